#!/usr/bin/env python3
"""Decode (low-latency) dispatch/combine latency under CUDA-graph replay, per transport.

    python experiments/decode_bench.py --world-size 4 --out experiments/results

For each transport (copy_engine: zero-SM copy-engine transfers; sm: kernel stores over NVLink;
nccl: all_to_all_single of the packed regions) and each dispatch dtype (bf16, fp8), one graph
holds `dispatch(return_recv_hook=True); hook()` and another `combine(...); hook()` (bf16), so
time_us is send + hook with Python launch cost removed (the slowest rank's median over replays).
Bytes: `wire` = rows this rank sends to other ranks (payload + scales, not the row headers);
`logical` = all rows received including the rank's own; `copied` = bytes the fixed-size
transfers actually move to other ranks (each sends the worst-case region). GB/s = bytes / time.
Writes decode_bench_ws{N}.json (DESIGN.md §5 format).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_graph_replay, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TRANSPORTS = ("copy_engine", "sm", "nccl")


def make_routing(num_tokens, num_experts, topk, seed, device):
    """Uniform top-k routing (distinct experts per token) with softmax weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    w = torch.softmax(torch.randn(num_tokens, topk, generator=gen), dim=1)
    return idx.to(device), w.to(device)


def _bench_rank(rank, world_size, args):
    from overlap.ep import EPBuffer
    from overlap.ep.low_latency import low_latency_state

    dev = torch.device("cuda", torch.cuda.current_device())
    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    torch.manual_seed(1234 + rank)
    x = torch.randn(T, H, device=dev).to(torch.bfloat16)
    idx, w = make_routing(T, E, K, seed=99 + rank, device=dev)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch", validate_values=False,
                   device=dev)
    ll = low_latency_state(buf)
    rows = []
    for transport in args.transports:
        try:
            _bench_transport(rank, world_size, args, ll, x, idx, w, transport, rows)
        except Exception as exc:  # e.g. a NCCL build that cannot be captured: keep the other rows
            if transport != args.transports[-1]:
                raise
            print(f"[decode_bench] rank {rank}: transport {transport} failed: {exc}", flush=True)
            rows.append(("error", transport, str(exc)[:200], None, 0, 0, 0))
    ll.check_status()
    return _rows(rank, world_size, args, rows, dev)


def _bench_transport(rank, world_size, args, ll, x, idx, w, transport, rows):
    from overlap.ep.low_latency_layout import combine_row_stride, dispatch_row_stride, region_stride

    T, H, K = args.tokens, args.hidden, args.topk
    dev = x.device
    # An eager dispatch gives the routing's row counts and a handle for the combine graphs.
    recv, counts, handle, _ = ll.dispatch(x, idx, w, transport=transport)
    slots = handle.token_slot
    sent_other = int((slots >= 0).sum()) - int((slots[:, rank] >= 0).sum())
    received = int(handle.src_counts.sum())
    y = recv.clone()
    def progress(case):
        # A stalled case then names itself in the log (rank 0 speaks for all ranks).
        if rank == 0:
            print(f"[decode_bench] {transport}: {case}", flush=True)

    for fp8 in (False, True):
        payload = H + H // 128 * 4 if fp8 else H * 2
        rs = region_stride(T, dispatch_row_stride(H, K, fp8))
        progress(f"dispatch {'fp8' if fp8 else 'bf16'} under graph replay")
        t = time_graph_replay(lambda: ll.dispatch(x, idx, w, use_fp8=fp8, return_recv_hook=True,
                                                  transport=transport)[3](),
                              warmup=args.warmup, iters=args.iters)
        rows.append(("dispatch", transport, "fp8" if fp8 else "bf16", t, sent_other * payload,
                     received * payload, (world_size - 1) * rs))
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    progress("combine bf16 under graph replay")
    t = time_graph_replay(lambda: ll.combine(y, None, None, handle, return_recv_hook=True, out=out)[1](),
                          warmup=args.warmup, iters=args.iters)
    back_other = received - int(handle.src_counts[rank])
    rs = region_stride(T, combine_row_stride(H))
    rows.append(("combine", transport, "bf16", t, back_other * H * 2, int((slots >= 0).sum()) * H * 2,
                 (world_size - 1) * rs))
    torch.cuda.synchronize()


def _rows(rank, world_size, args, rows, dev):
    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk

    def reduce(v, op):
        t = torch.tensor([float(v)], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=op)
        return float(t.item())

    out_rows = []
    pack_blocks = max(1, min((T * ((H + 1023) // 1024) + 3) // 4, 1024))
    for op, transport, dtype, t, wire, logical, copied in rows:
        if op == "error":
            out_rows.append({"op": "error", "backend": f"ll_{transport}", "transport": transport, "error": dtype,
                             "world_size": world_size})
            continue
        time_us = reduce(t["time_us"], dist.ReduceOp.MAX)
        wire_b = reduce(wire, dist.ReduceOp.SUM) / world_size
        logical_b = reduce(logical, dist.ReduceOp.SUM) / world_size
        # SMs our kernels hold while the data is in flight: none for copy engines; the SM path's
        # pack kernel stores until done; NCCL's own kernel (its channel count) for nccl.
        sms = {"copy_engine": 0, "sm": min(pack_blocks, torch.cuda.get_device_properties(dev).multi_processor_count),
               "nccl": None}[transport]
        out_rows.append({"op": op, "backend": f"ll_{transport}", "transport": transport, "num_sms": sms,
                         "num_tokens": T, "hidden": H, "topk": K, "num_experts": E, "dtype": dtype,
                         "time_us": time_us, "min_us": reduce(t["min_us"], dist.ReduceOp.MAX),
                         "wire_gbps": wire_b / time_us / 1e3, "logical_gbps": logical_b / time_us / 1e3,
                         "wire_bytes_per_rank": wire_b, "logical_bytes_per_rank": logical_b,
                         "copied_bytes_per_rank": copied, "timing": "cuda_graph_replay, send + hook",
                         "iters": args.iters, "world_size": world_size})
    return out_rows if rank == 0 else None


def main(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=gpus or 2)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--transports", nargs="*", default=list(TRANSPORTS), choices=TRANSPORTS)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the results JSON")
    args = p.parse_args(argv)
    if gpus < args.world_size:
        p.error(f"--world-size {args.world_size} needs {args.world_size} GPUs; this machine has {gpus}")
    if args.experts % args.world_size:
        p.error(f"--experts {args.experts} must be a multiple of --world-size {args.world_size}")
    print(f"[decode_bench] {args.world_size} GPUs: {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"top-{args.topk}, {args.experts} experts")
    rows = run_distributed(_bench_rank, args.world_size, args, backend="nccl", timeout_s=900)[0]
    print(f"\n{'op':<10}{'transport':<13}{'dtype':<6}{'SMs':>5}{'time_us':>10}{'wire GB/s':>11}{'logical GB/s':>14}")
    for r in rows:
        if r["op"] == "error":
            print(f"{r['op']:<10}{r['transport']:<13}{r['error']}")
            continue
        sms = "-" if r["num_sms"] is None else r["num_sms"]
        print(f"{r['op']:<10}{r['transport']:<13}{r['dtype']:<6}{sms:>5}{r['time_us']:>10.1f}"
              f"{r['wire_gbps']:>11.1f}{r['logical_gbps']:>14.1f}")
    command = "python experiments/decode_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = make_meta("decode_bench", args.world_size, command=command,
                     bytes_counted="payload (+fp8 scales) rows; wire excludes a rank's own rows; "
                                   "copied = fixed-size regions the transfers move to other ranks")
    path = os.path.join(args.out, f"decode_bench_ws{args.world_size}.json")
    write_results(path, meta, rows)
    print(f"[decode_bench] wrote {path}")
    return rows


if __name__ == "__main__":
    main()
