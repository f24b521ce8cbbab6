"""Scatter token rows into group-major order (the send buffer): Triton ``permute_rows``.

One program per (token, column block) reads its piece of ``x[t]`` once and stores it to every
group the token belongs to. Values are only loaded and stored, never converted, so the copy is
bit-exact for every row format (bf16 and fp8 too, even in the interpreter, which cannot do bf16
arithmetic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from overlap.triton_kernels._common import (INDEX_DTYPES, NUM_WARPS, check_int, check_same_device,
                                            check_tensor, row_block)

ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _permute_rows_kernel(x_ptr, slot_ptr, group_offsets_ptr, out_ptr, hidden, num_groups, num_rows,
                         BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    row = tl.load(x_ptr + t * hidden + cols, mask=col_ok)
    # A scalar loop: the branch is uniform per program and stores do not stall, so there is
    # nothing to gain from a [groups, columns] tile except a register-layout shuffle.
    g = 0
    while g < num_groups:  # not range(): see RUNTIME_LOOPS in _common
        slot = tl.load(slot_ptr + t * num_groups + g).to(tl.int64)
        if slot >= 0:
            dst = tl.load(group_offsets_ptr + g).to(tl.int64) + slot
            if (dst >= 0) & (dst < num_rows):
                tl.store(out_ptr + dst * hidden + cols, row, mask=col_ok)
        g += 1


@triton_op("overlap_triton::permute_rows", mutates_args=())
def _permute_rows_op(x: torch.Tensor, token_slot: torch.Tensor, group_offsets: torch.Tensor,
                     num_rows: int) -> torch.Tensor:
    num_tokens, hidden = x.shape
    out = x.new_empty(num_rows, hidden)
    if num_tokens == 0 or hidden == 0 or num_rows == 0:
        return out
    block_h = row_block(x.element_size(), hidden)
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    wrap_triton(_permute_rows_kernel)[grid](
        x, token_slot, group_offsets, out, hidden, token_slot.shape[1],
        num_rows, BLOCK_H=block_h, num_warps=NUM_WARPS)
    return out


def permute_rows(x: torch.Tensor, token_slot: torch.Tensor, group_offsets: torch.Tensor,
                 num_rows: int) -> torch.Tensor:
    """Triton version of :func:`overlap.ep.layout.permute_rows`, with identical output.

    ``out[group_offsets[g] + token_slot[t, g]] = x[t]`` for every ``token_slot[t, g] >= 0``.

    Args:
        x: ``[T, H]`` rows (bf16, fp16, fp32 or fp8), contiguous, on CUDA; any ``H``.
        token_slot: ``[T, G]`` int32/int64, -1 where token t is not in group g (e.g.
            ``RoutingLayout.token_slot_in_rank``).
        group_offsets: ``[G]`` int32/int64, each group's first row (e.g. ``rank_offsets``).
        num_rows: rows of the output, normally the number of ``token_slot >= 0`` entries.

    Returns:
        ``[num_rows, H]`` tensor of ``x.dtype``; rows no token maps to are left uninitialised
        (as in the reference). Destinations outside ``[0, num_rows)`` are skipped, not written.
    """
    check_tensor(x, "x", dtypes=ROW_DTYPES, ndim=2)
    check_tensor(token_slot, "token_slot", dtypes=INDEX_DTYPES, ndim=2)
    check_tensor(group_offsets, "group_offsets", dtypes=INDEX_DTYPES, ndim=1)
    num_rows = check_int(num_rows, "num_rows", minimum=0)
    check_same_device(x, "x", token_slot, "token_slot")
    check_same_device(x, "x", group_offsets, "group_offsets")
    if token_slot.shape[0] != x.shape[0]:
        raise ValueError(f"token_slot must have one row per token of x ({x.shape[0]}), "
                         f"got shape {tuple(token_slot.shape)}")
    if group_offsets.shape[0] != token_slot.shape[1]:
        raise ValueError(f"group_offsets must have one entry per column of token_slot "
                         f"({token_slot.shape[1]}), got shape {tuple(group_offsets.shape)}")
    return _permute_rows_op(x, token_slot, group_offsets, num_rows)
