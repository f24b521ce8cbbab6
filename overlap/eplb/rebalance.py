"""Expert-parallel load balancer: replicate hot experts and place the replicas on GPUs.

Both policies follow the published three-stage plan (deepseek-ai/EPLB), vectorised over
layers and nodes (a Python loop runs only over the items of one packing problem):

1. **Groups onto nodes.** Expert groups (DeepSeek-V3 routes each token to a few groups) are
   packed onto nodes, the same number of groups per node, balancing node load, so a token's
   experts stay on few nodes.
2. **Replicas within a node.** Each node's ``num_replicas / num_nodes`` slots go to its
   experts: one each, then the rest to the expert whose per-replica load is largest.
3. **Replicas onto GPUs.** Each node's replicas are packed onto its GPUs, the same number per
   GPU, balancing GPU load.

Stage 1 applies when ``num_nodes`` divides ``num_groups`` (the *hierarchical* policy);
otherwise the plan is *global*: one node holding every GPU, one group.

``policy="reference"`` reproduces the published plans exactly (same greedy rules, same
float32 arithmetic, same tie order). ``policy="balanced"`` (the default) keeps the stages and
changes four things, all aimed at the heaviest GPU:

- a replica count is capped at the GPUs of its node: a second replica on a GPU that already
  holds one splits nothing, it only takes a slot from another expert;
- replicas of one expert go to distinct GPUs (the published packing may co-locate them, e.g.
  when an expert has more replicas than its node has GPUs, or when equal shares tie), enforced
  by an exclusion mask during the greedy packing;
- per (layer, node), a few replica counts are tried, not only the greedy one, and the one
  that packs best is kept (see :func:`_replicate_and_pack_balanced`);
- after each greedy packing (groups onto nodes, replicas onto GPUs) pairwise swaps between the
  heaviest pack and the others lower the maximum further (the greedy rule with a cardinality
  limit cannot revisit an early choice).

On the skewed suite of ``experiments/eplb_balance.py`` the mean max/mean GPU load drops by
up to 30% against the published policy (geometric mean over the suite: 13%), no layer is more
than ~1% worse, and no replica ever shares a GPU with another replica of its expert.
"""
from __future__ import annotations

import numpy as np
import torch

from overlap.eplb.packing import greedy_pack, refine_by_swaps, slots_from_packing
from overlap.eplb.replication import replicate_greedy
from overlap.eplb.validation import check_rebalance_args


# Fractions (in eighths) of a node's extra slots the balanced policy tries handing out greedily
# (the rest go to the lightest experts). On the Zipf / hot-expert suite of
# experiments/eplb_balance.py the winners are almost always 4/8..8/8; trying 7/8, 3/8..0 as
# well changes the mean max/mean GPU load by < 0.1% and costs as much again.
_GREEDY_EIGHTHS = (8, 6, 5, 4)


def _replicate_and_pack_reference(local_load, slots_per_node, gpus_per_node):
    """Stages 2-3 as published: ``(replica expert, replica rank, count, GPU slot table)`` per row."""
    rep_expert, rep_rank, count = replicate_greedy(local_load, slots_per_node)
    rep_load = np.take_along_axis(local_load / count.astype(local_load.dtype), rep_expert, 1)
    pack, rank, _ = greedy_pack(rep_load, gpus_per_node, torch_order=True)
    return rep_expert, rep_rank, count, slots_from_packing(pack, rank, slots_per_node // gpus_per_node)


def _replicate_and_pack_balanced(local_load, slots_per_node, gpus_per_node):
    """Stages 2-3 of the balanced policy, same outputs as :func:`_replicate_and_pack_reference`.

    Replica counts are capped at ``gpus_per_node``. The pure greedy count minimises the
    largest *replica*, not the largest *GPU*: when it cuts two hot experts into replicas each
    above half a GPU's fair share, some GPU must take two of them, whereas cutting them less
    finely lets each sit on a GPU of its own. So rows whose greedy packing misses the lower
    bound (the mean GPU load, or the largest replica) also try candidates where only a
    fraction of the extra slots goes greedily and the rest become second replicas of the
    lightest experts; each row keeps the candidate whose packing has the lightest heaviest GPU
    (the full greedy on ties), and swaps then refine only the winner.
    """
    rows, experts_per_node = local_load.shape
    slots_per_gpu = slots_per_node // gpus_per_node
    extra = slots_per_node - experts_per_node
    fractions = sorted({extra * q // 8 for q in _GREEDY_EIGHTHS}, reverse=True)

    def candidate(load, num_greedy):
        rep_expert, rep_rank, count = replicate_greedy(load, slots_per_node, cap=gpus_per_node,
                                                       num_greedy=num_greedy)
        rep_load = np.take_along_axis(load / count, rep_expert, 1)
        pack, rank, conflict = greedy_pack(rep_load, gpus_per_node, rep_expert, experts_per_node)
        slots = slots_from_packing(pack, rank, slots_per_gpu)
        heaviest = np.take_along_axis(rep_load, slots, 1).reshape(-1, gpus_per_node, slots_per_gpu).sum(-1).max(-1)
        return [rep_expert, rep_rank, count, rep_load, slots, conflict, heaviest]

    best = candidate(local_load, None)
    mean = local_load.sum(1) / gpus_per_node
    # Fewer greedy replicas only make the largest replica larger: a row at its bound is done.
    bound = np.maximum(mean, best[3].max(1))
    open_rows = np.flatnonzero(best[6] > bound + 1e-3 * mean)
    if open_rows.size and len(fractions) > 1:
        n_alt, n_open = len(fractions) - 1, open_rows.size
        alt = candidate(np.tile(local_load[open_rows], (n_alt, 1)),          # candidate-major rows
                        np.repeat(fractions[1:], n_open))
        heaviest = np.concatenate([best[6][open_rows][None], alt[6].reshape(n_alt, n_open)])
        choice = heaviest.argmin(0)                                     # 0: keep the full greedy
        take = np.flatnonzero(choice > 0)
        src = (choice[take] - 1) * n_open + take
        for mine, theirs in zip(best, alt):
            mine[open_rows[take]] = theirs[src]
    rep_expert, rep_rank, count, rep_load, slots, conflict, _ = best
    if conflict.any():   # counts are capped at the GPUs per node, so greedy_pack always finds room
        raise RuntimeError("internal error: two replicas of one expert packed onto one GPU")
    slots = refine_by_swaps(rep_load, slots, gpus_per_node, rep_expert)
    return rep_expert, rep_rank, count, slots


def _group_loads(weight: np.ndarray, num_groups: int, balanced: bool) -> np.ndarray:
    """``[L, groups]`` summed load of each expert group."""
    layers, num_experts = weight.shape
    if balanced:
        return weight.reshape(layers, num_groups, -1).sum(-1)
    # The published plan sums with torch; numpy's float32 summation order can differ in the last bit.
    return torch.from_numpy(weight).view(layers, num_groups, -1).sum(-1).numpy()


def _plan(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
          balanced: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(phy2log [L, P], replica_rank [L, P], logcnt [L, E])`` of the three-stage plan."""
    layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes

    # Stage 1. node_group[l, s]: the group in node-major group position s.
    group_load = _group_loads(weight, num_groups, balanced)
    pack, rank, _ = greedy_pack(group_load, num_nodes, torch_order=not balanced)
    node_group = slots_from_packing(pack, rank, num_groups // num_nodes)
    if balanced:
        node_group = refine_by_swaps(group_load, node_group, num_nodes)
    # node_expert[l, m]: the logical expert at node-major position m (groups keep their expert order).
    node_expert = (node_group[:, :, None] * group_size + np.arange(group_size)).reshape(layers, num_experts)

    # Stages 2-3, one row per (layer, node): local expert i of node n is node_expert[l, n * epn + i].
    local_load = np.take_along_axis(weight, node_expert, 1).reshape(layers * num_nodes, experts_per_node)
    stages = _replicate_and_pack_balanced if balanced else _replicate_and_pack_reference
    rep_expert, rep_rank, local_count, gpu_slots = stages(local_load, slots_per_node, gpus_per_node)

    # Physical slot s of a node (GPU-major) holds replica gpu_slots[s] of the node's list.
    local_expert = np.take_along_axis(rep_expert, gpu_slots, 1)
    replica_rank = np.take_along_axis(rep_rank, gpu_slots, 1).reshape(layers, num_replicas)
    node_offset = np.tile(np.arange(num_nodes) * experts_per_node, layers)[:, None]
    phy2log = np.take_along_axis(node_expert, (local_expert + node_offset).reshape(layers, num_replicas), 1)
    logcnt = np.empty((layers, num_experts), dtype=np.int64)
    np.put_along_axis(logcnt, node_expert, local_count.reshape(layers, num_experts), 1)
    return phy2log, replica_rank, logcnt


def logical_to_physical(phy2log: torch.Tensor, replica_rank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """``[L, E, max count]`` physical slots of each logical expert by replica rank, padded with -1."""
    p2l, rank, cnt = phy2log.numpy(), replica_rank.numpy(), logcnt.numpy()
    layers, num_replicas = p2l.shape
    width = int(cnt.max())
    # numpy, not torch.full: a torch fill this size starts an OpenMP team, slow on a busy machine.
    log2phy = np.full((layers, cnt.shape[1] * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, p2l * width + rank, np.broadcast_to(np.arange(num_replicas), p2l.shape), 1)
    return torch.from_numpy(log2phy.reshape(layers, cnt.shape[1], width))


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      *, policy: str = "balanced") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan replicas of each logical expert and their GPUs, from per-expert load statistics.

    Args:
        weight: ``[layers, logical experts]`` non-negative loads (token counts or a moving
            average of them); any real dtype, any device (the plan is computed on the CPU).
        num_replicas: physical expert slots per layer, a multiple of ``num_gpus`` and at least
            the number of logical experts.
        num_groups: expert groups of the router (must divide the number of experts).
        num_nodes: server nodes; GPUs within a node talk over the faster link (NVLink).
        num_gpus: GPUs in all, a multiple of ``num_nodes``.
        policy: ``"balanced"`` (default: distinct GPUs for the replicas of one expert and a lower
            maximum GPU load) or ``"reference"`` (the published deepseek-ai/EPLB plan, exactly).

    Returns:
        ``(phy2log, log2phy, logcnt)``, int64 CPU tensors:

        - ``phy2log [layers, num_replicas]``: the logical expert of each physical slot; slots are
          GPU-major (GPU ``g`` holds slots ``[g * P/G, (g + 1) * P/G)``) and nodes are
          ``num_gpus / num_nodes`` consecutive GPUs.
        - ``log2phy [layers, experts, max replicas]``: the slots of each expert, by replica rank,
          padded with -1.
        - ``logcnt [layers, experts]``: replicas per expert.

    Raises:
        ValueError / TypeError naming the offending argument (negative or NaN loads,
        ``num_replicas`` not a multiple of ``num_gpus`` or below the expert count, ``num_gpus``
        not a multiple of ``num_nodes``, ...).
    """
    w, num_replicas, num_groups, num_nodes, num_gpus = check_rebalance_args(
        weight, num_replicas, num_groups, num_nodes, num_gpus, policy)
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1  # global policy
    balanced = policy == "balanced"
    # The reference plan must see the published float32 sums; the balanced one gains nothing from
    # float32 and float64 keeps its strict improvement tests free of rounding cycles.
    work = w.double().numpy() if balanced else w.numpy()
    phy2log, replica_rank, logcnt = (torch.from_numpy(a) for a in
                                     _plan(work, num_replicas, num_groups, num_nodes, num_gpus, balanced))
    return phy2log, logical_to_physical(phy2log, replica_rank, logcnt), logcnt
