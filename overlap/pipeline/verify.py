"""Check a pipeline against a sequential single-process reference, on gloo or NCCL ranks.

:func:`run_case` builds a model of identical stages, runs it micro-batch by micro-batch in one
process (the reference), then runs the same stages through the pipeline, and checks:
loss and outputs bit-identical, gradients within ``1e-13`` of the reference by
:func:`cosine_gap` (each stage's copies summed, as DualPipe's two copies must be), the trace
equal to what the schedule says, and no gradients from a no_grad step. Used by the tests
(gloo) and by the GPU tests (NCCL); every rank of the world calls it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from overlap.pipeline.layers import MLPStage
from overlap.pipeline.pipelines import DualPipe, DualPipeV, OneFOneB, ZB1P
from overlap.pipeline.schedules import build_schedule

PIPELINES = {"dualpipe": DualPipe, "dualpipev": DualPipeV, "1f1b": OneFOneB, "zb1p": ZB1P}
GRAD_TOLERANCE = 1e-13


@dataclass(frozen=True)
class Case:
    """One configuration to check.

    ``stage``: ``"mlp"`` (MLPStage: overlap hook, deferrable weight gradients), ``"plain"``
    (nn.Sequential of nn.Linear: no hook, nothing deferred) or ``"two"`` (two tensors in and
    out of every stage, two labels). ``group_ranks``: run on a subgroup of the world.
    ``rank_mapping``: ``"reversed"`` maps group rank g to pipeline rank n-1-g.
    ``p2p``: ``"instance"`` sets shapes/dtype on the pipeline, ``"module"`` module-level.
    """

    schedule: str
    num_chunks: int
    stage: str = "mlp"
    dtype: str = "float32"
    micro_batch: int = 2
    seq: int = 3
    hidden: int = 8
    group_ranks: Optional[tuple] = None
    rank_mapping: Optional[str] = None
    p2p: str = "instance"
    train_steps: int = 1
    record_timeline: bool = False
    seed: int = 0


class TwoTensorStage(nn.Module):
    """A stage with two inputs and two outputs that mix: ``(x, y) -> (x + tanh(A y), y + B x)``."""

    def __init__(self, hidden: int, dtype=None, device=None) -> None:
        super().__init__()
        self.a = nn.Linear(hidden, hidden, dtype=dtype, device=device)
        self.b = nn.Linear(hidden, hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return x + torch.tanh(self.a(y)), y + self.b(x)


def _make_stage(kind: str, hidden: int, dtype, device) -> nn.Module:
    if kind == "mlp":
        return MLPStage(hidden, ffn=2 * hidden, bias=True, dtype=dtype, device=device)
    if kind == "plain":
        return nn.Sequential(nn.Linear(hidden, 2 * hidden, dtype=dtype, device=device), nn.GELU(),
                             nn.Linear(2 * hidden, hidden, dtype=dtype, device=device))
    if kind == "two":
        return TwoTensorStage(hidden, dtype=dtype, device=device)
    raise ValueError(f"stage must be 'mlp', 'plain' or 'two', got {kind!r}")


def _mse(y: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y, label)


def _mse_two(a: torch.Tensor, b: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, la) + F.mse_loss(b, lb)


def cosine_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2<x,y> / (|x|^2 + |y|^2)`` in float64: 0 for equal tensors, ~ relative error^2."""
    x, y = x.double().flatten(), y.double().flatten()
    return 1.0 - 2.0 * (x * y).sum().item() / (x * x + y * y).sum().item()


def _as_list(outputs) -> list:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _flat_grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten().cpu() for p in module.parameters()])


def run_case(case: Case, device: Optional[torch.device] = None) -> dict:
    """Check ``case`` on this rank; raise AssertionError on any mismatch.

    Returns ``{"rank", "trace", "records", "max_grad_gap"}`` (``{"skipped": True}`` on a rank
    outside ``group_ranks``).
    """
    device = device or torch.device("cpu")
    dtype = getattr(torch, case.dtype)
    group = dist.new_group(list(case.group_ranks)) if case.group_ranks is not None else None
    if case.group_ranks is not None and dist.get_rank() not in case.group_ranks:
        return {"skipped": True}
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    group_rank = dist.get_rank(group) if dist.is_initialized() else 0
    mapping = list(reversed(range(n))) if case.rank_mapping == "reversed" else None
    rank = mapping[group_rank] if mapping else group_rank
    sched = build_schedule(case.schedule, n, case.num_chunks)
    chains, c = sched.chains, case.num_chunks
    num_tensors = 2 if case.stage == "two" else 1
    criterion = _mse_two if case.stage == "two" else _mse
    where = f"{case} on pipeline rank {rank}"

    # The model and the batch, identical on every rank.
    torch.manual_seed(case.seed)
    full = [_make_stage(case.stage, case.hidden, dtype, device) for _ in range(sched.num_stages)]
    shape = (c * case.micro_batch, case.seq, case.hidden)
    xs = [torch.randn(shape, dtype=dtype, device=device) for _ in range(num_tensors)]
    labels = [torch.randn(shape, dtype=dtype, device=device) for _ in range(num_tensors)]
    num_modules = PIPELINES[case.schedule].num_modules
    local = []
    for d in range(num_modules):
        module = copy.deepcopy(full[sched.locate(rank, d)[1]])
        module.zero_grad(set_to_none=True)
        local.append(module)

    # Reference: the whole model, one micro-batch after the other, in one process.
    ref_losses, ref_outputs = [], []
    for m in range(c):
        outs = [x.tensor_split(c)[m] for x in xs]
        for stage in full:
            outs = _as_list(stage(*outs))
        loss = criterion(*outs, *[lab.tensor_split(c)[m] for lab in labels])
        loss.backward()
        ref_losses.append(loss.detach())
        ref_outputs.append([o.detach() for o in outs])
    ref_losses = torch.stack(ref_losses)
    for stage in full:   # every training step accumulates the same gradients again
        for p in stage.parameters():
            p.grad.mul_(case.train_steps)

    pipe = PIPELINES[case.schedule](local if num_modules == 2 else local[0], process_group=group,
                                    rank_mapping=mapping)
    p2p_shapes = [(case.micro_batch, case.seq, case.hidden)] * num_tensors
    if case.p2p == "instance":
        pipe.set_p2p_tensor_shapes(p2p_shapes)
        pipe.set_p2p_tensor_dtype(dtype)
    else:
        from overlap.pipeline import comm
        comm.set_p2p_tensor_shapes(p2p_shapes)
        comm.set_p2p_tensor_dtype(dtype)

    # Chain k carries batch slice k of len(chains); its inputs enter at its first stage's
    # rank and its labels and loss live at its last stage's rank.
    def part(tensors, k):
        return [t.tensor_split(len(chains))[k] for t in tensors]
    inputs = [t for k, ch in enumerate(chains) if ch.first_rank == rank for t in part(xs, k)]
    ends = [k for k, ch in enumerate(chains) if ch.last_rank == rank]
    step_labels = [t for k in ends for t in part(labels, k)]
    per_chain = c // len(chains)

    pipe.record_timeline = case.record_timeline
    for _ in range(case.train_steps):
        loss, outputs = pipe.step(*inputs, num_chunks=c, criterion=criterion, labels=step_labels)
    assert outputs is None, f"{where}: outputs returned without return_outputs"
    if ends:
        (k,) = ends
        assert torch.equal(loss, ref_losses[k * per_chain:(k + 1) * per_chain]), f"{where}: training loss differs"
    else:
        assert loss is None, f"{where}: a loss on a rank without a last stage"
    want = sched.executed_labels(rank, overlap_hook=pipe.use_overlap_hook)
    assert pipe.trace == want, f"{where}: trace {pipe.trace} != schedule {want}"
    records, train_trace = pipe.timeline_records, pipe.trace

    # Gradients: gather every rank's, sum the copies of each stage, compare with the reference.
    mine = {(sched.locate(rank, d)[1], rank, d): _flat_grads(local[d]) for d in range(num_modules)}
    gathered = [None] * n
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    summed: dict[int, torch.Tensor] = {}
    for payload in gathered:
        for (j, _r, _d), g in payload.items():
            summed[j] = summed[j] + g if j in summed else g
    gaps = [cosine_gap(summed[j], _flat_grads(full[j])) for j in range(sched.num_stages)]
    assert max(gaps) < GRAD_TOLERANCE, f"{where}: gradient gaps {gaps} exceed {GRAD_TOLERANCE}"

    # Inference: no gradients, same loss, outputs bit-identical, forwards only.
    pipe.zero_grad(set_to_none=True)
    pipe.record_timeline = False
    with torch.no_grad():
        loss, outputs = pipe.step(*inputs, num_chunks=c, criterion=criterion, labels=step_labels,
                                  return_outputs=True)
    if ends:
        (k,) = ends
        assert torch.equal(loss, ref_losses[k * per_chain:(k + 1) * per_chain]), f"{where}: inference loss differs"
        got = _as_list(outputs)
        for i in range(num_tensors):
            want_out = torch.cat([o[i] for o in ref_outputs[k * per_chain:(k + 1) * per_chain]])
            assert torch.equal(got[i], want_out), f"{where}: inference output {i} differs"
    else:
        assert loss is None and outputs is None, f"{where}: results on a rank without a last stage"
    assert all(p.grad is None for p in pipe.parameters()), f"{where}: no_grad step produced gradients"
    want = sched.executed_labels(rank, forward_only=True)
    assert pipe.trace == want, f"{where}: inference trace {pipe.trace} != {want}"
    return {"rank": rank, "trace": train_trace, "records": records, "max_grad_gap": max(gaps)}
