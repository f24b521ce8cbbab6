"""experiments/sm_ablation.py: a CPU smoke run (gloo ranks, tiny sizes) and its argument checks."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "sm_ablation.py")
PLOT = os.path.join(ROOT, "experiments", "plot_sm_ablation.py")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm_ablation")
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--world-size", "2", "--num-sms", "4", "12",
                           "--backends", "nccl", "torch", "copy_engine", "no_such_backend", "--out", str(out),
                           "--fig-dir", str(out / "figs"), "--timeout", "120"],
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "sm_ablation_cpu_ws2.json").read_text())
    return out, data, proc.stdout


def test_results_file_has_every_part(cpu_run):
    out, data, _ = cpu_run
    meta, rows = data["meta"], data["rows"]
    assert meta["study"] == "sm_ablation" and meta["world_size"] == 2 and meta["device"] == "cpu"
    assert meta["commit"] and "command" in meta and meta["parts"] == ["a", "b", "c"] and meta["partial"] is False
    for row in rows:   # DESIGN.md §5: flat rows with the shared names
        assert all(not isinstance(v, (dict, list, tuple)) for v in row.values()), row
        assert {"op", "backend", "num_sms", "time_us"} <= set(row), row
        assert row["time_us"] > 0, row
    backends = ("gloo", "torch")   # raw all_to_all_single, and the EPBuffer torch backend
    a = [r for r in rows if r["op"] in ("dispatch", "combine")]
    assert {(r["backend"], r["op"], r["num_sms"]) for r in a} == {
        (bk, op, k) for bk in backends for op in ("dispatch", "combine") for k in (4, 12)}
    assert all(r["wire_gbps"] > 0 and r["logical_gbps"] >= r["wire_gbps"] for r in a)
    # 2 ranks, top-2 of 8 experts: a rank keeps part of its rows, so wire < logical bytes.
    assert all(0 < r["wire_bytes_per_rank"] < r["logical_bytes_per_rank"] for r in a)
    for op in ("dispatch", "combine"):   # both backends move the same rows
        assert len({r["wire_bytes_per_rank"] for r in a if r["op"] == op}) == 1
    b = [r for r in rows if r["op"] == "gemm_with_comm"]
    assert {(r["backend"], r["gemm"], r["num_sms"]) for r in b} == {
        (bk, g, k) for bk in backends for g in ("gemm", "grouped_gemm") for k in (4, 12)}
    for r in b:
        assert r["ideal_ratio"] == pytest.approx((132 - r["num_sms"]) / 132)
        assert r["ratio_alone"] == pytest.approx(r["alone_us"] / r["time_us"])
        assert r["tflops"] > 0 and r["comm_steps_per_window"] >= 2
    assert {r["gemm"] for r in rows if r["op"] == "gemm_alone"} == {"gemm", "grouped_gemm"}
    assert {r["gemm"] for r in rows if r["op"] == "gemm_alone_repeat"} == {"gemm", "grouped_gemm"}
    c = [r for r in rows if r["op"].startswith("moe_")]
    ops = {"moe_overlapped", "moe_serial", "moe_compute_only", "moe_comm_only"}
    assert {(r["backend"], r["op"], r["num_sms"]) for r in c} == {(bk, op, k) for bk in backends for op in ops
                                                                  for k in (4, 12)}
    for r in c:
        assert r["bound_us"] == pytest.approx(max(x["time_us"] for x in c if x["num_sms"] == r["num_sms"]
                                                  and x["backend"] == r["backend"]
                                                  and x["op"] in ("moe_compute_only", "moe_comm_only")))
        assert r["expert_tflop"] > 0


def test_skipped_backends_are_named(cpu_run):
    out, data, _ = cpu_run
    notes = " ".join(data["meta"]["notes"])
    assert "copy_engine skipped" in notes and "no_such_backend skipped" in notes
    assert {r["backend"] for r in data["rows"]} == {"gloo", "torch", "none"}


def test_summary_and_plots_written(cpu_run, tmp_path):
    out, data, stdout = cpu_run
    md = (out / "sm_ablation_cpu_ws2.md").read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "copy_engine skipped", "CPU smoke run"):
        assert heading in md
    for bk in ("gloo", "torch"):   # one row in (a) and (c), one per GEMM in (b)
        assert md.count(f"| {bk} | 12 |") == 1 + 2 + 1
    for part in ("a_bandwidth", "b_gemm_interference", "c_moe_layer"):
        png = out / "figs" / f"sm_ablation_cpu_ws2_{part}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "sm_ablation:" in stdout and "4/4" in stdout      # the tqdm bar went over every case
    # The plots and summary come back from the JSON alone.
    proc = subprocess.run([sys.executable, PLOT, str(out / "sm_ablation_cpu_ws2.json"), "--fig-dir", str(tmp_path),
                           "--md", str(tmp_path / "s.md")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "s.md").read_text() == md
    assert len(list(tmp_path.glob("*.png"))) == 3


@pytest.mark.parametrize("argv, message", [
    (["--experts", "9"], "multiple of --world-size"),
    (["--num-sms", "0"], "--num-sms"),
    (["--tokens", "1"], "--tokens"),
    (["--topk", "9"], "--topk"),
    (["--parts", "d"], "invalid choice"),
])
def test_bad_arguments_fail_clearly(argv, message):
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--world-size", "2", *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
