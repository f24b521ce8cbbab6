"""Routing layout: where each token goes, and the local row movements around the all-to-all.

These are the pure-PyTorch definitions. The Triton kernels (`overlap.triton_kernels`) and
the CUDA kernel (`csrc/kernels/routing_layout.cu`) compute exactly the same outputs and are
tested against these functions.

Conventions (all backends):
- Experts are split evenly and contiguously: expert ``e`` lives on rank ``e // (E // W)``.
- ``topk_idx[t, j] == -1`` means slot j of token t has no expert.
- A token is sent once to each rank that hosts at least one of its experts.
- Send order to a rank, and receive order from a rank, is ascending source token index;
  receive buffers are ordered by source rank, then source token index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingLayout:
    """Where each token goes, for one rank's ``topk_idx`` of shape ``[T, k]``.

    Attributes:
        num_tokens_per_rank: ``[W]`` int32, tokens with at least one expert on each rank.
        num_tokens_per_expert: ``[E]`` int32, (token, slot) pairs routed to each expert.
        is_token_in_rank: ``[T, W]`` bool.
        token_slot_in_rank: ``[T, W]`` int32, the token's position among the tokens sent to
            that rank (ascending token order), or -1 when it is not sent there.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    token_slot_in_rank: torch.Tensor

    @property
    def rank_offsets(self) -> torch.Tensor:
        """``[W]`` int64 exclusive prefix sum of ``num_tokens_per_rank``: each rank's first send row."""
        return _exclusive_prefix(self.num_tokens_per_rank)


def _exclusive_prefix(counts: torch.Tensor) -> torch.Tensor:
    """int64 exclusive prefix sum: where each group's rows start."""
    counts = counts.to(torch.int64)
    return torch.cumsum(counts, 0) - counts


def _group_slots(group: torch.Tensor, valid: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows whose valid slots name groups (``group [R, k]``, ``valid [R, k]``): ``in_group [R, G]``
    int32, 1 where some valid slot of the row names the group (a group named twice counts once), and
    the row's position among the group's rows in ascending row order (meaningful where in_group)."""
    # Count hits rather than scatter booleans: an invalid slot must not clear a hit. scatter_add
    # rather than bincount: no data-dependent shape, so no host sync.
    hits = torch.zeros(group.shape[0], num_groups, dtype=torch.int32, device=group.device)
    hits.scatter_add_(1, group, valid.to(torch.int32))
    in_group = (hits > 0).to(torch.int32)
    return in_group, torch.cumsum(in_group, dim=0, dtype=torch.int32) - in_group


def routing_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> RoutingLayout:
    """Compute the :class:`RoutingLayout` of ``topk_idx`` (``[T, k]``, -1 = no expert)."""
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})")
    experts_per_rank = num_experts // num_ranks
    device = topk_idx.device
    valid = topk_idx >= 0
    idx = topk_idx.to(torch.int64)
    # scatter_add rather than bincount of the valid ids: no data-dependent shape, so no host sync.
    expert_counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    expert_counts.scatter_add_(0, idx.clamp(min=0).flatten(), valid.flatten().to(torch.int32))
    dest_rank = torch.where(valid, idx // experts_per_rank, torch.zeros_like(idx))
    in_rank_i, slot = _group_slots(dest_rank, valid, num_ranks)
    is_in_rank = in_rank_i > 0
    slot = torch.where(is_in_rank, slot, torch.full_like(slot, -1))
    return RoutingLayout(
        num_tokens_per_rank=in_rank_i.sum(0, dtype=torch.int32),
        num_tokens_per_expert=expert_counts.to(torch.int32),
        is_token_in_rank=is_in_rank,
        token_slot_in_rank=slot,
    )


def permute_rows(x: torch.Tensor, token_slot: torch.Tensor, group_offsets: torch.Tensor,
                 num_rows: int) -> torch.Tensor:
    """Scatter token rows into group-major order: ``out[group_offsets[g] + token_slot[t, g]] = x[t]``.

    ``token_slot`` is ``[T, G]`` with -1 where token t is not in group g; ``num_rows`` is the
    total number of (token, group) pairs. Used to build the send buffer (groups = ranks).
    """
    out = x.new_empty(num_rows, x.shape[1])
    t_idx, g_idx = torch.nonzero(token_slot >= 0, as_tuple=True)
    rows = group_offsets.to(torch.int64)[g_idx] + token_slot[t_idx, g_idx].to(torch.int64)
    # index_select/index_copy_ move whole rows; advanced indexing is far slower on CPU.
    out.index_copy_(0, rows, x.index_select(0, t_idx))
    return out


def gather_reduce(src: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · src[index[t, j]]`` accumulated in fp32 (-1 entries skipped).

    ``index`` is ``[T, J]``; ``weights`` is ``[T, J]`` or None (all ones). This is the weighted
    un-permute on the expert side and the cross-rank sum on the way back.
    """
    num_tokens = index.shape[0]
    out = torch.zeros(num_tokens, src.shape[1], dtype=torch.float32, device=src.device)
    valid = index >= 0
    t_idx, j_idx = torch.nonzero(valid, as_tuple=True)
    rows = src.index_select(0, index[t_idx, j_idx].to(torch.int64)).float()
    if weights is not None:
        rows = rows * weights[t_idx, j_idx].float().unsqueeze(1)
    out.index_add_(0, t_idx, rows)
    return out.to(out_dtype or src.dtype)


def expert_major_positions(local_topk_idx: torch.Tensor, num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of received tokens regrouped by local expert.

    Returns ``(num_tokens_per_expert [E_l] int32, position [R, k] int64)`` where
    ``position[i, j]`` is the row of (token i, slot j) in expert-major order (expert, then
    ascending token index), or -1 where ``local_topk_idx[i, j] == -1``.
    """
    # routing_layout with ranks = experts, less what this needs not: per-expert slot counts, the
    # rank division and the -1 fill of the slot table (about half the work on CPU).
    idx = local_topk_idx.to(torch.int64)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    in_expert, row_in_expert = _group_slots(safe, valid, num_local_experts)
    counts = in_expert.sum(0, dtype=torch.int32)
    pos = _exclusive_prefix(counts)[safe] + row_in_expert.to(torch.int64).gather(1, safe)
    return counts, torch.where(valid, pos, torch.full_like(pos, -1))
