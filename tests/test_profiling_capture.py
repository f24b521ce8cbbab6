"""Per-rank trace capture: a CPU gloo round trip (capture -> Chrome trace -> analyzer)."""
import os

import pytest
import torch

from overlap.profiling import COMM, analyze_trace, capture_trace, load_trace, trace_path
from overlap.testing import run_distributed


def test_trace_path_naming():
    assert trace_path("out/step", 3) == "out/step_rank3.json"
    assert trace_path("out/step.json", 0) == "out/step_rank0.json"
    assert trace_path("out/step.json.gz", 1) == "out/step_rank1.json.gz"
    with pytest.raises(ValueError, match="rank"):
        trace_path("out/step", -1)
    with pytest.raises(ValueError, match="out_path"):
        trace_path("out/", 0)


def test_capture_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="fn"):
        capture_trace(None, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="active"):
        capture_trace(lambda: None, str(tmp_path / "x"), active=0)
    with pytest.raises(ValueError, match="warmup"):
        capture_trace(lambda: None, str(tmp_path / "x"), warmup=-1)


def _rank_input(rank, world_size):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(64 * world_size, 32, generator=g)


def _capture_worker(rank, world_size, prefix):
    import torch.distributed as dist

    x = _rank_input(rank, world_size)
    w = torch.randn(32, 32)
    outs = []

    def step():
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)
        work = dist.all_reduce(out.clone(), async_op=True)  # gloo runs it on its own thread
        y = x @ w
        work.wait()
        outs.append(out)
        return y

    path = capture_trace(step, prefix, warmup=1, active=2, record_shapes=True)
    # The profiled collective really ran: chunk r of the output is rank r's chunk for this rank.
    for r in range(world_size):
        expect = _rank_input(r, world_size)[64 * rank: 64 * (rank + 1)]
        torch.testing.assert_close(outs[-1][64 * r: 64 * (r + 1)], expect)
    return path


def test_capture_gloo_round_trip(tmp_path):
    prefix = str(tmp_path / "gloo_step")
    paths = run_distributed(_capture_worker, 2, prefix, backend="gloo", timeout_s=120)
    assert paths == [trace_path(prefix, 0), trace_path(prefix, 1)]
    for rank, path in enumerate(paths):
        assert os.path.getsize(path) > 0
        trace = load_trace(path)
        assert trace.events, f"rank {rank}: empty trace"
        assert trace.distributed_info.get("rank") == rank
        names = {e.name for e in trace.events}
        assert sum(n.startswith("ProfilerStep#") for n in names) == 2  # the active steps only
        a = analyze_trace(path)
        assert a.mode == "cpu"
        d = a.devices[0]
        assert d.comm_us > 0 and d.compute_us > 0
        assert 0 <= d.overlapped_us <= min(d.comm_us, d.compute_us)
        assert d.exposed_us == pytest.approx(d.comm_us - d.overlapped_us)
        comm_names = {k.name for k in a.kernels if k.cls == COMM}
        assert any(n.startswith("c10d::") for n in comm_names), comm_names
        assert any(n.startswith("gloo:") for n in comm_names), comm_names
        assert any(k.name == "aten::mm" for k in a.kernels)


def _nccl_capture_worker(rank, world_size, prefix):
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(2048 * world_size, 1024, device=dev)
    out = torch.empty_like(x)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def step():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dist.all_to_all_single(out, x)
        for _ in range(4):
            a @ a
        torch.cuda.current_stream().wait_stream(side)

    return capture_trace(step, prefix, warmup=2, active=3)


@pytest.mark.gpu
def test_capture_nccl_round_trip(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    prefix = str(tmp_path / "nccl_step")
    paths = run_distributed(_nccl_capture_worker, 2, prefix, backend="nccl", timeout_s=300)
    for rank, path in enumerate(paths):
        a = analyze_trace(path)
        assert a.mode == "gpu"
        d = a.device(f"cuda:{rank}")
        assert d.num_sms == torch.cuda.get_device_properties(rank).multi_processor_count
        assert d.comm_us > 0 and d.compute_us > 0
        assert 0 <= d.overlapped_us <= min(d.comm_us, d.compute_us)
        comm = [k for k in a.kernels if k.cls == COMM and k.kind == "kernel"]  # NCCL may also use copy engines
        assert comm and all("nccl" in k.name.lower() for k in comm), [k.name for k in comm]
        assert all(k.grid is not None and 1 <= k.sms <= d.num_sms for k in comm)
        gemm = [k for k in a.kernels if k.cls != COMM and k.kind == "kernel"]
        assert gemm and max(k.total_us for k in gemm) > 0


@pytest.mark.parametrize("sync_each_step, expected_syncs", [(True, 4), (False, 1)])
def test_capture_syncs_per_step_or_once(tmp_path, monkeypatch, sync_each_step, expected_syncs):
    """Back-to-back capture (sync_each_step=False) synchronises CUDA once, after the last step."""
    from torch.profiler import ProfilerActivity

    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(1))
    steps = []
    path = capture_trace(lambda: steps.append(1), str(tmp_path / "s"), warmup=1, active=3,
                         activities=[ProfilerActivity.CPU], barrier=False, sync_each_step=sync_each_step)
    assert len(steps) == 4 and len(syncs) == expected_syncs
    assert os.path.exists(path)
