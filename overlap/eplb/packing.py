"""Packing weighted items into equal-size packs, vectorised over independent rows.

A *row* is one independent packing problem (one layer, or one layer of one node); every
function here loops only over the items of one row (tens), never over rows, so a 58-layer
plan costs the same handful of array ops per item as a 1-layer plan.

The arrays are numpy: at these sizes (hundreds of rows, tens of packs) a numpy call costs a
fraction of a torch call, and it never starts an OpenMP team, which on a busy machine can
stall a torch op for milliseconds.

- :func:`greedy_pack` is the published EPLB rule (longest-processing-time first with a
  cardinality limit): heaviest item first, each to the lightest pack that still has room.
  With ``keys`` it also refuses a pack already holding an item of the same key (a replica
  of the same logical expert), which the published rule does not.
- :func:`refine_by_swaps` then swaps pairs of items between the heaviest pack and any
  other pack while that lowers the heavier of the two, keeping the key exclusion.
"""
from __future__ import annotations

import numpy as np
import torch

# Swaps gaining less than this fraction of the mean pack load are not worth an iteration: loads
# are noisy estimates, and the cut keeps the swap loop short.
_MIN_GAIN = 1e-3


def greedy_pack(weight: np.ndarray, num_packs: int, keys: np.ndarray | None = None, num_keys: int = 0,
                torch_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign ``n`` items per row to ``num_packs`` packs of ``n / num_packs`` items each.

    Items are visited heaviest first; each goes to the lightest pack with room left, the
    lowest pack index among equally light ones. Pack loads accumulate in ``weight``'s dtype
    (float32 reproduces the published sums bit for bit). With one item per pack the published
    rule keeps item ``i`` in pack ``i``; so does this.

    Args:
        weight: ``[R, n]`` item weights.
        num_packs: packs per row; must divide ``n``.
        keys: optional ``[R, n]`` int64 in ``[0, num_keys)``: an item only goes to a pack
            holding no item of its key. When every pack with room holds the key (light
            replicas of one expert arriving last), an earlier item of similar weight is moved
            into the lightest such pack and the new item takes its place (see :func:`_unstick`).
        num_keys: number of distinct keys (needed with ``keys``).
        torch_order: order equal weights as ``torch.sort(descending=True)`` does, as the
            published code does (torch's default sort is not stable past 16 items, and the
            plan depends on it); otherwise equal weights keep their index order.

    Returns:
        ``(pack [R, n], rank [R, n], conflict [R])``: the pack of each item, its position in
        that pack (order of arrival), and per row whether a key could not be kept distinct
        (only possible when some key has more items than there are packs; see :func:`_unstick`).
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        pack = np.broadcast_to(np.arange(n), (rows, n)).copy()
        return pack, np.zeros_like(pack), np.zeros(rows, dtype=bool)
    if torch_order:
        order = torch.sort(torch.from_numpy(weight), dim=-1, descending=True).indices.numpy()
    else:
        order = np.argsort(-weight, axis=1, kind="stable")
    # Item-major copies: each step reads one contiguous row of items.
    st = _PackState(np.take_along_axis(weight, order, 1).T.copy(), num_packs, per_pack,
                    np.take_along_axis(keys, order, 1).T.copy() if keys is not None else None, num_keys)
    for j in range(n):
        if st.keys is None:
            p = st.price.argmin(1)
            st.place_all(j, p, st.flat_base + p)
            continue
        allowed = np.where(st.holds[st.key_rows[j]], np.inf, st.price)
        p = allowed.argmin(1)
        flat = st.flat_base + p
        stuck = np.isinf(allowed.reshape(-1)[flat])
        if not stuck.any():
            st.place_all(j, p, flat)
            continue
        todo = ~_unstick(st, np.flatnonzero(stuck), j)
        p = np.where(stuck, st.price.argmin(1), p)
        st.place(j, p[todo], st.rows[todo])
    pack, rank = np.empty((rows, n), dtype=np.int64), np.empty((rows, n), dtype=np.int64)
    np.put_along_axis(pack, order, st.pack.T, 1)
    np.put_along_axis(rank, order, st.rank.T, 1)
    return pack, rank, st.conflict


class _PackState:
    """Running state of :func:`greedy_pack`: numpy arrays, items item-major (``[n, rows]``).

    ``price[row, pack]`` is the pack's load, or +inf once it is full, so a plain argmin (first
    minimum on ties) picks the lightest pack with room. Updates go through flat indices
    ``row * num_packs + pack``, the cheapest numpy fancy indexing; the common step (every row
    places its item) avoids all other indexing.
    """

    def __init__(self, w, num_packs, per_pack, keys, num_keys):
        n, rows = w.shape
        self.w, self.keys, self.num_packs, self.per_pack = w, keys, num_packs, per_pack
        self.rows = np.arange(rows)
        self.flat_base = self.rows * num_packs
        self.price = np.zeros((rows, num_packs), dtype=w.dtype)
        self.filled = np.zeros((rows, num_packs), dtype=np.int64)
        self.price_flat, self.filled_flat = self.price.reshape(-1), self.filled.reshape(-1)
        self.pack = np.full((n, rows), -1, dtype=np.int64)
        self.rank = np.full((n, rows), -1, dtype=np.int64)
        self.conflict = np.zeros(rows, dtype=bool)
        if keys is not None:
            # holds[row * num_keys + key, pack]: one fancy-index read gives a row's packs for its key.
            self.holds = np.zeros((rows * num_keys, num_packs), dtype=bool)
            self.holds_flat = self.holds.reshape(-1)
            self.key_base = self.rows * num_keys
            self.key_rows = self.key_base + keys                                # [n, rows]

    def add(self, flat, w):
        """Add ``w`` to the packs at flat indices ``flat`` (distinct); count one more item."""
        rank = self.filled_flat[flat]
        self.filled_flat[flat] = rank + 1
        price = self.price_flat[flat] + w
        price[rank + 1 == self.per_pack] = np.inf
        self.price_flat[flat] = price
        return rank

    def place_all(self, j, p, flat):
        """Put item ``j`` of every row into packs ``p`` (flat indices ``flat``), keys distinct."""
        self.pack[j] = p
        self.rank[j] = self.add(flat, self.w[j])
        if self.keys is not None:
            self.holds_flat[self.key_rows[j] * self.num_packs + p] = True

    def place(self, j, p, r):
        """Put item ``j`` of rows ``r`` into packs ``p``, flagging rows whose key repeats."""
        if r.size == 0:
            return
        self.pack[j, r] = p
        self.rank[j, r] = self.add(self.flat_base[r] + p, self.w[j, r])
        hold = self.key_rows[j, r] * self.num_packs + p
        self.conflict[r] |= self.holds_flat[hold]
        self.holds_flat[hold] = True


def _unstick(st: _PackState, r: np.ndarray, j: int) -> np.ndarray:
    """Place item ``j`` of rows ``r``, where every pack with room already holds its key.

    In the lightest pack ``p`` with room goes an earlier item ``i`` (from a pack ``q`` that
    lacks ``j``'s key, with a key ``p`` lacks); ``j`` takes ``i``'s old place in ``q``. Such a
    ``q`` is full (every pack with room holds ``j``'s key), so its load no longer matters to
    the greedy rule. Among such ``i`` the one closest in weight to ``j`` is taken, so loads
    barely move. Returns, per row of the state, whether item ``j`` was placed here.

    Such an ``i`` exists whenever no key has more items than there are packs: some pack ``q``
    lacks ``j``'s key (at most ``packs - 1`` of its items are placed); ``q`` holds
    ``per_pack`` distinct keys while ``p``, not full and holding ``j``'s key, holds at most
    ``per_pack - 2`` others, so at least two items of ``q`` qualify.
    """
    placed = np.zeros(st.rows.size, dtype=bool)
    p = st.price[r].argmin(1)
    kj = st.keys[j, r]
    q = st.pack[:j, r].T                                                   # [len(r), j]
    ki = st.keys[:j, r].T
    base = st.key_base[r][:, None]
    ok = (q != p[:, None]) & ~st.holds[base + kj[:, None], q] & ~st.holds[base + ki, p[:, None]]
    cost = np.where(ok, np.abs(st.w[:j, r].T - st.w[j, r][:, None]), np.inf)
    i = cost.argmin(1)
    found = np.isfinite(cost[np.arange(r.size), i])
    r, p, kj, i = r[found], p[found], kj[found], i[found]
    if r.size == 0:
        return placed
    q, ki = st.pack[i, r], st.keys[i, r]
    kb = st.key_base[r]
    # Item j takes i's place in (full) q ...
    st.pack[j, r], st.rank[j, r] = q, st.rank[i, r]
    st.holds[kb + ki, q] = False
    st.holds[kb + kj, q] = True
    # ... and i moves into p.
    st.pack[i, r], st.rank[i, r] = p, st.filled[r, p]
    st.add(st.flat_base[r] + p, st.w[i, r])
    st.holds[kb + ki, p] = True
    placed[r] = True
    return placed


def slots_from_packing(pack: np.ndarray, rank: np.ndarray, per_pack: int) -> np.ndarray:
    """``[R, n]`` item index held by each slot ``pack * per_pack + rank`` (the inverse map)."""
    slots = np.empty_like(pack)
    np.put_along_axis(slots, pack * per_pack + rank, np.broadcast_to(np.arange(pack.shape[1]), pack.shape), 1)
    return slots


def refine_by_swaps(weight: np.ndarray, slots: np.ndarray, num_packs: int,
                    keys: np.ndarray | None = None, max_iters: int | None = None) -> np.ndarray:
    """Lower the heaviest pack of every row by pairwise swaps; return the new slot table.

    Each iteration takes, per row, the heaviest pack ``a`` and considers every swap of one
    of its items ``i`` with an item ``j`` of another pack ``b`` with ``w_i > w_j``; it applies
    the swap that minimises ``max(load_a - d, load_b + d)`` (``d = w_i - w_j``) if that is
    below ``load_a`` by more than a small fraction of the mean load. Keys stay distinct per
    pack: ``i``'s key must be absent from ``b`` and ``j``'s from ``a``. The sorted vector of
    pack loads falls strictly at each swap, so the loop ends; rows that stop improving, or
    whose heaviest pack is already at the lower bound (the mean, or the heaviest item), leave
    the working set, so late iterations are cheap.

    Args:
        weight: ``[R, n]`` item weights. The search runs in float32 (half the memory
            traffic of float64); the required gain, a thousandth of the mean pack load, is far
            above float32 rounding, so rounding cannot make a swap look like a gain.
        slots: ``[R, n]`` item of each slot, pack-major (``per_pack`` consecutive slots a pack).
        keys: as in :func:`greedy_pack`; packs must already be key-distinct.
        max_iters: cap on swaps per row (default ``4 * num_packs``).
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if num_packs < 2 or per_pack < 1:
        return slots
    slot_item = slots.copy()
    w_slot = np.take_along_axis(weight, slot_item, 1).astype(np.float32)
    k_slot = np.take_along_axis(keys, slot_item, 1) if keys is not None else None
    pack_of_slot = np.arange(n) // per_pack
    in_pack = np.arange(per_pack)
    total = w_slot.sum(1)
    min_gain = _MIN_GAIN * total / num_packs
    # No swap can take a pack below the mean or below its heaviest item: rows there are done.
    floor = np.maximum(total / num_packs, w_slot.max(1)) + min_gain
    tables = (slot_item, w_slot) + ((k_slot,) if k_slot is not None else ())
    active = np.arange(rows)
    for _ in range(4 * num_packs if max_iters is None else max_iters):
        w = w_slot[active]
        loads = w.reshape(-1, num_packs, per_pack).sum(-1)
        a = loads.argmax(1)
        top = loads[np.arange(active.size), a]
        open_rows = top > floor[active]
        active, w, loads, a, top = active[open_rows], w[open_rows], loads[open_rows], a[open_rows], top[open_rows]
        if active.size == 0:
            break
        a_slots = a[:, None] * per_pack + in_pack                                  # [A, S]
        d = np.take_along_axis(w, a_slots, 1)[:, :, None] - w[:, None, :]         # [A, S, n]: w_i - w_j
        # New loads of a and of j's pack b; "worst < top - gain" also implies d > 0 and b != a.
        worst = np.subtract(top[:, None, None], d)
        np.maximum(worst, loads[:, pack_of_slot][:, None, :] + d, out=worst)
        ok = worst < (top - min_gain[active])[:, None, None]
        if k_slot is not None:
            k = k_slot[active]
            same = k[:, None, :] == np.take_along_axis(k, a_slots, 1)[:, :, None]  # key_i == key_j
            by_pack = (active.size, per_pack, num_packs, per_pack)
            ok_by_pack = ok.reshape(by_pack)                                          # a view of ok
            ok_by_pack &= ~same.reshape(by_pack).any(3, keepdims=True)               # i's key already on b
            ok &= ~same.any(1, keepdims=True)                                        # j's key already on a
        np.copyto(worst, np.inf, where=~ok)
        score = worst.reshape(active.size, -1)
        best = score.argmin(1)
        improved = np.isfinite(score[np.arange(active.size), best])
        if not improved.any():
            break
        active, best, a_slots = active[improved], best[improved], a_slots[improved]
        si = a_slots[np.arange(active.size), best // n]
        sj = best % n
        for table in tables:
            table[active, si], table[active, sj] = table[active, sj], table[active, si].copy()
    return slot_item

