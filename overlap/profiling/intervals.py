"""Half-open time intervals ``[start, end)`` and the set algebra the trace analyzer needs.

A *union* is a sorted list of disjoint, non-empty ``(start, end)`` tuples; every function
that takes a union expects that form (build one with :func:`union`). Empty or inverted
intervals are dropped rather than rejected, because profilers do emit zero-length events
(memsets of a few bytes) and those occupy no time.
"""
from __future__ import annotations

import bisect
from typing import Iterable, Sequence

Interval = tuple[float, float]


def union(intervals: Iterable[Sequence[float]]) -> list[Interval]:
    """Merge possibly overlapping intervals into a sorted list of disjoint ones."""
    spans = sorted((float(s), float(e)) for s, e in intervals if e > s)
    out: list[list[float]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def total(u: Sequence[Interval]) -> float:
    """Summed length of a union."""
    return sum(e - s for s, e in u)


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """Intersection of two unions (a two-pointer sweep, linear in their sizes)."""
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        # Advance whichever interval ends first: it cannot meet anything further on.
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """The parts of union ``a`` not covered by union ``b``."""
    out: list[Interval] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            if cur >= e:
                break
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def covered_length(start: float, end: float, u: Sequence[Interval], starts: Sequence[float] | None = None) -> float:
    """Length of ``[start, end)`` covered by union ``u``.

    ``starts`` may carry ``[s for s, _ in u]`` precomputed, to keep many queries against one
    union logarithmic each.
    """
    if end <= start or not u:
        return 0.0
    if starts is None:
        starts = [s for s, _ in u]
    # The first interval that can reach past `start` is at most one before the bisection point.
    k = max(bisect.bisect_right(starts, start) - 1, 0)
    covered = 0.0
    while k < len(u) and u[k][0] < end:
        s = max(u[k][0], start)
        e = min(u[k][1], end)
        if e > s:
            covered += e - s
        k += 1
    return covered
