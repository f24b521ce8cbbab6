"""Pipeline schedules as data: a placement of stages on ranks plus, per rank, a list of ops.

This is the one schedule core. A :class:`Schedule` says where every stage lives (its
:class:`Chain` s) and which compute chunks each rank runs, in order (``overlap.pipeline.ops``).
The executor (``overlap.pipeline.engine``) runs any schedule; the simulator
(``overlap.pipeline.simulator``) times any schedule. DualPipe, DualPipeV, 1F1B and ZB1P differ
only in the generator below that writes their op lists and in their placement:

- DualPipe and DualPipeV come from one generator, :func:`bidirectional_rank_ops`, the eight
  phases of a bidirectional schedule on ``n`` virtual ranks. DualPipeV runs it on its ``N``
  ranks; DualPipe is the same schedule "cut in half" the other way round: its rank ``r`` runs
  virtual rank ``min(r, N-1-r)`` of ``N/2``, with the two local modules swapped on the second
  half of the ranks (there the direction that starts nearby is the one starting at rank N-1).
- 1F1B and ZB1P come from :func:`unidirectional_rank_ops`; ZB1P splits each backward into an
  input-gradient chunk ``b`` and a weight chunk ``W`` and delays the ``W`` s into the bubbles.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

from overlap.pipeline import ops as O
from overlap.pipeline.ops import Op


@dataclass(frozen=True)
class Chain:
    """One stream of micro-batches through a sequence of stages.

    ``stages[j] = (rank, d)``: stage ``j`` is local module ``d`` of pipeline rank ``rank``.
    Micro-batch inputs enter at ``stages[0]``; the loss is computed after ``stages[-1]``.
    """

    stages: tuple
    num_microbatches: int

    @property
    def first_rank(self) -> int:
        return self.stages[0][0]

    @property
    def last_rank(self) -> int:
        return self.stages[-1][0]


@dataclass(frozen=True)
class Schedule:
    """A placement (``chains``) and each rank's ops, in execution order (``rank_ops[r]``)."""

    name: str
    num_ranks: int
    num_chunks: int
    chains: tuple
    rank_ops: tuple

    def locate(self, rank: int, d: int) -> tuple[int, int]:
        """(chain index, stage index) of local module ``d`` on ``rank``."""
        try:
            return self._where()[(rank, d)]
        except KeyError:
            raise ValueError(f"rank {rank} has no local module {d} in schedule {self.name}") from None

    def stage(self, chain: int, j: int) -> tuple[int, int]:
        """(rank, d) that runs stage ``j`` of ``chain``."""
        return self.chains[chain].stages[j]

    def num_stages_of(self, chain: int) -> int:
        return len(self.chains[chain].stages)

    def num_local_modules(self, rank: int) -> int:
        return sum(1 for (r, _d) in self._where() if r == rank)

    @property
    def num_stages(self) -> int:
        """Stages per chain: the PP of the bubble formulas."""
        return len(self.chains[0].stages)

    def _where(self) -> dict:
        cached = self.__dict__.get("_where_cache")
        if cached is None:
            cached = {}
            for k, chain in enumerate(self.chains):
                for j, where in enumerate(chain.stages):
                    if where in cached:
                        raise ValueError(f"{where} hosts two stages")
                    cached[where] = (k, j)
            object.__setattr__(self, "_where_cache", cached)
        return cached

    def labels(self, rank: int) -> list[str]:
        """This rank's ops as trace labels."""
        return O.format_trace(self.rank_ops[rank])

    def executed_labels(self, rank: int, overlap_hook: bool = True, forward_only: bool = False) -> list[str]:
        """The trace a run of this schedule records on ``rank``.

        Without an overlap hook a pair runs as its forward then its backward; under no_grad
        only forwards run.
        """
        out = []
        for op in self.rank_ops[rank]:
            if forward_only:
                if op.is_forward:
                    out.append(str(op.forward_part()))
            elif op.kind == O.PAIR and not overlap_hook:
                out += [str(op.forward_part()), str(op.backward_part())]
            else:
                out.append(str(op))
        return out


class _Numbering:
    """Hands out micro-batch indices: forwards and backwards of a module each run in order."""

    def __init__(self) -> None:
        self._next_f: dict[int, int] = defaultdict(int)
        self._next_b: dict[int, int] = defaultdict(int)

    def _f(self, d: int) -> int:
        m = self._next_f[d]
        self._next_f[d] += 1
        return m

    def _b(self, d: int) -> int:
        m = self._next_b[d]
        self._next_b[d] += 1
        return m

    def F(self, d: int) -> Op:
        return O.F(d, self._f(d))

    def B(self, d: int, defer_weights: bool = False) -> Op:
        return (O.b if defer_weights else O.B)(d, self._b(d))

    def FB(self, d0: int, d1: int) -> Op:
        return O.FB(d0, self._f(d0), d1, self._b(d1))


def bidirectional_rank_ops(n: int, i: int, c: int, module_of_phase: Sequence[int]) -> list[Op]:
    """Ops of virtual rank ``i`` of ``n`` in the bidirectional (DualPipe) schedule.

    ``c`` micro-batches flow in each of the two phases; phase 0 is the stage whose forward
    starts nearest this rank (it receives first), phase 1 the other. ``module_of_phase[p]``
    is the local module index that runs phase ``p``. Needs ``c >= 2 * n``.
    """
    if c < 2 * n:
        raise ValueError(f"the bidirectional schedule needs at least {2 * n} micro-batches per "
                         f"direction on {n} virtual ranks, got {c}")
    p0, p1 = module_of_phase
    num = _Numbering()
    out: list[Op] = []
    # Phase 1, "nF0": warm-up, forwards of phase 0 only; ranks further from the start do fewer.
    out += [num.F(p0) for _ in range(2 * (n - i - 1))]
    # Phase 2, "nF0F1": forwards of both phases alternate until phase 1's first gradient arrives.
    for _ in range(i + 1):
        out += [num.F(p0), num.F(p1)]
    # Phase 3, "nB1W1F1": zero-bubble steps; the W fills what would be idle time.
    for _ in range(n - i - 1):
        out += [num.B(p1, defer_weights=True), O.W(), num.F(p1)]
    # Phase 4, "nF0B1F1B0": the main loop, each forward overlapped with the other phase's
    # backward. The innermost rank does its first pair unpaired: its F0 feeds its own next
    # step, so running it alone first shortens the bubble.
    for k in range(c - 2 * n + i + 1):
        if k == 0 and i == n - 1:
            out += [num.F(p0), num.B(p1)]
        else:
            out.append(num.FB(p0, p1))
        out.append(num.FB(p1, p0))
    # Phase 5, "nB1F1B0": phase 0's forwards are done; phase 1 still has forwards to pair.
    for _ in range(n - i - 1):
        out += [num.B(p1), num.FB(p1, p0)]
    # Phase 6, "nB1B0": backwards only; the last i+1 of these 2(i+1) chunks defer their
    # weight gradients, so the W's of phases 7-8 fill the cool-down bubble.
    for k in range(2 * (i + 1)):
        out.append(num.B(p1 if k % 2 == 0 else p0, defer_weights=k >= i + 1))
    # Phase 7, "nWB0": zero-bubble steps of phase 0's remaining backwards.
    for _ in range(n - i - 1):
        out += [O.W(), num.B(p0, defer_weights=True)]
    # Phase 8, "nW": drain the deferred weight gradients.
    out += [O.W() for _ in range(i + 1)]
    return out


def unidirectional_rank_ops(n: int, r: int, c: int, zero_bubble: bool) -> list[Op]:
    """Ops of rank ``r`` of ``n`` in 1F1B (``zero_bubble=False``) or ZB1P (ZB-H1).

    Warm-up with ``n-r-1`` forwards, then one forward / one backward alternately, then the
    cool-down backwards. ZB1P runs each backward as ``b`` (the input gradient, which is what
    the upstream rank waits for) and lets its ``W`` lag: rank ``r`` holds back ``r`` of them
    in the steady state, which keeps the downstream ranks' backwards on the critical path
    short, and releases one after each cool-down ``b``, where it would otherwise wait.
    """
    warmup = min(n - r - 1, c)
    held_back = r if zero_bubble else 0
    num = _Numbering()
    out: list[Op] = [num.F(0) for _ in range(warmup)]
    pending_w = 0

    def backward() -> None:
        nonlocal pending_w
        out.append(num.B(0, defer_weights=zero_bubble))
        pending_w += zero_bubble

    def weight() -> None:
        nonlocal pending_w
        out.append(O.W())
        pending_w -= 1

    # Steady state, "1F1B": one forward, one backward; ZB1P keeps `held_back` W's pending.
    for _ in range(c - warmup):
        out.append(num.F(0))
        backward()
        if pending_w > held_back:
            weight()
    # Cool-down: backwards only; ZB1P fills each wait for the next gradient with a W.
    for _ in range(warmup):
        backward()
        if pending_w:
            weight()
    # Drain whatever W's are still held back.
    while pending_w:
        weight()
    return out


def _check_ranks(name: str, num_ranks) -> None:
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise ValueError(f"{name}: num_ranks must be a positive int, got {num_ranks!r}")


def _check_chunks(name: str, num_chunks, minimum: int, why: str) -> None:
    if not isinstance(num_chunks, int) or isinstance(num_chunks, bool):
        raise TypeError(f"{name}: num_chunks must be an int, got {type(num_chunks).__name__}")
    if num_chunks < minimum:
        raise ValueError(f"{name}: num_chunks must be >= {minimum} ({why}), got {num_chunks}")


def dualpipe_schedule(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe: two chains of ``num_chunks/2`` micro-batches, one starting at each end.

    Rank ``r`` hosts stage ``r`` of direction 0 as module 0 and stage ``N-1-r`` of
    direction 1 as module 1.
    """
    _check_ranks("DualPipe", num_ranks)
    if num_ranks % 2:
        raise ValueError(f"DualPipe needs an even number of ranks, got {num_ranks} "
                         "(use DualPipeV for odd counts)")
    _check_chunks("DualPipe", num_chunks, 2 * num_ranks, "twice the number of ranks")
    if num_chunks % 2:
        raise ValueError(f"DualPipe: num_chunks must be even (half per direction), got {num_chunks}")
    n, c = num_ranks // 2, num_chunks // 2
    chains = (Chain(tuple((r, 0) for r in range(num_ranks)), c),
              Chain(tuple((r, 1) for r in reversed(range(num_ranks))), c))
    rank_ops = []
    for r in range(num_ranks):
        second_half = r >= n
        rank_ops.append(tuple(bidirectional_rank_ops(
            n, min(r, num_ranks - 1 - r), c, (1, 0) if second_half else (0, 1))))
    return Schedule("dualpipe", num_ranks, num_chunks, chains, tuple(rank_ops))


def dualpipev_schedule(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV: one chain of ``2N`` stages folded into a V.

    Rank ``r`` hosts stage ``r`` (module 0, the way down) and stage ``2N-1-r`` (module 1,
    the way up), so the first and the last stage both live on rank 0.
    """
    _check_ranks("DualPipeV", num_ranks)
    _check_chunks("DualPipeV", num_chunks, 2 * num_ranks, "twice the number of ranks")
    stages = tuple((r, 0) for r in range(num_ranks)) + tuple((r, 1) for r in reversed(range(num_ranks)))
    rank_ops = tuple(tuple(bidirectional_rank_ops(num_ranks, r, num_chunks, (0, 1)))
                     for r in range(num_ranks))
    return Schedule("dualpipev", num_ranks, num_chunks, (Chain(stages, num_chunks),), rank_ops)


def _unidirectional_schedule(name: str, zero_bubble: bool) -> Callable[[int, int], Schedule]:
    def build(num_ranks: int, num_chunks: int) -> Schedule:
        _check_ranks(name, num_ranks)
        _check_chunks(name, num_chunks, 1, "at least one micro-batch")
        chain = Chain(tuple((r, 0) for r in range(num_ranks)), num_chunks)
        rank_ops = tuple(tuple(unidirectional_rank_ops(num_ranks, r, num_chunks, zero_bubble))
                         for r in range(num_ranks))
        return Schedule(name, num_ranks, num_chunks, (chain,), rank_ops)

    build.__name__ = f"{name}_schedule"
    build.__doc__ = (f"{name}: one chain, stage ``r`` on rank ``r``"
                     + (", backward split into b and W." if zero_bubble else "."))
    return build


one_f_one_b_schedule = _unidirectional_schedule("1f1b", zero_bubble=False)
zb1p_schedule = _unidirectional_schedule("zb1p", zero_bubble=True)

SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": one_f_one_b_schedule,
    "zb1p": zb1p_schedule,
    "dualpipe": dualpipe_schedule,
    "dualpipev": dualpipev_schedule,
}


def build_schedule(name: str, num_ranks: int, num_chunks: int) -> Schedule:
    """The schedule called ``name`` (one of :data:`SCHEDULES`) for this many ranks and chunks."""
    try:
        builder = SCHEDULES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}") from None
    return builder(num_ranks, num_chunks)


def check_schedule(schedule: Schedule) -> None:
    """Raise ValueError unless every micro-batch is run exactly once forward and once backward
    on the stage's own rank, each backward after its forward, and W's match deferred backwards.
    """
    seen_f, seen_b = set(), set()
    for rank, rank_ops in enumerate(schedule.rank_ops):
        pending_w = 0
        for op in rank_ops:
            if op.kind == O.WEIGHT:
                pending_w -= 1
                if pending_w < 0:
                    raise ValueError(f"{schedule.name} rank {rank}: a W with no deferred backward")
                continue
            if op.is_forward:
                key = (rank, op.d, op.m)
                if key in seen_f:
                    raise ValueError(f"{schedule.name} rank {rank}: {op} repeats a forward")
                seen_f.add(key)
            if op.is_backward:
                part = op.backward_part()
                key = (rank, part.d, part.m)
                if key in seen_b:
                    raise ValueError(f"{schedule.name} rank {rank}: {op} repeats a backward")
                if key not in seen_f:
                    raise ValueError(f"{schedule.name} rank {rank}: {op} runs before its forward")
                seen_b.add(key)
                if part.kind == O.BACKWARD_INPUT:
                    pending_w += 1
        if pending_w:
            raise ValueError(f"{schedule.name} rank {rank}: {pending_w} deferred backwards lack a W")
    want = {(r, d, m) for chain in schedule.chains for (r, d) in chain.stages
            for m in range(chain.num_microbatches)}
    if seen_f != want or seen_b != want:
        missing = sorted((want - seen_f) | (want - seen_b))[:5]
        extra = sorted((seen_f | seen_b) - want)[:5]
        raise ValueError(f"{schedule.name}: ops do not cover the placement (missing {missing}, extra {extra})")
