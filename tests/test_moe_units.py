"""MoE pieces that need no process group: routing, bias balancing, grouped GEMMs, deferred weight
gradients, expert-major regrouping, configuration errors."""
import pytest
import torch
import torch.nn.functional as F

from overlap.moe import (GroupedLinear, MoEBlock, MoEConfig, Router, expert_rows, grouped_mm, mesh_ranks, permute,
                         select_experts, unpermute)
from overlap.moe.linear import grouped_mm_dgrad, grouped_mm_wgrad, linear
from overlap.moe.weight_grads import capture_weight_grads, run_or_forward, weight_grad_store


def _select_by_loops(scores, bias, topk, num_groups, topk_groups):
    """Group-limited top-k written token by token, as the DeepSeek-V3 report states it."""
    t, e = scores.shape
    size = e // num_groups
    out = []
    for i in range(t):
        s = (scores[i] + bias).tolist()
        group_score = [sum(sorted(s[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
        groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [j for g in groups for j in range(g * size, (g + 1) * size)]
        out.append(sorted(sorted(allowed, key=lambda j: -s[j])[:topk]))
    return torch.tensor(out)


@pytest.mark.parametrize("num_groups,topk_groups,topk", [(1, 1, 3), (4, 2, 3), (8, 3, 4), (4, 4, 6)])
def test_group_limited_selection_matches_the_definition(num_groups, topk_groups, topk):
    gen = torch.Generator().manual_seed(num_groups * 10 + topk)
    scores = torch.rand(40, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.1
    got = select_experts(scores, bias, topk, num_groups, topk_groups).sort(dim=1).values
    assert torch.equal(got, _select_by_loops(scores, bias, topk, num_groups, topk_groups))


def test_router_weights_use_unbiased_scores_and_bias_only_steers_choice():
    torch.manual_seed(0)
    router = Router(8, 6, 2, route_scale=2.5)
    x = torch.randn(30, 8)
    idx0, w0 = router(x)
    assert torch.allclose(w0.sum(1), torch.full((30,), 2.5))
    # A large bias on expert 5 makes every token pick it; its weight is still its own score.
    router.expert_bias[5] = 100.0
    idx1, w1 = router(x)
    assert (idx1 == 5).any(dim=1).all()
    scores = torch.sigmoid(router.gate(x).float())
    picked = scores.gather(1, idx1)
    assert torch.allclose(w1, 2.5 * picked / picked.sum(1, keepdim=True))
    # Gradients reach the gate through the weights (not through w.sum(): that is constant).
    (w1 * torch.randn_like(w1)).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_bias_update_moves_toward_balance():
    torch.manual_seed(1)
    router = Router(16, 8, 2, bias_update_rate=0.02)
    with torch.no_grad():
        router.gate.weight[0] += 0.5   # expert 0 is favoured by every token
    x = torch.randn(512, 16)

    def imbalance():
        router.tokens_per_expert.zero_()
        router(x)
        counts = router.tokens_per_expert.float()
        return (counts.max() / counts.mean()).item()

    before = imbalance()
    counts = router.update_bias()
    assert int(counts.sum()) == 512 * 2 and int(router.tokens_per_expert.sum()) == 0
    load = counts.float()
    assert torch.equal(torch.sign(router.expert_bias), torch.sign(load.mean() - load))
    for _ in range(60):
        router(x)
        router.update_bias()
    after = imbalance()
    assert before > 1.5 and after < 0.75 * before, (before, after)
    # No tokens seen: nothing moves.
    bias = router.expert_bias.clone()
    router.tokens_per_expert.zero_()
    router.update_bias()
    assert torch.equal(bias, router.expert_bias)
    # Counting happens only in training mode.
    router.eval()
    router(x)
    assert int(router.tokens_per_expert.sum()) == 0


@pytest.mark.parametrize("inner,outer", [(16, 8), (6, 10)])   # (6, 10): unaligned rows -> per-group loop
def test_grouped_gemms_match_per_expert_products(inner, outer):
    gen = torch.Generator().manual_seed(inner)
    counts = torch.tensor([3, 0, 5, 1, 0], dtype=torch.int32)
    offs = counts.cumsum(0, dtype=torch.int32)
    n = int(counts.sum())
    x = torch.randn(n, inner, generator=gen)
    w = torch.randn(5, outer, inner, generator=gen)
    g = torch.randn(n, outer, generator=gen)
    bounds = [0] + offs.tolist()
    y_ref = torch.cat([x[s:e] @ w[i].t() for i, (s, e) in enumerate(zip(bounds, bounds[1:]))])
    dx_ref = torch.cat([g[s:e] @ w[i] for i, (s, e) in enumerate(zip(bounds, bounds[1:]))])
    dw_ref = torch.stack([g[s:e].t() @ x[s:e] for s, e in zip(bounds, bounds[1:])])
    assert torch.allclose(grouped_mm(x, w, offs), y_ref, atol=1e-5)
    assert torch.allclose(grouped_mm_dgrad(g, w, offs), dx_ref, atol=1e-5)
    assert torch.allclose(grouped_mm_wgrad(g, x, offs), dw_ref, atol=1e-5)
    assert torch.equal(grouped_mm_wgrad(g[:0], x[:0], torch.zeros(5, dtype=torch.int32)), torch.zeros(5, outer, inner))


def test_weight_gradients_defer_through_the_store():
    torch.manual_seed(2)
    layer = GroupedLinear(3, 8, 4)
    counts = torch.tensor([2, 3, 1], dtype=torch.int32)
    x = torch.randn(6, 8, requires_grad=True)
    g = torch.randn(6, 4)
    offs = counts.cumsum(0, dtype=torch.int32)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = layer.weight.detach().clone().requires_grad_()
    torch.autograd.backward(torch.cat([ref_x[s:e] @ ref_w[i].t() for i, (s, e) in
                                       enumerate([(0, 2), (2, 5), (5, 6)])]), g)
    captured = []
    with capture_weight_grads(captured):
        torch.autograd.backward(layer(x, offs), g)
    assert layer.weight.grad is None and len(captured) == 1   # input grad now, weight grad later
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)
    store = weight_grad_store()
    assert not store.enabled
    run_or_forward(captured)
    assert torch.allclose(layer.weight.grad, ref_w.grad, atol=1e-6)
    # With the store enabled by an enclosing pipeline, closures are handed on, not run.
    dense = torch.randn(4, 8, requires_grad=True)
    store.enabled, saved = True, store.cache
    store.cache = []
    try:
        (linear(torch.randn(5, 8), dense) ** 2).sum().backward()
        assert dense.grad is None and len(store.cache) == 1
        run_or_forward(store.cache)   # forwarded again while enabled
        assert dense.grad is None and len(store.cache) == 2
        store.cache[0]()
        assert dense.grad is not None
    finally:
        store.enabled, store.cache = False, saved


def test_expert_rows_regroup_and_weigh_received_tokens():
    gen = torch.Generator().manual_seed(3)
    recv_idx = torch.tensor([[0, 2, -1], [-1, -1, 1], [2, 1, 0], [-1, 0, -1]])
    recv_w = torch.rand(4, 3, generator=gen) * (recv_idx >= 0)
    x = torch.randn(4, 5, generator=gen)
    rows = expert_rows(recv_idx, 3)
    assert rows.counts.tolist() == [3, 2, 2]
    assert rows.row.tolist() == [0, 2, 3, 1, 2, 0, 2]          # expert-major, ascending row
    assert torch.equal(permute(x, rows), x[rows.row])
    y = torch.randn(7, 5, generator=gen)
    want = torch.zeros(4, 5)
    for n, (r, s) in enumerate(zip(rows.row.tolist(), rows.slot.tolist())):
        assert recv_idx[r, s] >= 0
        want[r] += recv_w[r, s] * y[n]
    assert torch.allclose(unpermute(y, recv_w, rows), want, atol=1e-6)


def test_bad_configuration_is_named():
    good = dict(hidden=16, num_heads=2, num_experts=8, topk=2, expert_ffn=8)
    MoEConfig(**good)
    for change, word in [({"num_heads": 3}, "num_heads"), ({"topk": 0}, "topk"), ({"num_groups": 3}, "num_groups"),
                         ({"num_groups": 4, "topk_groups": 5}, "topk_groups"),
                         ({"num_groups": 4, "topk_groups": 1, "topk": 3}, "topk"),
                         ({"score_func": "relu"}, "score_func"), ({"shared_ffn": -1}, "shared_ffn"),
                         ({"hidden": 0}, "hidden")]:
        with pytest.raises(ValueError, match=word):
            MoEConfig(**{**good, **change})
    with pytest.raises(ValueError, match="bias_update_rate"):
        Router(8, 4, 2, bias_update_rate=-1)
    cfg = MoEConfig(**good)
    with pytest.raises(ValueError, match="ep_size"):
        MoEBlock(cfg, ep_size=3)
    with pytest.raises(TypeError, match="config"):
        MoEBlock(dict(good))
    with pytest.raises(ValueError, match="same config"):
        MoEBlock(cfg, ep_size=2).load_from_dense(MoEBlock(MoEConfig(**{**good, "topk": 3})), 0)
    with pytest.raises(ValueError, match="pp"):
        mesh_ranks(0, 2)
    assert mesh_ranks(2, 2) == ([[0, 2], [1, 3]], [[0, 1], [2, 3]])


def test_dense_reference_equals_a_loop_over_tokens():
    """forward_dense, the oracle of the distributed tests, against the formula token by token."""
    torch.manual_seed(4)
    cfg = MoEConfig(hidden=8, num_heads=2, num_experts=4, topk=2, expert_ffn=6, shared_ffn=4)
    block = MoEBlock(cfg)
    x = torch.randn(2, 3, 8)
    out = block.forward_dense(x)
    h = x + block.attn(block.attn_norm(x))
    hn = block.moe_norm(h).flatten(0, 1)
    idx, w = block.router(hn)
    want = []
    for t in range(hn.shape[0]):
        y = block.shared(hn[t:t + 1])[0]
        for k in range(2):
            e = int(idx[t, k])
            a = hn[t] @ block.experts.w13.weight[e].t()
            y = y + w[t, k] * ((F.silu(a[:6]) * a[6:]) @ block.experts.w2.weight[e].t())
        want.append(y)
    assert torch.allclose(out, h + torch.stack(want).view_as(h), atol=1e-5)
