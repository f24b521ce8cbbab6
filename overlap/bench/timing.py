"""Timing helpers: CUDA events after warm-up (median of many), optional L2 flush, graph replay.

On CPU (gloo ranks) the same functions time with perf_counter, so every benchmark runs
everywhere; only GPU numbers are meant to be reported.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from overlap.profiling.analyze import kernel_label

_L2_FLUSH_BYTES = 256 << 20  # several times the H100/H200 L2 (50-60 MB)
_flush_buffers: dict[int, torch.Tensor] = {}


def flush_l2() -> None:
    """Evict the L2 cache by writing a buffer several times its size (no-op on CPU)."""
    if not torch.cuda.is_available():
        return
    dev = torch.cuda.current_device()
    buf = _flush_buffers.get(dev)
    if buf is None:
        buf = _flush_buffers[dev] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    buf.random_(0, 255)


def time_fn(fn: Callable[[], object], *, warmup: int = 5, iters: int = 20, flush: bool = True,
            barrier: Callable[[], object] | None = None,
            after_each: Callable[[], object] | None = None) -> dict[str, float]:
    """Median/min/max time of ``fn()`` in microseconds over ``iters`` runs after ``warmup``.

    On CUDA each run is bracketed by events on the current stream; ``barrier`` (e.g. a
    process-group barrier) runs before each timed call so ranks start together;
    ``after_each`` runs after each timed call has finished, outside the timing (e.g. to read
    what the call left behind).
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        if flush:
            flush_l2()
        if barrier is not None:
            barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        if after_each is not None:
            after_each()
    return {"time_us": statistics.median(samples), "min_us": min(samples), "max_us": max(samples),
            "iters": iters}


def capture_graph(fn: Callable[[], object], *, warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph (replay with ``.replay()``), after ``warmup`` eager calls
    on a side stream: they do the lazy setup capture cannot (allocator pools, cuBLAS
    workspaces, collective buffer allocation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph_replay(fn: Callable[[], object], *, warmup: int = 3, iters: int = 50,
                      replays_per_sample: int = 10, profile_replays: int = 0) -> dict[str, float]:
    """Capture ``fn`` in a CUDA graph and time its replays (launch overhead removed).

    Each sample is ``replays_per_sample`` back-to-back replays between two events, divided.
    ``profile_replays > 0``: afterwards, that many more replays run under the torch profiler and
    ``device_us_by_name`` says where the device time of one replay went (:func:`device_time_by_name`)
    and ``replay_timeline`` when each record started and ended (:func:`replay_timeline`).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_graph_replay needs a CUDA device")
    graph = capture_graph(fn, warmup=warmup)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays_per_sample):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / replays_per_sample)
    out = {"time_us": statistics.median(samples), "min_us": min(samples), "max_us": max(samples), "iters": iters}
    if profile_replays > 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_replays):
                graph.replay()
            torch.cuda.synchronize()
        out["device_us_by_name"] = device_time_by_name(prof, profile_replays)
        out["replay_timeline"] = replay_timeline(prof, profile_replays)
    return out


def device_time_by_name(prof, per: int = 1, top: int = 8) -> str:
    """Device time of each kernel / memcpy name in a torch profile, per ``per`` (e.g. the replays
    profiled): ``"name=us xcount; ..."``, largest first, ``top`` names; ``us`` = the median
    duration of the name's records times their count per replay (a median: one record that
    spans a profiler flush or a peer's stall would swamp a mean). Copies on side streams overlap
    other work, so the terms can add up to more than the wall time."""
    durations: dict[str, list] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            durations.setdefault(kernel_label(evt.name), []).append(evt.device_time_total)
    totals = {name: (statistics.median(d) * len(d) / per, len(d) / per) for name, d in durations.items()}
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return "; ".join(f"{name}={us:.1f}us x{n:g}" for name, (us, n) in ranked)


def replay_timeline(prof, per: int) -> str:
    """When each device record of a replay starts and ends, relative to the replay's first record:
    ``"name@start-end; ..."`` in start order, each figure the median over the ``per`` profiled
    replays (µs). The gaps between records are the dependency and launch latency the per-name
    times of :func:`device_time_by_name` leave out. Replays run one after another, so sorting
    all records by start and cutting them into ``per`` equal runs recovers each replay; records
    pair up across replays by name and occurrence (two streams' records that start together may
    swap places). When the record count is not a multiple of ``per`` (a profiler flush lost one),
    or the replays' records differ, it says so instead.
    """
    records = sorted((evt.time_range.start, evt.time_range.end, kernel_label(evt.name)) for evt in prof.events()
                     if evt.device_type == torch.autograd.DeviceType.CUDA)
    if per < 1 or not records or len(records) % per:
        return f"unavailable: {len(records)} device records for {per} replays"
    n = len(records) // per
    keyed = []   # per replay: {(name, occurrence): (start, end) from the replay's first record}
    for i in range(per):
        replay, seen, spans = records[i * n:(i + 1) * n], {}, {}
        for start, end, name in replay:
            seen[name] = seen.get(name, -1) + 1
            spans[(name, seen[name])] = (start - replay[0][0], end - replay[0][0])
        keyed.append(spans)
    if any(spans.keys() != keyed[0].keys() for spans in keyed):
        return f"unavailable: the {per} profiled replays recorded different kernels and copies"
    parts = []
    for key in sorted(keyed[0], key=lambda k: statistics.median(spans[k][0] for spans in keyed)):
        start = statistics.median(spans[key][0] for spans in keyed)
        end = statistics.median(spans[key][1] for spans in keyed)
        parts.append(f"{key[0]}@{start:.1f}-{end:.1f}")
    return "; ".join(parts)