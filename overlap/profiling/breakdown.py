"""Split one device's communication into the part that can hide under compute and the part that cannot.

The overlap share of :mod:`overlap.profiling.analyze` treats every communication event alike. For
schedules whose transfers hold no SM (the decode path: a pack kernel, copy-engine copies, a
receive-hook kernel) that one number mixes three different things, so this module reports them
apart, per device:

* ``transfer``: communication events that hold no SM (copies: ``Memcpy PtoP`` and friends). Only
  these can run beside compute for free; ``transfer_overlap_share`` says how much of them did.
* ``comm kernels``: communication-class kernels. They hold SMs; issued on the compute stream
  (the decode pack and hook kernels) they cannot overlap compute at all, whatever the schedule.
* ``wait``: time comm kernels spent beyond the fastest launch of the same kernel (same name and
  grid). Where every launch does the same work (the decode path: fixed-size regions, the same
  routing every step) this is waiting: a hook kernel spins until its peer's data lands, so a
  lagging peer (rank skew, a slower host) shows up here, not as transfer time. Where launches
  move different amounts (training layers of different loads) it also counts that difference.
  When one rank waited in every launch its own fastest launch still includes a wait: pass
  ``baseline_us`` (the minimum over every rank's trace, :func:`kernel_minima`).
* ``idle``: span minus busy time. When the GPU is idle most of the span the trace is paced by
  the host (eager launches under the profiler): its overlap figures describe the host, not the
  device schedule, and a CUDA-graph replay should be traced instead (``host_bound``).
* ``copy start lag``: median time from the end of the comm kernel a batch of copies follows to
  the first copy's start: the dependency (or host launch) latency before a transfer flies.
"""
from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from overlap.profiling import intervals as iv
from overlap.profiling.classify import COMM
from overlap.profiling.trace import TraceEvent

HOST_BOUND_IDLE_SHARE = 0.5   # GPU idle more than this share of the span: a host-paced trace
# The CommBreakdown fields that DeviceStats carries (and result rows copy).
FIGURES = ("transfer_us", "transfer_overlapped_us", "transfer_overlap_share", "comm_kernel_us",
           "comm_kernel_overlapped_us", "comm_wait_us", "idle_us", "idle_share", "host_bound", "copy_start_lag_us")


@dataclass
class CommBreakdown:
    """Figures of one device (microseconds); shares are None when their denominator is 0."""

    device: str
    num_transfers: int
    transfer_us: float
    transfer_overlapped_us: float
    transfer_overlap_share: float | None
    num_comm_kernels: int
    comm_kernel_us: float
    comm_kernel_overlapped_us: float
    comm_wait_us: float
    idle_us: float
    idle_share: float | None
    host_bound: bool
    copy_start_lag_us: float | None


def kernel_key(event: TraceEvent) -> tuple:
    """Launches that should take the same time: same kernel name and grid."""
    return (event.name, event.grid)


def kernel_minima(classified_sets: Iterable[Sequence[tuple[TraceEvent, str]]]) -> dict[tuple, float]:
    """Fastest duration of every comm kernel (by :func:`kernel_key`) over several traces, e.g.
    ``[a.classified for a in analyses_of_every_rank]``: a wait baseline no single rank biases."""
    best: dict[tuple, float] = {}
    for classified in classified_sets:
        for e, cls in classified:
            if cls == COMM and e.kind == "kernel":
                k = kernel_key(e)
                best[k] = min(best.get(k, e.dur), e.dur)
    return best


def breakdown_events(device: str, events: Sequence[tuple[TraceEvent, str]], compute_u: Sequence[tuple],
                     *, baseline_us: dict | None = None) -> CommBreakdown:
    """The breakdown of one device from its classified GPU events and its compute union."""
    transfers = [e for e, c in events if c == COMM and e.kind != "kernel"]
    kernels = [e for e, c in events if c == COMM and e.kind == "kernel"]
    transfer_u = iv.union((e.ts, e.end) for e in transfers)
    kernel_u = iv.union((e.ts, e.end) for e in kernels)
    transfer_us, kernel_us = iv.total(transfer_u), iv.total(kernel_u)
    transfer_ov = iv.total(iv.intersect(transfer_u, compute_u))

    fastest = dict(kernel_minima([[(e, COMM) for e in kernels]]))
    for k, v in (baseline_us or {}).items():
        if k in fastest:
            fastest[k] = min(fastest[k], v)
    wait = sum(e.dur - fastest[kernel_key(e)] for e in kernels)

    if events:
        span = max(e.end for e, _ in events) - min(e.ts for e, _ in events)
        busy = iv.total(iv.union((e.ts, e.end) for e, _ in events))
    else:
        span = busy = 0.0
    idle = span - busy
    idle_share = idle / span if span > 0 else None
    return CommBreakdown(
        device=device, num_transfers=len(transfers), transfer_us=transfer_us, transfer_overlapped_us=transfer_ov,
        transfer_overlap_share=transfer_ov / transfer_us if transfer_us > 0 else None,
        num_comm_kernels=len(kernels), comm_kernel_us=kernel_us,
        comm_kernel_overlapped_us=iv.total(iv.intersect(kernel_u, compute_u)),
        comm_wait_us=min(wait, kernel_us), idle_us=idle, idle_share=idle_share,
        host_bound=idle_share is not None and idle_share > HOST_BOUND_IDLE_SHARE,
        copy_start_lag_us=_copy_start_lag(kernels, transfers))


def _copy_start_lag(kernels: Sequence[TraceEvent], transfers: Sequence[TraceEvent]) -> float | None:
    """Median over comm kernels followed by copies of (first such copy's start - kernel end)."""
    if not kernels or not transfers:
        return None
    ends = sorted(e.end for e in kernels)
    first: dict[float, float] = {}
    for t in transfers:
        i = bisect.bisect_right(ends, t.ts) - 1   # the last comm kernel over before the copy began
        if i >= 0:
            first[ends[i]] = min(first.get(ends[i], t.ts), t.ts)
    return statistics.median(s - end for end, s in first.items()) if first else None


def comm_breakdown(analysis, device: str, *, baseline_us: dict | None = None) -> CommBreakdown:
    """:class:`CommBreakdown` of ``device`` in a GPU-mode :class:`~overlap.profiling.analyze.TraceAnalysis`.

    ``baseline_us`` (from :func:`kernel_minima`) tightens the wait estimate across ranks.
    """
    if analysis.mode != "gpu":
        raise ValueError(f"comm_breakdown needs a GPU-mode analysis (kernels and copies), got mode={analysis.mode!r}")
    if device not in analysis.compute_intervals:
        raise KeyError(f"no device {device!r} in this analysis (have {[d.device for d in analysis.devices]})")
    events = [(e, c) for e, c in analysis.classified if e.device == device]
    return breakdown_events(device, events, analysis.compute_intervals[device], baseline_us=baseline_us)
