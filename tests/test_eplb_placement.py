"""EPLB at run time: ExpertPlacement, LoadCounter, and dispatch through EPBuffer with replicas (gloo)."""
import types

import pytest
import torch

from overlap.eplb import ExpertPlacement, LoadCounter, dispatch_replicated, rebalance_experts
from overlap.eplb.workloads import sample_topk, zipf_popularity


def _zipf_topk(num_tokens, num_experts, k, gen, skew=1.2):
    """Distinct experts per token, Zipf-skewed, with some -1 slots."""
    return sample_topk(num_tokens, zipf_popularity(num_experts, skew, gen), k, gen, empty_frac=0.1)


def _plan(num_experts=16, replicas=24, gpus=4, layers=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    load = torch.rand(layers, num_experts, generator=gen).pow(4) * 1000
    return rebalance_experts(load, replicas, 4, 1, gpus)


def test_to_physical_maps_to_replicas_of_the_same_expert():
    phy2log, log2phy, logcnt = _plan()
    placement = ExpertPlacement.from_plan(phy2log, log2phy, logcnt, layer=1)
    gen = torch.Generator().manual_seed(1)
    topk = _zipf_topk(500, 16, 4, gen)
    for dtype in (torch.int64, torch.int32):
        phys = placement.to_physical(topk.to(dtype), salt=3)
        assert phys.dtype == dtype and phys.shape == topk.shape
        assert torch.equal(phys < 0, topk < 0)
        valid = topk >= 0
        assert torch.equal(phy2log[1][phys[valid].long()], topk[valid])


def test_to_physical_splits_each_expert_evenly():
    phy2log, log2phy, logcnt = _plan()
    placement = ExpertPlacement.from_plan(phy2log, log2phy, logcnt, layer=0)
    assert (placement.logcnt > 1).any()
    gen = torch.Generator().manual_seed(2)
    topk = _zipf_topk(1000, 16, 4, gen)
    for salt in (0, 5):
        phys = placement.to_physical(topk, salt=salt)
        per_slot = torch.bincount(phys[phys >= 0], minlength=placement.num_physical)
        for e in range(16):
            shares = per_slot[placement.log2phy[e, : placement.logcnt[e]]]
            assert shares.sum() == (topk == e).sum()
            assert shares.max() - shares.min() <= 1, (e, shares)
    # The salt decides which replicas take the remainders.
    assert not torch.equal(placement.to_physical(topk, salt=0), placement.to_physical(topk, salt=1))


def test_to_physical_by_token_id():
    phy2log, log2phy, logcnt = _plan()
    placement = ExpertPlacement.from_plan(phy2log, log2phy, logcnt, layer=0)
    gen = torch.Generator().manual_seed(3)
    topk = _zipf_topk(64, 16, 3, gen)
    token_ids = torch.randint(0, 10_000, (64,), generator=gen)
    phys = placement.to_physical(topk, token_ids=token_ids, salt=2)
    for t in range(64):
        for j in range(3):
            e = int(topk[t, j])
            if e < 0:
                assert phys[t, j] == -1
            else:
                assert phys[t, j] == log2phy[0, e, (int(token_ids[t]) + 2) % int(logcnt[0, e])]
    # A function of the token alone: the same token maps the same way in another batch.
    again = placement.to_physical(topk[10:20], token_ids=token_ids[10:20], salt=2)
    assert torch.equal(again, phys[10:20])


def test_identity_placement_and_derived_tables():
    ident = ExpertPlacement.identity(8)
    topk = torch.tensor([[0, 7, -1], [3, 2, 1]])
    assert torch.equal(ident.to_physical(topk), topk)
    # Tables derived from phy2log alone agree with the planner's.
    phy2log, log2phy, logcnt = _plan(layers=1)
    derived = ExpertPlacement(phy2log[0])
    assert torch.equal(derived.logcnt, logcnt[0])
    assert torch.equal(derived.log2phy.sort(dim=1).values, log2phy[0].sort(dim=1).values)


def test_from_plan_accepts_padding_of_a_wider_layer():
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 1, 2]])
    plan = rebalance_experts(torch.tensor([[9.0, 1, 1, 1], [1.0, 5, 5, 1]]), 6, 1, 1, 2, policy="reference")
    assert plan[1].shape[2] == 3
    p1 = ExpertPlacement.from_plan(*plan, layer=1)
    assert p1.log2phy.shape == (4, 2)
    with pytest.raises(ValueError, match="layer"):
        ExpertPlacement.from_plan(*plan, layer=2)
    assert ExpertPlacement(phy2log[0]).logcnt.tolist() == [3, 1, 1, 1]


def test_placement_rejects_bad_tables():
    with pytest.raises(ValueError, match="no physical slot"):
        ExpertPlacement(torch.tensor([0, 1, 3, 3]), num_logical=4)
    with pytest.raises(ValueError, match="logcnt"):
        ExpertPlacement(torch.tensor([0, 1, 1, 2]), logcnt=torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="log2phy"):
        ExpertPlacement(torch.tensor([0, 1, 1, 2]), log2phy=torch.tensor([[0, -1], [1, 3], [2, -1]]))
    with pytest.raises(ValueError, match="log2phy"):     # a gap before the last replica
        ExpertPlacement(torch.tensor([0, 1, 1, 2]), log2phy=torch.tensor([[-1, 0], [1, 2], [3, -1]]))
    with pytest.raises(ValueError, match="log2phy lists more"):
        ExpertPlacement(torch.tensor([0, 1, 2]), log2phy=torch.tensor([[0, 1], [1, -1], [2, -1]]))
    with pytest.raises(TypeError, match="phy2log"):
        ExpertPlacement(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="phy2log"):
        ExpertPlacement(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="phy2log values"):
        ExpertPlacement(torch.tensor([0, 1, 5]), num_logical=3)
    p = ExpertPlacement.identity(4)
    with pytest.raises(ValueError, match="topk_idx values"):
        p.to_physical(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="topk_idx values"):
        p.to_physical(torch.tensor([[0, -2]]))
    with pytest.raises(TypeError, match="topk_idx"):
        p.to_physical(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="topk_idx"):
        p.to_physical(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="token_ids"):
        p.to_physical(torch.tensor([[0, 1]]), token_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ranks"):
        p.slots_of_rank(0, 3)


def test_local_logical_and_logical_counts():
    placement = ExpertPlacement(torch.tensor([2, 0, 1, 2, 3, 2]))
    assert placement.local_logical(1, 3).tolist() == [1, 2]
    assert placement.slots_of_rank(2, 3).tolist() == [4, 5]
    assert placement.logical_counts(torch.tensor([5, 1, 2, 7, 3, 1])).tolist() == [1, 2, 13, 3]
    with pytest.raises(ValueError, match="physical_counts"):
        placement.logical_counts(torch.tensor([1, 2]))


def test_load_counter():
    counter = LoadCounter(2, 6)
    gen = torch.Generator().manual_seed(4)
    a, b = _zipf_topk(40, 6, 2, gen), _zipf_topk(30, 6, 3, gen)
    counter.add(a, layer=0)
    counter.add(b, layer=0)
    counter.add(b.to(torch.int32), layer=1)
    want0 = torch.bincount(torch.cat([a[a >= 0], b[b >= 0]]), minlength=6)
    assert torch.equal(counter.counts[0], want0)
    assert torch.equal(counter.counts[1], torch.bincount(b[b >= 0], minlength=6))
    total = counter.reduce()                       # no process group: the local counts, copied
    assert torch.equal(total, counter.counts) and total.data_ptr() != counter.counts.data_ptr()
    counter.add_counts(torch.tensor([1, 0, 0, 0, 0, 2]), layer=1)
    assert counter.counts[1, 5] == (b == 5).sum() + 2
    counter.reset()
    assert counter.counts.sum() == 0
    with pytest.raises(ValueError, match="layer"):
        counter.add(a, layer=2)
    with pytest.raises(ValueError, match="topk_idx"):
        counter.add(torch.tensor([[6]]))
    with pytest.raises(ValueError, match="counts"):
        counter.add_counts(torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_experts"):
        LoadCounter(1, 0)


def test_dispatch_replicated_checks_the_buffer_size():
    placement = ExpertPlacement(torch.tensor([0, 1, 1, 0]))
    fake = types.SimpleNamespace(num_experts=2)
    with pytest.raises(ValueError, match="num_experts=placement.num_physical"):
        dispatch_replicated(fake, placement, torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.int64),
                            torch.ones(1, 1))


# ------------------------------------------------------------------ end to end over gloo ranks
def _expert_weights(num_experts, hidden):
    gen = torch.Generator().manual_seed(1234)          # identical on every rank
    return torch.randn(num_experts, hidden, hidden, generator=gen) / hidden ** 0.5


def _run_experts(buffer, recv_x, recv_idx, recv_w, logical_of_local, weights):
    """One row per received token: sum over its local experts of w * (x @ W_e)."""
    y = torch.zeros(recv_x.shape[0], recv_x.shape[1], dtype=torch.float32, device=recv_x.device)
    logical_of_local = logical_of_local.to(recv_x.device)
    for j in range(recv_idx.shape[1]):
        hit = recv_idx[:, j] >= 0
        if hit.any():
            e = logical_of_local[recv_idx[hit, j].long()]
            y[hit] += recv_w[hit, j, None] * torch.bmm(recv_x[hit, None, :].float(), weights[e])[:, 0]
    return y.to(recv_x.dtype)


def _e2e_worker(rank, world_size, policy, device="cpu"):
    import torch.distributed as dist

    from overlap.ep import EPBuffer

    device = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    num_experts, hidden, tokens, k = 16, 32, 64, 4
    weights = _expert_weights(num_experts, hidden).to(device)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    topk = _zipf_topk(tokens, num_experts, k, gen).to(device)
    topw = torch.rand(tokens, k, generator=gen).to(device)
    valid = topk >= 0
    want = torch.zeros(tokens, hidden, device=device)
    for j in range(k):
        e = topk[valid[:, j], j]
        want[valid[:, j]] += topw[valid[:, j], j, None] * torch.bmm(x[valid[:, j], None], weights[e])[:, 0]

    # Without replicas: EPBuffer over logical experts.
    plain = EPBuffer(None, num_experts=num_experts, hidden=hidden, max_tokens_per_rank=tokens)
    rx, ridx, rw, _, handle = plain.dispatch(x, topk, topw)
    local = torch.arange(rank * (num_experts // world_size), (rank + 1) * (num_experts // world_size), device=device)
    out_plain = plain.combine(_run_experts(plain, rx, ridx, rw, local, weights), handle)

    # Statistics -> plan -> placement.
    counter = LoadCounter(1, num_experts, device=device)
    counter.add(topk)
    load = counter.reduce()
    direct = torch.bincount(topk[valid], minlength=num_experts)
    dist.all_reduce(direct)
    load, direct = load.cpu(), direct.cpu()
    replicas = num_experts + 2 * world_size
    plan = rebalance_experts(load, replicas, 4, 1, world_size, policy=policy)
    placement = ExpertPlacement.from_plan(*plan, layer=0)

    # With replicas: EPBuffer over physical slots; the router's logical ids are mapped first.
    counter2 = LoadCounter(1, num_experts, device=device)
    rep = EPBuffer(None, num_experts=placement.num_physical, hidden=hidden, max_tokens_per_rank=tokens)
    rx, ridx, rw, recv_counts, handle = dispatch_replicated(rep, placement, x, topk, topw, counter=counter2,
                                                            salt=rank)
    y = _run_experts(rep, rx, ridx, rw, placement.local_logical(rank, world_size), weights)
    out_rep = rep.combine(y, handle)
    all_counts = [torch.zeros_like(recv_counts) for _ in range(world_size)]
    dist.all_gather(all_counts, recv_counts)
    per_slot = torch.cat(all_counts).long().cpu()
    return {"err_plain": (out_plain - want).abs().max().item(), "err_rep": (out_rep - want).abs().max().item(),
            "scale": want.abs().max().item(), "load_ok": torch.equal(load, direct.unsqueeze(0)),
            "counter2_ok": torch.equal(counter2.counts, counter.counts),
            "slot_counts_ok": torch.equal(placement.logical_counts(per_slot), load[0]),
            # Plain lists: tensors would cross the result queue through shared memory that dies with the rank.
            "per_slot": per_slot.tolist(), "log2phy": placement.log2phy.tolist(), "logcnt": placement.logcnt.tolist()}


def _check_e2e(results, world_size):
    for r, res in enumerate(results):
        assert res["err_plain"] <= 1e-4 * res["scale"], (r, res["err_plain"])
        assert res["err_rep"] <= 1e-4 * res["scale"], (r, res["err_rep"])
        assert res["load_ok"] and res["counter2_ok"] and res["slot_counts_ok"], r
    # Tokens of each replicated expert split evenly over its replicas (each rank within one).
    per_slot, log2phy, logcnt = (torch.tensor(results[0][key]) for key in ("per_slot", "log2phy", "logcnt"))
    assert (logcnt > 1).any()
    for e in range(logcnt.numel()):
        shares = per_slot[log2phy[e, : logcnt[e]]]
        assert shares.max() - shares.min() <= world_size, (e, shares)


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_with_replicas_matches_without_gloo(world_size):
    import overlap.ep

    if not hasattr(overlap.ep, "EPBuffer"):
        pytest.skip("overlap.ep.EPBuffer not available yet")
    from overlap.testing import run_distributed

    policy = "balanced" if world_size == 4 else "reference"
    _check_e2e(run_distributed(_e2e_worker, world_size, policy, backend="gloo", timeout_s=150), world_size)


@pytest.mark.gpu
def test_dispatch_with_replicas_matches_without_nccl():
    from overlap.testing import gpu_world_sizes, run_distributed

    sizes = gpu_world_sizes((2, 4))
    if not sizes:
        pytest.skip("needs 2 GPUs")
    for world_size in sizes:
        for policy in ("balanced", "reference"):
            _check_e2e(run_distributed(_e2e_worker, world_size, policy, "cuda", backend="nccl", timeout_s=300),
                       world_size)
