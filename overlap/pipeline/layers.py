"""Building blocks for pipeline stages: a linear layer that can defer its weight gradients,
and a small MLP stage with an ``overlapped_forward_backward`` hook.

Used by the tests and the step-time experiment; also a template for real stages.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from overlap.pipeline.utils import WeightGradStore, sequential_forward_backward


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _DeferrableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors

        # Parameter gradients go straight into .grad (autograd gets None for them), so the
        # closure may run any time before the optimizer step: now, or in a W chunk.
        def weight_grads() -> None:
            rows = grad_out.flatten(0, -2)
            _accumulate(weight, rows.t() @ x.flatten(0, -2))
            if bias is not None:
                _accumulate(bias, rows.sum(0))

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grads)
        else:
            weight_grads()
        return grad_out @ weight, None, None


class DeferrableLinear(nn.Linear):
    """``nn.Linear`` whose weight (and bias) gradients go to ``WeightGradStore`` when enabled.

    The pipeline enables the store for ``b`` chunks, and a later ``W`` chunk runs them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeferrableLinearFn.apply(x, self.weight, self.bias)


class MLPStage(nn.Module):
    """``num_layers`` residual blocks ``x + W2 gelu(W1 x)``, a pipeline stage of hidden size ``hidden``.

    ``deferrable=True`` builds its linears from :class:`DeferrableLinear` (ZB1P / DualPipe
    zero-bubble chunks then really defer weight gradients).
    """

    def __init__(self, hidden: int, ffn: Optional[int] = None, num_layers: int = 1, bias: bool = False,
                 deferrable: bool = True, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        ffn = 4 * hidden if ffn is None else ffn
        linear = DeferrableLinear if deferrable else nn.Linear
        kw = {"bias": bias, "dtype": dtype, "device": device}
        self.layers = nn.ModuleList(nn.ModuleList([linear(hidden, ffn, **kw), linear(ffn, hidden, **kw)])
                                    for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in self.layers:
            x = x + down(F.gelu(up(x)))
        return x

    @classmethod
    def overlapped_forward_backward(
        cls, module0: "MLPStage", inputs0: List[torch.Tensor], criterion0: Optional[Callable],
        labels0: List[torch.Tensor], module1: "MLPStage", loss1: Optional[torch.Tensor],
        outputs1: Sequence[torch.Tensor], output_grads1: Sequence[torch.Tensor],
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Forward of ``module0`` and backward of ``module1``, one after the other.

        A dense stage has no communication to hide; an MoE stage would interleave here,
        running one chunk's all-to-all under the other's computation.
        """
        return sequential_forward_backward(module0, inputs0, criterion0, labels0, loss1, outputs1, output_grads1)
