"""Weighted gather-and-sum of rows in fp32: Triton ``gather_reduce``.

``out[t] = sum_j w[t, j] * src[index[t, j]]`` is both the expert-side weighted un-permute
(index = a token's k expert rows) and the cross-rank sum of combine (index = a token's row from
each rank). One program per (token, column block) loads up to ``BLOCK_J`` source rows as one
``[BLOCK_J, BLOCK_H]`` tile, so that many independent loads are in flight at once, and sums
them in fp32 registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from overlap.triton_kernels._common import (FLOAT_DTYPES, INDEX_DTYPES, NUM_WARPS, check_same_device,
                                            check_tensor, row_block)

_MAX_BLOCK_J = 8


@triton.jit
def _gather_reduce_kernel(src_ptr, index_ptr, weights_ptr, out_ptr, hidden, num_src_rows, J,
                          HAS_WEIGHTS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    j0 = 0
    while j0 < J:  # not range(): see RUNTIME_LOOPS in _common
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < J
        rows = tl.load(index_ptr + t * J + js, mask=j_ok, other=-1).to(tl.int64)
        row_ok = j_ok & (rows >= 0) & (rows < num_src_rows)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        vals = tl.load(src_ptr + rows[:, None] * hidden + cols[None, :], mask=tile_ok,
                       other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            # Masked by row_ok: a skipped slot's weight may be inf/nan and is never read.
            w = tl.load(weights_ptr + t * J + js, mask=row_ok, other=0.0).to(tl.float32)
            vals = vals * w[:, None]
        acc += tl.sum(vals, axis=0)
        j0 += BLOCK_J
    tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton_op("overlap_triton::gather_reduce", mutates_args=())
def _gather_reduce_op(src: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    num_tokens, num_j = index.shape
    num_src_rows, hidden = src.shape
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=src.device)
    if num_tokens == 0 or hidden == 0:
        return out
    block_h = row_block(src.element_size(), hidden)
    block_j = max(2, min(triton.next_power_of_2(max(num_j, 1)), _MAX_BLOCK_J))
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    has_weights = weights is not None
    wrap_triton(_gather_reduce_kernel)[grid](
        src, index, weights if has_weights else index, out, hidden, num_src_rows, num_j,
        HAS_WEIGHTS=has_weights, BLOCK_J=block_j, BLOCK_H=block_h, num_warps=NUM_WARPS)
    return out


def gather_reduce(src: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton version of :func:`overlap.ep.layout.gather_reduce` (same result up to fp32 rounding).

    ``out[t] = sum_j weights[t, j] * src[index[t, j]]``, accumulated in fp32, skipping
    ``index == -1``.

    Args:
        src: ``[N, H]`` bf16/fp16/fp32 rows, contiguous, on CUDA; any ``H``.
        index: ``[T, J]`` int32/int64 rows of ``src``; -1 (or anything outside ``[0, N)``,
            which the reference would reject) is skipped.
        weights: ``[T, J]`` bf16/fp16/fp32, or None for all ones.
        out_dtype: bf16/fp16/fp32 output dtype; default ``src.dtype``.

    Returns:
        ``[T, H]`` tensor of ``out_dtype``; tokens with no valid entry get zeros.
    """
    check_tensor(src, "src", dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(index, "index", dtypes=INDEX_DTYPES, ndim=2)
    check_same_device(src, "src", index, "index")
    if weights is not None:
        check_tensor(weights, "weights", dtypes=FLOAT_DTYPES, ndim=2)
        check_same_device(src, "src", weights, "weights")
        if weights.shape != index.shape:
            raise ValueError(f"weights must have the shape of index {tuple(index.shape)}, "
                             f"got {tuple(weights.shape)}")
    if out_dtype is None:
        out_dtype = src.dtype
    elif not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}")
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of bfloat16, float16, float32, got {out_dtype}")
    return _gather_reduce_op(src, index, weights, out_dtype)
