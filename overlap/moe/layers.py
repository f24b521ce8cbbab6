"""The compute layers of a DeepSeek-style block: attention, the shared expert, the routed experts.

Every weight goes through :mod:`overlap.moe.linear`, so all weight gradients are deferrable.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from overlap.moe.linear import DeferredLinear, GroupedLinear


class Attention(nn.Module):
    """Multi-head self-attention over ``[batch, seq, hidden]`` with torch SDPA (causal by default).

    (DeepSeek-V3 uses MLA; the attention kind does not change where the all-to-alls go.)
    """

    def __init__(self, hidden: int, num_heads: int, causal: bool = True, dtype=None, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.causal = causal
        self.qkv = DeferredLinear(hidden, 3 * hidden, dtype=dtype, device=device)
        self.out = DeferredLinear(hidden, hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP ``w2(silu(w1 x) * w3 x)`` (the shared expert); w1 and w3 are one GEMM."""

    def __init__(self, hidden: int, ffn: int, dtype=None, device=None):
        super().__init__()
        self.w13 = DeferredLinear(hidden, 2 * ffn, dtype=dtype, device=device)
        self.w2 = DeferredLinear(ffn, hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class RoutedExperts(nn.Module):
    """``num_experts`` SwiGLU experts run as two grouped GEMMs over expert-major rows.

    ``forward(x, counts)``: ``x [N, hidden]`` holds expert 0's rows first, then expert 1's, ...;
    ``counts [num_experts]`` int32 says how many rows each has.
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int, dtype=None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = GroupedLinear(num_experts, hidden, 2 * ffn, dtype=dtype, device=device)
        self.w2 = GroupedLinear(num_experts, ffn, hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = self.w13(x, offs).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up, offs)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on rows ``x`` (plain autograd; the dense reference uses it)."""
        gate, up = (x @ self.w13.weight[e].t()).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2.weight[e].t()
