"""Routing layout: the PyTorch reference on hand-made cases, and the CUDA/Triton kernels against it."""
import pytest
import torch

from overlap.ep.layout import expert_major_positions, gather_reduce, permute_rows, routing_layout


def _random_topk(T, E, k, gen, p_drop=0.2):
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    drop = torch.rand(idx.shape, generator=gen) < p_drop
    return torch.where(drop, torch.full_like(idx, -1), idx)


def test_reference_hand_case():
    idx = torch.tensor([[4, -1, 7], [7, 5, 1], [-1, -1, -1], [0, 1, 2]])
    lay = routing_layout(idx, num_experts=8, num_ranks=4)
    assert lay.num_tokens_per_rank.tolist() == [2, 1, 2, 2]
    assert lay.num_tokens_per_expert.tolist() == [1, 2, 1, 0, 1, 1, 0, 2]
    assert lay.token_slot_in_rank.tolist() == [[-1, -1, 0, 0], [0, -1, 1, 1], [-1, -1, -1, -1], [1, 0, -1, -1]]
    assert lay.rank_offsets.tolist() == [0, 2, 3, 5]


def test_reference_invariants_random():
    gen = torch.Generator().manual_seed(0)
    for T, E, W, k in [(100, 16, 4, 3), (57, 8, 8, 8), (0, 4, 2, 2), (33, 64, 2, 6)]:
        idx = _random_topk(T, E, k, gen)
        lay = routing_layout(idx, E, W)
        assert lay.is_token_in_rank.sum(0).tolist() == lay.num_tokens_per_rank.tolist()
        for r in range(W):
            slots = lay.token_slot_in_rank[lay.is_token_in_rank[:, r], r]
            assert slots.tolist() == list(range(int(lay.num_tokens_per_rank[r])))
        assert int(lay.num_tokens_per_expert.sum()) == int((idx >= 0).sum())


def test_permute_and_gather_reduce_round_trip():
    gen = torch.Generator().manual_seed(1)
    T, E, W, k, H = 40, 16, 4, 4, 24
    idx = _random_topk(T, E, k, gen)
    x = torch.randn(T, H, generator=gen)
    lay = routing_layout(idx, E, W)
    n = int(lay.num_tokens_per_rank.sum())
    send = permute_rows(x, lay.token_slot_in_rank, lay.rank_offsets, n)
    rows = torch.where(lay.is_token_in_rank, lay.rank_offsets.unsqueeze(0) + lay.token_slot_in_rank, -1)
    back = gather_reduce(send, rows)  # each token's copies summed: x times its rank count
    assert torch.allclose(back, x * lay.is_token_in_rank.sum(1, keepdim=True))
    w = torch.rand(T, W, generator=gen)
    weighted = gather_reduce(send, rows, w)
    assert torch.allclose(weighted, x * (w * lay.is_token_in_rank).sum(1, keepdim=True), atol=1e-6)


def test_expert_major_positions():
    counts, pos = expert_major_positions(torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0]]), 2)
    assert counts.tolist() == [2, 3]
    assert pos.tolist() == [[2, -1], [0, 3], [-1, -1], [4, 1]]


@pytest.mark.parametrize("R,E,k", [(0, 4, 2), (1, 1, 3), (257, 16, 4), (1000, 64, 8)])
def test_expert_major_positions_match_the_routing_layout_definition(R, E, k):
    """Random routings with -1 slots and repeated experts in a row (both slots share a position):
    the same result as a routing layout with one rank per expert."""
    idx = torch.randint(-1, E, (R, k))
    counts, pos = expert_major_positions(idx, E)
    lay = routing_layout(idx, E, E)
    safe = idx.clamp(min=0)
    want = lay.rank_offsets[safe] + lay.token_slot_in_rank.to(torch.int64).gather(1, safe)
    assert torch.equal(counts, lay.num_tokens_per_rank)
    assert torch.equal(pos, torch.where(idx >= 0, want, torch.full_like(want, -1)))


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,W,k", [(4096, 256, 2, 8), (4096, 256, 4, 8), (4096, 256, 8, 8), (0, 16, 4, 2),
                                     (1, 8, 8, 1), (5000, 64, 4, 6), (300, 4096, 64, 8),
                                     (2049, 80, 40, 9), (1023, 32, 32, 3)])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_cuda_and_triton_layout_match_reference(T, E, W, k, idx_dtype):
    from overlap.ep.cuda_ops import cuda_routing_layout

    gen = torch.Generator().manual_seed(T * 7 + E + W)
    idx = _random_topk(T, E, k, gen).to(idx_dtype)
    ref = routing_layout(idx, E, W)
    impls = {"cuda": cuda_routing_layout}
    try:
        import overlap.triton_kernels as tk

        if hasattr(tk, "routing_layout"):
            impls["triton"] = tk.routing_layout
    except ImportError:
        pass
    for name, fn in impls.items():
        got = fn(idx.cuda(), E, W)
        for field in ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank", "token_slot_in_rank"):
            a, b = getattr(got, field).cpu(), getattr(ref, field)
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{field} differs from the reference"


@pytest.mark.gpu
def test_cuda_layout_ignores_out_of_range_int64_ids_like_minus_one():
    """Unvalidated ids outside [0, E) count as no expert in every output, also int64 ones whose
    low 32 bits name a real expert (2^32 + 5)."""
    from overlap.ep.cuda_ops import cuda_routing_layout

    gen = torch.Generator().manual_seed(91)
    T, E, W, k = 300, 64, 4, 6
    idx = _random_topk(T, E, k, gen)
    bad = torch.rand(T, k, generator=gen) < 0.2
    garbage = idx.masked_fill(bad, 2 ** 32 + 5)
    got = cuda_routing_layout(garbage.cuda(), E, W)
    ref = routing_layout(idx.masked_fill(bad, -1), E, W)
    for field in ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank", "token_slot_in_rank"):
        assert torch.equal(getattr(got, field).cpu(), getattr(ref, field)), field

