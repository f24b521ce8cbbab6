"""Dispatch and combine as autograd functions, and the expert-side row regrouping.

:func:`moe_dispatch` / :func:`moe_combine` make an expert-parallel MoE differentiable end to
end with ordinary autograd: the backward of dispatch combines the gradients of a token's
copies (and of its routing weights) back to its rank; the backward of combine dispatches the
output gradient to the rows that produced it. Both wait for their transfer (the overlapped
schedule in :mod:`overlap.moe.stage` issues the same transfers asynchronously instead).

:func:`expert_rows`, :func:`permute` and :func:`unpermute` move received rows into the
expert-major order of the grouped GEMMs and back, as plain differentiable tensor ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from overlap.ep import EPBuffer
from overlap.ep.layout import expert_major_positions
from overlap.moe.comm import Dispatched, EPComm


def _as_comm(comm: Union[EPComm, EPBuffer]) -> EPComm:
    return comm if isinstance(comm, EPComm) else EPComm(comm)


class _DispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, comm, topk_idx):
        d = comm.dispatch_forward(x, topk_idx, topk_weights).wait()
        ctx.comm, ctx.d = comm, d
        ctx.mark_non_differentiable(d.recv_topk_idx, d.num_recv_tokens_per_expert)
        return d.recv_x, d.recv_topk_idx, d.recv_topk_weights, d.num_recv_tokens_per_expert, d

    @staticmethod
    def backward(ctx, grad_recv_x, _idx, grad_recv_w, _counts, _d):
        d = ctx.d
        if grad_recv_x is None:
            grad_recv_x = torch.zeros_like(d.recv_x)
        # Whether weights get a gradient depends on the model only, so every rank agrees on
        # whether the (collective) weight transfer runs.
        if ctx.needs_input_grad[1] and grad_recv_w is None:
            grad_recv_w = torch.zeros_like(d.recv_topk_weights)
        grad_x, grad_w = ctx.comm.dispatch_backward(grad_recv_x, grad_recv_w if ctx.needs_input_grad[1] else None,
                                                    d).wait()
        return grad_x, (grad_w.to(d.topk_weights.dtype) if grad_w is not None else None), None, None


class _CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm, d):
        ctx.comm, ctx.d = comm, d
        return comm.combine_forward(y, d).wait()

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.comm.combine_backward(grad_out.contiguous(), ctx.d).wait(), None, None


def moe_dispatch(comm: Union[EPComm, EPBuffer], x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_weights: torch.Tensor):
    """Differentiable dispatch of ``x [T, H]`` with routing ``topk_idx``/``topk_weights [T, k]``.

    Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, dispatched)``
    with the semantics of :meth:`overlap.ep.EPBuffer.dispatch`; ``recv_x`` and
    ``recv_topk_weights`` carry gradients back to ``x`` and ``topk_weights``; ``dispatched``
    goes to :func:`moe_combine`.
    """
    return _DispatchFn.apply(x, topk_weights, _as_comm(comm), topk_idx)


def moe_combine(comm: Union[EPComm, EPBuffer], y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
    """Differentiable combine of per-received-row sums ``y [R, H]`` into ``[T, H]`` (fp32 sums)."""
    if not isinstance(dispatched, Dispatched):
        raise TypeError("dispatched must be the Dispatched that moe_dispatch returned, "
                        f"got {type(dispatched).__name__}")
    return _CombineFn.apply(y, _as_comm(comm), dispatched)


@dataclass
class ExpertRows:
    """Expert-major order of received (row, slot) pairs: ``row[n]``/``slot[n]`` of position n.

    With a fixed capacity (budget mode) the positions past ``counts.sum()`` are padding: their
    ``row`` is ``num_rows`` (one past the last received row), ``slot`` 0, ``index``
    ``num_rows * k``. They lie past the last grouped-GEMM group; :func:`permute` and
    :func:`unpermute` keep them out of every result and gradient.
    """

    row: torch.Tensor      # [N] int64 received row (num_rows: padding)
    slot: torch.Tensor     # [N] int64 top-k slot (0: padding)
    index: torch.Tensor    # [N] int64 row * k + slot, the (row, slot) pair flattened (num_rows * k: padding)
    counts: torch.Tensor   # [E_local] int32 rows per local expert
    num_rows: int          # R, received rows


def expert_rows(recv_topk_idx: torch.Tensor, num_local_experts: int, capacity: Optional[int] = None) -> ExpertRows:
    """Group received rows by local expert (expert 0 first, ascending row within an expert),
    the order of :meth:`overlap.ep.EPBuffer.permute_to_experts`.

    ``capacity=None`` sizes the result by the pairs there are (one host sync to read their
    number). With ``capacity`` the result has exactly that many positions and the host never
    waits (padding as described in :class:`ExpertRows`); more pairs than that fail an
    assertion on the device (see :mod:`overlap.moe.budget`).
    """
    if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")
    idx = recv_topk_idx.to(torch.int64)
    num_rows, k = idx.shape
    counts, pos = expert_major_positions(idx, num_local_experts)   # no data-dependent shape
    if capacity is None:
        n = int(counts.sum())
    else:
        n = capacity
        if n < num_rows * min(k, num_local_experts):   # else no routing can overflow it
            torch._assert_async(counts.sum() <= n, "more (row, local expert) pairs arrived than expert_capacity "
                                                   "allows; pass a larger expert_capacity (or leave it None)")
    # Every pair without a position (an empty slot, or past the capacity) lands on a spare
    # position n, dropped below; the duplicate writes there are harmless.
    pos = torch.where(pos >= 0, pos.clamp(max=n), torch.full_like(pos, n))
    flat = torch.arange(num_rows * k, device=idx.device)
    index = torch.full((n + 1,), num_rows * k, dtype=torch.int64, device=idx.device)
    index = index.scatter_(0, pos.flatten(), flat)[:n]
    return ExpertRows(row=torch.div(index, k, rounding_mode="floor"), slot=index % k, index=index,
                      counts=counts, num_rows=num_rows)


class _GatherRows(torch.autograd.Function):
    """``src[row]`` where ``row == len(src)`` (padding) takes an arbitrary row; the gradient of
    padding positions, whatever it holds, goes to a spare row that is dropped."""

    @staticmethod
    def forward(ctx, src, row):
        ctx.save_for_backward(row)
        ctx.num_rows = src.shape[0]
        if src.shape[0] == 0:
            return src.new_zeros(row.shape[0], src.shape[1])
        return src.index_select(0, row.clamp(max=src.shape[0] - 1))

    @staticmethod
    def backward(ctx, grad):
        (row,) = ctx.saved_tensors
        acc = grad.new_zeros(ctx.num_rows + 1, grad.shape[1]).index_add_(0, row, grad)
        return acc[:ctx.num_rows], None


def permute(recv_x: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """``[N, H]`` expert-major copies of the received rows (a row appears once per local expert)."""
    return _GatherRows.apply(recv_x, rows.row)


def unpermute(expert_y: torch.Tensor, recv_topk_weights: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """``[R, H]``: each received row's ``Σ_slot w · expert output``, summed in fp32, in ``expert_y``'s dtype.

    Padding positions (whose ``expert_y`` rows the grouped GEMMs leave undefined) get weight 0
    and add into a spare row that is dropped, so neither they nor their gradients reach a result.
    """
    w = recv_topk_weights.float().reshape(-1)
    w = torch.cat([w, w.new_zeros(1)]).index_select(0, rows.index).unsqueeze(1)
    acc = expert_y.new_zeros(rows.num_rows + 1, expert_y.shape[1], dtype=torch.float32)
    acc = acc.index_add(0, rows.row, expert_y.float() * w)
    return acc[:rows.num_rows].to(expert_y.dtype)
