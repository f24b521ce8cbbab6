"""A DeepSeek-style block, cut into the pieces the overlapped schedule interleaves.

``out = h + shared(hn) + routed(hn)`` with ``h = x + attn(norm(x))`` and ``hn = norm(h)``.
The block runs as pieces with the all-to-alls between them:

    attn(F): x -> h, hn, router(hn)        dispatch(F)      mlp(F): routed experts
    shared(F): shared expert               combine(F)       post(F): out = h + shared + routed

and backwards, from the output gradient g:

    combine(B): g to the experts' rows     shared(B), mlp(B): input grads (weight grads deferrable)
    dispatch(B): token/weight grads back   attn(B): down to x

Every piece starts from leaf tensors (detached boundaries), so each one's backward runs on its
own with ``torch.autograd.backward`` and the transfers between pieces can be issued
asynchronously by whoever drives them (:mod:`overlap.moe.stage`). A :class:`LayerState`
holds one micro-batch's boundary tensors between its forward and its backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from overlap.moe.autograd import expert_rows, permute, unpermute
from overlap.moe.comm import Dispatched
from overlap.moe.config import MoEConfig
from overlap.moe.layers import Attention, RoutedExperts, SwiGLU
from overlap.moe.router import Router


class LayerState:
    """One micro-batch's pass through one block (see the module docstring)."""

    __slots__ = ("x", "h", "hn", "topk_idx", "topk_w", "d", "recv_x", "recv_w", "rows", "y_rows",
                 "s_in", "s_out")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)

    def clear(self) -> None:
        """Drop every tensor (after the backward), so activations are freed at once."""
        for name in self.__slots__:
            setattr(self, name, None)


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    # detach(): a new tensor object, so .grad never leaks between two passes over one buffer.
    return t.detach().requires_grad_(requires_grad)


class MoEBlock(nn.Module):
    """Attention + router + routed experts (this rank's share) + shared expert.

    Args:
        config: sizes and routing options.
        ep_size: expert-parallel group size; this block holds ``num_experts / ep_size`` routed
            experts (1: all of them, e.g. for the dense reference).
    """

    def __init__(self, config: MoEConfig, ep_size: int = 1, dtype=None, device=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if not isinstance(ep_size, int) or ep_size < 1 or config.num_experts % ep_size != 0:
            raise ValueError(f"ep_size must be a positive int dividing num_experts={config.num_experts}, "
                             f"got {ep_size!r}")
        c = config
        self.config = c
        self.ep_size = ep_size
        self.num_local_experts = c.num_experts // ep_size
        kw = {"dtype": dtype, "device": device}
        self.attn_norm = nn.RMSNorm(c.hidden, eps=c.eps, **kw)
        self.attn = Attention(c.hidden, c.num_heads, causal=c.causal, **kw)
        self.moe_norm = nn.RMSNorm(c.hidden, eps=c.eps, **kw)
        self.router = Router(c.hidden, c.num_experts, c.topk, num_groups=c.num_groups, topk_groups=c.topk_groups,
                             score_func=c.score_func, route_scale=c.route_scale, norm_topk=c.norm_topk,
                             bias_update_rate=c.bias_update_rate, **kw)
        self.experts = RoutedExperts(self.num_local_experts, c.hidden, c.expert_ffn, **kw)
        self.shared = SwiGLU(c.hidden, c.shared_ffn, **kw) if c.shared_ffn > 0 else None

    # ---- forward pieces ----------------------------------------------------------------------

    def attn_forward(self, st: LayerState, x: torch.Tensor) -> None:
        """attn(F): attention, residual, norm and routing of ``x [B, S, H]``."""
        st.x = x
        st.h = x + self.attn(self.attn_norm(x))
        st.hn = self.moe_norm(st.h).flatten(0, 1)
        st.topk_idx, st.topk_w = self.router(st.hn)

    @staticmethod
    def dispatch_inputs(st: LayerState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What dispatch(F) sends: ``(hn, topk_idx, topk_weights)``, detached."""
        return st.hn.detach(), st.topk_idx, st.topk_w.detach()

    def mlp_forward(self, st: LayerState, d: Dispatched) -> torch.Tensor:
        """mlp(F): the routed experts on the received rows; returns what combine(F) sends."""
        grad = torch.is_grad_enabled()
        st.d = d
        st.recv_x = _leaf(d.recv_x, grad)
        st.recv_w = _leaf(d.recv_topk_weights, grad and st.topk_w.requires_grad)
        # A budgeted dispatch (d.expert_capacity set) gets fixed-size expert rows: no host sync.
        st.rows = expert_rows(d.recv_topk_idx, self.num_local_experts, capacity=d.expert_capacity)
        expert_y = self.experts(permute(st.recv_x, st.rows), st.rows.counts)
        st.y_rows = unpermute(expert_y, st.recv_w, st.rows)
        return st.y_rows.detach()

    def shared_forward(self, st: LayerState) -> None:
        """shared(F): the shared expert (needs no transfer)."""
        if self.shared is not None:
            st.s_in = _leaf(st.hn, torch.is_grad_enabled())
            st.s_out = self.shared(st.s_in)

    @staticmethod
    def post_forward(st: LayerState, combined: torch.Tensor) -> torch.Tensor:
        """post(F): ``out = h + shared + routed`` (its backward is the identity, run by attn(B))."""
        with torch.no_grad():
            moe = combined if st.s_out is None else st.s_out + combined
            return st.h.detach() + moe.view_as(st.h)

    # ---- backward pieces ---------------------------------------------------------------------

    @staticmethod
    def shared_backward(st: LayerState, grad_out: torch.Tensor) -> None:
        """shared(B): input gradient of the shared expert (weight gradients deferrable)."""
        if st.s_out is not None:
            torch.autograd.backward(st.s_out, grad_out.reshape(st.s_out.shape))

    @staticmethod
    def mlp_backward(st: LayerState, grad_rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """mlp(B): gradients of the received rows and weights; returns what dispatch(B) sends."""
        torch.autograd.backward(st.y_rows, grad_rows)
        grad_x = st.recv_x.grad if st.recv_x.grad is not None else torch.zeros_like(st.recv_x)
        if not st.recv_w.requires_grad:
            return grad_x, None
        grad_w = st.recv_w.grad if st.recv_w.grad is not None else torch.zeros_like(st.recv_w)
        return grad_x, grad_w

    @staticmethod
    def attn_backward(st: LayerState, grad_out: torch.Tensor, grad_hn: torch.Tensor,
                      grad_w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """attn(B): everything back to the block input; returns its gradient."""
        if st.s_in is not None and st.s_in.grad is not None:
            grad_hn = grad_hn + st.s_in.grad
        roots, grads = [st.h, st.hn], [grad_out, grad_hn]
        if grad_w is not None and st.topk_w.requires_grad:
            roots.append(st.topk_w)
            grads.append(grad_w)
        torch.autograd.backward(roots, grads)
        return st.x.grad

    # ---- one piece at a time, without a schedule: the dense reference ----------------------

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The block on one process holding every expert, in plain autograd (the reference).

        Each token's output is ``Σ_k w_k · expert_{e_k}(hn)`` computed expert by expert, with
        no dispatch, permutation or grouped GEMM, so it checks all of those.
        """
        if self.ep_size != 1:
            raise RuntimeError("forward_dense needs a block holding every expert (ep_size=1)")
        h = x + self.attn(self.attn_norm(x))
        hn = self.moe_norm(h).flatten(0, 1)
        idx, w = self.router(hn)
        routed = torch.zeros(hn.shape, dtype=torch.float32, device=hn.device)
        for e in range(self.num_local_experts):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel():
                y = self.experts.expert(e, hn[tok]).float() * w[tok, slot].unsqueeze(1)
                routed = routed.index_add(0, tok, y)
        moe = routed.to(hn.dtype)
        if self.shared is not None:
            moe = self.shared(hn) + moe
        return h + moe.view_as(h)

    @torch.no_grad()
    def load_from_dense(self, dense: "MoEBlock", ep_rank: int) -> "MoEBlock":
        """Copy a full block's weights: replicated ones whole, routed experts this rank's slice."""
        if dense.ep_size != 1 or dense.config != self.config:
            raise ValueError("dense must be an ep_size=1 MoEBlock with the same config")
        if not 0 <= ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={ep_rank} is outside [0, {self.ep_size})")
        lo, hi = ep_rank * self.num_local_experts, (ep_rank + 1) * self.num_local_experts
        src = dense.state_dict()
        for name, t in self.state_dict().items():
            value = src[name]
            if name.startswith("experts."):
                value = value[lo:hi]
            t.copy_(value)
        return self
