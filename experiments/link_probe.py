#!/usr/bin/env python3
"""The NVLink ceiling of this machine, measured the way the intranode kernels move bytes.

Every rank copies ``--mib`` MiB from a local tensor into the next rank's symmetric buffer at
the same time (with 2 GPUs: both directions of the one pair at once, the all-to-all pattern),
with the link probe kernel (csrc/kernels/link_probe.cu: plain 16-byte stores, no flags, no
fences) on k thread blocks, and with a cudaMemcpyAsync (copy engines, 0 SMs; needs cupy). Then NCCL
all_to_all_single over the same bytes per peer, for reference.

    python3 experiments/link_probe.py --world-size 2
    python3 experiments/link_probe.py --world-size 2 --blocks 4 8 20 --unroll 8 16 --threads 512

GB/s = bytes a rank wrote into its peer's memory / time (10^9 B/s); time = the slowest rank's
median (CUDA events, ranks started together by a barrier).
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

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _probe_rank(rank, world_size, args):
    import overlap
    from overlap.ep.symm_buffer import SymmetricBuffer

    overlap.load_cuda_extension()
    device = torch.device("cuda", torch.cuda.current_device())
    nbytes = args.mib << 20
    canary = torch.ops.overlap.intranode_layout()[1]
    symm = SymmetricBuffer(dist.group.WORLD, nbytes + 8192, device, zero_bytes=8192, canary_offset=canary)
    peer = (rank + 1) % world_size
    dst_ptr = int(symm.peer_bases[peer].item()) + 8192

    def source_of(r: int) -> torch.Tensor:  # every rank can rebuild any rank's bytes
        gen = torch.Generator(device=device).manual_seed(1000 + r)
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)

    src = source_of(rank)
    barrier = lambda: dist.barrier(device_ids=[device.index])  # noqa: E731

    def slowest(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    rows = []

    def record(method, blocks, threads, unroll, t):
        us = slowest(t["time_us"])
        rows.append({"method": method, "num_blocks": blocks, "threads": threads, "unroll": unroll,
                     "bytes_per_rank": nbytes, "time_us": us, "gbps": nbytes / us / 1e3,
                     "gbps_per_block": (nbytes / us / 1e3 / blocks) if blocks else None})

    # The probe copies real bytes: check one run landed intact before timing anything.
    torch.ops.overlap.link_probe_copy(src, dst_ptr, 8, 512, 8, False)
    torch.cuda.synchronize()
    barrier()
    ok = torch.tensor([int(torch.equal(symm.tensor[8192:8192 + nbytes], source_of((rank - 1) % world_size)))],
                      device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise RuntimeError("link probe: the bytes a peer wrote do not match its source")

    for mode in args.modes:
        for threads in args.threads:
            for unroll in args.unroll:
                for blocks in args.blocks:
                    t = time_fn(lambda: torch.ops.overlap.link_probe_copy(src, dst_ptr, blocks, threads, unroll,
                                                                          mode == "store"),
                                warmup=args.warmup, iters=args.iters, flush=False, barrier=barrier)
                    record(f"sm_{mode}", blocks, threads, unroll, t)
    try:  # copy engines: cudaMemcpyAsync into the peer's memory (cupy has a raw-pointer memcpy)
        import cupy

        def engine_copy():
            cupy.cuda.runtime.memcpyAsync(dst_ptr, src.data_ptr(), nbytes, cupy.cuda.runtime.memcpyDeviceToDevice,
                                          torch.cuda.current_stream().cuda_stream)

        t = time_fn(engine_copy, warmup=args.warmup, iters=args.iters, flush=False, barrier=barrier)
        record("copy_engine", 0, None, None, t)
    except ImportError:
        print("[link_probe] cupy not installed: no copy-engine row")
    # NCCL: the same bytes to every peer in one all_to_all_single (per peer nbytes / (W - 1)).
    if world_size > 1:
        per_peer = nbytes // (world_size - 1) // 16 * 16
        send = torch.randint(0, 256, (per_peer * world_size,), dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)
        t = time_fn(lambda: dist.all_to_all_single(recv, send), warmup=args.warmup, iters=args.iters, flush=False,
                    barrier=barrier)
        us = slowest(t["time_us"])
        rows.append({"method": "nccl_all_to_all", "num_blocks": None, "threads": None, "unroll": None,
                     "bytes_per_rank": per_peer * (world_size - 1), "time_us": us,
                     "gbps": per_peer * (world_size - 1) / us / 1e3, "gbps_per_block": None})
    del symm
    return [dict(r, world_size=world_size) for r in rows] if rank == 0 else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    p.add_argument("--mib", type=int, default=64, help="MiB each rank writes into its peer per run")
    p.add_argument("--blocks", type=int, nargs="*", default=[1, 2, 4, 8, 16, 20, 32, 64, 132])
    p.add_argument("--threads", type=int, nargs="*", default=[512])
    p.add_argument("--unroll", type=int, nargs="*", default=[8, 16])
    p.add_argument("--modes", nargs="*", choices=["copy", "store"], default=["copy", "store"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or args.world_size < 2 or args.world_size > torch.cuda.device_count():
        p.error("link_probe needs 2 or more local GPUs (--world-size)")
    rows = run_distributed(_probe_rank, args.world_size, args, backend="nccl", timeout_s=600)[0]
    print(f"\n{'method':<16}{'blocks':>7}{'thr':>5}{'unr':>5}{'time_us':>10}{'GB/s':>8}{'GB/s/blk':>10}")
    for r in rows:
        per = f"{r['gbps_per_block']:.1f}" if r["gbps_per_block"] else "-"
        print(f"{r['method']:<16}{r['num_blocks'] or '-':>7}{r['threads'] or '-':>5}{r['unroll'] or '-':>5}"
              f"{r['time_us']:>10.1f}{r['gbps']:>8.1f}{per:>10}")
    meta = make_meta("link_probe", args.world_size, bytes_counted="bytes each rank writes into its peer's memory "
                     "(all ranks at once; 2 GPUs: both directions of the pair)")
    path = write_results(os.path.join(args.out, f"link_probe_ws{args.world_size}.json"), meta, rows)
    print(f"[link_probe] wrote {path}")


if __name__ == "__main__":
    main()
