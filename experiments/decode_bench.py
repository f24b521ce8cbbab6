#!/usr/bin/env python3
"""Decode (low-latency) dispatch/combine latency under CUDA-graph replay, per transport.

    python experiments/decode_bench.py --world-size 4 --out experiments/results

For each transport (copy_engine: zero-SM copy-engine transfers; sm: kernel stores over NVLink;
nccl: all_to_all_single of the packed regions) and each dispatch dtype (bf16, fp8), one graph
holds `dispatch(return_recv_hook=True); hook()` and another `combine(...); hook()` (bf16), so
time_us is send + hook with Python launch cost removed (the slowest rank's median over replays).
`--timing eager` times the same calls without graphs (launch-bound; for telling a capture problem
from a transport problem). Bytes: `wire` = rows this rank sends to other ranks (payload + scales,
not the row headers); `logical` = all rows received including the rank's own; `copied` = bytes
the fixed-size transfers actually move to other ranks (each sends the worst-case region).
GB/s = bytes / time. Writes decode_bench_ws{N}.json (DESIGN.md §5 format), rewritten after every
case, so a run that stalls keeps the rows it finished (meta.partial says so).

Robustness (the 2-GPU run once stalled silently): every rank runs the same cases in the same
order, in lockstep through the TCP store (no NCCL and no GPU in the control plane); each case
runs under a wall-clock guard that prints the case, the rank and every thread's Python stack and
exits with code 124 instead of hanging; a case that fails on any rank fails on every rank and
skips the rest of its transport, whose buffer is not reused (each transport gets a fresh one).
The kernels' own waits are bounded by OVERLAP_KERNEL_TIMEOUT_S (default 10 s), so only NCCL or
the host can stall longer than that.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import pickle
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_fn, time_graph_replay, write_results  # noqa: E402
from overlap.testing import DistributedTimeout, RankFailed, run_distributed  # noqa: E402
from overlap.testing.env import temporary_env  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TRANSPORTS = ("copy_engine", "sm", "nccl")
STALL_EXIT_CODE = 124        # like coreutils `timeout`
CHUNK = 1024                 # channels per warp task in csrc/kernels/ll_*.cu (kChunk)
MAX_SEND_BLOCKS = 1024       # grid cap of the low-latency send kernels


# ------------------------------------------------------------------------------------ lockstep cases
class StallGuard:
    """Ends this process, saying what it was doing, when one phase outlives its limit.

    A timer thread prints the phase, the rank and every thread's Python stack, then calls
    ``os._exit(124)``. ``faulthandler``'s own C thread does the same a little later (exit code 1)
    in case the main thread holds the GIL inside a blocking call, where no Python thread can run.
    """

    BACKSTOP_S = 15.0

    def __init__(self, tag: str, rank: int):
        self.tag, self.rank = tag, rank
        self._lock = threading.Lock()
        self._armed = 0          # generation: a timer fires only for the phase that armed it
        self._timer: Optional[threading.Timer] = None

    def arm(self, what: str, limit_s: float) -> None:
        self.disarm()
        with self._lock:
            self._armed += 1
            gen = self._armed
        self._timer = threading.Timer(limit_s, self._fire, args=(gen, what, limit_s))
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(limit_s + self.BACKSTOP_S, exit=True)

    def disarm(self) -> None:
        with self._lock:
            self._armed += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        faulthandler.cancel_dump_traceback_later()

    def _fire(self, gen: int, what: str, limit_s: float) -> None:
        with self._lock:
            if gen != self._armed:
                return
            sys.stdout.flush()
            sys.stderr.write(f"\n[{self.tag}] rank {self.rank}: STALL: {what} did not finish within {limit_s:g} s; "
                             f"this rank's Python stacks follow, then it exits with code {STALL_EXIT_CODE}\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(STALL_EXIT_CODE)


class StoreControl:
    """Host-side exchange of small picklable values between the ranks, through the TCP store
    that bootstrapped the process group (``MASTER_ADDR``/``MASTER_PORT``, as run_distributed
    sets them). Needs no NCCL, no gloo and no GPU, so a GPU or NCCL stall cannot block it.
    """

    def __init__(self, rank: int, world_size: int, prefix: str, timeout_s: float):
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                              timedelta(seconds=timeout_s))
        self.store = dist.PrefixStore(prefix, store)
        self.rank, self.world_size = rank, world_size
        self._step = 0

    def exchange(self, value: Any) -> list:
        """Every rank's ``value``, in rank order (the same list on every rank)."""
        self._step += 1
        self.store.set(f"{self._step}/{self.rank}", pickle.dumps(value))
        keys = [f"{self._step}/{r}" for r in range(self.world_size)]
        self.store.wait(keys)
        return [pickle.loads(self.store.get(k)) for k in keys]

    def barrier(self) -> None:
        self.exchange(None)

    def close(self) -> None:
        """Leave the exchange: rank 0 (whose process serves the store) waits until every other
        rank has read its last values, so tearing its process group down cannot cut them off."""
        if self.rank != 0:
            self.store.set(f"closed/{self.rank}", b"1")
        elif self.world_size > 1:
            self.store.wait([f"closed/{r}" for r in range(1, self.world_size)])


@dataclass
class CaseResult:
    """Outcome of one case, identical on every rank."""

    name: str
    ok: bool
    values: list                                  # each rank's return value (None where it failed)
    errors: dict = field(default_factory=dict)    # rank -> one-line error

    def error_text(self) -> str:
        return "; ".join(f"rank {r}: {e}" for r, e in sorted(self.errors.items()))


class CaseRunner:
    """Runs named cases in lockstep on every rank, each under a :class:`StallGuard`.

    Every rank must call :meth:`run` with the same names in the same order (checked). The ranks
    meet before a case, so no rank captures or replays while a peer is still in the previous
    one, and they agree after it: a case that raised on any rank is failed on every rank, so the
    caller's next decision (skip, go on) is the same everywhere. ``finish`` runs after the case
    body on every rank, also after an exception (e.g. ``torch.cuda.synchronize``), so no work of
    a case is still queued when the next one starts. A rank stuck in a case for ``case_timeout_s``
    (or waiting for peers ``grace_s`` longer) prints what it was doing and exits with code 124.
    """

    def __init__(self, rank: int, world_size: int, tag: str, *, case_timeout_s: float, grace_s: float = 30.0,
                 finish: Optional[Callable[[], None]] = None, control: Optional[StoreControl] = None):
        if not case_timeout_s > 0:
            raise ValueError(f"case_timeout_s must be positive, got {case_timeout_s!r}")
        self.rank, self.world_size, self.tag = rank, world_size, tag
        self.case_timeout_s, self.grace_s = float(case_timeout_s), float(grace_s)
        self.finish = finish
        # The store's own timeout is a last resort behind the guard's.
        self.control = control or StoreControl(rank, world_size, f"{tag}/cases",
                                               timeout_s=4 * (case_timeout_s + grace_s))
        self.guard = StallGuard(tag, rank)
        self.count = 0

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.tag}] {text}", flush=True)

    def run(self, name: str, fn: Callable[[], Any]) -> CaseResult:
        self.count += 1
        wait_s = self.case_timeout_s + self.grace_s
        self.guard.arm(f"case {self.count} '{name}' (waiting for the other ranks to start it)", wait_s)
        self.control.barrier()
        self.say(f"case {self.count}: {name} ...")
        self.guard.arm(f"case {self.count} '{name}'", self.case_timeout_s)
        t0 = time.perf_counter()
        value, error = None, None
        try:
            value = fn()
        except Exception as exc:
            error = _one_line(exc)
            sys.stderr.write(f"[{self.tag}] rank {self.rank}: case '{name}' failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
        if self.finish is not None:
            try:
                self.finish()
            except Exception as exc:
                error = error or f"after the case: {_one_line(exc)}"
        elapsed = time.perf_counter() - t0
        self.guard.arm(f"case {self.count} '{name}' (finished here after {elapsed:.1f} s; waiting for the other "
                       "ranks to finish it)", wait_s)
        gathered = self.control.exchange((name, error, value if error is None else None))
        self.guard.disarm()
        names = [g[0] for g in gathered]
        if len(set(names)) != 1:
            raise RuntimeError(f"ranks ran different cases (a bug in this script): {names}")
        errors = {r: g[1] for r, g in enumerate(gathered) if g[1] is not None}
        result = CaseResult(name, not errors, [g[2] for g in gathered], errors)
        self.say(f"  {'ok' if result.ok else 'FAILED: ' + result.error_text()} ({elapsed:.1f} s)")
        return result

    def close(self, teardown: Callable[[], None]) -> None:
        """Run ``teardown`` (e.g. free buffers, destroy the process group) under the guard."""
        self.guard.arm("teardown (freeing buffers, destroy_process_group)", self.case_timeout_s)
        teardown()
        self.guard.disarm()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ------------------------------------------------------------------------------------ sizes
def make_routing(num_tokens, num_experts, topk, seed, device):
    """Uniform top-k routing (distinct experts per token) with softmax weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    w = torch.softmax(torch.randn(num_tokens, topk, generator=gen), dim=1)
    return idx.to(device), w.to(device)


def send_kernel_blocks(op: str, num_tokens: int, world_size: int, max_tokens: int, hidden: int) -> int:
    """Blocks of the low-latency send kernel (mirrors launch_dispatch_send / launch_combine_send):
    one warp per (row, 1024-channel chunk), 4 warps per block, at most 1024 blocks. The dispatch
    pack walks this rank's tokens; the combine pack walks every received row slot."""
    rows = num_tokens if op == "dispatch" else world_size * max_tokens
    warps = rows * ((hidden + CHUNK - 1) // CHUNK)
    return max(1, min((warps + 3) // 4, MAX_SEND_BLOCKS))


def sms_in_flight(transport: Optional[str], op: str, num_tokens: int, world_size: int, max_tokens: int, hidden: int,
                  sm_count: int) -> Optional[int]:
    """SMs our communication holds while its data is in flight.

    copy_engine: 0 (cudaMemcpyAsync on copy engines; no kernel of ours is resident between send
    and hook). sm: the send kernel's blocks (it stores until the data has landed). nccl: unknown
    from here (NCCL's kernel holds one SM per channel): None. No transport: None.
    """
    if transport == "copy_engine":
        return 0
    if transport == "sm":
        return min(send_kernel_blocks(op, num_tokens, world_size, max_tokens, hidden), sm_count)
    return None


def results_path(out_dir: str, study: str, world_size: int, timing: str) -> str:
    suffix = "" if timing == "graph" else f"_{timing}"
    return os.path.join(out_dir, f"{study}{suffix}_ws{world_size}.json")


# ------------------------------------------------------------------------------------ rank body
def rank_device() -> torch.device:
    """This rank's GPU (run_distributed has set it)."""
    return torch.device("cuda", torch.cuda.current_device())


def time_case(fn: Callable[[], Any], args, control: StoreControl) -> dict:
    """Median/min of ``fn`` under CUDA-graph replay, or eager with the ranks meeting before each sample
    (``args.profile_replays``, where the script has it: also profile that many replays)."""
    if args.timing == "graph":
        return time_graph_replay(fn, warmup=args.warmup, iters=args.iters,
                                 profile_replays=getattr(args, "profile_replays", 0))
    return time_fn(fn, warmup=args.warmup, iters=args.iters, flush=False, barrier=control.barrier)


def _bench_rank(rank, world_size, args):
    dev = rank_device()
    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    runner = CaseRunner(rank, world_size, "decode_bench", case_timeout_s=args.case_timeout, finish=torch.cuda.synchronize)
    torch.manual_seed(1234 + rank)
    inputs = (torch.randn(T, H, device=dev).to(torch.bfloat16),) + make_routing(T, E, K, seed=99 + rank, device=dev)
    sink = ResultsSink(rank, args, "decode_bench", timing=args.timing, case_timeout_s=args.case_timeout,
                       bytes_counted="payload (+fp8 scales) rows; wire excludes a rank's own rows; "
                                     "copied = fixed-size regions the transfers move to other ranks")
    kept = []   # every transport's buffers live until teardown (a peer may map them until then)
    for transport in args.transports:
        _bench_transport(runner, sink, kept, args, rank, world_size, dev, inputs, transport)
    runner.close(lambda: release(kept, runner))
    sink.save(partial=False)
    return sink.rows if rank == 0 else None


def _bench_transport(runner, sink, kept, args, rank, world_size, dev, inputs, transport):
    """Setup, then dispatch bf16, dispatch fp8 and combine bf16 of one transport, as lockstep cases."""
    from overlap.ep.low_latency_layout import combine_row_stride, dispatch_row_stride, region_stride

    T, H, K = args.tokens, args.hidden, args.topk
    base = {"backend": f"ll_{transport}", "transport": transport, "num_tokens": T, "hidden": H, "topk": K,
            "num_experts": args.experts, "world_size": world_size}
    holder = {}
    kept.append(holder)

    def setup():
        holder.update(_setup_transport(args, rank, dev, inputs, transport))
        return holder.pop("counts")

    res = runner.run(f"{transport}: setup (EPBuffer, low-latency state, one eager dispatch)", setup)
    if not res.ok:
        sink.add({"op": "error", **base, "case": res.name, "error": res.error_text()[:500]})
        return
    counts = res.values   # per rank
    ll = holder["ll"]
    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    failed = None
    for op, fp8 in (("dispatch", False), ("dispatch", True), ("combine", False)):
        dtype = "fp8" if fp8 else "bf16"
        name = f"{transport}: {op} {dtype} ({'CUDA-graph replay' if args.timing == 'graph' else 'eager'})"
        if failed is not None:
            sink.add({"op": op, **base, "dtype": dtype, "skipped": f"after the failure of '{failed}'"})
            continue
        if op == "dispatch":
            def fn(fp8=fp8):
                ll.dispatch(*inputs, use_fp8=fp8, return_recv_hook=True, transport=transport)[3]()
        else:
            def fn():
                ll.combine(holder["y"], None, None, holder["handle"], return_recv_hook=True, out=holder["out"])[1]()

        def case(fn=fn):
            t = time_case(fn, args, runner.control)
            ll.check_status()   # a kernel timeout during the replays surfaces here, naming this case
            if args.stamps:
                t["kernel_stamps"] = format_kernel_stamps(ll.kernel_stamps())
            return t

        res = runner.run(name, case)
        if not res.ok:
            failed = name
            sink.add({"op": op, **base, "dtype": dtype, "error": res.error_text()[:500]})
            continue
        if op == "dispatch":
            payload = H + H // 128 * 4 if fp8 else H * 2
            wire = [c["sent_other"] * payload for c in counts]
            logical = [c["received"] * payload for c in counts]
            copied = (world_size - 1) * region_stride(T, dispatch_row_stride(H, K, fp8))
        else:
            wire = [c["back_other"] * H * 2 for c in counts]
            logical = [c["sent_rows"] * H * 2 for c in counts]
            copied = (world_size - 1) * region_stride(T, combine_row_stride(H))
        sink.add(reduce_row({"op": op, **base, "num_sms": sms_in_flight(transport, op, T, world_size, T, H, sm_count),
                             "hook_copy_unroll": ll.copy_unroll,
                             "dtype": dtype, "copied_bytes_per_rank": copied,
                             "timing": ("cuda_graph_replay" if args.timing == "graph" else "eager") + ", send + hook",
                             "iters": args.iters}, res.values, wire, logical))


def _setup_transport(args, rank, dev, inputs, transport):
    """A fresh EPBuffer and low-latency state (collective), and one eager dispatch whose row counts
    give the byte figures and whose handle the combine cases use."""
    from overlap.ep import EPBuffer
    from overlap.ep.low_latency import low_latency_state

    buf = EPBuffer(None, num_experts=args.experts, hidden=args.hidden, max_tokens_per_rank=args.tokens,
                   backend="torch", validate_values=False, device=dev)
    with temporary_env({"OVERLAP_LL_STAMPS": "1"} if args.stamps else {}):   # read when the state is built
        ll = low_latency_state(buf)
    recv, _, handle, _ = ll.dispatch(*inputs, transport=transport)
    ll.check_status()
    slots = handle.token_slot
    sent_rows = int((slots >= 0).sum())
    received = int(handle.src_counts.sum())
    counts = {"sent_rows": sent_rows, "sent_other": sent_rows - int((slots[:, rank] >= 0).sum()),
              "received": received, "back_other": received - int(handle.src_counts[rank])}
    return {"buf": buf, "ll": ll, "handle": handle, "y": recv.clone(), "counts": counts,
            "out": torch.empty(args.tokens, args.hidden, dtype=torch.bfloat16, device=dev)}


class ResultsSink:
    """Rows of a run, rewritten to the results file (rank 0) after every case, so a run that stalls
    later keeps what it measured (meta.partial = true until the end)."""

    def __init__(self, rank: int, args, study: str, **meta_extra):
        self.rank, self.path, self.rows = rank, args.results_path, []
        self.meta = (make_meta(study, args.world_size, command=args.command,
                               kernel_timeout_s=os.environ.get("OVERLAP_KERNEL_TIMEOUT_S", "10"), **meta_extra)
                     if rank == 0 else None)

    def add(self, row: dict) -> None:
        if self.rank == 0:
            self.rows.append(row)
            self.save(partial=True)

    def save(self, partial: bool) -> None:
        if self.rank == 0:
            write_results(self.path, {**self.meta, "partial": partial}, self.rows)


def release(kept: list, runner: CaseRunner) -> None:
    """Free the buffers, leave the store last on rank 0, destroy the process group."""
    kept.clear()
    gc.collect()
    torch.cuda.synchronize()
    runner.control.close()
    dist.destroy_process_group()


def reduce_row(row: dict, timings: list, wire: list, logical: list) -> dict:
    """Fill time (slowest rank's median and min) and bytes/bandwidth (mean over ranks) into ``row``."""
    slowest = max(timings, key=lambda t: t["time_us"])
    time_us = slowest["time_us"]
    wire_b, logical_b = sum(wire) / len(wire), sum(logical) / len(logical)
    row.update({"time_us": time_us, "min_us": max(t["min_us"] for t in timings),
                "time_us_per_rank": " ".join(f"{t['time_us']:.2f}" for t in timings),
                "wire_gbps": wire_b / time_us / 1e3, "logical_gbps": logical_b / time_us / 1e3,
                "wire_bytes_per_rank": wire_b, "logical_bytes_per_rank": logical_b})
    if "device_us_by_name" in slowest:   # --profile-replays: where the slowest rank's replay spends device time
        row["device_us_by_name_slowest_rank"] = slowest["device_us_by_name"]
        row["replay_timeline_slowest_rank"] = slowest.get("replay_timeline", "")
    if "kernel_stamps" in slowest:   # --stamps: the slowest rank's last pack and hook, phase by phase
        row["kernel_stamps_slowest_rank"] = slowest["kernel_stamps"]
    return row


def format_kernel_stamps(stamps: dict) -> str:
    """One line from :meth:`LowLatencyEP.kernel_stamps`: per kernel, when its blocks reached each
    phase after the first block started, as min/median/max µs over blocks, e.g.
    ``"pack (448 blocks): prologue 0.6/0.8/1.1, ...; hook (128 blocks): ..."``."""
    parts = []
    for kernel in ("pack", "hook"):
        phases = stamps.get(kernel)
        if not phases:
            continue
        times = ", ".join(f"{ph} " + "/".join(f"{v:.2f}" for v in phases[ph])
                          for ph in phases if ph not in ("blocks", "start"))
        parts.append(f"{kernel} ({phases.get('blocks', '?')} blocks): {times}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------ driver
def add_size_arguments(p: argparse.ArgumentParser, gpus: int, *, tokens_help: str) -> None:
    """World size and the decode sizes (DESIGN.md section 5) every decode study takes."""
    p.add_argument("--world-size", type=int, default=gpus or 2)
    p.add_argument("--tokens", type=int, default=128, help=tokens_help)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)


def add_run_arguments(p: argparse.ArgumentParser, *, warmup: int, iters: int, profile_replays: bool = True) -> None:
    """Options both decode scripts share: timing mode, counts, guards, output; ``--profile-replays``
    only where the rows record what it measures (``profile_replays``)."""
    p.add_argument("--transports", nargs="*", default=list(TRANSPORTS), choices=TRANSPORTS)
    p.add_argument("--timing", choices=("graph", "eager"), default="graph",
                   help="graph: CUDA-graph replay (the reported figure); eager: no graphs (launch-bound; "
                        "a diagnostic that leaves graph capture out)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=iters)
    if profile_replays:
        p.add_argument("--profile-replays", type=int, default=0,
                           help="graph timing: profile this many more replays and record each kernel's and copy's "
                            "device time per replay (device_us_by_name_slowest_rank) and when each starts and ends "
                            "(replay_timeline_slowest_rank); 0: off")
    p.add_argument("--case-timeout", type=float, default=120.0,
                   help="seconds one case may run before the rank reports a stall and exits (code 124)")
    p.add_argument("--timeout", type=float, default=540.0,
                   help="seconds for the whole run (also the NCCL process-group timeout); keep it below any "
                        "outer `timeout` so this script, not the outer one, reports the stall")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the results JSON")


def check_run_arguments(p: argparse.ArgumentParser, args, gpus: int) -> None:
    if args.world_size < 1:
        p.error(f"--world-size must be >= 1, got {args.world_size}")
    if gpus < args.world_size:
        p.error(f"--world-size {args.world_size} needs {args.world_size} GPUs; this machine has {gpus}")
    if args.experts % args.world_size:
        p.error(f"--experts {args.experts} must be a multiple of --world-size {args.world_size}")
    if getattr(args, "profile_replays", 0) < 0:
        p.error(f"--profile-replays must be >= 0, got {args.profile_replays}")
    if args.warmup < 0 or args.iters < 1:
        p.error(f"--warmup must be >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
    if not (args.case_timeout > 0 and args.timeout > 0):
        p.error("--case-timeout and --timeout must be positive")
    if not args.transports:
        p.error("--transports needs at least one transport")


def launch(study: str, rank_fn, args, argv) -> list:
    """Run ``rank_fn`` on NCCL ranks; on failure say where the partial results are and exit 1."""
    args.command = f"python experiments/{study}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.results_path = results_path(args.out, study, args.world_size, args.timing)
    started = time.time()
    try:
        return run_distributed(rank_fn, args.world_size, args, backend="nccl", timeout_s=args.timeout)[0]
    except (RankFailed, DistributedTimeout) as exc:
        print(f"[{study}] FAILED: {exc}", file=sys.stderr, flush=True)
        if os.path.exists(args.results_path) and os.path.getmtime(args.results_path) >= started:
            print(f"[{study}] rows finished before the failure are in {args.results_path} (meta.partial = true)",
                  file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(p, gpus, tokens_help="tokens per rank")
    add_run_arguments(p, warmup=5, iters=30)
    p.add_argument("--stamps", action="store_true",
                   help="build the buffers with OVERLAP_LL_STAMPS=1 and record when the last replay's pack and "
                        "hook blocks reached each phase (kernel_stamps_slowest_rank; the stamps' stores cost a "
                        "little time, so compare timings only between runs that both have them)")
    args = p.parse_args(argv)
    check_run_arguments(p, args, gpus)
    print(f"[decode_bench] {args.world_size} GPUs: {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"top-{args.topk}, {args.experts} experts, transports {' '.join(args.transports)}, timing {args.timing}",
          flush=True)
    rows = launch("decode_bench", _bench_rank, args, argv)
    print(f"\n{'op':<10}{'transport':<13}{'dtype':<6}{'SMs':>5}{'time_us':>10}{'wire GB/s':>11}{'logical GB/s':>14}")
    for r in rows:
        if "time_us" not in r:
            print(f"{r['op']:<10}{r['transport']:<13}{r.get('dtype', ''):<6} {r.get('error') or r.get('skipped')}")
            continue
        sms = "-" if r["num_sms"] is None else r["num_sms"]
        print(f"{r['op']:<10}{r['transport']:<13}{r['dtype']:<6}{sms:>5}{r['time_us']:>10.1f}"
              f"{r['wire_gbps']:>11.1f}{r['logical_gbps']:>14.1f}")
    print(f"[decode_bench] wrote {args.results_path}", flush=True)
    if any("time_us" not in r for r in rows):
        sys.exit(1)   # a failed or skipped case is a failed run, even though the others were written
    return rows


if __name__ == "__main__":
    main()
