#!/usr/bin/env python3
"""Step time of DualPipe, DualPipeV, 1F1B and ZB1P on one small model, in one run.

    python experiments/pipeline_step_time.py                       # all local GPUs, NCCL
    python experiments/pipeline_step_time.py --cpu --world-size 2  # gloo CPU ranks (a smoke run)

Every schedule trains the same model (``layers_per_rank * N`` residual MLP blocks, hidden
``--hidden``) on the same global batch (``--chunks`` micro-batches of ``--micro-batch`` x
``--seq`` tokens): 1F1B/ZB1P cut it into N stages, DualPipe into N stages held twice (each
rank holds stage r and stage N-1-r), DualPipeV into 2N half-size stages; so every rank does
the same compute per step. time_us = the slowest rank's median step time over ``--iters``
steps after ``--warmup`` (CUDA events on GPU, perf_counter on CPU). One further step is
recorded chunk by chunk: its median chunk durations feed the simulator, so each row also
carries the simulated step time and bubble; ``--figures DIR`` draws the recorded run beside
its simulation. Writes ``pipeline_step_time_ws{N}.json`` (DESIGN.md section 5) to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_fn, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ALL_SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p")


def _valid(schedule: str, n: int, chunks: int) -> str | None:
    """Why ``schedule`` cannot run here, or None."""
    from overlap.pipeline import build_schedule

    try:
        build_schedule(schedule, n, chunks)
    except ValueError as exc:
        return str(exc)
    return None


def _bench_rank(rank, world_size, args):
    from overlap.pipeline import SCHEDULES, Durations, Timeline, published_bubble, simulate
    from overlap.pipeline.layers import MLPStage
    from overlap.pipeline.verify import PIPELINES

    on_gpu = not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if not on_gpu:
        torch.set_num_threads(max(1, args.cpu_threads))
    dtype = DTYPES[args.dtype]
    n = world_size
    barrier = (lambda: dist.barrier(device_ids=[device.index])) if on_gpu else (lambda: dist.barrier())

    def reduce_max(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    rows, timelines = [], {}
    total_layers = args.layers_per_rank * n
    for name in args.schedules:
        if _valid(name, n, args.chunks):
            continue
        sched = SCHEDULES[name](n, args.chunks)
        stages = sched.num_stages
        if total_layers % stages:
            raise ValueError(f"--layers-per-rank {args.layers_per_rank} x {n} ranks = {total_layers} layers "
                             f"do not split into {stages} {name} stages")
        torch.manual_seed(1000 + rank)
        modules = [MLPStage(args.hidden, args.ffn, num_layers=total_layers // stages, dtype=dtype, device=device,
                            deferrable=not args.no_defer)
                   for _ in range(PIPELINES[name].num_modules)]
        pipe = PIPELINES[name](modules if len(modules) == 2 else modules[0])
        if args.no_hook:
            pipe.use_overlap_hook = False
        pipe.set_p2p_tensor_shapes([(args.micro_batch, args.seq, args.hidden)])
        pipe.set_p2p_tensor_dtype(dtype)
        shape = (args.chunks * args.micro_batch, args.seq, args.hidden)
        gen = torch.Generator(device="cpu").manual_seed(7)
        x = torch.randn(shape, generator=gen).to(device, dtype)
        y = torch.randn(shape, generator=gen).to(device, dtype)
        half = len(sched.chains)
        inputs = [x.tensor_split(half)[k] for k, ch in enumerate(sched.chains) if ch.first_rank == rank]
        labels = [y.tensor_split(half)[k] for k, ch in enumerate(sched.chains) if ch.last_rank == rank]

        def step():
            pipe.step(*inputs, num_chunks=args.chunks, criterion=F.mse_loss, labels=labels)

        timing = time_fn(step, warmup=args.warmup, iters=args.iters, flush=False, barrier=barrier)
        step_us = reduce_max(timing["time_us"])
        # One recorded step: chunk durations for the simulator and the figure.
        pipe.record_timeline = True
        step()
        pipe.record_timeline = False
        records = [None] * n
        dist.all_gather_object(records, pipe.timeline_records)
        recorded = Timeline.from_records(f"{name} recorded", records)
        durations = Durations.from_timeline(recorded)
        sim = simulate(sched, durations)
        timelines[name] = (recorded, sim.timeline)
        params = sum(p.numel() for p in pipe.parameters())
        rows.append({
            "op": "pipeline_step", "backend": "nccl" if on_gpu else "gloo", "schedule": name,
            "world_size": n, "num_stages": stages, "num_chunks": args.chunks, "micro_batch": args.micro_batch,
            "seq": args.seq, "hidden": args.hidden, "ffn": args.ffn or 4 * args.hidden,
            "layers": total_layers, "layers_per_stage": total_layers // stages, "dtype": args.dtype,
            "overlap_hook": pipe.use_overlap_hook, "deferrable_weights": not args.no_defer,
            "params_per_rank_max": int(reduce_max(params)),
            "time_us": step_us, "rank0_min_us": timing["min_us"], "rank0_max_us": timing["max_us"],
            "iters": args.iters,
            "tokens_per_s": args.chunks * args.micro_batch * args.seq / (step_us * 1e-6),
            "recorded_step_us": recorded.makespan * 1e6,
            "chunk_F_us": durations.F * 1e6, "chunk_B_us": durations.B * 1e6, "chunk_W_us": durations.W * 1e6,
            "chunk_FB_us": durations.pair * 1e6,
            "sim_step_us": sim.makespan * 1e6, "sim_max_bubble_us": sim.max_bubble * 1e6,
            "formula_bubble_us": published_bubble(name, stages, durations) * 1e6,
            "peak_activations": max(sim.peak_activations),
        })
        del pipe, modules
        if on_gpu:
            torch.cuda.empty_cache()
        barrier()
    return (rows, timelines) if rank == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks (default: all local GPUs; with --cpu, 2)")
    parser.add_argument("--cpu", action="store_true", help="gloo CPU ranks instead of NCCL GPUs")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for pipeline_step_time_ws{N}.json")
    parser.add_argument("--figures", default=None, help="directory for recorded-vs-simulated PNGs (optional)")
    parser.add_argument("--schedules", nargs="+", default=list(ALL_SCHEDULES), choices=ALL_SCHEDULES)
    parser.add_argument("--hidden", type=int, default=None, help="default 2048 (GPU) / 64 (CPU)")
    parser.add_argument("--ffn", type=int, default=None, help="default 4 x hidden")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample; default 1024 (GPU) / 8 (CPU)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layers-per-rank", type=int, default=4,
                        help="MLP blocks per rank (the model has this x N; must split into 2N for DualPipeV)")
    parser.add_argument("--chunks", type=int, default=None, help="micro-batches per step (default 4 x N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (GPU) / fp32 (CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="default 5 (GPU) / 2 (CPU)")
    parser.add_argument("--iters", type=int, default=None, help="default 30 (GPU) / 5 (CPU)")
    parser.add_argument("--no-hook", action="store_true", help="run F&B pairs as two chunks")
    parser.add_argument("--no-defer", action="store_true", help="plain nn.Linear: nothing for W chunks to do")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=580.0)
    args = parser.parse_args(argv)

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu for gloo CPU ranks")
    n = args.world_size or (2 if args.cpu else torch.cuda.device_count())
    if n < 1 or (not args.cpu and n > torch.cuda.device_count()):
        parser.error(f"--world-size {n} is not available here")
    gpu = not args.cpu
    args.world_size = n
    args.hidden = args.hidden or (2048 if gpu else 64)
    args.seq = args.seq or (1024 if gpu else 8)
    args.chunks = args.chunks or 4 * n
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.iters = args.iters or (30 if gpu else 5)
    skipped = {s: why for s in args.schedules if (why := _valid(s, n, args.chunks))}
    for s, why in skipped.items():
        print(f"skipping {s}: {why}")
    if len(skipped) == len(args.schedules):
        parser.error("no schedule can run with these settings")

    result = run_distributed(_bench_rank, n, args, backend="gloo" if args.cpu else "nccl", timeout_s=args.timeout)
    rows, timelines = result[0]
    meta = make_meta("pipeline_step_time", n, model="residual MLP blocks (MLPStage), mse loss",
                     note="time_us: slowest rank's median step; sim_*: simulator fed the recorded median "
                          "chunk durations of one further step")
    path = write_results(os.path.join(args.out, f"pipeline_step_time_ws{n}.json"), meta, rows)

    head = f"{'schedule':<10} {'stages':>6} {'chunks':>6} {'step us':>11} {'sim us':>11} {'bubble us':>10} " \
           f"{'F us':>8} {'B us':>8} {'W us':>8} {'F&B us':>8} {'vs 1f1b':>8}"
    print(head)
    base = next((r["time_us"] for r in rows if r["schedule"] == "1f1b"), None)
    for r in rows:
        ratio = f"{base / r['time_us']:.3f}x" if base else "-"
        print(f"{r['schedule']:<10} {r['num_stages']:>6} {r['num_chunks']:>6} {r['time_us']:>11.1f} "
              f"{r['sim_step_us']:>11.1f} {r['sim_max_bubble_us']:>10.1f} {r['chunk_F_us']:>8.1f} "
              f"{r['chunk_B_us']:>8.1f} {r['chunk_W_us']:>8.1f} {r['chunk_FB_us']:>8.1f} {ratio:>8}")
    print(f"wrote {path}")
    if args.figures:
        from overlap.pipeline.draw import save_timelines

        for name, (recorded, simulated) in timelines.items():
            fig = os.path.join(args.figures, f"pipeline_timeline_{name}_ws{n}{'_cpu' if args.cpu else ''}.png")
            save_timelines([recorded, simulated], fig,
                           titles=[f"{name}, recorded ({'gloo CPU' if args.cpu else 'NCCL GPU'}, seconds)",
                                   f"{name}, simulated with the recorded median chunk durations"],
                           annotate=True)
            print(f"wrote {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
