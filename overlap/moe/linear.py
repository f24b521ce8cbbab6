"""Linear and grouped linear layers whose weight gradients can be deferred.

Both run through one autograd function: the backward returns the input gradient at once and
hands the weight gradient to :func:`overlap.moe.weight_grads.defer_or_run`, so a pipeline
(or the overlapped forward-backward) decides when it is computed.

A grouped linear multiplies consecutive row groups of ``x`` by their own weight, the grouped
GEMM of the routed experts: rows ``[offs[g-1], offs[g])`` use ``weight[g]``; rows past
``offs[-1]`` belong to no group (budget mode's padding): their outputs are left undefined and
they add nothing to weight gradients. It runs as ``torch._grouped_mm`` where the shapes allow it
(rows 16-byte aligned), else one GEMM per group.

Host syncs: on CUDA only bf16 on sm90+ takes ``torch._grouped_mm``'s fast path, which reads
``offs`` on the device; other dtypes reach torch's own per-group fallback, and our loop reads
the group bounds with ``offs.tolist()``: one host sync per GEMM either way.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from overlap.moe.weight_grads import accumulate_grad, defer_or_run

# (product, device type, dtype) where torch._grouped_mm raised once: use the per-group loop there.
_GROUPED_MM_BROKEN: set = set()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned start, as torch._grouped_mm requires."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _can_group(key: tuple, *tensors: torch.Tensor) -> bool:
    t0 = tensors[0]
    if key in _GROUPED_MM_BROKEN or not hasattr(torch, "_grouped_mm"):
        return False
    if t0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    align = 16 // t0.element_size()
    # Both matrix dims of a 3-D weight, the width of a 2-D row block: 16-byte strides.
    dims = [d for t in tensors for d in (t.shape[-2:] if t.dim() == 3 else t.shape[-1:])]
    return all(d % align == 0 for d in dims)


def _try_grouped(fn, key) -> Optional[torch.Tensor]:
    try:
        return fn()
    except RuntimeError:
        # Unsupported on this build/device/dtype: remember, and loop from now on.
        _GROUPED_MM_BROKEN.add(key)
        return None


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ weight[g].T`` for ``x [N, in]``, ``weight [G, out, in]``.

    ``offs`` is ``[G]`` int32, the inclusive end row of each group (cumulative counts).
    """
    key = ("fprop", x.device.type, x.dtype)
    if _can_group(key, x, weight):
        y = _try_grouped(lambda: torch._grouped_mm(_aligned(x), _aligned(weight).transpose(1, 2), offs=offs), key)
        if y is not None:
            return y
    out = x.new_empty(x.shape[0], weight.shape[1])
    for g, (s, e) in enumerate(_group_bounds(offs)):
        out[s:e] = x[s:e] @ weight[g].t()
    return out


def grouped_mm_dgrad(grad: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Input gradient of :func:`grouped_mm`: ``grad[rows of g] @ weight[g]``."""
    key = ("dgrad", grad.device.type, grad.dtype)
    if _can_group(key, grad, weight.transpose(1, 2)):
        y = _try_grouped(lambda: torch._grouped_mm(_aligned(grad), _aligned(weight), offs=offs), key)
        if y is not None:
            return y
    out = grad.new_empty(grad.shape[0], weight.shape[2])
    for g, (s, e) in enumerate(_group_bounds(offs)):
        out[s:e] = grad[s:e] @ weight[g]
    return out


def grouped_mm_wgrad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Weight gradient of :func:`grouped_mm`: ``[G, out, in]``, ``grad[rows of g].T @ x[rows of g]``."""
    num_groups = offs.shape[0]
    if x.shape[0] == 0:
        return x.new_zeros(num_groups, grad.shape[1], x.shape[1])
    key = ("wgrad", x.device.type, x.dtype)
    if _can_group(key, grad, x):
        y = _try_grouped(lambda: torch._grouped_mm(_aligned(grad).t(), _aligned(x), offs=offs), key)
        if y is not None:
            return y
    out = x.new_zeros(num_groups, grad.shape[1], x.shape[1])
    for g, (s, e) in enumerate(_group_bounds(offs)):
        if e > s:
            out[g] = grad[s:e].t() @ x[s:e]
    return out


class _LinearFn(torch.autograd.Function):
    """``x @ weight.T`` (dense, ``offs is None``) or the grouped product, deferrable weight grad."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        ctx.save_for_backward(x, weight, offs)
        if offs is None:
            return x @ weight.t()
        return grouped_mm(x, weight, offs)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()

        # Writes .grad itself (autograd sees None), so it may run now or in a later W chunk.
        def weight_grad() -> None:
            if offs is None:
                g = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            else:
                g = grouped_mm_wgrad(grad_out, x, offs)
            accumulate_grad(weight, g)

        if weight.requires_grad:
            defer_or_run(weight_grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = grad_out @ weight if offs is None else grouped_mm_dgrad(grad_out, weight, offs)
        return grad_x, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense (``offs=None``: ``x [..., in] @ weight[out, in].T``) or grouped linear
    (``x [N, in]``, ``weight [G, out, in]``, ``offs [G]`` int32 cumulative row counts),
    with a deferrable weight gradient."""
    return _LinearFn.apply(x, weight, offs)


class DeferredLinear(nn.Linear):
    """Bias-free ``nn.Linear`` whose weight gradient goes through ``WeightGradStore``."""

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None):
        super().__init__(in_features, out_features, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class GroupedLinear(nn.Module):
    """``num_groups`` linears ``in_features -> out_features`` applied to consecutive row groups."""

    def __init__(self, num_groups: int, in_features: int, out_features: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_groups, out_features, in_features, dtype=dtype, device=device))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation range
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, offs)
