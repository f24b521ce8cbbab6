"""Synthetic skewed expert loads and routings, shared by the EPLB tests and experiments.

Real MoE routers are skewed: a few experts take a large share of tokens, and the skew varies
from layer to layer. These generators produce that shape reproducibly (every function takes a
``torch.Generator``) so that planners can be compared on the same inputs.
"""
from __future__ import annotations

import torch


def zipf_popularity(num_experts: int, skew: float, generator: torch.Generator) -> torch.Tensor:
    """``[E]`` float64 probabilities ``∝ 1 / rank**skew``, the ranks shuffled over experts."""
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    probs = 1.0 / ranks.pow(skew)
    return (probs / probs.sum())[torch.randperm(num_experts, generator=generator)]


def hot_popularity(num_experts: int, num_hot: int, hot_share: float, generator: torch.Generator) -> torch.Tensor:
    """``[E]`` probabilities: ``num_hot`` random experts share ``hot_share``, the rest the remainder (with noise)."""
    cold = torch.rand(num_experts, generator=generator, dtype=torch.float64) + 0.5
    hot = torch.randperm(num_experts, generator=generator)[:num_hot]
    is_hot = torch.zeros(num_experts, dtype=torch.bool)
    is_hot[hot] = True
    cold[is_hot] = 0
    probs = cold / cold.sum() * (1 - hot_share)
    probs[hot] = hot_share / num_hot
    return probs


def sample_counts(probs: torch.Tensor, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``[E]`` int64 token counts: ``num_tokens`` draws from ``probs`` (sampling noise included)."""
    return torch.multinomial(probs, num_tokens, replacement=True, generator=generator).bincount(
        minlength=probs.numel())


def mixed_skew_loads(num_layers: int, num_experts: int, generator: torch.Generator,
                     tokens_per_layer: int = 100_000, skews: tuple[float, float] = (0.3, 1.5)) -> torch.Tensor:
    """``[layers, experts]`` counts, layer ``l`` Zipf with exponent spread evenly over ``skews``."""
    exponents = torch.linspace(skews[0], skews[1], num_layers).tolist()
    return torch.stack([sample_counts(zipf_popularity(num_experts, s, generator), tokens_per_layer, generator)
                        for s in exponents])


def load_suite(num_layers: int, num_experts: int, generator: torch.Generator,
               tokens_per_layer: int = 100_000) -> dict[str, torch.Tensor]:
    """Named ``[layers, experts]`` load matrices: Zipf of several skews, hot experts, mixed skew.

    - ``zipf{s}``: every layer Zipf with exponent ``s`` (its own shuffle per layer);
    - ``hot4``: 4 experts per layer take 40% of the tokens;
    - ``mixed``: layer ``l`` has Zipf exponent spread from 0.3 (first layer) to 1.5 (last).
    """
    def stack(popularity):
        return torch.stack([sample_counts(popularity(), tokens_per_layer, generator) for _ in range(num_layers)])

    suite = {f"zipf{s}": stack(lambda s=s: zipf_popularity(num_experts, s, generator)) for s in (0.6, 1.0, 1.4)}
    suite["hot4"] = stack(lambda: hot_popularity(num_experts, 4, 0.4, generator))
    suite["mixed"] = mixed_skew_loads(num_layers, num_experts, generator, tokens_per_layer)
    return suite


def sample_topk(num_tokens: int, probs: torch.Tensor, k: int, generator: torch.Generator,
                empty_frac: float = 0.0) -> torch.Tensor:
    """``[T, k]`` int64 routing: ``k`` distinct experts per token drawn by popularity, -1 at ``empty_frac`` of slots."""
    idx = torch.multinomial(probs.expand(num_tokens, -1), k, replacement=False, generator=generator)
    if empty_frac > 0:
        idx[torch.rand(num_tokens, k, generator=generator) < empty_frac] = -1
    return idx
