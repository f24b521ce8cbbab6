"""Sizes and routing options of a DeepSeek-style MoE block."""
from __future__ import annotations

from dataclasses import dataclass

from overlap.moe.router import check_routing_args


@dataclass(frozen=True)
class MoEConfig:
    """One block: attention, then a routed MoE with an optional shared expert.

    Attributes:
        hidden: model width.
        num_heads: attention heads (must divide ``hidden``).
        num_experts: routed experts over the whole expert-parallel group.
        topk: experts per token.
        expert_ffn: inner width of each routed (SwiGLU) expert.
        shared_ffn: inner width of the shared expert; 0 for none.
        num_groups / topk_groups: group-limited routing (1 / 1: plain top-k).
        score_func: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"``.
        route_scale: routing weights are multiplied by it (DeepSeek-V3: 2.5).
        norm_topk: normalise the chosen weights to sum 1 before scaling.
        bias_update_rate: step of the auxiliary-loss-free bias update (DeepSeek-V3: 0.001).
        causal: causal attention.
        eps: RMSNorm epsilon.
    """

    hidden: int
    num_heads: int
    num_experts: int
    topk: int
    expert_ffn: int
    shared_ffn: int = 0
    num_groups: int = 1
    topk_groups: int = 1
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    norm_topk: bool = True
    bias_update_rate: float = 1e-3
    causal: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden", "num_heads", "expert_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.shared_ffn, int) or self.shared_ffn < 0:
            raise ValueError(f"shared_ffn must be an int >= 0 (0: no shared expert), got {self.shared_ffn!r}")
        if self.hidden % self.num_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden={self.hidden}")
        check_routing_args(self.num_experts, self.topk, self.num_groups, self.topk_groups, self.score_func)
