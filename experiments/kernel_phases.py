#!/usr/bin/env python3
"""Where the `cuda` backend's dispatch and combine kernels spend their time.

Runs each operation with phase stamps on (``OVERLAP_CUDA_STAMPS=1``: every warp records
%globaltimer at its phases, see overlap/ep/kernel_stamps.py) for every num_sms and tuning
variant, and reports per operation: the call's time (CUDA events), the kernel's own span and
its span after every peer's kernel had started (eager calls start on the ranks up to ~100 us
apart, which the first rank's kernel spends in its ready handshake), the ready handshake, how long senders and receivers were busy, what share of that they spent
waiting (receivers for arrival flags, senders in fences), and the tail.

    python3 experiments/kernel_phases.py --world-size 2
    python3 experiments/kernel_phases.py --world-size 2 --num-sms 8 20 \\
        --variant base: --variant unroll8:OVERLAP_CUDA_COPY_UNROLL=8 --variant sw8:OVERLAP_CUDA_SEND_WARPS=8

A variant is ``name:VAR=value,VAR=value`` (environment applied while its buffers are built).
Dispatches run in budget mode (``num_worst_tokens``), so no host sync sits inside the timing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_fn, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402
from overlap.testing.env import temporary_env  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_VARIANTS = ["base:", "unroll8:OVERLAP_CUDA_COPY_UNROLL=8"]


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``"name:VAR=v,VAR=v"`` -> (name, {VAR: v}); raises ValueError naming the bad part."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {text!r} must be name:VAR=value,... (empty after ':' for the defaults)")
    env = {}
    for item in filter(None, rest.split(",")):
        var, eq, value = item.partition("=")
        if not eq or not var.startswith("OVERLAP_"):
            raise ValueError(f"--variant {text!r}: {item!r} must be OVERLAP_...=value")
        env[var] = value
    return name, env


def _phases_rank(rank, world_size, args):
    from overlap.ep import EPBuffer
    from overlap.ep.kernel_stamps import median_summary, summarize

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(7 + rank)
    x = torch.randn(args.tokens, args.hidden, device=device).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(11 + rank)
    idx = torch.rand(args.tokens, args.experts, generator=gen).topk(args.topk, dim=1).indices.to(device)
    w = torch.softmax(torch.randn(args.tokens, args.topk, generator=gen), dim=1).to(device)
    budget = world_size * args.tokens
    barrier = lambda: dist.barrier(device_ids=[device.index])  # noqa: E731
    rows = []
    for text in args.variant:
        name, env = parse_variant(text)
        for num_sms in args.num_sms:
            with temporary_env({**env, "OVERLAP_CUDA_STAMPS": "1"}):  # read when the buffer is set up
                buf = EPBuffer(dist.group.WORLD, num_experts=args.experts, hidden=args.hidden,
                               max_tokens_per_rank=args.tokens, backend="cuda", num_sms=num_sms,
                               validate_values=False, device=device)
                handle = buf.dispatch(x, idx, w, num_worst_tokens=budget)[4]
            backend = buf._backend
            y = torch.randn(handle.num_recv_tokens, args.hidden, device=device).to(torch.bfloat16)
            ops = {"dispatch bf16": ("dispatch", lambda: buf.dispatch(x, idx, w, num_worst_tokens=budget)),
                   "dispatch fp8": ("dispatch", lambda: buf.dispatch_fp8(x, idx, w, num_worst_tokens=budget)),
                   "combine bf16": ("combine", lambda: buf.combine(y, handle))}
            for label, (kind, fn) in ops.items():
                summaries = []
                timed = time_fn(fn, warmup=args.warmup, iters=args.iters, flush=False, barrier=barrier,
                                after_each=lambda: summaries.append(summarize(backend.last_phase_stamps(kind))))
                s = median_summary(summaries)
                t = torch.tensor([timed["time_us"], s["total_us"], s["after_ready_us"]], dtype=torch.float64,
                                 device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                send_warps, send_chunk = backend.tuning.split(kind, fp8=label == "dispatch fp8")
                rows.append({"variant": name, "env": ",".join(f"{k}={v}" for k, v in env.items()),
                             "num_sms": num_sms, "op": label, "send_warps": send_warps, "send_chunk": send_chunk,
                             "copy_unroll": backend.tuning.copy_unroll,
                             "call_us": float(t[0]), "kernel_us_slowest_rank": float(t[1]),
                             "kernel_after_ready_us_slowest_rank": float(t[2]),
                             **{f"rank{rank}_{k}": v for k, v in s.items()}})
            del buf
    # Rank 0 reports; fold rank 1's phase summaries in for the same rows.
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows)
    if rank != 0:
        return None
    merged = []
    for parts in zip(*gathered):
        row = dict(parts[0])
        for other in parts[1:]:
            row.update({k: v for k, v in other.items() if k.startswith("rank")})
        merged.append(dict(row, world_size=world_size, num_tokens=args.tokens, hidden=args.hidden, topk=args.topk,
                           num_experts=args.experts))
    return merged


def print_table(rows):
    print(f"\n{'variant':<10}{'SMs':>4} {'op':<14}{'call':>7}{'kernel':>8}{'k.ready':>8}{'hshake':>8}{'send':>7}{'s.wait':>7}"
          f"{'s.max':>7}{'recv':>7}{'r.wait':>7}{'r.first':>8}{'help':>7}{'tail':>6}"
          "   (us, rank 0; k.ready = kernel after every peer started (slowest rank); wait = share of busy time;"
          " help = senders' receiving after their last send)")
    for r in rows:
        g = lambda k: r.get(f"rank0_{k}", float("nan"))  # noqa: E731
        print(f"{r['variant']:<10}{r['num_sms']:>4} {r['op']:<14}{r['call_us']:>7.0f}{r['kernel_us_slowest_rank']:>8.0f}"
              f"{r.get('kernel_after_ready_us_slowest_rank', float('nan')):>8.0f}"
              f"{g('handshake_us'):>8.1f}{g('send_busy_us'):>7.0f}{g('send_wait_share'):>7.2f}"
              f"{g('send_busy_max_us'):>7.0f}{g('recv_busy_us'):>7.0f}{g('recv_wait_share'):>7.2f}"
              f"{g('recv_first_row_us'):>8.1f}{g('help_busy_us'):>7.0f}{g('tail_us'):>6.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--num-sms", type=int, nargs="*", default=[8, 20, 32])
    p.add_argument("--variant", action="append", default=None, help="name:VAR=value,... (repeatable)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    args.variant = args.variant or DEFAULT_VARIANTS
    for v in args.variant:
        try:
            parse_variant(v)
        except ValueError as exc:
            p.error(str(exc))
    if not torch.cuda.is_available() or not 1 <= args.world_size <= torch.cuda.device_count():
        p.error("kernel_phases needs CUDA GPUs (--world-size at most the local GPU count)")
    rows = run_distributed(_phases_rank, args.world_size, args, backend="nccl", timeout_s=900)[0]
    print_table(rows)
    meta = make_meta("kernel_phases", args.world_size,
                     note="phase stamps of the cuda backend's kernels; rankN_* fields are that rank's medians")
    path = write_results(os.path.join(args.out, f"kernel_phases_ws{args.world_size}{args.tag}.json"), meta, rows)
    print(f"[kernel_phases] wrote {path}")


if __name__ == "__main__":
    main()
