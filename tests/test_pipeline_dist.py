"""Pipelines on several ranks: gloo on CPU (one spawn per world size, many cases inside), and
the same checks on NCCL when GPUs are present (marked gpu)."""
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from overlap.pipeline import (DualPipeV, OneFOneB, Timeline, build_schedule, dependency_violations, simulate)
from overlap.pipeline import comm
from overlap.pipeline.draw import save_timelines
from overlap.pipeline.layers import MLPStage
from overlap.pipeline.simulator import Durations
from overlap.pipeline.verify import Case, run_case
from overlap.testing import gpu_world_sizes, run_distributed

STAGES = ("mlp", "plain", "two")


def _chunks(name, n):
    return 2 * n + 2 if name.startswith("dual") else n + 2


def _cases(n):
    """Every schedule this world size allows, with every stage kind."""
    names = ["dualpipe"] if n % 2 == 0 else []
    names += ["dualpipev"] if n <= 4 else []
    names += ["1f1b", "zb1p"]
    return [Case(name, _chunks(name, n), stage=stage, seed=n) for name in names for stage in STAGES]


# ---- extra checks, run inside the ranks --------------------------------------------------------

def _errors(rank, n, device):
    """Invalid use fails fast with a clear error, before anything is sent."""
    comm.TENSOR_SHAPES, comm.TENSOR_DTYPE = None, None
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pipe = OneFOneB(MLPStage(4))
    with pytest.raises(RuntimeError, match="set_p2p_tensor_shapes"):
        pipe.step(x, num_chunks=4, criterion=F.mse_loss, labels=(y,))
    pipe.set_p2p_tensor_shapes([(2, 4)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    if rank == n - 1:      # the loss rank, alone: it raises before talking to anyone
        with pytest.raises(ValueError, match="needs a criterion"):
            pipe.step(num_chunks=4, labels=(y,))
    if rank == 0:
        with pytest.raises(ValueError, match="inputs are required"):
            pipe.step(num_chunks=4, criterion=F.mse_loss)
        wrong = OneFOneB(MLPStage(4))
        wrong.set_p2p_tensor_shapes([(2, 5)])   # the stage really sends (2, 4)
        wrong.set_p2p_tensor_dtype(torch.float32)
        with pytest.raises(ValueError, match=r"declare \(2, 5\)"):
            wrong.step(x, num_chunks=4, criterion=F.mse_loss, labels=(y,))
    if n % 2:
        from overlap.pipeline import DualPipe
        with pytest.raises(ValueError, match="even number of ranks"):
            DualPipe((MLPStage(4), MLPStage(4)))
    with pytest.raises(ValueError, match="num_chunks must be >= "):
        DualPipeV((MLPStage(4), MLPStage(4))).step(x, num_chunks=2 * n - 1, criterion=F.mse_loss, labels=(y,))
    dist.barrier()
    return "ok"


def _two_pipelines(rank, n, device):
    """Two pipelines with different boundary shapes, stepped in turn, with module-level
    shapes set to something wrong for both: per-instance settings must win."""
    comm.set_p2p_tensor_shapes([(1, 1)])
    comm.set_p2p_tensor_dtype(torch.float16)
    losses = {}
    for hidden in (4, 6):
        torch.manual_seed(hidden)
        full = [MLPStage(hidden, device=device) for _ in range(2 * n)]
        x, y = torch.randn(4 * n, hidden, device=device), torch.randn(4 * n, hidden, device=device)
        ref = []
        for xm, ym in zip(x.tensor_split(2 * n), y.tensor_split(2 * n)):
            for stage in full:
                xm = stage(xm)
            ref.append(F.mse_loss(xm, ym).detach())
        pipe = DualPipeV((full[rank], full[2 * n - 1 - rank]))
        pipe.set_p2p_tensor_shapes([(2, hidden)])
        pipe.set_p2p_tensor_dtype(torch.float32)
        losses[hidden] = (pipe, x, y, torch.stack(ref))
    for hidden in (4, 6, 4, 6):
        pipe, x, y, ref = losses[hidden]
        inputs = (x,) if rank == 0 else ()
        loss, _ = pipe.step(*inputs, num_chunks=2 * n, criterion=F.mse_loss, labels=(y,) if rank == 0 else ())
        if rank == 0:
            assert torch.equal(loss, ref), hidden
    return "ok"


def _sends_never_block(rank, n, device):
    """Make every send look unfinished: the step must still run all its chunks, and wait for
    its sends only after the last one."""
    waits = []

    class Unfinished:
        def __init__(self, work):
            self.work = work

        def is_completed(self):
            return False

        def wait(self, *args):
            waits.append(time.perf_counter())
            return self.work.wait(*args)

    real = dist.isend
    dist.isend = lambda *a, **k: Unfinished(real(*a, **k))
    try:
        torch.manual_seed(0)
        pipe = DualPipeV((MLPStage(4), MLPStage(4)))
        pipe.set_p2p_tensor_shapes([(2, 4)])
        pipe.set_p2p_tensor_dtype(torch.float32)
        pipe.record_timeline = True
        x, y = torch.randn(4 * n, 4), torch.randn(4 * n, 4)
        pipe.step(*((x,) if rank == 0 else ()), num_chunks=2 * n, criterion=F.mse_loss,
                  labels=(y,) if rank == 0 else ())
    finally:
        dist.isend = real
    last_chunk_end = max(end for _, _, end in pipe.timeline_records)
    assert waits and min(waits) >= last_chunk_end, "a send was waited for before the last chunk"
    return len(waits)


EXTRAS = {"errors": _errors, "two_pipelines": _two_pipelines, "sends_never_block": _sends_never_block}


def _run_on_ranks(rank, world_size, cases, extras, device_kind):
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    extra = {name: EXTRAS[name](rank, world_size, device) for name in extras}
    results = [run_case(case, device) for case in cases]
    return results, extra


def _check_recorded(cases, per_rank, tmp_path, n):
    """A recorded run respects the schedule's dependencies and draws beside its simulation."""
    for i, case in enumerate(cases):
        if not case.record_timeline:
            continue
        members = sorted((r[0][i] for r in per_rank if not r[0][i].get("skipped")), key=lambda x: x["rank"])
        recorded = Timeline.from_records(f"{case.schedule} recorded (gloo)", [m["records"] for m in members])
        sched = build_schedule(case.schedule, len(members), case.num_chunks)
        assert [recorded.labels(r) for r in range(len(members))] == [m["trace"] for m in members]
        assert dependency_violations(sched, recorded, tolerance=1e-6) == []
        simulated = simulate(sched, Durations.from_timeline(recorded)).timeline
        save_timelines([simulated, recorded], str(tmp_path / f"pipeline_{case.schedule}_{n}.png"),
                       titles=["simulated with the recorded median durations", "recorded"])
        assert (tmp_path / f"pipeline_{case.schedule}_{n}.png").stat().st_size > 10_000


WORLD = {
    1: ([Case("dualpipev", 2, stage=s) for s in STAGES] + [Case("1f1b", 3), Case("zb1p", 3, stage="two")], ()),
    2: (_cases(2) + [Case("dualpipe", 4, dtype="float64", p2p="module", train_steps=2),
                     Case("zb1p", 2, stage="two", rank_mapping="reversed"),
                     Case("dualpipev", 6, record_timeline=True)],
        ("errors", "two_pipelines", "sends_never_block")),
    3: (_cases(3) + [Case("1f1b", 7, rank_mapping="reversed", train_steps=2),
                     Case("dualpipev", 7, stage="two", rank_mapping="reversed", record_timeline=True)],
        ("errors", "two_pipelines")),
    4: ([c for c in _cases(4) if c.stage != "plain"]
        + [Case("dualpipe", 4, group_ranks=(1, 3), rank_mapping="reversed"),
           Case("dualpipev", 6, group_ranks=(0, 2, 3), rank_mapping="reversed"),
           Case("dualpipe", 10, record_timeline=True)],
        ("two_pipelines",)),
    8: ([Case("dualpipe", 16, stage=s) for s in ("mlp", "plain")] + [Case("dualpipe", 20, stage="two")]
        + [Case(name, 9) for name in ("1f1b", "zb1p")] + [Case("dualpipe", 16, record_timeline=True)],
        ()),
}


@pytest.mark.parametrize("n", sorted(WORLD))
def test_pipelines_on_gloo_ranks(n, tmp_path):
    cases, extras = WORLD[n]
    per_rank = run_distributed(_run_on_ranks, n, cases, extras, "cpu", backend="gloo", timeout_s=240)
    for results, extra in per_rank:
        assert all(v == "ok" or isinstance(v, int) and v > 0 for v in extra.values()), extra
        assert len(results) == len(cases)
    _check_recorded(cases, per_rank, tmp_path, n)


@pytest.mark.gpu
@pytest.mark.parametrize("n", gpu_world_sizes((2, 4, 8)) or [0])
def test_pipelines_on_nccl_ranks(n, tmp_path):
    if n == 0:
        pytest.skip("needs 2 GPUs")
    cases = _cases(n) + [Case("dualpipe" if n % 2 == 0 else "dualpipev", 4 * n, dtype="float64",
                              record_timeline=True, hidden=64, seq=16)]
    per_rank = run_distributed(_run_on_ranks, n, cases, ("two_pipelines",), "cuda", backend="nccl",
                               timeout_s=300, env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    assert all(len(results) == len(cases) for results, _ in per_rank)
