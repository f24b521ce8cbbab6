#!/usr/bin/env python3
"""Two-micro-batch decode layer: one micro-batch's attention runs while the other's tokens fly.

    python experiments/decode_overlap.py --world-size 4 --out experiments/results

Each micro-batch (128 tokens per GPU by default) runs an MLA-like attention split in two parts
(part 1: q/kv down- and up-projections and a memory-bound attention core over a KV cache;
part 2: per-head value up-projection and the output projection), then a low-latency dispatch,
the experts (identity here: the study is about communication) and a combine. Per layer, on one
stream, every transfer of one micro-batch flies under an attention part of the other, and every
hook is called as late as its result allows (a hook spins on the SMs until its data is there):

    A.part1 | dB flies ; hook dB, send cB ; A.part2 | cB flies ; send dA, hook cB ;
    B.part1 | dA flies ; hook dA, send cA ; B.part2 | cA flies ; send dB, hook cA (dB: next layer)

The dispatch runs in bf16 and in FP8 (``--dispatch-dtypes``; FP8 is DeepSeek's decode setting,
and its experts output a fixed bf16 tensor instead of the identity); the combine is bf16.
B's first attention (fill) and A's last two transfers (drain) are exposed once per replay. Three
schedules run under CUDA-graph replay, for each transport: `compute_only` (the same attention
work, no communication), `sequential` (every transfer waited for at once: the layer without
overlap) and `overlapped` (above). Each is captured with two layer counts L_lo < L_hi and the
per-layer time is the slope (replay(L_hi) - replay(L_lo)) / (L_hi - L_lo): the steady state,
with fill and drain cancelled. The slowest rank's median replay counts. `sms_during_flight` =
SMs our communication holds while data is in flight (0 for copy engines; the send kernel's
blocks for sm; unknown, None, for NCCL's own kernel). `hidden_comm_share` = share of the
sequential layer's communication time (sequential - compute_only) that the overlapped layer hid.
Target (issue 5, 4 H200): overlapped at most 1.1x compute_only.

What can hide: only the time a transfer is in flight with no SM held (the copies, and the
dependency latency before and after them). The pack and hook kernels hold SMs on the compute
stream, so they add to the layer in every schedule: overlap cannot beat compute_only + their
time (~120 us per layer on 2 H200 in the first decode trace: dispatch pack 11 us, dispatch hook
24 us, combine pack 15 us, combine hook 9 us per micro-batch). `--profile` measures them.

`--profile DIR` (off by default) also traces `--profile-steps` replays of compute_only and of
each transport's sequential and overlapped layer at L_hi with torch.profiler (one
Chrome trace per rank: DIR/decode_overlap_{schedule}[_{transport}]_ws{N}_rank{r}.json.gz) and
adds `op="trace"` rows: overlap.profiling's breakdown of each rank's trace (zero-SM transfer
time and the share compute covered, SM-holding comm kernel time, time hooks waited for a peer,
GPU idle share), per replay and per layer. Writes decode_overlap_ws{N}.json; lockstep cases,
per-case stall guard and partial results as in decode_bench.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

from overlap.bench import capture_graph  # noqa: E402
from decode_bench import (CaseRunner, ResultsSink, add_run_arguments, add_size_arguments,  # noqa: E402
                          check_run_arguments, launch, rank_device, release, sms_in_flight, time_case)

TARGET_RATIO = 1.1   # overlapped / compute_only, issue 5 (4 H200)
# The copy-engine transport copies into peer memory mapped on this GPU, which the profiler may record
# as a device-to-device copy on the local GPU rather than as a peer copy. The decode layer issues no
# local cudaMemcpy of its own, so every such copy in its trace is a transfer.
COPY_ENGINE_COMM = (r"^Memcpy DtoD",)
# Figures of overlap.profiling's analysis that the op="trace" rows carry, per replay.
TRACE_KEYS = ("span_us", "busy_us", "comm_us", "compute_us", "overlapped_us", "exposed_us", "transfer_us",
              "transfer_overlapped_us", "comm_kernel_us", "comm_wait_us", "idle_us", "host_bound",
              "copy_start_lag_us", "comm_sms_mode", "comm_mean_sms")


class MLALikeAttention:
    """DeepSeek-V3-sized projections for decode (weights random, bf16); no real softmax semantics needed."""

    def __init__(self, hidden, heads, ctx, tokens, device, q_lora=1536, kv_lora=512, rope=64, nope=128, v_dim=128):
        g = torch.Generator(device="cpu").manual_seed(7)

        def p(*shape):
            return (torch.randn(*shape, generator=g) / shape[-2] ** 0.5).to(device, torch.bfloat16)

        self.heads, self.kv_dim, self.kv_lora = heads, kv_lora + rope, kv_lora
        self.wq_a, self.wq_b = p(hidden, q_lora), p(q_lora, heads * (nope + rope))
        self.wkv_a = p(hidden, kv_lora + rope)
        self.w_qabs = p(heads, nope + rope, kv_lora + rope)     # absorbed q -> latent
        self.w_vup = p(heads, kv_lora, v_dim)
        self.wo = p(heads * v_dim, hidden)
        # One latent KV cache per token (decode: each token attends over its own context).
        self.cache = (torch.randn(tokens, ctx, kv_lora + rope, generator=g) * 0.1).to(device, torch.bfloat16)

    def part1(self, x):
        T = x.shape[0]
        q = ((x @ self.wq_a) @ self.wq_b).view(T, self.heads, -1)
        _ = x @ self.wkv_a  # the new token's latent (would be appended to the cache)
        q_lat = torch.einsum("thd,hdk->thk", q, self.w_qabs)                 # [T, H, 576]
        scores = torch.bmm(q_lat, self.cache.transpose(1, 2)) * 0.04         # [T, H, ctx]
        probs = torch.softmax(scores.float(), dim=-1).to(torch.bfloat16)
        return torch.bmm(probs, self.cache[:, :, :self.kv_lora])             # [T, H, 512]

    def part2(self, o_lat):
        T = o_lat.shape[0]
        v = torch.einsum("thk,hkv->thv", o_lat, self.w_vup).reshape(T, -1)
        return v @ self.wo                                                    # [T, hidden]


def make_micro_batches(tokens, hidden, experts, topk, seed, device):
    """Micro-batches A and B: bf16 activations and a uniform top-k routing with softmax weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mbs = {}
    for name in "AB":
        idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices.to(device)
        w = torch.softmax(torch.randn(tokens, topk, generator=gen), dim=1).to(device)
        mbs[name] = {"x": (torch.randn(tokens, hidden, generator=gen) * 0.5).to(device, torch.bfloat16),
                     "idx": idx, "w": w}
    return mbs


# ------------------------------------------------------------------------------------ schedules
# `ll` is a LowLatencyEP (or anything with its dispatch/combine signature). The experts are the
# identity: a micro-batch's MoE output is the combine of its own dispatched rows.
def run_compute_only(attn, mbs, layers):
    """Both micro-batches' attention for ``layers`` layers, no communication."""
    xa, xb = mbs["A"]["x"], mbs["B"]["x"]
    for _ in range(layers):
        xa = attn.part2(attn.part1(xa))
        xb = attn.part2(attn.part1(xb))
    return xa, xb


def stand_in_experts(recv, y_fp8=None):
    """The experts of this study: the identity on bf16 tokens. After an FP8 dispatch, a fixed bf16
    output ``y_fp8`` in the receive layout (a real expert GEMM reads the e4m3 values and scales and
    writes bf16; expert compute is not part of this study, and the combine moves the same bytes)."""
    return recv if y_fp8 is None else y_fp8


def run_sequential(attn, ll, mbs, layers, transport, y_fp8=None):
    """Attention, then dispatch and combine waited for at once, A then B: the layer without overlap.
    ``y_fp8``: dispatch in FP8, and the experts output it (see :func:`stand_in_experts`)."""
    def moe(x, m):
        recv, _, handle, _ = ll.dispatch(x, m["idx"], m["w"], use_fp8=y_fp8 is not None, transport=transport)
        return ll.combine(stand_in_experts(recv, y_fp8), None, None, handle)[0]

    xa, xb = mbs["A"]["x"], mbs["B"]["x"]
    for _ in range(layers):
        xa = moe(attn.part2(attn.part1(xa)), mbs["A"])
        xb = moe(attn.part2(attn.part1(xb)), mbs["B"])
    return xa, xb


def run_overlapped(attn, ll, mbs, layers, transport, y_fp8=None):
    """The module docstring's schedule: the same work as :func:`run_sequential`, and the same
    result, with each transfer of one micro-batch in flight under an attention part of the other."""
    A, B = mbs["A"], mbs["B"]

    def send_dispatch(x, m):
        recv, _, handle, hook = ll.dispatch(x, m["idx"], m["w"], use_fp8=y_fp8 is not None, return_recv_hook=True,
                                            transport=transport)
        return recv, handle, hook

    def send_combine(recv, handle):
        return ll.combine(stand_in_experts(recv, y_fp8), None, None, handle, return_recv_hook=True)

    xa, xb = A["x"], None
    rb, hb, hook_db = send_dispatch(attn.part2(attn.part1(B["x"])), B)   # fill: B's layer-0 attention
    for layer in range(layers):
        last = layer + 1 == layers
        a1 = attn.part1(xa)                          # dB flies
        hook_db()
        xb, hook_cb = send_combine(rb, hb)
        a2 = attn.part2(a1)                          # cB flies
        # dA's pack first, while a2 is fresh in L2; cB gets the pack's time too before its hook.
        ra, ha, hook_da = send_dispatch(a2, A)
        hook_cb()
        b1 = None if last else attn.part1(xb)        # dA flies (drain: nothing left to cover it)
        hook_da()
        xa, hook_ca = send_combine(ra, ha)
        b2 = None if last else attn.part2(b1)        # cA flies
        if not last:
            rb, hb, hook_db = send_dispatch(b2, B)
        hook_ca()
    return xa, xb


# ------------------------------------------------------------------------------------ rank body
def _rank(rank, world_size, args):
    dev = rank_device()
    runner = CaseRunner(rank, world_size, "decode_overlap", case_timeout_s=args.case_timeout,
                        finish=torch.cuda.synchronize)
    sink = ResultsSink(rank, args, "decode_overlap", timing=args.timing, case_timeout_s=args.case_timeout,
                       tokens_per_micro_batch=args.tokens, ctx=args.ctx, heads=args.heads,
                       experts_compute="identity (bf16 dispatch); a fixed bf16 output (fp8 dispatch)",
                       layers_lo=args.layers[0], layers_hi=args.layers[1], target_ratio=TARGET_RATIO)
    kept = []   # buffers live until teardown (peers map them until then)
    _study(runner, sink, kept, args, rank, world_size, dev)
    runner.close(lambda: release(kept, runner))
    sink.save(partial=False)
    return sink.rows if rank == 0 else None


def _study(runner, sink, kept, args, rank, world_size, dev):
    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    lo, hi = args.layers
    base = {"op": "decode_layer", "num_tokens": T, "micro_batches": 2, "hidden": H, "topk": K, "num_experts": E,
            "heads": args.heads, "ctx": args.ctx, "layers_lo": lo, "layers_hi": hi,
            "timing": ("cuda_graph_replay" if args.timing == "graph" else "eager")
                      + ", per layer = (replay(L_hi) - replay(L_lo)) / (L_hi - L_lo)", "world_size": world_size}
    work = {}

    def setup_compute():
        work["attn"] = MLALikeAttention(H, args.heads, args.ctx, T, dev)
        work["mbs"] = make_micro_batches(T, H, E, K, seed=10 + rank, device=dev)

    def per_layer(label, make_fn, check=None):
        """Replay time (slowest rank) at L_lo and L_hi, one case each -> (row fields, error text)."""
        times = {}
        for L in (lo, hi):
            def case(L=L):
                t = time_case(make_fn(L), args, runner.control)
                if check is not None:
                    check()   # a kernel timeout during the replays surfaces here, naming this case
                return t

            res = runner.run(f"{label}, L={L}", case)
            if not res.ok:
                return None, res.error_text()[:500]
            times[L] = max(t["time_us"] for t in res.values)
        return {"replay_us_lo": times[lo], "replay_us_hi": times[hi],
                "time_us": (times[hi] - times[lo]) / (hi - lo)}, None

    def profile(label, make_fn, check=None):
        """--profile: trace replays of the L_hi layer on every rank -> the case's result (each rank's
        trace path), or None without --profile."""
        if not args.profile:
            return None
        prefix = os.path.join(args.profile, f"decode_overlap_{label}_ws{world_size}.json.gz")

        def case():
            from overlap.profiling import capture_trace

            fn = make_fn(hi)
            step = capture_graph(fn).replay if args.timing == "graph" else fn
            # The runner has just lined the ranks up; a process-group barrier would put NCCL in the
            # control path the runner keeps it out of.
            path = capture_trace(step, prefix, warmup=1, active=args.profile_steps, barrier=False)
            if check is not None:
                check()
            return path

        return runner.run(f"{label}: profile {args.profile_steps} replays at L={hi}", case)

    def add_traces(cases, comm=()):
        """Rank 0: op=trace rows of profiled (row, result) pairs analysed together."""
        cases = [(where, res) for where, res in cases if res is not None]
        if rank == 0 and cases:
            for row in trace_rows(cases, args.profile_steps, hi, args.profile, comm=comm):
                sink.add(row)

    compute_row = {**base, "schedule": "compute_only", "backend": "none", "transport": None, "dtype": None}
    res = runner.run("compute setup (attention weights, KV cache, micro-batches)", setup_compute)
    if not res.ok:
        sink.add({**compute_row, "error": res.error_text()[:500]})
        return
    attn, mbs = work["attn"], work["mbs"]
    compute, err = per_layer("compute_only", lambda L: (lambda: run_compute_only(attn, mbs, L)))
    if compute is None:
        sink.add({**compute_row, "error": err})
        return
    sink.add({**compute_row, "num_sms": None, "sms_during_flight": None, **compute, "ratio_to_compute_only": 1.0})
    add_traces([(compute_row, profile("compute_only", lambda L: (lambda: run_compute_only(attn, mbs, L))))])
    # The communication a layer may still expose and meet the target.
    budget = (TARGET_RATIO - 1.0) * compute["time_us"]

    def measure(ll, where, sms, y_fp8) -> bool:
        """Both schedules of one transport and dispatch dtype (rows, and traces with --profile);
        False once a case failed."""
        transport, tag = where["transport"], where["transport"] + ("" if y_fp8 is None else "_fp8")
        measured, profiled, ok = {}, [], True
        for schedule, run in (("sequential", run_sequential), ("overlapped", run_overlapped)):
            make = (lambda L, run=run: (lambda: run(attn, ll, mbs, L, transport, y_fp8)))
            fields, err = per_layer(f"{tag}: {schedule}", make, check=ll.check_status)
            if fields is None:
                sink.add({**where, "schedule": schedule, "error": err})
                ok = False
                break
            measured[schedule] = fields["time_us"]
            row = {**where, "schedule": schedule, "num_sms": sms, "sms_during_flight": sms, **fields,
                   "ratio_to_compute_only": fields["time_us"] / compute["time_us"],
                   "exposed_us_per_layer": fields["time_us"] - compute["time_us"]}
            if schedule == "overlapped":
                row["target_ratio"] = TARGET_RATIO
                row["meets_target"] = row["ratio_to_compute_only"] <= TARGET_RATIO
                row["exposed_budget_us_per_layer"] = budget
                comm = measured["sequential"] - compute["time_us"]
                if comm > 0:
                    # Share of the sequential layer's communication time that the overlap hid.
                    row["hidden_comm_share"] = (measured["sequential"] - fields["time_us"]) / comm
            sink.add(row)
            res = profile(f"{schedule}_{tag}", make, check=ll.check_status)
            profiled.append(({**where, "schedule": schedule}, res))
            if res is not None and not res.ok:
                ok = False
                break
        # Both schedules' traces together: the sequential hooks' time beyond the overlapped ones'
        # fastest launch is their wait for data in flight.
        add_traces(profiled, comm=COPY_ENGINE_COMM if transport == "copy_engine" else ())
        return ok

    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    for transport in args.transports:
        where = {**base, "backend": f"ll_{transport}", "transport": transport}
        holder = {}
        kept.append(holder)
        res = runner.run(f"{transport}: setup (EPBuffer, low-latency state)",
                         lambda holder=holder: holder.update(_setup_transport(args, dev)))
        if not res.ok:
            sink.add({**where, "schedule": "setup", "error": res.error_text()[:500]})
            continue
        ll = holder["ll"]
        where["hook_copy_unroll"] = ll.copy_unroll
        per_op = [sms_in_flight(transport, op, T, world_size, T, H, sm_count) for op in ("dispatch", "combine")]
        sms = None if None in per_op else max(per_op)
        for dtype in args.dispatch_dtypes:
            y_fp8 = None
            if dtype == "fp8":
                res = runner.run(f"{transport}: stand-in expert output for the FP8 dispatch",
                                 lambda: holder.update(y_fp8=_stand_in_output(holder["buf"], dev)))
                if not res.ok:
                    sink.add({**where, "dtype": dtype, "schedule": "setup", "error": res.error_text()[:500]})
                    break
                y_fp8 = holder["y_fp8"]
            if not measure(ll, {**where, "dtype": dtype,
                                "experts_compute": "identity" if y_fp8 is None else "fixed bf16 output"}, sms, y_fp8):
                break   # this transport's state may be out of step: leave it


def _stand_in_output(buf, dev):
    """The experts' bf16 output after an FP8 dispatch (see stand_in_experts): random, in the receive
    layout ``[E/W, W * M, hidden]``."""
    g = torch.Generator(device=dev).manual_seed(11 + buf.rank)
    shape = (buf.num_local_experts, buf.world_size * buf.max_tokens_per_rank, buf.hidden)
    return (torch.randn(shape, generator=g, device=dev) * 0.5).to(torch.bfloat16)


def trace_rows(cases: list, steps: int, layers: int, out_dir: str, comm=()) -> list:
    """``op="trace"`` rows of profiled cases, ``[(row fields, CaseResult)]`` (``res.values``: each
    rank's trace path). The traces of all of them are analysed together, so one wait baseline
    (each comm kernel's fastest launch in any of them) serves every rank and schedule. Figures are
    per replay and per layer (a replay holds ``layers`` layers, fill and drain included)."""
    from overlap.profiling import analyze_ranks

    out, paths, owners = [], [], []
    for where, res in cases:
        row = {**where, "op": "trace", "profile_steps": steps, "layers": layers}
        if not res.ok:
            out.append({**row, "error": res.error_text()[:500]})
            continue
        for rank, path in enumerate(res.values):
            paths.append(path)
            owners.append({**row, "rank": rank, "trace_file": os.path.relpath(path, out_dir)})
    for row, a in zip(owners, analyze_ranks(paths, comm=comm) if paths else []):
        dev = max(a.devices, key=lambda d: (d.comm_us, d.busy_us))
        figures = {k: getattr(dev, k) for k in TRACE_KEYS}
        per_replay = {f"{k}_per_replay": (v / steps if isinstance(v, float) else v) for k, v in figures.items()
                      if k not in ("host_bound", "copy_start_lag_us", "comm_sms_mode", "comm_mean_sms")}
        per_layer = {f"{k}_per_layer": figures[k] / steps / layers
                     for k in ("comm_kernel_us", "transfer_us", "comm_wait_us", "exposed_us")
                     if isinstance(figures[k], float)}
        share = dev.transfer_overlap_share
        out.append({**row, "mode": a.mode, **per_replay, **per_layer,
                    "host_bound": figures["host_bound"], "copy_start_lag_us": figures["copy_start_lag_us"],
                    "comm_sms_mode": figures["comm_sms_mode"], "comm_mean_sms": figures["comm_mean_sms"],
                    "overlap_pct": None if dev.overlap_share is None else 100.0 * dev.overlap_share,
                    "transfer_overlap_pct": None if share is None else 100.0 * share,
                    "idle_pct": None if dev.idle_share is None else 100.0 * dev.idle_share})
    return out


def _setup_transport(args, dev):
    """A fresh EPBuffer and its low-latency state (collective, outside any capture)."""
    from overlap.ep import EPBuffer
    from overlap.ep.low_latency import low_latency_state

    buf = EPBuffer(None, num_experts=args.experts, hidden=args.hidden, max_tokens_per_rank=args.tokens,
                   backend="torch", validate_values=False, device=dev)
    return {"buf": buf, "ll": low_latency_state(buf)}


# ------------------------------------------------------------------------------------ driver
def main(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(p, gpus, tokens_help="tokens per micro-batch per rank")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--ctx", type=int, default=1024, help="KV-cache length each token attends over")
    p.add_argument("--layers", type=int, nargs=2, default=[2, 6], metavar=("L_LO", "L_HI"),
                   help="the two layer counts captured per schedule; per-layer time is the slope between them")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace compute_only and each transport's sequential and overlapped layer at L_HI with "
                        "torch.profiler, one Chrome trace per rank in DIR, and add op=trace rows (off by default)")
    p.add_argument("--profile-steps", type=int, default=3, help="replays per profiled trace")
    p.add_argument("--dispatch-dtypes", nargs="+", default=["bf16", "fp8"], choices=("bf16", "fp8"),
                   help="dispatch in bf16 (identity experts) and/or FP8 e4m3 (DeepSeek's decode setting; the experts "
                        "then output a fixed bf16 tensor); the combine is bf16 either way")
    add_run_arguments(p, warmup=3, iters=20, profile_replays=False)   # per-layer slopes: see --profile
    args = p.parse_args(argv)
    lo, hi = args.layers
    if not 1 <= lo < hi:
        p.error(f"--layers needs 1 <= L_LO < L_HI, got {lo} {hi}")
    if args.profile_steps < 1:
        p.error(f"--profile-steps must be >= 1, got {args.profile_steps}")
    if args.profile is not None:
        args.profile = os.path.abspath(args.profile)
    check_run_arguments(p, args, gpus)
    print(f"[decode_overlap] {args.world_size} GPUs: 2 micro-batches x {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"{args.heads} heads, ctx {args.ctx}, top-{args.topk} of {args.experts} experts, layers {lo} and {hi}, "
          f"transports {' '.join(args.transports)}, timing {args.timing}", flush=True)
    rows = launch("decode_overlap", _rank, args, argv)
    print_summary(rows)
    print(f"[decode_overlap] wrote {args.results_path}", flush=True)
    if any("error" in r for r in rows):
        sys.exit(1)
    return rows


def print_summary(rows: list) -> None:
    """The per-layer table (and, with --profile, each traced replay's breakdown)."""
    layer_rows = [r for r in rows if r["op"] == "decode_layer"]
    print(f"\n{'schedule':<14}{'transport':<13}{'dispatch':<9}{'SMs in flight':>14}{'us/layer':>10}{'x compute':>11}"
          f"{'exposed us':>12}{'hidden':>8}")
    for r in layer_rows:
        dtype = str(r.get("dtype") or "-")
        if "time_us" not in r:
            print(f"{r['schedule']:<14}{str(r.get('transport') or '-'):<13}{dtype:<9} failed: {r['error']}")
            continue
        sms = "-" if r["sms_during_flight"] is None else r["sms_during_flight"]
        exposed = "-" if "exposed_us_per_layer" not in r else f"{r['exposed_us_per_layer']:.1f}"
        hidden = "-" if "hidden_comm_share" not in r else f"{100 * r['hidden_comm_share']:.0f}%"
        verdict = ""
        if "meets_target" in r:
            verdict = (f"  target <= {TARGET_RATIO} (exposed <= {r['exposed_budget_us_per_layer']:.0f} us): "
                       f"{'met' if r['meets_target'] else 'NOT met'}")
        print(f"{r['schedule']:<14}{str(r['transport'] or '-'):<13}{dtype:<9}{sms:>14}{r['time_us']:>10.1f}"
              f"{r['ratio_to_compute_only']:>11.3f}{exposed:>12}{hidden:>8}{verdict}")
    traces = [r for r in rows if r["op"] == "trace"]
    if traces:
        print(f"\ntraced replays (per layer, fill and drain included): {'schedule':<13}{'transport/dispatch':<19}"
              f"{'rank':>5}{'comm kernels us':>16}{'waiting us':>11}{'transfers us':>13}{'under compute':>14}"
              f"{'GPU idle':>9}")
        for r in traces:
            what = "-" if r.get("transport") is None else f"{r['transport']}/{r.get('dtype') or '-'}"
            if "error" in r:
                print(f"{'':<52}{r['schedule']:<13}{what:<19} failed: {r['error']}")
                continue
            print(f"{'':<52}{r['schedule']:<13}{what:<19}{r['rank']:>5}"
                  f"{_num(r.get('comm_kernel_us_per_layer')):>16}{_num(r.get('comm_wait_us_per_layer')):>11}"
                  f"{_num(r.get('transfer_us_per_layer')):>13}{_pct(r.get('transfer_overlap_pct')):>14}"
                  f"{_pct(r.get('idle_pct')):>9}")


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%"


if __name__ == "__main__":
    main()
