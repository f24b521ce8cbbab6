"""experiments/capture_traces.py: a CPU smoke run (2 gloo ranks, train + prefill), its argument
checks, the two-micro-batch interleaving, and the full run on 2 GPUs (marked gpu)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from overlap.profiling import load_trace
from overlap.testing import gpu_world_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "capture_traces.py")
# The analyzer's figures every per-(scenario, rank) row carries.
ANALYZER_KEYS = {"span_us", "busy_us", "comm_us", "compute_us", "overlapped_us", "exposed_us", "overlap_pct",
                 "exposed_pct_of_span", "num_events", "num_comm", "num_streams", "num_comm_streams",
                 "max_stream_busy_us", "top_comm_kernel", "top_compute_kernel", "top_comm_grid", "mode"}


def _module():
    spec = importlib.util.spec_from_file_location("capture_traces_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out, *extra, timeout=170):
    cmd = [sys.executable, SCRIPT, "--out", str(out), "--figures", str(out / "figs"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _check_rows(out, data, scenarios, world_size, mode, cpu):
    meta, rows = data["meta"], data["rows"]
    assert meta["study"] == "capture_traces" and meta["world_size"] == world_size
    assert meta["commit"] and "capture_traces.py" in meta["command"]
    for row in rows:   # DESIGN.md section 5: flat rows with an op
        assert "op" in row and all(not isinstance(v, (dict, list, tuple)) for v in row.values()), row
    main = [r for r in rows if r["op"] == "trace"]
    assert sorted((r["scenario"], r["rank"]) for r in main) == sorted(
        (s, r) for s in scenarios for r in range(world_size))
    for r in main:
        what = f"{r['scenario']} rank {r['rank']}"
        assert ANALYZER_KEYS <= set(r), f"{what}: missing {ANALYZER_KEYS - set(r)}"
        assert r["mode"] == mode, what
        path = os.path.join(out, r["trace_file"])
        tag = f"{r['scenario']}{'_cpu' if cpu else ''}_ws{world_size}"
        assert os.path.basename(path) == f"{tag}_rank{r['rank']}.json.gz", path
        assert os.path.getsize(path) > 0 and load_trace(path).distributed_info.get("rank") == r["rank"], what
        assert r["busy_us"] > 0 and r["span_us"] >= r["busy_us"] > 0, what
        assert r["comm_us"] > 0 and r["compute_us"] > 0 and r["num_comm"] > 0, what
        assert r["overlap_pct"] is not None and 0.0 <= r["overlap_pct"] <= 100.0, what
        assert 0.0 <= r["overlapped_us"] <= min(r["comm_us"], r["compute_us"]) + 1e-6, what
        assert r["exposed_us"] == pytest.approx(r["comm_us"] - r["overlapped_us"], abs=1e-3), what
        assert r["max_stream_busy_us"] <= r["busy_us"] + 1e-6 and r["num_streams"] >= 1, what
        assert r["top_comm_kernel"] and r["top_compute_kernel"], what
        details = [d for d in rows if d["scenario"] == r["scenario"] and d["rank"] == r["rank"] and d["op"] != "trace"]
        assert {d["op"] for d in details} == {"trace_stream", "trace_kernel"}, what
        assert sum(d["op"] == "trace_stream" for d in details) == r["num_streams"], what
    for s in scenarios:
        assert os.path.getsize(os.path.join(out, "figs", f"trace_{s}{'_cpu' if cpu else ''}_ws{world_size}_rank0.png")) > 0
    return main


def test_cpu_train_and_prefill(tmp_path):
    """2 gloo ranks, tiny sizes; decode is asked for too and must be skipped with a message."""
    stdout = _run(tmp_path, "--cpu", "--world-size", "2", "--scenarios", "train", "prefill", "decode",
                  "--trace-steps", "1", "--timeout", "150")
    assert "decode: skipped" in stdout and "CUDA" in stdout, stdout[-2000:]
    assert "[capture_traces] train: captured" in stdout and "[capture_traces] prefill: captured" in stdout
    data = json.loads((tmp_path / "capture_traces_cpu_ws2.json").read_text())
    assert any("decode" in s for s in data["meta"]["skipped"])
    main = _check_rows(tmp_path, data, ("train", "prefill"), 2, "cpu", cpu=True)
    assert all(r["backend"] == "torch" and r["micro_batches"] == 2 for r in main)
    assert not os.path.exists(tmp_path / "traces" / "decode_cpu_ws2_rank0.json.gz")


def test_ping_pong_order_and_results():
    """Each micro-batch's segments run in order, `lead` segments of the first one before the second starts."""
    mod = _module()
    log = []

    def mb(name, n, result):
        for i in range(n):
            log.append(f"{name}{i}")
            yield
        log.append(f"{name}end")
        return result

    assert mod.ping_pong(mb("A", 3, 1.5), mb("B", 3, "b"), lead=2) == (1.5, "b")
    assert log == ["A0", "A1", "B0", "A2", "B1", "Aend", "B2", "Bend"]
    log.clear()
    assert mod.ping_pong(mb("A", 2, 0), mb("B", 4, 1), lead=1) == (0, 1)
    assert log == ["A0", "B0", "A1", "B1", "Aend", "B2", "B3", "Bend"]


@pytest.mark.parametrize("argv, message", [
    (["--cpu", "--world-size", "3"], "must divide"),
    (["--cpu", "--backend", "cuda"], "needs CUDA"),
    (["--cpu", "--backend", "nope"], "--backend must be one of"),
    (["--cpu", "--trace-steps", "0"], "--trace-steps must be >= 1"),
    (["--cpu", "--num-sms", "0"], "--num-sms must be >= 1"),
    (["--cpu", "--scenarios", "serve"], "invalid choice"),
    (["--cpu", "--decode-timing", "later"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
    mod = _module()
    with pytest.raises(SystemExit):
        mod.parse_args(argv)
    assert message in capsys.readouterr().err


DECODE_TRACES = [os.path.join(ROOT, "experiments", "results", "traces", f"decode_eager_ws2_rank{r}_ada4e51.json.gz")
                 for r in (0, 1)]   # eager capture at ada4e51 (rank 0 host-paced), kept as the analyzer's fixture


@pytest.mark.skipif(not all(os.path.exists(p) for p in DECODE_TRACES), reason="committed decode traces absent")
def test_decode_rows_split_comm_with_one_wait_baseline(tmp_path):
    """The decode rows on the committed eager 2-H200 traces: copies vs SM-holding comm kernels, rank 1's
    hooks waiting for the host-paced rank 0 (measured against rank 0's launches), rank 0 flagged."""
    mod = _module()
    args = mod.parse_args(["--cpu", "--out", str(tmp_path), "--figures", ""])
    caps = [{"scenario": "decode", "rank": r, "path": p, "backend": "ll_copy_engine", "transport": "copy_engine"}
            for r, p in enumerate(DECODE_TRACES)]
    rows = [mod.analyse(args, cap, a, None)[0] for cap, a in zip(caps, mod.analyse_scenario(args, caps))]
    r0, r1 = rows
    for r in rows:
        assert all(not isinstance(v, (dict, list, tuple)) for v in r.values()), r
        # A copy may fly while a hook spins: the union is at most the sum of the two parts.
        assert max(r["transfer_us"], r["comm_kernel_us"]) <= r["comm_us"] <= r["transfer_us"] + r["comm_kernel_us"]
    assert r0["host_bound"] and r0["idle_pct"] > 60 and r0["transfer_overlap_pct"] == 0
    assert not r1["host_bound"] and r1["transfer_overlap_pct"] > 0
    assert r1["comm_us"] > 8 * r0["comm_us"] and r1["comm_wait_us"] > 0.85 * r1["comm_kernel_us"]
    own = mod.analyse_scenario(args, caps[1:])[0].devices[0].comm_wait_us   # rank 1 alone: no fast hook to compare
    assert own < r1["comm_wait_us"]


@pytest.mark.gpu
@pytest.mark.skipif(2 not in gpu_world_sizes(), reason="needs >= 2 GPUs")
def test_gpu_all_scenarios(tmp_path):
    stdout = _run(tmp_path, "--world-size", "2", "--scenarios", "train", "prefill", "decode", "--timeout", "540",
                  timeout=600)
    data = json.loads((tmp_path / "capture_traces_ws2.json").read_text())
    main = _check_rows(tmp_path, data, ("train", "prefill", "decode"), 2, "gpu", cpu=False)
    for r in main:
        what = f"{r['scenario']} rank {r['rank']}"
        assert r["device_sms"] and r["comm_sms_mode"] is not None, what
        assert not r["host_bound"], what
        if r["scenario"] == "decode":
            continue
        # The schedules exist to overlap: some communication must run beside compute.
        assert r["overlap_pct"] > 0, what
        assert r["num_streams"] >= 2, what   # comm runs on its own stream(s)
    decode = [r for r in main if r["scenario"] == "decode"]
    assert all(r["backend"] == "ll_copy_engine" and r["num_tokens"] == 128 for r in decode)
    for r in decode:
        # Graph replays; the pack and hook kernels sit on the compute stream by design, so the
        # copies (zero SMs) are what must fly beside compute.
        assert r["timing"] == "cuda_graph_replay" and r["transfer_us"] > 0, r
        assert r["transfer_overlap_pct"] > 50, f"rank {r['rank']}: copies under compute {r['transfer_overlap_pct']}%"
    assert "decode: captured" in stdout
