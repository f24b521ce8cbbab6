"""Routing layout in Triton: bit-identical to :func:`overlap.ep.layout.routing_layout`.

A token's slot in a rank is a prefix count over *all* tokens, so blocks of tokens depend on
each other. Instead of cross-program spin-waits (which the interpreter cannot run and which
deadlock if programs are not co-resident), the work is split in three launches:

1. ``_count_kernel``: per token block, which ranks each token hits (``is_token_in_rank``),
   the block's token count per rank, and the per-expert counts (integer atomics, so exact).
2. ``_scan_kernel``: one program per rank chunk turns the block counts into each block's
   first slot per rank (exclusive scan) and the per-rank totals.
3. ``_slot_kernel``: per token block, a ``tl.cumsum`` down the block plus the block's base.

When all tokens fit in one block (decode sizes) step 1 writes slots and totals itself: one
launch instead of three.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from overlap.ep.layout import RoutingLayout
from overlap.triton_kernels._common import INDEX_DTYPES, check_int, check_tensor

# [tokens, ranks] tile of one program. The tile, its cumsum and the broadcast compares live in
# registers: 2048 int32 at 8 warps compiles to <= ~120 registers for sm_90 without spills,
# while 8192 (or rank chunks of 64) hit 255 registers and spill.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_W = 16
_NUM_WARPS = 8
# One program walks k columns of its tokens in sequence; past a few hundred tokens, three
# launches over many programs beat one long program.
_MAX_FUSED_T = 512
_MULTI_BLOCK_T = 256


@triton.jit
def _count_kernel(topk_ptr, in_rank_ptr, block_counts_ptr, rank_counts_ptr, slot_ptr,
                  expert_counts_ptr, num_tokens, k, num_ranks, num_experts, experts_per_rank,
                  FUSED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_w = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < num_tokens
    tok64 = tok.to(tl.int64)
    ranks = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    rank_ok = ranks < num_ranks
    # Only the first rank chunk counts experts, so each (token, slot) is counted once.
    count_experts = pid_w == 0

    hits = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.int32)
    j = 0
    while j < k:  # not range(k): see RUNTIME_LOOPS in _common
        e = tl.load(topk_ptr + tok64 * k + j, mask=tok_ok, other=-1)
        # Range-check in the loaded dtype: truncating a bad int64 first could make it valid.
        valid = tok_ok & (e >= 0) & (e < num_experts)
        e = tl.where(valid, e, 0).to(tl.int32)
        dest = e // experts_per_rank
        hit = valid[:, None] & (dest[:, None] == ranks[None, :])
        hits = hits | hit.to(tl.int32)
        tl.atomic_add(expert_counts_ptr + e, 1, mask=valid & count_experts, sem="relaxed")
        j += 1

    tile = tok64[:, None] * num_ranks + ranks[None, :]
    tile_ok = tok_ok[:, None] & rank_ok[None, :]
    tl.store(in_rank_ptr + tile, hits != 0, mask=tile_ok)
    block_total = tl.sum(hits, axis=0)
    if FUSED:
        slot = tl.where(hits != 0, tl.cumsum(hits, axis=0) - hits, -1)
        tl.store(slot_ptr + tile, slot, mask=tile_ok)
        tl.store(rank_counts_ptr + ranks, block_total, mask=rank_ok)
    else:
        tl.store(block_counts_ptr + pid_t * num_ranks + ranks, block_total, mask=rank_ok)


@triton.jit
def _scan_kernel(block_counts_ptr, block_base_ptr, rank_counts_ptr, num_blocks, num_ranks,
                 BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
    ranks = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    rank_ok = ranks < num_ranks
    carry = tl.zeros((BLOCK_W,), dtype=tl.int32)
    start = 0
    while start < num_blocks:  # not range(): see RUNTIME_LOOPS in _common
        blocks = start + tl.arange(0, BLOCK_B)
        tile = blocks[:, None] * num_ranks + ranks[None, :]
        tile_ok = (blocks < num_blocks)[:, None] & rank_ok[None, :]
        counts = tl.load(block_counts_ptr + tile, mask=tile_ok, other=0)
        base = tl.cumsum(counts, axis=0) - counts + carry[None, :]
        tl.store(block_base_ptr + tile, base, mask=tile_ok)
        carry += tl.sum(counts, axis=0)
        start += BLOCK_B
    tl.store(rank_counts_ptr + ranks, carry, mask=rank_ok)


@triton.jit
def _slot_kernel(in_rank_ptr, block_base_ptr, slot_ptr, num_tokens, num_ranks,
                 BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_t = tl.program_id(0)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rank_ok = ranks < num_ranks
    tile = tok.to(tl.int64)[:, None] * num_ranks + ranks[None, :]
    tile_ok = (tok < num_tokens)[:, None] & rank_ok[None, :]
    hits = tl.load(in_rank_ptr + tile, mask=tile_ok, other=0).to(tl.int32)
    base = tl.load(block_base_ptr + pid_t * num_ranks + ranks, mask=rank_ok, other=0)
    slot = tl.where(hits != 0, tl.cumsum(hits, axis=0) - hits + base[None, :], -1)
    tl.store(slot_ptr + tile, slot, mask=tile_ok)


def layout_launch_config(num_tokens: int, num_ranks: int) -> tuple[int, int, bool]:
    """``(BLOCK_T, BLOCK_W, fused)`` for a launch; fused means a single token block."""
    block_w = max(2, min(triton.next_power_of_2(num_ranks), _MAX_BLOCK_W))
    max_block_t = max(16, min(_TILE_ELEMENTS // block_w, _MAX_FUSED_T))
    if num_tokens <= max_block_t:
        return max(16, triton.next_power_of_2(num_tokens)), block_w, True
    return min(_MULTI_BLOCK_T, max_block_t), block_w, False


@triton_op("overlap_triton::routing_layout", mutates_args=())
def _routing_layout_op(topk_idx: torch.Tensor, num_experts: int,
                       num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, k = topk_idx.shape
    device = topk_idx.device
    rank_counts = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    expert_counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
    slot = torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return rank_counts, expert_counts, in_rank, slot

    block_t, block_w, fused = layout_launch_config(num_tokens, num_ranks)
    num_blocks = triton.cdiv(num_tokens, block_t)
    grid = (num_blocks, triton.cdiv(num_ranks, block_w))
    # Unused by the fused launch, but a kernel argument still needs a real tensor.
    block_counts = torch.empty(num_blocks if not fused else 1, num_ranks, dtype=torch.int32,
                               device=device)
    wrap_triton(_count_kernel)[grid](
        topk_idx, in_rank, block_counts, rank_counts, slot, expert_counts,
        num_tokens, k, num_ranks, num_experts, num_experts // num_ranks,
        FUSED=fused, BLOCK_T=block_t, BLOCK_W=block_w, num_warps=_NUM_WARPS)
    if fused:
        return rank_counts, expert_counts, in_rank, slot

    block_base = torch.empty_like(block_counts)
    wrap_triton(_scan_kernel)[(grid[1],)](
        block_counts, block_base, rank_counts, num_blocks, num_ranks,
        BLOCK_B=max(16, min(triton.next_power_of_2(num_blocks), 128)), BLOCK_W=block_w,
        num_warps=_NUM_WARPS)
    wrap_triton(_slot_kernel)[grid](
        in_rank, block_base, slot, num_tokens, num_ranks, BLOCK_T=block_t, BLOCK_W=block_w,
        num_warps=_NUM_WARPS)
    return rank_counts, expert_counts, in_rank, slot


def routing_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> RoutingLayout:
    """Triton version of :func:`overlap.ep.layout.routing_layout`, with identical outputs.

    Args:
        topk_idx: ``[T, k]`` int32 or int64, contiguous, on CUDA; ``-1`` = no expert.
            Entries outside ``[0, num_experts)`` are treated like ``-1`` (the reference
            raises on values >= ``num_experts`` instead; checking would need a device sync).
        num_experts: total experts ``E``, a multiple of ``num_ranks``; expert ``e`` lives on
            rank ``e // (E // W)``.
        num_ranks: ``W``.

    Returns:
        :class:`overlap.ep.layout.RoutingLayout` with ``num_tokens_per_rank [W]`` int32,
        ``num_tokens_per_expert [E]`` int32, ``is_token_in_rank [T, W]`` bool and
        ``token_slot_in_rank [T, W]`` int32 (-1 where the token does not go).
    """
    check_tensor(topk_idx, "topk_idx", dtypes=INDEX_DTYPES, ndim=2)
    num_experts = check_int(num_experts, "num_experts", minimum=1)
    num_ranks = check_int(num_ranks, "num_ranks", minimum=1)
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})")
    rank_counts, expert_counts, in_rank, slot = _routing_layout_op(topk_idx, num_experts, num_ranks)
    return RoutingLayout(num_tokens_per_rank=rank_counts, num_tokens_per_expert=expert_counts,
                         is_token_in_rank=in_rank, token_slot_in_rank=slot)
