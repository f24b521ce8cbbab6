"""Top-k router with group-limited routing and DeepSeek-V3's auxiliary-loss-free balancing.

Scores are ``sigmoid`` (DeepSeek-V3) or ``softmax`` of the gate logits, in fp32. A per-expert
``expert_bias`` is added to the scores *for choosing experts only*; the routing weights are the
unbiased scores of the chosen experts (normalised to sum 1 when ``norm_topk``, then times
``route_scale``). Group-limited routing first keeps the ``topk_groups`` best of ``num_groups``
expert groups, a group scoring the sum of its two best biased scores, and picks the top-k among
their experts. Balancing: the router counts the tokens each expert receives while training;
:meth:`Router.update_bias` moves every bias by ``bias_update_rate`` toward balance (up for an
underloaded expert, down for an overloaded one) and resets the counts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from overlap.moe.linear import DeferredLinear

SCORE_FUNCS = ("sigmoid", "softmax")


def check_routing_args(num_experts: int, topk: int, num_groups: int, topk_groups: int, score_func: str) -> None:
    """Raise ValueError naming the first inconsistent routing argument."""
    for name, value in (("num_experts", num_experts), ("topk", topk), ("num_groups", num_groups),
                        ("topk_groups", topk_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_experts % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts}")
    if topk_groups > num_groups:
        raise ValueError(f"topk_groups={topk_groups} exceeds num_groups={num_groups}")
    reachable = topk_groups * (num_experts // num_groups)
    if topk > reachable:
        raise ValueError(f"topk={topk} exceeds the {reachable} experts that topk_groups={topk_groups} "
                         f"groups of {num_experts // num_groups} can offer")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")


def select_experts(scores: torch.Tensor, bias: Optional[torch.Tensor], topk: int, num_groups: int = 1,
                   topk_groups: int = 1) -> torch.Tensor:
    """``[T, topk]`` int64 expert ids chosen from ``scores [T, E]`` (+ ``bias [E]``), group-limited."""
    choice = scores if bias is None else scores + bias
    if num_groups > 1:
        t, e = choice.shape
        grouped = choice.view(t, num_groups, e // num_groups)
        group_score = grouped.topk(min(2, e // num_groups), dim=-1).values.sum(-1)
        keep = group_score.topk(topk_groups, dim=-1).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(t, e)
    return choice.topk(topk, dim=-1).indices


class Router(nn.Module):
    """Gate ``hidden -> num_experts`` and the routing rule of the module docstring.

    ``forward(x [T, hidden])`` returns ``(topk_idx [T, topk] int64, topk_weights [T, topk] fp32)``;
    the weights are differentiable with respect to the gate.
    """

    def __init__(self, hidden: int, num_experts: int, topk: int, *, num_groups: int = 1, topk_groups: int = 1,
                 score_func: str = "sigmoid", route_scale: float = 1.0, norm_topk: bool = True,
                 bias_update_rate: float = 1e-3, dtype=None, device=None):
        super().__init__()
        check_routing_args(num_experts, topk, num_groups, topk_groups, score_func)
        if not isinstance(bias_update_rate, (int, float)) or bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be a number >= 0, got {bias_update_rate!r}")
        self.num_experts, self.topk = num_experts, topk
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.score_func, self.route_scale, self.norm_topk = score_func, float(route_scale), norm_topk
        self.bias_update_rate = float(bias_update_rate)
        self.gate = DeferredLinear(hidden, num_experts, dtype=dtype, device=device)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x).float()
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        idx = select_experts(scores.detach(), self.expert_bias, self.topk, self.num_groups, self.topk_groups)
        weights = scores.gather(1, idx)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        if self.training:
            with torch.no_grad():
                # scatter_add, not bincount: bincount syncs the host on CUDA.
                self.tokens_per_expert.scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))
        return idx, weights

    @torch.no_grad()
    def update_bias(self, group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
        """Nudge ``expert_bias`` toward balance from the counts seen since the last update.

        With ``group``, counts are summed over its ranks first (every rank then applies the
        same update, keeping replicated routers identical). Returns the counts used.
        """
        counts = self.tokens_per_expert.clone()
        if group is not None:
            dist.all_reduce(counts, group=group)
        self.tokens_per_expert.zero_()
        if int(counts.sum()) == 0:
            return counts
        load = counts.to(torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        return counts
