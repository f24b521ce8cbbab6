"""Run a function on N local ranks of a torch.distributed group, with a hard deadline.

Used by the tests, the benchmarks and the experiments alike. Each rank is a fresh process
(start method "spawn", so CUDA works); the parent collects each rank's return value or its
traceback and kills every rank once the deadline passes, so a hang fails loudly and never
stalls CI.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

# Multicast/NVLS is off on the lent GPUs (see DESIGN.md); keep it off for every process we start.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class DistributedTimeout(RuntimeError):
    """A distributed run did not finish before its deadline; all its ranks were killed."""


class RankFailed(RuntimeError):
    """One or more ranks raised; the message carries each failing rank's traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, backend, port, args, kwargs, result_queue, env, pg_timeout_s):
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    try:
        import torch
        import torch.distributed as dist

        init_kwargs = {}
        if backend == "gloo":
            # Ranks share the machine's cores: oversubscribed intra-op threads spin and slow
            # every rank down by orders of magnitude.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            init_kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s), **init_kwargs)
        try:
            out = fn(rank, world_size, *args, **kwargs)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        result_queue.put((rank, True, out))
    except BaseException:  # report everything, including KeyboardInterrupt from a kill
        result_queue.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    timeout_s: float = 120.0, env: dict | None = None, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return their results.

    ``fn`` must be importable (defined at module level) and its return value picklable.
    Raises :class:`RankFailed` with every failing rank's traceback, or
    :class:`DistributedTimeout` after ``timeout_s`` seconds (all ranks are killed first).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    port = free_port()
    child_env = dict(SAFE_ENV)
    child_env.update(env or {})
    procs = [ctx.Process(target=_rank_main,
                         args=(fn, r, world_size, backend, port, args, kwargs, result_queue,
                               child_env, max(30.0, timeout_s)),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedTimeout(
                    f"{fn.__name__} on {world_size} {backend} ranks did not finish within {timeout_s:.0f} s; "
                    f"ranks still running: {sorted(set(range(world_size)) - set(results) - set(failures))}")
            try:
                rank, ok, payload = result_queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in results and r not in failures]
                if dead:
                    # A rank died without reporting (segfault, OOM kill): give the queue a moment.
                    try:
                        rank, ok, payload = result_queue.get(timeout=2.0)
                    except queue_mod.Empty:
                        for r in dead:
                            failures[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
                        break  # the others may block forever in a collective with it: stop now
                else:
                    continue
            (results if ok else failures)[rank] = payload
            if failures:
                # One rank failed: the others may block forever in a collective; stop now.
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
    if failures:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise RankFailed(f"{fn.__name__} failed on {len(failures)} of {world_size} ranks:\n{msg}")
    return [results[r] for r in range(world_size)]


def assert_ranks_pass(fn: Callable[..., list], world_size: int, *args: Any, **kwargs: Any) -> None:
    """Run a per-rank checker that returns a list of failure messages; fail with all of them.

    Checkers collect failures instead of raising, so one spawn reports every failing case on
    every rank. Keyword arguments go to :func:`run_distributed`.
    """
    results = run_distributed(fn, world_size, *args, **kwargs)
    failures = [msg for per_rank in results for msg in per_rank]
    assert not failures, "\n".join(failures)


def gpu_world_sizes(candidates: Sequence[int] = (2, 4, 8)) -> list[int]:
    """The candidate world sizes this machine's GPU count can serve."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [w for w in candidates if w <= n]
