"""A pipeline stage of MoE blocks, with DualPipe's ``overlapped_forward_backward`` hook.

:class:`MoEStage` is an ordinary module: ``stage(x)`` then ``loss.backward()`` trains it (each
transfer waited for at once). Its training forward runs the blocks as pieces
(:mod:`overlap.moe.schedule`) and ties them into the autograd graph with one node, whose
backward runs the pieces backwards. A pipeline that finds the class's
``overlapped_forward_backward`` (deepseek-ai/DualPipe's contract, also
:mod:`overlap.pipeline`'s) calls it for a forward chunk of one micro-batch and a backward chunk
of another: the hook finds the backward micro-batch's recorded pieces behind its loss or
outputs and interleaves the two chunks so each one's all-to-alls run under the other's compute.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from overlap.ep import EPBuffer
from overlap.moe.block import LayerState, MoEBlock
from overlap.moe.comm import EPComm
from overlap.moe.config import MoEConfig
from overlap.moe.schedule import backward_chunk, forward_chunk, overlapped_chunks
from overlap.pipeline.utils import backward_from, run_backward, sequential_forward_backward


class StageRecord:
    """What a training forward of a :class:`MoEStage` keeps for its backward."""

    def __init__(self, stage: "MoEStage", x: torch.Tensor):
        self.stage = stage
        self.x = x
        self.states: List[LayerState] = []
        self.out: Optional[torch.Tensor] = None
        self.capture = False           # set by the hook: the backward node only hands over its grad
        self.grad_out: Optional[torch.Tensor] = None


class _StageNode(torch.autograd.Function):
    """Ties a stage's piecewise forward into the graph: output = the recorded result."""

    @staticmethod
    def forward(ctx, anchor, x, record):
        ctx._moe_stage_record = record
        out, record.out = record.out, None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        record = ctx._moe_stage_record
        if record.capture:
            record.grad_out = grad_out
            return None, None, None
        stage = record.stage
        grad_x = backward_chunk(stage.blocks, stage.comm, record.states, grad_out, labels=stage.profile_labels)
        return None, grad_x if ctx.needs_input_grad[1] else None, None


def _attach(record: StageRecord, out: torch.Tensor) -> torch.Tensor:
    record.out = out
    # The anchor makes the output require grad even when x does not (first stage).
    anchor = torch.empty(0, device=out.device, requires_grad=True)
    return _StageNode.apply(anchor, record.x, record)


def _records_behind(roots: Sequence[torch.Tensor], limit: int = 100_000) -> List[StageRecord]:
    """The stage records reachable from ``roots`` without crossing another stage node."""
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    seen, found = set(), []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        rec = getattr(node, "_moe_stage_record", None)
        if isinstance(rec, StageRecord):
            found.append(rec)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return found


class MoEStage(nn.Module):
    """``num_layers`` :class:`MoEBlock` s over one expert-parallel group, a pipeline stage.

    Args:
        config: the blocks' sizes and routing.
        buffer: the :class:`~overlap.ep.EPBuffer` of the expert-parallel group (see
            :func:`overlap.moe.groups.make_ep_buffer`); both stages of a DualPipe rank may share it.
        num_layers: blocks in this stage.
        num_worst_tokens: None (exact-size buffers, the host reads counts at each dispatch) or
            a row budget for every dispatch, which makes forward, backward and the overlapped
            F&B free of host synchronisation (budget mode, :mod:`overlap.moe.budget`; same
            results). ``overlap.moe.worst_case_tokens(buffer)`` always suffices.
        expert_capacity: budget mode's expert-major rows (None: the safe bound).

    Attributes:
        comm: the object issuing the all-to-alls (an :class:`~overlap.moe.comm.EPComm`);
            replaceable, e.g. by :mod:`overlap.moe.measure`'s recording/replaying ones.
        profile_labels: wrap each piece in a ``moe:<piece>`` profiler range.
        overlap: False makes the hook run its two chunks one after the other (for comparisons).

    ``forward(x)`` takes ``[batch, seq, hidden]`` and returns the same shape.
    """

    def __init__(self, config: MoEConfig, buffer: EPBuffer, num_layers: int = 1, dtype=None, device=None, *,
                 num_worst_tokens: Optional[int] = None, expert_capacity: Optional[int] = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if not isinstance(buffer, EPBuffer):
            raise TypeError(f"buffer must be an overlap.ep.EPBuffer, got {type(buffer).__name__}")
        if buffer.num_experts != config.num_experts or buffer.hidden != config.hidden:
            raise ValueError(f"buffer was built for num_experts={buffer.num_experts}, hidden={buffer.hidden}; "
                             f"config has num_experts={config.num_experts}, hidden={config.hidden}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.config = config
        self.buffer = buffer
        self.comm = EPComm(buffer, num_worst_tokens=num_worst_tokens, expert_capacity=expert_capacity)
        self.profile_labels = True
        self.overlap = True
        device = device if device is not None else buffer.device
        self.blocks = nn.ModuleList(MoEBlock(config, buffer.world_size, dtype=dtype, device=device)
                                    for _ in range(num_layers))

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.config.hidden:
            raise ValueError(f"x must be [batch, seq, hidden={self.config.hidden}], got shape {tuple(x.shape)}")
        if x.shape[0] * x.shape[1] > self.buffer.max_tokens_per_rank:
            raise ValueError(f"x holds {x.shape[0] * x.shape[1]} tokens, more than the buffer's "
                             f"max_tokens_per_rank={self.buffer.max_tokens_per_rank}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not torch.is_grad_enabled():
            return forward_chunk(self.blocks, self.comm, x)
        record = StageRecord(self, x)
        out = forward_chunk(self.blocks, self.comm, x, record.states, labels=self.profile_labels)
        return _attach(record, out)

    def update_router_bias(self, group=None) -> None:
        """Apply every block's auxiliary-loss-free bias update (counts summed over ``group``)."""
        for block in self.blocks:
            block.router.update_bias(group)

    def load_from_dense(self, dense_blocks: Sequence[MoEBlock], ep_rank: Optional[int] = None) -> "MoEStage":
        """Copy full (``ep_size=1``) blocks' weights; routed experts: this rank's slice."""
        if len(dense_blocks) != len(self.blocks):
            raise ValueError(f"{len(dense_blocks)} dense blocks for {len(self.blocks)} layers")
        rank = self.buffer.rank if ep_rank is None else ep_rank
        for mine, dense in zip(self.blocks, dense_blocks):
            mine.load_from_dense(dense, rank)
        return self

    @classmethod
    def overlapped_forward_backward(
        cls, module0: "MoEStage", inputs0: List[torch.Tensor], criterion0: Optional[Callable],
        labels0: Optional[List[torch.Tensor]], module1: "MoEStage", loss1: Optional[torch.Tensor],
        outputs1: Optional[List[torch.Tensor]], output_grads1: Optional[List[torch.Tensor]],
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Forward of ``module0`` on ``inputs0`` and backward of ``module1`` (from ``loss1``, or
        from ``outputs1`` with ``output_grads1``), overlapped (deepseek-ai/DualPipe's hook).

        Returns ``(outputs0, loss0)``; input gradients of ``module1`` land in its inputs'
        ``.grad`` as after a plain backward. When the backward micro-batch was not produced by a
        training forward of ``module1`` (nothing recorded), the two chunks run one after the
        other, which gives the same result.
        """
        labels0 = list(labels0 or [])
        roots = [loss1] if loss1 is not None else list(outputs1 or [])
        records = _records_behind(roots) if torch.is_grad_enabled() else []
        overlap = (isinstance(module0, MoEStage) and isinstance(module1, MoEStage) and module0.overlap
                   and len(records) == 1 and records[0].stage is module1 and len(inputs0) == 1
                   and len(records[0].states) == len(module1.blocks))
        if not overlap:
            return sequential_forward_backward(module0, inputs0, criterion0, labels0, loss1, outputs1,
                                               output_grads1)

        x0 = inputs0[0]
        module0._check_input(x0)     # before anything is sent
        record1 = records[0]
        # Run the graph above module1's output (criterion, or nothing) to get its gradient.
        record1.capture = True
        try:
            backward_from(loss1, outputs1, output_grads1)
        finally:
            record1.capture = False
        grad_out1, record1.grad_out = record1.grad_out, None
        if grad_out1 is None:
            raise RuntimeError("the backward micro-batch's output received no gradient")

        record0 = StageRecord(module0, x0)
        out0, grad_x1 = overlapped_chunks(module0.blocks, module0.comm, x0, record0.states,
                                          module1.blocks, module1.comm, record1.states, grad_out1,
                                          labels=module0.profile_labels)
        if record1.x.requires_grad and grad_x1 is not None:
            run_backward([record1.x], [grad_x1])
        outputs0 = [_attach(record0, out0)]
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        return outputs0, loss0
