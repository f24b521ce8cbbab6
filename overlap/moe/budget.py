"""Budget mode: fixed-size MoE buffers, so that no step of a layer waits on the host.

In exact mode every dispatch sizes its outputs by the rows that arrive, which the host must
read first (a CPU-GPU synchronisation per dispatch, and one more to size the expert-major
rows). While the host waits it cannot queue the next compute kernels, so the transfers on the
side stream end up serialised with compute. In budget mode (``num_worst_tokens`` given to
:class:`~overlap.moe.comm.EPComm` or :class:`~overlap.moe.stage.MoEStage`):

- every dispatch returns ``num_worst_tokens`` rows (:meth:`overlap.ep.EPBuffer.dispatch` with
  that budget): rows past the received ones have ids -1 and weights 0;
- the expert-major rows (:func:`overlap.moe.autograd.expert_rows`) are ``expert_capacity``
  entries, the valid ones first; padding entries lie past the last grouped-GEMM group, so the
  GEMMs skip them, and their outputs and gradients go to a discarded row;
- routing-weight gradients return in one equal-split ``all_to_all_single`` of a
  ``[world_size * rows_per_peer, topk]`` fp32 buffer (:func:`pack_weight_grads` /
  :func:`unpack_weight_grads`), placed by the per-source row counts the forward dispatch's
  handle holds on the device (``DispatchHandle.recv_rank_counts``: for ``cuda``/``triton`` a
  column of the count matrix their notify kernel exchanged anyway, so no extra transfer).

Results equal exact mode's (padding never reaches a sum). No host sync remains with a kernel
backend (``cuda``, ``triton``), ``validate_values=False`` on the buffer, and bf16 grouped
GEMMs on sm90+ (torch's ``_grouped_mm`` fast path; other dtypes fall back to a per-group loop
that reads the group sizes on the host). The ``torch`` reference backend still exchanges
counts on the host inside each dispatch.

Memory cost, per layer and micro-batch in flight (activations kept for the backward):

- received rows: ``num_worst_tokens x hidden`` for the dispatched tokens, again for their
  gradient in the backward (exact mode: the received rows);
- expert rows: ``expert_capacity x (2 hidden + 3 expert_ffn)`` elements for the permuted
  input, the SwiGLU input and output and the expert output, plus ``expert_capacity x hidden``
  fp32 while the weighted sum is formed (exact mode: the received (row, expert) pairs);
- weight gradients: ``2 x world_size x rows_per_peer x topk x 4`` bytes (the send and
  receive buffers), where ``rows_per_peer = min(max_tokens_per_rank, num_worst_tokens)``.

The safe budgets (:func:`worst_case_tokens`, :func:`safe_expert_capacity`) hold every
possible routing: ``world_size x max_tokens_per_rank`` rows and ``min(topk, local experts)``
expert rows per received row. Element-wise work (permute, SwiGLU, weighted sum) runs on the
padding too, so a budget close to the rows that really arrive costs least: with a smaller
``num_worst_tokens`` an overflowing dispatch raises (see ``EPBuffer.dispatch``); with a smaller
``expert_capacity`` an overflow fails a device-side assertion (on GPU this aborts the process;
results are never silently wrong).
"""
from __future__ import annotations

import torch

from overlap.ep import EPBuffer
from overlap.ep.layout import RoutingLayout


def worst_case_tokens(buffer: EPBuffer) -> int:
    """Rows a dispatch over ``buffer`` can receive at most: ``world_size * max_tokens_per_rank``."""
    if not isinstance(buffer, EPBuffer):
        raise TypeError(f"buffer must be an overlap.ep.EPBuffer, got {type(buffer).__name__}")
    return buffer.world_size * buffer.max_tokens_per_rank


def safe_expert_capacity(num_worst_tokens: int, topk: int, num_local_experts: int) -> int:
    """Expert-major entries that ``num_worst_tokens`` received rows can need at most (a row
    meets each local expert once, at most ``topk`` of them)."""
    for name, value in (("num_worst_tokens", num_worst_tokens), ("topk", topk),
                        ("num_local_experts", num_local_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return num_worst_tokens * min(topk, num_local_experts)


def check_budget(num_worst_tokens, expert_capacity) -> None:
    """Raise ValueError naming a bad budget argument (None means exact mode / the safe capacity)."""
    if num_worst_tokens is not None and (not isinstance(num_worst_tokens, int) or isinstance(num_worst_tokens, bool)
                                         or num_worst_tokens < 1):
        raise ValueError(f"num_worst_tokens must be None (exact-size buffers) or a positive int, "
                         f"got {num_worst_tokens!r}")
    if expert_capacity is None:
        return
    if num_worst_tokens is None:
        raise ValueError("expert_capacity needs num_worst_tokens (it sizes the expert rows of budget mode)")
    if not isinstance(expert_capacity, int) or isinstance(expert_capacity, bool) or expert_capacity < 0:
        raise ValueError(f"expert_capacity must be None (the safe bound) or an int >= 0, got {expert_capacity!r}")


def rows_per_peer(buffer: EPBuffer, num_worst_tokens: int) -> int:
    """Rows one rank can receive from one peer under a budget: each chunk of the weight-gradient
    all-to-all holds that many."""
    return min(buffer.max_tokens_per_rank, num_worst_tokens)


def pack_weight_grads(grad_recv_w: torch.Tensor, recv_rank_counts: torch.Tensor, per_peer: int) -> torch.Tensor:
    """``[W * per_peer, k]`` fp32: chunk s holds the routing-weight gradients of the rows
    received from rank s, in received order, zeros after them.

    Received rows are ordered by source rank; rows past ``recv_rank_counts.sum()`` (a budget's
    padding) are dropped.
    """
    num_rows, k = grad_recv_w.shape
    world = recv_rank_counts.shape[0]
    ends = torch.cumsum(recv_rank_counts, 0)
    i = torch.arange(num_rows, device=grad_recv_w.device)
    src = (i.unsqueeze(1) >= ends.unsqueeze(0)).sum(1)            # source rank of row i; W: padding
    start = (ends - recv_rank_counts).index_select(0, src.clamp(max=world - 1))
    dest = torch.where(src < world, src * per_peer + i - start, torch.full_like(i, world * per_peer))
    send = grad_recv_w.new_zeros(world * per_peer + 1, k, dtype=torch.float32)   # + a row for the padding
    send.index_copy_(0, dest, grad_recv_w.float())
    return send[:world * per_peer]


def unpack_weight_grads(back: torch.Tensor, layout: RoutingLayout, per_peer: int) -> torch.Tensor:
    """``[T, k]`` fp32 routing-weight gradients of this rank's tokens from what
    :func:`pack_weight_grads` chunks brought back (chunk r from rank r, in send order).

    A slot's weight lives on one rank only; the other ranks hold 0 for it, so the sum over
    ranks is exact.
    """
    slot = layout.token_slot_in_rank.to(torch.int64)              # [T, W], -1: not sent there
    num_tokens, world = slot.shape
    sent = slot >= 0
    where = torch.where(sent, slot + torch.arange(world, device=slot.device) * per_peer, torch.zeros_like(slot))
    rows = back.index_select(0, where.flatten()).view(num_tokens, world, back.shape[1])
    return torch.where(sent.unsqueeze(2), rows, torch.zeros_like(rows)).sum(1)


__all__ = ["worst_case_tokens", "safe_expert_capacity", "check_budget", "rows_per_peer", "pack_weight_grads",
           "unpack_weight_grads"]
