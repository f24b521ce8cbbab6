#!/usr/bin/env python3
"""Dispatch/combine microbenchmark: every available backend, a num_sms sweep, and the raw
all_to_all_single on the same bytes, in one run on the same process group.

    python experiments/ep_bench.py                      # all local GPUs (NCCL), or 4 gloo CPU ranks
    python experiments/ep_bench.py --world-size 2 --backends torch --num-sms 8 20

Bytes counted (per GPU): `wire` = token rows this rank sends to *other* ranks (x only, not the
top-k ids/weights) for dispatch, and the rows it sends back for combine; `logical` = all rows
received including the rank's own (DeepEP's convention). GB/s = bytes / time_us (10^9 B/s).
time_us = the slowest rank's median over the timed iterations (CUDA events on GPU).

Kernel backends run each dispatch in three modes (``--modes``): ``exact`` sizes the outputs
from the counts (one host sync per dispatch), ``budget`` passes ``num_worst_tokens = W * tokens``
(no host sync), ``graph`` times the budget-mode call as CUDA-graph replays (what a captured
step costs the GPU, without Python's launch overhead; backends that cannot be captured skip
it). Eager times include the host's launch cost whenever the GPU waits for it. Rows record the
mode and the CUDA kernels' tuning (KernelTuning in overlap/ep/backends/cuda_backend.py).
NCCL is timed eagerly (one call; its launch cost is small).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_fn, time_graph_replay, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_routing(num_tokens, num_experts, topk, seed, device):
    """Uniform top-k routing (distinct experts per token), fresh per seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    idx = scores.topk(topk, dim=1).indices
    w = torch.softmax(torch.randn(num_tokens, topk, generator=gen), dim=1)
    return idx.to(device), w.to(device)


def _bench_rank(rank, world_size, args):
    from overlap.ep import EPBuffer, available_backends

    on_gpu = torch.cuda.is_available() and args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(1234 + rank)
    x = torch.randn(args.tokens, args.hidden, device=device).to(dtype)
    idx, w = make_routing(args.tokens, args.experts, args.topk, seed=99 + rank, device=device)
    row_bytes = args.hidden * x.element_size()
    group = dist.group.WORLD
    barrier = (lambda: dist.barrier()) if not on_gpu else (lambda: dist.barrier(device_ids=[device.index]))
    rows = []

    def gather_max(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather_mean(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / world_size

    backends = [b for b in args.backends if b in available_backends()] if args.backends else available_backends()
    for backend in backends:
        sms_list = args.num_sms if backend != "torch" else [None]  # the torch backend leaves SMs to NCCL
        modes = args.modes if backend != "torch" else ["exact"]
        for num_sms, mode in [(n, m) for n in sms_list for m in modes]:
            buf = EPBuffer(group, num_experts=args.experts, hidden=args.hidden, max_tokens_per_rank=args.tokens,
                           backend=backend, num_sms=num_sms or 20, validate_values=False, device=device)
            budget = world_size * args.tokens if mode in ("budget", "graph") else None
            tuning = getattr(buf._backend, "tuning", None) if backend == "cuda" else None
            recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(x, idx, w)
            lay = handle.layout
            sent_rows = lay.num_tokens_per_rank.to(torch.int64)
            wire_rows = int(sent_rows.sum() - sent_rows[rank])
            recv_rows = recv_x.shape[0]
            if budget is not None:
                handle = buf.dispatch(x, idx, w, num_worst_tokens=budget)[4]
            y = torch.randn(handle.num_recv_tokens, args.hidden, device=device).to(dtype)

            def timer(fn):
                # graph: the GPU's own time per call (CUDA-graph replay, no Python launch cost);
                # otherwise eager calls, each started together on every rank by the barrier.
                if mode == "graph":
                    barrier()
                    return time_graph_replay(fn, warmup=args.warmup, iters=max(5, args.iters // 3),
                                             profile_replays=args.profile_replays)
                return time_fn(fn, warmup=args.warmup, iters=args.iters, barrier=barrier)

            if mode == "graph" and not buf._backend.graph_capturable:
                del buf
                continue
            t_disp = timer(lambda: buf.dispatch(x, idx, w, num_worst_tokens=budget))
            t_comb = timer(lambda: buf.combine(y, handle))
            back_wire_rows = recv_rows - int(sent_rows[rank])  # rows returned to other ranks
            timed = [("dispatch", t_disp, wire_rows, recv_rows, row_bytes, args.dtype),
                     ("combine", t_comb, back_wire_rows, int(sent_rows.sum()), row_bytes, args.dtype)]
            if hasattr(buf._backend, "dispatch_fp8") and args.hidden % 128 == 0:
                t_fp8 = timer(lambda: buf.dispatch_fp8(x, idx, w, num_worst_tokens=budget))
                fp8_row_bytes = args.hidden + args.hidden // 128 * 4  # e4m3 values + fp32 scales
                timed.append(("dispatch", t_fp8, wire_rows, recv_rows, fp8_row_bytes, "fp8"))
            for op, t, wire, logical, nbytes, dtype_name in timed:
                send_warps, send_chunk = (None, None) if tuning is None else tuning.split(op, fp8=dtype_name == "fp8")
                time_us = gather_max(t["time_us"])
                wire_b, logical_b = gather_mean(wire * nbytes), gather_mean(logical * nbytes)
                rows.append({"op": op, "backend": backend, "num_sms": num_sms, "mode": mode,
                             "send_warps": send_warps, "send_chunk": send_chunk,
                             "copy_unroll": None if tuning is None else tuning.copy_unroll,
                             "dtype": dtype_name, "time_us": time_us,
                             "wire_gbps": wire_b / time_us / 1e3, "logical_gbps": logical_b / time_us / 1e3,
                             "wire_bytes_per_rank": wire_b, "logical_bytes_per_rank": logical_b,
                             "min_us": gather_max(t["min_us"]), "iters": args.iters})
                if "device_us_by_name" in t:   # --profile-replays (graph mode): rank 0's kernels per call
                    rows[-1]["device_us_by_name_rank0"] = t["device_us_by_name"]
            del buf

    # The raw collective on exactly the dispatch's x bytes and splits: the yardstick.
    from overlap.ep.layout import permute_rows, routing_layout

    lay = routing_layout(idx, args.experts, world_size)
    send_counts = lay.num_tokens_per_rank.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send = permute_rows(x, lay.token_slot_in_rank, lay.rank_offsets, int(send_counts.sum()))
    recv = x.new_empty(int(recv_counts.sum()), args.hidden)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    t = time_fn(lambda: dist.all_to_all_single(recv, send, rc, sc), warmup=args.warmup, iters=args.iters,
                barrier=barrier)
    wire_rows = int(send_counts.sum() - send_counts[rank])
    time_us = gather_max(t["time_us"])
    wire_b, logical_b = gather_mean(wire_rows * row_bytes), gather_mean(recv.shape[0] * row_bytes)
    rows.append({"op": "all_to_all_single", "backend": "nccl" if on_gpu else "gloo", "num_sms": None, "mode": "exact",
                 "send_warps": None, "send_chunk": None, "copy_unroll": None, "dtype": args.dtype,
                 "time_us": time_us, "wire_gbps": wire_b / time_us / 1e3, "logical_gbps": logical_b / time_us / 1e3,
                 "wire_bytes_per_rank": wire_b, "logical_bytes_per_rank": logical_b,
                 "min_us": gather_max(t["min_us"]), "iters": args.iters})
    common = {"num_tokens": args.tokens, "hidden": args.hidden, "topk": args.topk, "num_experts": args.experts,
              "world_size": world_size}
    return [dict(common, **r) for r in rows] if rank == 0 else None


def print_table(rows):
    print(f"\n{'op':<18}{'backend':<9}{'mode':<7}{'dtype':<6}{'SMs':>5}{'time_us':>11}{'wire GB/s':>11}"
          f"{'logical GB/s':>14}")
    for r in rows:
        sms = "-" if r["num_sms"] is None else r["num_sms"]
        print(f"{r['op']:<18}{r['backend']:<9}{r.get('mode', 'exact'):<7}{r['dtype']:<6}{sms:>5}{r['time_us']:>11.1f}"
              f"{r['wire_gbps']:>11.1f}{r['logical_gbps']:>14.1f}")


def main(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=gpus or 4, help="ranks (default: all GPUs, or 4 CPU ranks)")
    p.add_argument("--cpu", action="store_true", help="use gloo CPU ranks even when GPUs exist")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (GPU default 4096, CPU 512)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (GPU default 7168, CPU 2048)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backends", nargs="*", default=None, help="default: every backend available here")
    p.add_argument("--num-sms", type=int, nargs="*", default=[2, 4, 8, 12, 16, 20, 24, 32])
    p.add_argument("--modes", nargs="*", choices=["exact", "budget", "graph"], default=["exact", "budget", "graph"],
                   help="kernel backends: exact (outputs sized by a host sync), budget (num_worst_tokens, eager "
                        "calls), graph (num_worst_tokens, timed as CUDA-graph replays: the GPU's own time)")
    p.add_argument("--profile-replays", type=int, default=0,
                   help="graph mode: profile this many more replays per case and record rank 0's device time per "
                        "kernel (device_us_by_name_rank0); 0: off")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the results JSON")
    p.add_argument("--tag", default="", help="suffix for the results file name")
    args = p.parse_args(argv)
    use_gpu = gpus > 0 and not args.cpu
    if use_gpu and args.world_size > gpus:
        p.error(f"--world-size {args.world_size} needs {args.world_size} GPUs; this machine has {gpus}")
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    args.device = "cuda" if use_gpu else "cpu"
    args.tokens = args.tokens or (4096 if use_gpu else 512)
    args.hidden = args.hidden or (7168 if use_gpu else 2048)
    args.warmup = args.warmup if args.warmup is not None else (5 if use_gpu else 2)
    args.iters = args.iters if args.iters is not None else (30 if use_gpu else 5)
    if args.experts % args.world_size:
        p.error(f"--experts {args.experts} must be a multiple of --world-size {args.world_size}")
    where = f"{args.world_size} {'GPUs (NCCL)' if use_gpu else 'gloo CPU ranks'}"
    print(f"[ep_bench] {where}: {args.tokens} tokens/rank, hidden {args.hidden}, top-{args.topk}, "
          f"{args.experts} experts, {args.dtype}")
    results = run_distributed(_bench_rank, args.world_size, args, backend="nccl" if use_gpu else "gloo",
                              timeout_s=900)
    rows = results[0]
    print_table(rows)
    meta = make_meta("ep_bench", args.world_size, bytes_counted="x payload rows only (no top-k ids/weights); "
                     "wire excludes rows a rank keeps for itself; logical counts all received rows")
    kind = "gpu" if use_gpu else "cpu"
    path = os.path.join(args.out, f"ep_bench_{kind}_ws{args.world_size}{args.tag}.json")
    write_results(path, meta, rows)
    print(f"[ep_bench] wrote {path}")
    return rows


if __name__ == "__main__":
    main()
