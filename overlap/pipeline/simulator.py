"""Schedule simulator: per-rank timelines, bubbles and live activations of any :class:`Schedule`.

Each rank runs its ops in order, each as soon as the rank is free and its inputs have
arrived: a forward needs the previous stage's forward of the same micro-batch, a backward
needs the next stage's backward of it (the last stage: its own forward, for the loss).
Crossing ranks adds ``comm`` to the arrival time; a hand-off between two modules of one rank
(the bottom of DualPipeV's V) is free.

Timelines recorded from a real run (``PipelineEngine.timeline``) use the same
:class:`Timeline` type, so both draw the same way (``overlap.pipeline.draw``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from overlap.pipeline import ops as O
from overlap.pipeline.ops import Op
from overlap.pipeline.schedules import Schedule


@dataclass(frozen=True)
class Durations:
    """Chunk durations (any unit).

    ``B`` is a full backward; a deferred-weight backward ``b`` takes ``B - W`` and its
    ``W`` takes ``W``. ``FB`` is an overlapped forward-and-backward pair (default ``F + B``).
    ``comm`` is added when a micro-batch crosses ranks.
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: Optional[float] = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "comm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Durations.{name} must be a non-negative number, got {value!r}")
        if self.F <= 0 or self.B <= 0:
            raise ValueError(f"Durations.F and Durations.B must be positive, got F={self.F}, B={self.B}")
        if self.W >= self.B:
            raise ValueError(f"Durations.W must be smaller than B (b = B - W > 0), got W={self.W}, B={self.B}")
        if self.FB is not None and (not isinstance(self.FB, (int, float)) or self.FB <= 0):
            raise ValueError(f"Durations.FB must be a positive number, got {self.FB!r}")

    @classmethod
    def from_timeline(cls, timeline: "Timeline") -> "Durations":
        """Median chunk durations of a (recorded) timeline, to simulate it with.

        A missing kind is filled in: ``B`` from ``b + W``, ``W`` as 0, ``FB`` as ``F + B``.
        """
        import statistics

        by_kind: dict[str, list[float]] = {}
        for rank in timeline.ranks:
            for iv in rank:
                by_kind.setdefault(iv.op.kind, []).append(iv.end - iv.start)
        med = {k: statistics.median(v) for k, v in by_kind.items()}
        if O.FORWARD not in med:
            raise ValueError("timeline has no forward chunks to measure")
        w = min(med.get(O.WEIGHT, 0.0), 0.999 * med.get(O.BACKWARD, float("inf")))
        full = med.get(O.BACKWARD, med.get(O.BACKWARD_INPUT, 0.0) + w)
        if full <= w:
            full = w + 1e-12
        return cls(F=med[O.FORWARD], B=full, W=w, FB=med.get(O.PAIR))

    @property
    def pair(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, op: Op) -> float:
        """Duration of one op."""
        return {O.FORWARD: self.F, O.BACKWARD: self.B, O.BACKWARD_INPUT: self.B - self.W,
                O.WEIGHT: self.W, O.PAIR: self.pair}[op.kind]


@dataclass(frozen=True)
class Interval:
    op: Op
    start: float
    end: float

    @property
    def label(self) -> str:
        return str(self.op)


@dataclass
class Timeline:
    """What each rank ran, when. ``bubble(r)`` is the step time minus rank ``r``'s busy time."""

    name: str
    ranks: list = field(default_factory=list)   # ranks[r] = [Interval, ...] in execution order

    @classmethod
    def from_records(cls, name: str, records: Sequence[Sequence[tuple]]) -> "Timeline":
        """From per-rank ``[(label, start, end), ...]`` lists (what a recorded run returns).

        Times are shifted so the earliest start is 0.
        """
        t0 = min((s for rank in records for (_l, s, _e) in rank), default=0.0)
        return cls(name, [[Interval(O.parse_op(label), s - t0, e - t0) for (label, s, e) in rank]
                          for rank in records])

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def makespan(self) -> float:
        return max((iv.end for rank in self.ranks for iv in rank), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(iv.end - iv.start for iv in self.ranks[rank])

    def bubble(self, rank: int) -> float:
        return self.makespan - self.busy(rank)

    def bubbles(self) -> list[float]:
        return [self.bubble(r) for r in range(self.num_ranks)]

    def labels(self, rank: int) -> list[str]:
        return [iv.label for iv in self.ranks[rank]]


@dataclass
class SimResult:
    """A simulated schedule: its timeline, per-rank bubbles and peak live activations."""

    schedule: Schedule
    durations: Durations
    timeline: Timeline
    peak_activations: list

    @property
    def makespan(self) -> float:
        return self.timeline.makespan

    @property
    def bubbles(self) -> list[float]:
        return self.timeline.bubbles()

    @property
    def max_bubble(self) -> float:
        return max(self.bubbles)


def _forward_key(schedule: Schedule, rank: int, op: Op) -> tuple:
    chain, j = schedule.locate(rank, op.d)
    return ("F", chain, j, op.m)


def _dependencies(schedule: Schedule, rank: int, op: Op) -> list[tuple[tuple, bool]]:
    """(key of the op whose end this op waits for, crosses ranks?) pairs."""
    deps = []
    if op.is_forward:
        chain, j = schedule.locate(rank, op.d)
        if j > 0:
            src_rank, _ = schedule.stage(chain, j - 1)
            deps.append((("F", chain, j - 1, op.m), src_rank != rank))
    if op.is_backward:
        part = op.backward_part()
        chain, j = schedule.locate(rank, part.d)
        if j + 1 < schedule.num_stages_of(chain):
            src_rank, _ = schedule.stage(chain, j + 1)
            deps.append((("B", chain, j + 1, part.m), src_rank != rank))
        deps.append((("F", chain, j, part.m), False))   # its own activations (and loss)
    return deps


def _produced(schedule: Schedule, rank: int, op: Op) -> list[tuple]:
    keys = []
    if op.is_forward:
        keys.append(_forward_key(schedule, rank, op))
    if op.is_backward:
        part = op.backward_part()
        chain, j = schedule.locate(rank, part.d)
        keys.append(("B", chain, j, part.m))
    return keys


def simulate_timeline(schedule: Schedule, durations: Durations = Durations()) -> Timeline:
    """Run every rank's ops as early as their order and dependencies allow.

    Raises ValueError if the schedule deadlocks (some rank waits for an op that never runs).
    """
    n = schedule.num_ranks
    done: dict[tuple, float] = {}
    position = [0] * n
    free_at = [0.0] * n
    ranks: list[list[Interval]] = [[] for _ in range(n)]
    remaining = sum(len(ops) for ops in schedule.rank_ops)
    while remaining:
        progressed = False
        for r in range(n):
            rank_ops = schedule.rank_ops[r]
            while position[r] < len(rank_ops):
                op = rank_ops[position[r]]
                ready = free_at[r]
                blocked = False
                for key, crosses in _dependencies(schedule, r, op):
                    if key not in done:
                        blocked = True
                        break
                    ready = max(ready, done[key] + (durations.comm if crosses else 0.0))
                if blocked:
                    break
                end = ready + durations.of(op)
                ranks[r].append(Interval(op, ready, end))
                for key in _produced(schedule, r, op):
                    done[key] = end
                free_at[r] = end
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(schedule.rank_ops[r][position[r]]) for r in range(n)
                     if position[r] < len(schedule.rank_ops[r])}
            raise ValueError(f"schedule {schedule.name} deadlocks; ranks wait at {stuck}")
    return Timeline(schedule.name, ranks)


def dependency_violations(schedule: Schedule, timeline: Timeline, tolerance: float = 0.0) -> list[str]:
    """Chunks of ``timeline`` (e.g. a recorded run) that started before an input was ready.

    An empty list means every chunk started after the chunk it depends on ended (less
    ``tolerance``). Only ops present in the timeline are checked.
    """
    ended: dict[tuple, float] = {}
    for r, intervals in enumerate(timeline.ranks):
        for iv in intervals:
            for key in _produced(schedule, r, iv.op):
                ended[key] = iv.end
    problems = []
    for r, intervals in enumerate(timeline.ranks):
        for iv in intervals:
            for key, _crosses in _dependencies(schedule, r, iv.op):
                if key in ended and iv.start < ended[key] - tolerance:
                    problems.append(f"rank {r} {iv.op} started at {iv.start:.6g} before {key} ended at {ended[key]:.6g}")
    return problems


def peak_activations(schedule: Schedule) -> list[int]:
    """Per rank, the most micro-batch activations held at once.

    A forward allocates one chunk's activations, a backward (``B`` or ``b``) frees them; in
    an overlapped pair the forward allocates before the backward frees.
    """
    peaks = []
    for rank_ops in schedule.rank_ops:
        live = peak = 0
        for op in rank_ops:
            if op.is_forward:
                live += 1
                peak = max(peak, live)
            if op.is_backward:
                live -= 1
        peaks.append(peak)
    return peaks


def simulate(schedule: Schedule, durations: Durations = Durations()) -> SimResult:
    """Timeline, bubbles and peak activations of ``schedule`` under ``durations``."""
    if not isinstance(durations, Durations):
        raise TypeError(f"durations must be a Durations, got {type(durations).__name__}")
    return SimResult(schedule, durations, simulate_timeline(schedule, durations), peak_activations(schedule))


def published_bubble(name: str, num_stages: int, durations: Durations) -> float:
    """The bubble formula of the DualPipe README for ``num_stages`` PP stages.

    1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe and DualPipeV (PP/2-1)(F&B+B-3W).
    """
    F, B, W, FB = durations.F, durations.B, durations.W, durations.pair
    pp = num_stages
    formulas = {"1f1b": (pp - 1) * (F + B), "zb1p": (pp - 1) * (F + B - 2 * W),
                "dualpipe": (pp / 2 - 1) * (FB + B - 3 * W), "dualpipev": (pp / 2 - 1) * (FB + B - 3 * W)}
    try:
        return formulas[name.lower()]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(formulas)}, got {name!r}") from None


def published_activations(name: str, num_stages: int) -> int:
    """Activations per device of the DualPipe README: PP (1F1B, ZB1P), PP+1 (DualPipe, V)."""
    table = {"1f1b": num_stages, "zb1p": num_stages, "dualpipe": num_stages + 1, "dualpipev": num_stages + 1}
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(table)}, got {name!r}") from None
