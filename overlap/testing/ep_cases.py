"""Random routings, edge cases and a communication-free oracle for dispatch/combine tests.

Every rank builds *all* ranks' inputs from one seed, so each rank can compute what it must
receive and what combine must return without trusting any communication. Shared by the
tests of every backend (CPU gloo and GPU NCCL alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EPCase:
    name: str
    tokens_per_rank: list[int]          # T of each rank (0 allowed)
    hidden: int
    num_experts: int
    topk: int
    dtype: torch.dtype = torch.float32
    routing: str = "random"             # random | skip_last_rank | one_expert | sparse
    seed: int = 0
    extra: dict = field(default_factory=dict)


def make_routing(case: EPCase, src_rank: int, world_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    T, E, k = case.tokens_per_rank[src_rank], case.num_experts, case.topk
    epr = E // world_size
    if case.routing == "one_expert":
        idx = torch.full((T, k), -1, dtype=torch.int64)
        idx[:, 0] = 0
    else:
        allowed = E - epr if case.routing == "skip_last_rank" else E  # last rank hosts the top experts
        picks = [torch.randperm(allowed, generator=gen)[:k] for _ in range(T)]
        # Fewer allowed experts than k (e.g. one rank, last rank skipped): pad with -1.
        picks = [torch.cat([p, torch.full((k - p.numel(),), -1, dtype=torch.int64)]) for p in picks]
        idx = torch.stack(picks) if T else torch.empty(0, k, dtype=torch.int64)
        if case.routing in ("random", "sparse", "skip_last_rank") and T:
            p_drop = 0.6 if case.routing == "sparse" else 0.15
            drop = torch.rand(T, k, generator=gen) < p_drop
            if T >= 2:
                drop[T // 2] = True  # one token with no expert at all
            idx = torch.where(drop, torch.full_like(idx, -1), idx)
    w = torch.rand(T, k, generator=gen, dtype=torch.float32) + 0.05
    w = torch.where(idx >= 0, w, torch.zeros_like(w))
    return idx, w


def make_inputs(case: EPCase, src_rank: int, world_size: int):
    """(x, topk_idx, topk_weights) of one rank, on CPU."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + src_rank)
    T = case.tokens_per_rank[src_rank]
    x = (torch.randn(T, case.hidden, generator=gen) * 2).to(case.dtype)
    idx, w = make_routing(case, src_rank, world_size, gen)
    return x, idx, w


def expert_fn(x: torch.Tensor, global_expert: int) -> torch.Tensor:
    """A cheap, expert-specific function in fp32: f_e(x) = x·(1 + e/16) + sin(e)."""
    return x.float() * (1.0 + global_expert / 16.0) + float(torch.sin(torch.tensor(float(global_expert))))


def expected_dispatch(case: EPCase, rank: int, world_size: int):
    """What ``rank`` must receive: (recv_x, recv_topk_idx, recv_topk_weights, counts_per_local_expert)."""
    epr = case.num_experts // world_size
    xs, idxs, ws = [], [], []
    for src in range(world_size):
        x, idx, w = make_inputs(case, src, world_size)
        local = idx - rank * epr
        is_local = (idx >= 0) & (local >= 0) & (local < epr)
        keep = is_local.any(dim=1)
        xs.append(x[keep])
        idxs.append(torch.where(is_local, local, torch.full_like(local, -1))[keep])
        ws.append(torch.where(is_local, w, torch.zeros_like(w))[keep])
    recv_idx = torch.cat(idxs)
    counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=epr).to(torch.int32)
    return torch.cat(xs), recv_idx, torch.cat(ws), counts


def local_expert_outputs(recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor,
                         rank: int, num_local_experts: int) -> torch.Tensor:
    """This rank's weighted partial sum per received row, in fp32 (what a real MoE layer computes)."""
    y = torch.zeros(recv_x.shape[0], recv_x.shape[1], dtype=torch.float32, device=recv_x.device)
    for j in range(recv_idx.shape[1]):
        for e_local in range(num_local_experts):
            rows = recv_idx[:, j] == e_local
            if rows.any():
                fe = expert_fn(recv_x[rows], rank * num_local_experts + e_local)
                y[rows] += recv_w[rows, j].unsqueeze(1) * fe
    return y


def expected_combine(case: EPCase, rank: int, world_size: int) -> torch.Tensor:
    """Σ_k w[t,k]·f_e(x[t]) in fp32 for this rank's own tokens."""
    x, idx, w = make_inputs(case, rank, world_size)
    out = torch.zeros(x.shape[0], case.hidden, dtype=torch.float32)
    for j in range(case.topk):
        for e in idx[:, j].unique().tolist():
            if e < 0:
                continue
            rows = idx[:, j] == e
            out[rows] += w[rows, j].unsqueeze(1) * expert_fn(x[rows], e)
    return out


def standard_cases(world_size: int) -> list[EPCase]:
    """Random routings plus the edge cases every backend must pass."""
    W = world_size
    return [
        EPCase("random_fp32", [37 + 5 * r for r in range(W)], 64, 8 * W, 4, torch.float32, "random", seed=1),
        EPCase("random_bf16", [64] * W, 256, 4 * W, 3, torch.bfloat16, "random", seed=2),
        EPCase("random_fp16_k1", [40] * W, 96, 2 * W, 1, torch.float16, "random", seed=3),
        EPCase("hidden_not_multiple_of_128", [33] * W, 100, 4 * W, 2, torch.float32, "random", seed=4),
        EPCase("last_rank_receives_nothing", [30] * W, 64, 4 * W, 2, torch.float32, "skip_last_rank", seed=5),
        EPCase("every_token_to_one_expert", [25] * W, 64, 4 * W, 3, torch.float32, "one_expert", seed=6),
        EPCase("zero_tokens_on_rank_1", [20 if r != 1 else 0 for r in range(W)], 64, 4 * W, 2,
               torch.float32, "random", seed=7),
        EPCase("sparse_minus_one_slots", [50] * W, 64, 8 * W, 6, torch.float32, "sparse", seed=8),
        EPCase("one_expert_per_rank_topk_all", [16] * W, 32, W, W, torch.float32, "random", seed=9),
    ]
