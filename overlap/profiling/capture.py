"""Capture one Chrome trace per rank around a callable, with torch.profiler.

Usable inside :func:`overlap.testing.run_distributed` workers (or any process of a
torch.distributed group): each rank writes ``{prefix}_rank{r}.json``, and the files open in
Perfetto / chrome://tracing or go straight into :func:`overlap.profiling.analyze.analyze_trace`.
CUDA activity is recorded when CUDA is available, CPU ops otherwise.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

_SUFFIXES = (".json.gz", ".json")


def trace_path(prefix: str | os.PathLike, rank: int) -> str:
    """``{prefix}_rank{rank}.json`` (``.json.gz`` when ``prefix`` ends in ``.json.gz``).

    A ``.json`` suffix on ``prefix`` is moved after the rank: ``out/step.json`` ->
    ``out/step_rank0.json``.
    """
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    prefix = os.fspath(prefix)
    suffix = ".json"
    for s in _SUFFIXES:
        if prefix.endswith(s):
            prefix, suffix = prefix[: -len(s)], s
            break
    if not prefix or prefix.endswith(os.sep):
        raise ValueError(f"out_path needs a file name prefix, got {prefix!r}")
    return f"{prefix}_rank{rank}{suffix}"


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def capture_trace(fn: Callable[[], Any], out_path: str | os.PathLike, *, warmup: int = 1, active: int = 1,
                  record_shapes: bool = False, with_stack: bool = False, profile_memory: bool = False,
                  activities: Iterable | None = None, rank: int | None = None, barrier: bool = True,
                  sync_each_step: bool = True) -> str:
    """Run ``fn()`` ``warmup + active`` times under torch.profiler; export the active steps.

    ``warmup`` steps are traced but discarded (the profiler's own warm-up, which keeps its
    start-up cost out of the window); each of the ``active`` steps is one ``ProfilerStep#N``
    range in the trace. CUDA is synchronised at the end of every step so a step's kernels land
    in its window; ``sync_each_step=False`` synchronises only after the last step, so the steps
    run back to back as in training (the host queues step N+1 while the GPU runs step N, and
    no rank idles at a step boundary while its peers' communication kernels wait for it; a
    step's kernels may then show up in the next step's window). With an initialised process
    group the ranks meet at a barrier first, so their windows start together. ``rank`` defaults to the process-group rank (0 without one).
    Returns the path written, ``trace_path(out_path, rank)``.
    """
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, schedule

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(active, int) or active < 1:
        raise ValueError(f"active must be an int >= 1, got {active!r}")
    path = trace_path(out_path, _current_rank() if rank is None else rank)
    use_cuda = torch.cuda.is_available()
    if activities is None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    activities = list(activities)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if os.path.exists(path):
        os.remove(path)  # so a stale file can never pass for this capture

    exported: list[str] = []

    def _export(prof) -> None:
        prof.export_chrome_trace(path)
        exported.append(path)

    if barrier and dist.is_available() and dist.is_initialized():
        dist.barrier()
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                   on_trace_ready=_export, record_shapes=record_shapes, with_stack=with_stack,
                   profile_memory=profile_memory)
    with prof:
        for i in range(warmup + active):
            fn()
            if use_cuda and (sync_each_step or i == warmup + active - 1):
                torch.cuda.synchronize()
            prof.step()
    if not exported:
        raise RuntimeError(f"the profiler never delivered a trace for {path}")
    return path
