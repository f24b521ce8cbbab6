"""experiments/decode_bench.py and decode_overlap.py without a GPU: the lockstep case runner and
its stall guard (gloo ranks), the row arithmetic, the two-micro-batch schedules against a stand-in
for the low-latency path, and the argument checks. The GPU runs themselves are the scripts."""
import json
import os
import sys
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import decode_bench  # noqa: E402
import decode_overlap  # noqa: E402
from overlap.testing import RankFailed, run_distributed  # noqa: E402


# ---------------------------------------------------------------------------------------------- lockstep runner
def _runner_rank(rank, world_size, seed):
    finished = []
    runner = decode_bench.CaseRunner(rank, world_size, "t", case_timeout_s=30, grace_s=10,
                                     finish=lambda: finished.append(runner.count))
    value = float(torch.rand(1, generator=torch.Generator().manual_seed(seed + rank)))
    ok = runner.run("returns a value", lambda: {"v": value, "rank": rank})

    def fails_on_last_rank():
        if rank == world_size - 1:
            raise ValueError(f"boom {seed}")
        return rank

    bad = runner.run("fails on one rank", fails_on_last_rank)
    after = runner.run("runs after a failure", lambda: rank + 1)
    try:
        runner.run(f"named differently on rank {rank}", lambda: None)
        mismatch = None
    except RuntimeError as exc:
        mismatch = str(exc)
    runner.close(runner.control.close)
    return {"ok": (ok.ok, ok.values, ok.errors), "bad": (bad.ok, bad.values, bad.errors, bad.error_text()),
            "after": (after.ok, after.values), "mismatch": mismatch, "finished": finished, "mine": value}


def test_case_runner_keeps_ranks_in_lockstep_and_agrees_on_failures():
    W, seed = 2, int(torch.randint(0, 10_000, (1,)))
    results = run_distributed(_runner_rank, W, seed, backend="gloo", timeout_s=90)
    values = [r["mine"] for r in results]
    for r in results:   # every rank sees the same outcome of every case
        assert r["ok"] == (True, [{"v": values[q], "rank": q} for q in range(W)], {})
        ok, vals, errors, text = r["bad"]
        assert not ok and vals == list(range(W - 1)) + [None] and list(errors) == [W - 1]
        assert f"ValueError: boom {seed}" in errors[W - 1] and text.startswith(f"rank {W - 1}: ")
        assert r["after"] == (True, [q + 1 for q in range(W)])
        assert r["mismatch"] and "different cases" in r["mismatch"]
        assert r["finished"] == [1, 2, 3, 4]   # `finish` ran after every case, failed ones too


def _stall_rank(rank, world_size, nap_s):
    runner = decode_bench.CaseRunner(rank, world_size, "stalltest", case_timeout_s=1.5, grace_s=2.0)
    runner.run("quick case", lambda: rank)

    def stuck():
        if rank == 1:
            time.sleep(nap_s)   # stands for a GPU or NCCL wait that never returns
        return rank

    runner.run("stuck case", stuck)
    return "not reached"


def test_stall_guard_names_the_case_and_exits_nonzero(capfd):
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_distributed(_stall_rank, 2, 120.0, backend="gloo", timeout_s=100)
    elapsed = time.monotonic() - t0
    out, err = capfd.readouterr()
    text = out + err
    assert "exited with code 124" in str(info.value)
    assert "[stalltest] rank 1: STALL: case 2 'stuck case' did not finish within 1.5 s" in text
    assert "in stuck" in text   # the stuck rank's Python stack names the function it hangs in
    assert elapsed < 60, f"the guard should end the run within seconds, took {elapsed:.0f} s"


# ---------------------------------------------------------------------------------------------- arithmetic
def test_send_kernel_blocks_and_sms_in_flight():
    # DeepSeek decode sizes: 128 tokens x 7 chunks of 1024 channels = 896 warps = 224 blocks.
    assert decode_bench.send_kernel_blocks("dispatch", 128, 2, 128, 7168) == 224
    # The combine pack walks every received row slot: 2 ranks x 128 rows x 7 chunks / 4 warps.
    assert decode_bench.send_kernel_blocks("combine", 128, 2, 128, 7168) == 448
    assert decode_bench.send_kernel_blocks("combine", 128, 8, 4096, 7168) == 1024   # grid cap
    assert decode_bench.send_kernel_blocks("dispatch", 0, 2, 128, 7168) == 1        # empty batch still launches
    assert decode_bench.sms_in_flight("copy_engine", "dispatch", 128, 2, 128, 7168, 132) == 0
    assert decode_bench.sms_in_flight("sm", "dispatch", 128, 2, 128, 7168, 132) == 132
    assert decode_bench.sms_in_flight("sm", "dispatch", 8, 2, 128, 1024, 132) == 2
    assert decode_bench.sms_in_flight("nccl", "combine", 128, 2, 128, 7168, 132) is None


def test_reduce_row_takes_the_slowest_rank_and_mean_bytes():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, (1,))))
    t = (torch.rand(3, generator=g) * 50 + 10).tolist()
    timings = [{"time_us": t[i], "min_us": t[i] - 1} for i in range(3)]
    wire = torch.randint(1, 10**6, (3,), generator=g).tolist()
    logical = [w + 5 for w in wire]
    row = decode_bench.reduce_row({"op": "dispatch"}, timings, wire, logical)
    slow = max(t)
    assert row["time_us"] == slow and row["min_us"] == slow - 1
    assert row["wire_bytes_per_rank"] == pytest.approx(sum(wire) / 3)
    assert row["wire_gbps"] == pytest.approx(sum(wire) / 3 / slow / 1e3)
    assert row["logical_gbps"] == pytest.approx(sum(logical) / 3 / slow / 1e3)
    assert len(row["time_us_per_rank"].split()) == 3


def test_format_kernel_stamps_skips_missing_kernels():
    one = {"hook": {"start": (0.0, 0.0, 0.0), "prologue": (1.0, 1.25, 2.0), "rows": (3.0, 4.0, 5.5), "blocks": 128}}
    assert decode_bench.format_kernel_stamps(one) == "hook (128 blocks): prologue 1.00/1.25/2.00, rows 3.00/4.00/5.50"
    assert decode_bench.format_kernel_stamps({}) == ""


def test_results_paths():
    assert decode_bench.results_path("d", "decode_bench", 4, "graph") == os.path.join("d", "decode_bench_ws4.json")
    assert decode_bench.results_path("d", "decode_overlap", 2, "eager") == os.path.join("d",
                                                                                          "decode_overlap_eager_ws2.json")


# ---------------------------------------------------------------------------------------------- schedules
class FakeLowLatency:
    """Stands in for LowLatencyEP: the dispatch delivers the tokens unchanged and the combine returns
    them (identity experts). Outputs hold NaN until their hook ran, so a schedule that reads them
    early shows; every send and hook is logged; more than ``num_slots`` in flight raises.
    ``fail_on`` (a predicate on (kind, use_fp8, transport)) makes a call raise, as a broken
    transport would."""

    def __init__(self, log, names, num_slots=3, world_size=1, fail_on=None):
        self.log, self.names, self.num_slots, self.world_size = log, names, num_slots, world_size
        self.fail_on = fail_on or (lambda kind, fp8, transport: False)
        self.in_flight = {"dispatch": set(), "combine": set()}
        self.max_in_flight = Counter()
        self.hooks = Counter()
        self.issued = 0
        self.copy_unroll = 8

    def kernel_stamps(self):
        phases = {"start": (0.0, 0.1, 0.2), "prologue": (0.5, 0.6, 0.8), "end": (3.0, 3.5, 4.25)}
        return {"pack": dict(phases, blocks=4), "hook": dict(phases, blocks=2)}

    def _issue(self, kind, tag, fill):
        if len(self.in_flight[kind]) >= self.num_slots:
            raise RuntimeError(f"{self.num_slots} {kind}es already in flight")
        self.issued += 1
        op = (kind, tag, self.issued)
        self.in_flight[kind].add(op)
        self.max_in_flight[kind] = max(self.max_in_flight[kind], len(self.in_flight[kind]))
        self.log.append(("send", op))

        def hook():
            if self.hooks[op]:
                return
            self.hooks[op] += 1
            fill()
            self.in_flight[kind].discard(op)
            self.log.append(("hook", op))
        return hook

    def dispatch(self, x, topk_idx, topk_weights=None, *, use_fp8=False, return_recv_hook=False,
                 transport="copy_engine"):
        if self.fail_on("dispatch", use_fp8, transport):
            raise RuntimeError(f"stand-in failure: dispatch fp8={use_fp8} over {transport}")
        sent = x.clone()   # the pack reads x at send time
        recv = torch.full_like(x, float("nan"))
        T, W = x.shape[0], self.world_size
        slots = torch.randint(-1, T, (T, W), dtype=torch.int32)
        handle = SimpleNamespace(tag=self.names.get(id(topk_idx), "?"), received=False, token_slot=slots, num_tokens=T,
                                 src_counts=torch.randint(0, T + 1, (W,), dtype=torch.int32))

        def fill():
            recv.copy_(sent)
            handle.received = True

        hook = self._issue("dispatch", handle.tag, fill)
        if not return_recv_hook:
            hook()
        return recv, None, handle, hook

    def combine(self, y, topk_idx, topk_weights, handle, *, return_recv_hook=False, transport=None, out=None):
        if not handle.received:
            raise RuntimeError("combine before the dispatch's hook")
        # Identity experts hand back the received tokens; a stand-in expert output in the receive
        # layout (FP8 dispatch) combines to its first rows here.
        sent = y.reshape(-1, y.shape[-1])[:handle.num_tokens].clone()
        out = torch.full_like(sent, float("nan")) if out is None else out.fill_(float("nan"))
        hook = self._issue("combine", handle.tag, lambda: out.copy_(sent))
        if not return_recv_hook:
            hook()
        return out, hook

    def check_status(self, wait=True):
        pass


class LoggedAttention:
    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def part1(self, x):
        self.log.append(("compute", "part1"))
        return self.inner.part1(x)

    def part2(self, x):
        self.log.append(("compute", "part2"))
        return self.inner.part2(x)


def _flights(log):
    """For each send: how many attention parts ran before its hook."""
    hooks = {op: i for i, (what, op) in enumerate(log) if what == "hook"}
    return {op: sum(1 for what, _ in log[i + 1:hooks[op]] if what == "compute")
            for i, (what, op) in enumerate(log) if what == "send"}


def test_fp8_schedules_dispatch_in_fp8_and_combine_the_stand_in_output():
    seed = int(torch.randint(0, 10_000, (1,)))
    attn = decode_overlap.MLALikeAttention(64, 4, 8, 6, "cpu", q_lora=32, kv_lora=16, rope=8, nope=8, v_dim=8)
    mbs = decode_overlap.make_micro_batches(6, 64, 16, 4, seed=seed, device="cpu")
    y = torch.randn(4, 6, 64).to(torch.bfloat16)   # [local experts, W * M, hidden]
    outputs = {}
    for schedule in ("sequential", "overlapped"):
        fake = FakeLowLatency([], {})
        fp8_flags = []
        dispatch = fake.dispatch

        def logged_dispatch(*a, use_fp8=False, **k):
            fp8_flags.append(use_fp8)
            return dispatch(*a, use_fp8=use_fp8, **k)

        fake.dispatch = logged_dispatch
        outputs[schedule] = getattr(decode_overlap, f"run_{schedule}")(attn, fake, mbs, 2, "copy_engine", y_fp8=y)
        assert fp8_flags and all(fp8_flags)
    assert all(torch.equal(a, b) for a, b in zip(outputs["sequential"], outputs["overlapped"]))
    assert torch.equal(outputs["sequential"][0], y.reshape(-1, 64)[:6])   # the combine of the stand-in


@pytest.mark.parametrize("layers", [1, 3])
def test_overlapped_schedule_does_the_sequential_work_under_cover(layers):
    seed = int(torch.randint(0, 10_000, (1,)))
    attn = decode_overlap.MLALikeAttention(64, 4, 8, 6, "cpu", q_lora=32, kv_lora=16, rope=8, nope=8, v_dim=8)
    mbs = decode_overlap.make_micro_batches(6, 64, 16, 4, seed=seed, device="cpu")
    names = {id(m["idx"]): n for n, m in mbs.items()}
    outputs, logs, fakes = {}, {}, {}
    for schedule in ("compute_only", "sequential", "overlapped"):
        log = logs[schedule] = []
        fake = fakes[schedule] = FakeLowLatency(log, names)
        logged = LoggedAttention(attn, log)
        if schedule == "compute_only":
            outputs[schedule] = decode_overlap.run_compute_only(logged, mbs, layers)
        else:
            run = getattr(decode_overlap, f"run_{schedule}")
            outputs[schedule] = run(logged, fake, mbs, layers, "copy_engine")
    ref = outputs["compute_only"]
    assert all(torch.isfinite(t.float()).all() for t in ref)
    for schedule in ("sequential", "overlapped"):
        # Identity experts: the MoE changes nothing, so any hook read too early (NaN) or any
        # mixed-up micro-batch shows as a difference from the communication-free result.
        assert all(torch.equal(a, b) for a, b in zip(outputs[schedule], ref)), schedule
        fake = fakes[schedule]
        sends = [op for what, op in logs[schedule] if what == "send"]
        assert Counter((kind, tag) for kind, tag, _ in sends) == {
            (k, mb): layers for k in ("dispatch", "combine") for mb in "AB"}
        assert all(fake.hooks[op] == 1 for op in sends) and not any(fake.in_flight.values())
        assert max(fake.max_in_flight.values()) <= fake.num_slots
        parts = Counter(part for what, part in logs[schedule] if what == "compute")
        assert parts == {"part1": 2 * layers, "part2": 2 * layers}   # the same attention work
    assert all(n == 0 for n in _flights(logs["sequential"]).values())
    covered = _flights(logs["overlapped"])
    exposed = [op for op, n in covered.items() if n == 0]
    # Only A's last dispatch and combine (the drain) fly with no attention part to cover them.
    assert sorted((kind, tag) for kind, tag, _ in exposed) == [("combine", "A"), ("dispatch", "A")]
    assert max(fakes["overlapped"].max_in_flight.values()) == 1
    # Hooks as late as their results allow: a combine's hook runs just before the attention that
    # reads its output (after any send that does not need it), a dispatch's just before its combine.
    log = logs["overlapped"]
    for i, (what, op) in enumerate(log):
        if what == "hook":
            after = log[i + 1] if i + 1 < len(log) else None
            if op[0] == "combine":   # (at the drain, the next hook follows at once)
                assert after is None or after[0] in ("compute", "hook"), (i, log[i - 2:i + 2])
            else:
                assert after[0] == "send" and after[1][:2] == ("combine", op[1]), (i, log[i - 2:i + 2])


# ---------------------------------------------------------------------------------------------- rank bodies
class FakeEPBuffer:
    """Stands in for EPBuffer: its low-latency state is a FakeLowLatency (see _use_stand_ins)."""

    fail_on = None

    def __init__(self, group=None, *, num_experts, hidden, max_tokens_per_rank, backend="torch", num_sms=20,
                 validate_values=True, device=None):
        import torch.distributed as dist

        self.ll = FakeLowLatency([], {}, world_size=dist.get_world_size(), fail_on=FakeEPBuffer.fail_on)
        self.rank, self.world_size, self.hidden = dist.get_rank(), dist.get_world_size(), hidden
        self.num_local_experts, self.max_tokens_per_rank = num_experts // self.world_size, max_tokens_per_rank


def _fake_graph_replay(fn, *, warmup=3, iters=50, replays_per_sample=10, profile_replays=0):
    samples = []
    for _ in range(warmup):
        fn()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    out = {"time_us": sorted(samples)[len(samples) // 2], "min_us": min(samples), "max_us": max(samples),
           "iters": iters}
    if profile_replays:
        out["device_us_by_name"] = f"stand_in_kernel=1.0us x{profile_replays}"
        out["replay_timeline"] = "stand_in_kernel@0.0-1.0"
    return out


def _use_stand_ins(fail_on):
    """CPU stand-ins for what the GPU rank bodies call: the device, synchronisation, graph replay,
    EPBuffer and its low-latency state. Runs in the spawned rank, before the body."""
    import overlap.ep
    import overlap.ep.low_latency as low_latency

    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_device_properties = lambda *a, **k: SimpleNamespace(multi_processor_count=132)
    for module in (decode_bench, decode_overlap):
        module.rank_device = lambda: torch.device("cpu")
    decode_bench.time_graph_replay = _fake_graph_replay
    FakeEPBuffer.fail_on = fail_on
    overlap.ep.EPBuffer = FakeEPBuffer
    low_latency.low_latency_state = lambda buffer, num_slots=None: buffer.ll


def _fp8_dispatch_fails_on_rank_1_over_sm(rank):
    return lambda kind, fp8, transport: rank == 1 and kind == "dispatch" and fp8 and transport == "sm"


def _bench_body(rank, world_size, args):
    _use_stand_ins(_fp8_dispatch_fails_on_rank_1_over_sm(rank))
    return decode_bench._bench_rank(rank, world_size, args)


def _overlap_body(rank, world_size, args):
    _use_stand_ins(None)
    return decode_overlap._rank(rank, world_size, args)


def _script_args(script, tmp_path, *extra):
    argv = ["--world-size", "1", "--transports", "copy_engine", "sm", "nccl", "--warmup", "1", "--iters", "3",
            "--experts", "8", "--topk", "2", "--tokens", "6", "--case-timeout", "60", "--out", str(tmp_path), *extra]
    p = decode_bench.argparse.ArgumentParser()
    for flag, kind in (("--world-size", int), ("--tokens", int), ("--hidden", int), ("--topk", int),
                       ("--experts", int), ("--heads", int), ("--ctx", int)):
        p.add_argument(flag, type=kind, default=64)
    p.add_argument("--layers", type=int, nargs=2, default=[1, 2])
    p.add_argument("--profile", default=None)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--dispatch-dtypes", nargs="+", default=["bf16", "fp8"])
    p.add_argument("--stamps", action="store_true")
    decode_bench.add_run_arguments(p, warmup=1, iters=3)
    args = p.parse_args(argv)
    args.world_size = 2
    args.command = f"test {script}"
    args.results_path = decode_bench.results_path(str(tmp_path), script, 2, args.timing)
    return args


def test_bench_rank_body_runs_every_case_and_skips_after_a_failure(tmp_path):
    """The GPU body on CPU stand-ins: all transports in lockstep; the fp8 dispatch failing on one
    rank only fails that case everywhere, skips the transport's combine, and nccl still runs."""
    args = _script_args("decode_bench", tmp_path, "--profile-replays", "2", "--stamps")
    rows = run_distributed(_bench_body, 2, args, backend="gloo", timeout_s=120)[0]
    data = json.loads(open(args.results_path).read())
    assert data["meta"]["partial"] is False and data["meta"]["study"] == "decode_bench"
    assert data["rows"] == rows
    got = {(r["transport"], r["op"], r.get("dtype")): r for r in rows}
    assert list(got) == [(t, op, d) for t in ("copy_engine", "sm", "nccl")
                         for op, d in (("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16"))]
    failed = got[("sm", "dispatch", "fp8")]
    assert "time_us" not in failed and "rank 1: RuntimeError: stand-in failure" in failed["error"]
    assert "after the failure of 'sm: dispatch fp8" in got[("sm", "combine", "bf16")]["skipped"]
    measured = [r for r in rows if "time_us" in r]
    assert len(measured) == 7
    for r in measured:
        assert all(not isinstance(v, (dict, list, tuple)) for v in r.values())
        assert r["time_us"] > 0 and r["wire_bytes_per_rank"] >= 0 and r["world_size"] == 2
        assert r["device_us_by_name_slowest_rank"] == "stand_in_kernel=1.0us x2"   # --profile-replays 2
        assert r["replay_timeline_slowest_rank"] == "stand_in_kernel@0.0-1.0"
        assert r["hook_copy_unroll"] == 8
        assert r["kernel_stamps_slowest_rank"] == ("pack (4 blocks): prologue 0.50/0.60/0.80, end 3.00/3.50/4.25; "
                                                   "hook (2 blocks): prologue 0.50/0.60/0.80, end 3.00/3.50/4.25")
        sm_blocks = decode_bench.send_kernel_blocks(r["op"], 6, 2, 6, 64)   # 6 tokens, hidden 64
        assert r["num_sms"] == {"copy_engine": 0, "sm": sm_blocks, "nccl": None}[r["transport"]]


def test_overlap_rank_body_reports_every_schedule_and_profiles_them(tmp_path, capsys):
    """Every schedule of every transport measured in lockstep; with --profile, one trace per
    (schedule, rank) too, analysed into op=trace rows, and the table prints them."""
    prof = tmp_path / "prof"
    args = _script_args("decode_overlap", tmp_path, "--timing", "eager", "--heads", "4", "--ctx", "8",
                        "--profile", str(prof), "--profile-steps", "2")
    rows = run_distributed(_overlap_body, 2, args, backend="gloo", timeout_s=120)[0]
    data = json.loads(open(args.results_path).read())
    assert data["meta"]["partial"] is False and data["meta"]["target_ratio"] == decode_overlap.TARGET_RATIO
    assert data["rows"] == rows
    layer = [r for r in rows if r["op"] == "decode_layer"]
    assert [(r["schedule"], r["transport"], r["dtype"]) for r in layer] == [("compute_only", None, None)] + [
        (s, t, d) for t in ("copy_engine", "sm", "nccl") for d in ("bf16", "fp8") for s in ("sequential", "overlapped")]
    assert all(r["experts_compute"] == ("identity" if r["dtype"] == "bf16" else "fixed bf16 output")
               for r in layer[1:])
    base = layer[0]["time_us"]
    for r in layer:
        assert r["layers_lo"] == 1 and r["layers_hi"] == 2
        assert r["time_us"] == pytest.approx(r["replay_us_hi"] - r["replay_us_lo"])
        assert r["ratio_to_compute_only"] == pytest.approx(r["time_us"] / base)
    for r in layer[1:]:
        assert r["hook_copy_unroll"] == 8
        sm_blocks = decode_bench.send_kernel_blocks("combine", 6, 2, 6, 64)   # the larger of the two sends
        assert r["sms_during_flight"] == {"copy_engine": 0, "sm": sm_blocks, "nccl": None}[r["transport"]]
        assert ("meets_target" in r) == (r["schedule"] == "overlapped")
        if r["schedule"] == "overlapped":
            assert r["exposed_budget_us_per_layer"] == pytest.approx((decode_overlap.TARGET_RATIO - 1) * base)
    traces = [r for r in rows if r["op"] == "trace"]
    assert [(r["schedule"], r["transport"], r["rank"]) for r in traces] == [
        (r["schedule"], r["transport"], rank) for r in layer for rank in (0, 1)]
    for r in traces:
        assert "error" not in r, r
        path = prof / r["trace_file"]
        tag = "" if r["transport"] is None else "_" + r["transport"] + ("_fp8" if r["dtype"] == "fp8" else "")
        assert path.name == f"decode_overlap_{r['schedule']}{tag}_ws2_rank{r['rank']}.json.gz"
        assert path.stat().st_size > 0
        assert r["mode"] == "cpu" and r["profile_steps"] == 2 and r["layers"] == 2
        assert r["span_us_per_replay"] > 0 and r["transfer_us_per_replay"] is None   # CPU: no copies
        assert all(not isinstance(v, (dict, list, tuple)) for v in r.values())
    decode_overlap.print_summary(rows)
    out = capsys.readouterr().out
    assert "traced replays" in out and out.count("overlapped") >= 12 and "failed" not in out


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("script, argv, message", [
    (decode_bench, ["--world-size", "64"], "needs 64 GPUs"),
    (decode_overlap, ["--world-size", "64"], "needs 64 GPUs"),
    (decode_overlap, ["--layers", "3", "3"], "L_LO < L_HI"),
    (decode_overlap, ["--layers", "0", "2"], "L_LO < L_HI"),
    (decode_overlap, ["--profile-steps", "0"], "--profile-steps must be >= 1"),
    (decode_overlap, ["--profile-replays", "5"], "unrecognized arguments: --profile-replays"),   # see --profile
])
def test_bad_arguments_are_rejected_before_any_rank_starts(script, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
