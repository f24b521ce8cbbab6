"""Choosing how many replicas each logical expert gets (numpy, vectorised over rows)."""
from __future__ import annotations

import numpy as np


def replicate_greedy(weight: np.ndarray, num_slots: int, cap: int | None = None,
                     num_greedy: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_slots`` replicas to the ``E`` experts of every row, heaviest per-replica load first.

    Slot ``i < E`` holds expert ``i`` (replica 0); each further slot goes to the expert with
    the largest ``weight / count`` so far (lowest expert index on ties), which minimises the
    largest per-replica load (the published EPLB rule). The ``weight / count`` division happens in
    ``weight``'s dtype, so float32 input reproduces the published (torch) choices exactly.

    Args:
        weight: ``[R, E]`` loads.
        num_slots: replicas per row, ``>= E``.
        cap: most replicas one expert may get (``None``: unlimited). The balanced policy caps at
            the number of GPUs, since two replicas on one GPU balance nothing.
        num_greedy: how many of the ``num_slots - E`` extra slots follow the rule above
            (default: all; an int, or ``[R]`` per row). The others go, one at a time, to the
            expert with the fewest replicas and then the lightest load: near-empty slots that
            split nothing heavy. Splitting hot experts less finely can pack better: two
            replicas each above half a GPU's fair share cannot share a GPU without overloading it.

    Returns:
        ``(slot2expert [R, num_slots], replica_rank [R, num_slots], count [R, E])``.
    """
    rows, num_experts = weight.shape
    extra = num_slots - num_experts
    w = weight
    count = np.ones((rows, num_experts), dtype=np.int64)
    # float copy of count: w / count_f divides in w's dtype, as torch's float32 / int64 does.
    count_f = np.ones((rows, num_experts), dtype=w.dtype)
    flat_base = np.arange(rows) * num_experts
    chosen = np.empty((rows, extra), dtype=np.int64)
    ranks = np.empty((rows, extra), dtype=np.int64)
    num_greedy = np.broadcast_to(np.asarray(extra if num_greedy is None else num_greedy), (rows,))
    capped = cap is not None and cap < num_slots
    # Fill order for the non-greedy slots: fewest replicas first, then lightest; the count term
    # outweighs any load difference.
    count_scale = 2 * w.max(1, keepdims=True) + 1
    for i in range(extra):
        per_replica = w / count_f
        if capped:
            # Loads are >= 0, so -1 keeps an expert at its cap from being the largest.
            per_replica = np.where(count >= cap, -1, per_replica)
        e = per_replica.argmax(1)
        if (num_greedy <= i).any():
            fill = count * count_scale + w
            if capped:
                fill = np.where(count >= cap, np.inf, fill)
            e = np.where(num_greedy > i, e, fill.argmin(1))
        flat = flat_base + e
        chosen[:, i] = e
        ranks[:, i] = count.flat[flat]
        count.flat[flat] += 1
        count_f.flat[flat] += 1
    base = np.broadcast_to(np.arange(num_experts), (rows, num_experts))
    slot2expert = np.concatenate([base, chosen], axis=1)
    replica_rank = np.concatenate([np.zeros_like(base), ranks], axis=1)
    return slot2expert, replica_rank, count
