#!/usr/bin/env python3
"""Overlapped forward & backward chunk of a DeepSeek-style MoE stage: how much all-to-all hides.

    python experiments/moe_overlap.py                          # all local GPUs over NCCL
    python experiments/moe_overlap.py --world-size 2 --out DIR
    python experiments/moe_overlap.py --world-size 4 --pp 2    # PP2 x EP2 inside DualPipeV
    python experiments/moe_overlap.py --cpu                    # 2 gloo CPU ranks, tiny sizes (a check)

EP mode (``--pp 1``, every rank in one EP group): a steady chain of F&B chunks through one
stage, each step the forward of micro-batch k+1 overlapped with the backward of micro-batch k
(``MoEStage.overlapped_forward_backward``). Timed per step (median, CUDA events after
warm-up, ranks aligned by a barrier; the slowest rank counts):

* ``fb_overlapped``: the overlapped step;
* ``fb_serialized``: the same step as forward then backward, every transfer waited for at once;
* ``compute_only``: the overlapped step with every transfer replaced by its recorded result;
* ``comm_only``: the step's recorded transfers issued back to back, no compute.

``ratio_vs_bound = fb_overlapped / max(compute_only, comm_only)`` (target <= 1.1). One Chrome
trace per rank of the overlapped and of the serialized step goes to ``--out/traces``; the
share of communication time overlapped by compute (``hidden_pct``, target >= 90%; DeepSeek's
trace: 96.3%) is computed from each with ``overlap.profiling.analyze``; ``ep_kernels_hidden_pct``
is the same share over the EP backend's own kernels only (kernel backends), which in PP mode
leaves out the pipeline's NCCL send/recv (it waits through bubbles); ``exposed_us_by_kernel``
says which kernel sat in the open.

Budget mode (``--budget``; ``auto``, the default, turns it on for kernel backends or when a size
below is given, off for ``torch``): every dispatch is sized by ``--num-worst-tokens`` (default:
EP ranks x tokens per rank, always enough) and the expert rows by ``--expert-capacity``
(default: the safe bound), so no step waits on the host (``overlap.moe.budget``); ``off`` sizes
buffers by the rows that arrive (host syncs). Rows record the mode (``token_budget``,
``num_worst_tokens``, ``expert_capacity``) and the rows that really arrived (``recv_rows_max``,
``expert_pairs_max``), i.e. how much of the budget is padding.

PP mode (``--pp 2``): DualPipeV over the PP groups with an MoE stage pair per rank; a whole
step is timed with the hook overlapping and with it running F then B, and traced.

Results: ``--out/moe_overlap_ws{N}.json`` (``moe_overlap_cpu_ws{N}.json`` with ``--cpu``,
``..._pp{P}`` appended in PP mode, ``..._budget`` in budget mode) in the DESIGN.md section 5 format, plus a timeline PNG of
rank 0's overlapped trace in ``--figures``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_fn, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_HIDDEN_PCT = 90.0
TARGET_RATIO = 1.1
# DeepSeek-V2-Lite-like widths (hidden 2048, 64 experts, top-6, 2 shared experts), 4096 tokens per rank.
GPU_SIZES = dict(hidden=2048, heads=16, experts=64, topk=6, expert_ffn=1408, shared_ffn=2816, batch=1, seq=4096,
                 layers=1, iters=20, warmup=5, dtype="bf16")
CPU_SIZES = dict(hidden=64, heads=4, experts=8, topk=2, expert_ffn=32, shared_ffn=32, batch=2, seq=16,
                 layers=1, iters=3, warmup=1, dtype="fp32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="gloo CPU ranks and tiny default sizes")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs; 2 with --cpu)")
    p.add_argument("--pp", type=int, default=1, help="pipeline ranks; 1: EP over all ranks, 2: DualPipeV PP2 x EP")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results JSON and traces/ go here")
    p.add_argument("--figures", default=os.path.join(HERE, "figures"), help="timeline PNG goes here ('' for none)")
    p.add_argument("--backend", default="auto", help="EPBuffer backend ('auto': the fastest built here)")
    p.add_argument("--num-sms", type=int, default=20, help="SMs for communication (NCCL max_ctas of the EP group)")
    p.add_argument("--budget", choices=("auto", "on", "off"), default="auto",
                   help="fixed-size (sync-free) MoE buffers; auto: on for kernel backends or when a size below is "
                        "given, off for torch")
    p.add_argument("--num-worst-tokens", type=int, default=None,
                   help="rows of every dispatch in budget mode (default: EP ranks x tokens per rank)")
    p.add_argument("--expert-capacity", type=int, default=None,
                   help="expert-major rows in budget mode (default: the safe bound, num_worst_tokens * min(topk, "
                        "local experts))")
    for name in ("hidden", "heads", "experts", "topk", "expert-ffn", "shared-ffn", "batch", "seq", "layers",
                 "iters", "warmup"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--groups", type=int, default=1, help="expert groups for group-limited routing")
    p.add_argument("--topk-groups", type=int, default=1)
    p.add_argument("--chunks", type=int, default=None, help="micro-batches per DualPipeV step (PP mode)")
    p.add_argument("--trace-steps", type=int, default=3, help="steps in each captured trace (back to back)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--timeout", type=float, default=570.0, help="seconds before all ranks are killed")
    args = p.parse_args(argv)
    defaults = CPU_SIZES if args.cpu else GPU_SIZES
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.world_size is None:
        args.world_size = 2 if args.cpu else torch.cuda.device_count()
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA GPU here: use --cpu")
    if args.world_size < 1 or (not args.cpu and args.world_size > torch.cuda.device_count()):
        p.error(f"--world-size {args.world_size} is not available here")
    if args.pp < 1 or args.world_size % args.pp:
        p.error(f"--pp {args.pp} must divide --world-size {args.world_size}")
    if args.chunks is None:
        args.chunks = 4 * args.pp
    if args.budget == "off" and (args.num_worst_tokens is not None or args.expert_capacity is not None):
        p.error("--num-worst-tokens / --expert-capacity need budget mode (--budget on or auto)")
    return args


def _config(args):
    from overlap.moe import MoEConfig

    return MoEConfig(hidden=args.hidden, num_heads=args.heads, num_experts=args.experts, topk=args.topk,
                     expert_ffn=args.expert_ffn, shared_ffn=args.shared_ffn, num_groups=args.groups,
                     topk_groups=args.topk_groups)


def _device(args):
    return torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())


def _barrier(device):
    if device.type == "cuda":
        return lambda: dist.barrier(device_ids=[device.index])
    return dist.barrier


def _analyse(path: str, png: str | None, backend: str):
    from overlap.profiling import analyze_trace

    analysis = analyze_trace(path)
    dev = max(analysis.devices, key=lambda d: d.comm_us)   # the device that communicated
    # The EP backend's own kernels alone: in PP mode NCCL also carries the pipeline's send/recv,
    # which waits through the schedule's bubbles. (The torch backend's all-to-all is NCCL itself.)
    ep_share = None if backend == "torch" else analysis.overlap_share_of(dev.device, lambda n: "nccl" not in n.lower())
    if png:
        from overlap.profiling import plot_timeline

        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        plot_timeline(analysis, png, title=os.path.basename(path))
    return {"trace_file": os.path.basename(path), "trace_mode": analysis.mode, "span_us": dev.span_us,
            "comm_us": dev.comm_us, "compute_us": dev.compute_us, "overlapped_us": dev.overlapped_us,
            "exposed_us": dev.exposed_us,
            "hidden_pct": None if dev.overlap_share is None else 100.0 * dev.overlap_share,
            "ep_kernels_hidden_pct": None if ep_share is None else 100.0 * ep_share,
            # rows are flat: "kernel=us; kernel=us", most exposed first
            "exposed_us_by_kernel": "; ".join(f"{k}={v:.0f}" for k, v in analysis.exposed_by_kernel(dev.device).items()),
            "comm_sms_mode": dev.comm_sms_mode, "compute_sms_mode": dev.compute_sms_mode}


def _trace(fn, args, name: str, rank: int, png: bool, backend: str):
    from overlap.profiling import capture_trace

    prefix = os.path.join(args.out, "traces", f"{name}.json")
    # Steps back to back (one sync at the end), as in training: a sync per step leaves each
    # rank's GPU idle at the boundary while the host starts the next step, and the peers'
    # first transfers of that step then wait for it in the open (counted as exposed).
    path = capture_trace(fn, prefix, warmup=1, active=args.trace_steps, sync_each_step=False)
    fig = None
    if png and rank == 0 and args.figures:
        fig = os.path.join(args.figures, f"{name}_rank0.png")
    return _analyse(path, fig, backend)


def _ep_chain(rank, args, stage, device, dtype):
    """EP mode: time and trace the steady chain of F&B steps (see the module docstring)."""
    from overlap.moe import MoEStage, RecordingComm, ReplayComm, replay_transfers

    torch.manual_seed(1000 + rank)
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    g = torch.randn_like(x)
    chain = {"out": stage(x)}

    def overlapped():
        (out,), _ = MoEStage.overlapped_forward_backward(stage, [x], None, None, stage, None, [chain["out"]], [g])
        chain["out"] = out

    def serialized():
        out = stage(x)
        torch.autograd.backward([chain["out"]], [g])
        chain["out"] = out

    barrier = _barrier(device)
    timed = {}
    timed["fb_overlapped"] = time_fn(overlapped, warmup=args.warmup, iters=args.iters, barrier=barrier)
    timed["fb_serialized"] = time_fn(serialized, warmup=args.warmup, iters=args.iters, barrier=barrier)

    real = stage.comm
    recorder = RecordingComm(real)
    stage.comm = recorder
    overlapped()
    calls = list(recorder.calls)
    stage.comm = ReplayComm(calls)
    timed["compute_only"] = time_fn(overlapped, warmup=args.warmup, iters=args.iters, barrier=barrier)
    stage.comm = real
    timed["comm_only"] = time_fn(lambda: replay_transfers(real, calls), warmup=args.warmup, iters=args.iters,
                                 barrier=barrier)

    tag = args.tag
    traces = {"fb_overlapped": _trace(overlapped, args, f"{tag}_overlapped", rank, png=True,
                                            backend=stage.buffer.backend_name),
              "fb_serialized": _trace(serialized, args, f"{tag}_serialized", rank, png=False,
                                            backend=stage.buffer.backend_name)}
    torch.autograd.backward([chain["out"]], [g])   # finish the chain's last micro-batch
    dispatched = [pending.wait() for op, _, pending in calls if op == "dispatch_forward"]
    return timed, traces, {"transfers_per_step": len(calls),
                           "wire_bytes_per_step": _wire_bytes(calls, stage.buffer, x.element_size()),
                           "recv_rows_max": max(_received_rows(d) for d in dispatched),
                           "expert_pairs_max": max(int(d.num_recv_tokens_per_expert.sum()) for d in dispatched)}


def _received_rows(d) -> int:
    """Rows a dispatch really delivered (a budgeted one's outputs hold more). Reads the host."""
    if d.recv_rank_counts is not None:
        return int(d.recv_rank_counts.sum())
    return d.handle.num_recv_tokens


def _wire_bytes(calls, buffer, elem_size):
    """Token-row bytes this rank sends to other ranks in one step's transfers (ids/weights excluded).

    Reads counts on the host: call it outside timed regions. The rows a rank keeps for itself
    are the ones it sends to itself, whichever way they travel.
    """
    me, total = buffer.rank, 0
    for op, args, pending in calls:
        d = pending.wait() if op == "dispatch_forward" else args[-1]
        send = d.handle.layout.num_tokens_per_rank.tolist()
        if op in ("dispatch_forward", "combine_backward"):       # tokens (or their grads) out
            rows = sum(send) - send[me]
        else:                                                    # rows (or their grads) back
            rows = _received_rows(d) - send[me]
        total += rows * buffer.hidden * elem_size
    return total


def _pp_steps(rank, args, groups, buffer, cfg, device, dtype, budget):
    """PP mode: DualPipeV over the PP groups, with the hook overlapping and without."""
    import torch.nn.functional as F

    from overlap.moe import MoEStage
    from overlap.pipeline import DualPipeV

    mods = [MoEStage(cfg, buffer, num_layers=args.layers, dtype=dtype, device=device, **budget) for _ in range(2)]
    pipe = DualPipeV(mods, process_group=groups.pp_group)
    pipe.set_p2p_tensor_shapes([(args.batch, args.seq, args.hidden)])
    pipe.set_p2p_tensor_dtype(dtype)
    torch.manual_seed(1000 + groups.ep_rank)
    shape = (args.chunks * args.batch, args.seq, args.hidden)
    x = torch.randn(shape, device=device, dtype=dtype)
    labels = torch.randn(shape, device=device, dtype=dtype)
    first = groups.pp_rank == 0

    def step():
        if first:
            pipe.step(x, num_chunks=args.chunks, criterion=F.mse_loss, labels=(labels,))
        else:
            pipe.step(num_chunks=args.chunks)

    def with_overlap(flag):
        def run():
            for m in mods:
                m.overlap = flag
            step()
        return run

    barrier = _barrier(device)
    timed = {"step_overlapped": time_fn(with_overlap(True), warmup=args.warmup, iters=args.iters, barrier=barrier),
             "step_serialized": time_fn(with_overlap(False), warmup=args.warmup, iters=args.iters, barrier=barrier)}
    tag = args.tag
    traces = {"step_overlapped": _trace(with_overlap(True), args, f"{tag}_overlapped", rank, png=True,
                                              backend=buffer.backend_name),
              "step_serialized": _trace(with_overlap(False), args, f"{tag}_serialized", rank, png=False,
                                              backend=buffer.backend_name)}
    return timed, traces, {}


def _tag(args, budget_on: bool) -> str:
    tag = f"moe_overlap{'_cpu' if args.cpu else ''}_ws{args.world_size}"
    return tag + (f"_pp{args.pp}" if args.pp > 1 else "") + ("_budget" if budget_on else "")


def _budget(args, buffer, cfg) -> dict:
    """The MoEStage budget arguments ``--budget`` asks for on this buffer (empty: exact mode)."""
    from overlap.moe import safe_expert_capacity, worst_case_tokens

    sized = args.num_worst_tokens is not None or args.expert_capacity is not None
    on = args.budget == "on" or (args.budget == "auto" and (buffer.backend_name != "torch" or sized))
    if not on:
        return {}
    worst = args.num_worst_tokens if args.num_worst_tokens is not None else worst_case_tokens(buffer)
    capacity = args.expert_capacity
    if capacity is None:
        capacity = safe_expert_capacity(worst, cfg.topk, buffer.num_local_experts)
    return {"num_worst_tokens": worst, "expert_capacity": capacity}


def _worker(rank, world_size, args):
    from overlap.moe import make_ep_buffer, pp_ep_groups

    device = _device(args)
    dtype = DTYPES[args.dtype]
    groups = pp_ep_groups(args.pp, world_size // args.pp, num_sms=None if args.cpu else args.num_sms)
    cfg = _config(args)
    tokens = args.batch * args.seq
    buffer = make_ep_buffer(cfg, groups.ep_group, tokens, backend=args.backend, num_sms=args.num_sms,
                            validate_values=False)
    budget = _budget(args, buffer, cfg)
    args.tag = _tag(args, bool(budget))
    torch.manual_seed(0)   # replicated weights identical on every rank
    if args.pp == 1:
        from overlap.moe import MoEStage

        stage = MoEStage(cfg, buffer, num_layers=args.layers, dtype=dtype, device=device, **budget)
        timed, traces, extra = _ep_chain(rank, args, stage, device, dtype)
    else:
        timed, traces, extra = _pp_steps(rank, args, groups, buffer, cfg, device, dtype, budget)
    return {"rank": rank, "pp_rank": groups.pp_rank, "ep_rank": groups.ep_rank, "timed": timed,
            "traces": traces, "backend": buffer.backend_name, "tag": args.tag,
            "budget": {"token_budget": "budget" if budget else "exact",
                       "num_worst_tokens": budget.get("num_worst_tokens"),
                       "expert_capacity": budget.get("expert_capacity")}, **extra}


def _rows(args, per_rank):
    base = {"backend": per_rank[0]["backend"], "num_sms": args.num_sms, "num_tokens": args.batch * args.seq,
            "hidden": args.hidden, "topk": args.topk, "num_experts": args.experts, "expert_ffn": args.expert_ffn,
            "shared_ffn": args.shared_ffn, "layers": args.layers, "dtype": args.dtype, "pp": args.pp,
            "ep": args.world_size // args.pp, "num_groups": args.groups, "topk_groups": args.topk_groups,
            **per_rank[0]["budget"]}
    rows = []
    for r in per_rank:
        where = {"rank": r["rank"], "pp_rank": r["pp_rank"], "ep_rank": r["ep_rank"]}
        where.update({k: r[k] for k in ("recv_rows_max", "expert_pairs_max") if k in r})
        for op, t in r["timed"].items():
            row = {"op": op, **base, **where, "time_us": t["time_us"], "min_us": t["min_us"],
                   "max_us": t["max_us"], "iters": t["iters"]}
            if op == "comm_only" and r.get("wire_bytes_per_step"):
                row["wire_bytes"] = r["wire_bytes_per_step"]
                row["wire_gbps"] = r["wire_bytes_per_step"] / (t["time_us"] * 1e3)
            rows.append(row)
        for op, tr in r["traces"].items():
            rows.append({"op": f"trace_{op}", **base, **where, **tr})
    slowest = {op: max(r["timed"][op]["time_us"] for r in per_rank) for op in per_rank[0]["timed"]}
    hidden = {op: [r["traces"][op]["hidden_pct"] for r in per_rank if r["traces"][op]["hidden_pct"] is not None]
              for op in per_rank[0]["traces"]}
    key = "fb_overlapped" if args.pp == 1 else "step_overlapped"
    serial = "fb_serialized" if args.pp == 1 else "step_serialized"
    summary = {"op": "summary", **base, "overlapped_us": slowest[key], "serialized_us": slowest[serial],
               "speedup_vs_serialized": slowest[serial] / slowest[key],
               "hidden_pct_min": min(hidden[key], default=None),
               "hidden_pct_mean": statistics.mean(hidden[key]) if hidden[key] else None,
               "serialized_hidden_pct_mean": statistics.mean(hidden[serial]) if hidden[serial] else None,
               "target_hidden_pct": TARGET_HIDDEN_PCT}
    ep_hidden = [r["traces"][key]["ep_kernels_hidden_pct"] for r in per_rank
                 if r["traces"][key].get("ep_kernels_hidden_pct") is not None]
    summary["ep_kernels_hidden_pct_min"] = min(ep_hidden, default=None)
    summary["ep_kernels_hidden_pct_mean"] = statistics.mean(ep_hidden) if ep_hidden else None
    summary["meets_hidden_target"] = (summary["hidden_pct_min"] is not None
                                      and summary["hidden_pct_min"] >= TARGET_HIDDEN_PCT)
    if args.pp == 1:
        bound = max(slowest["compute_only"], slowest["comm_only"])
        summary.update({"compute_only_us": slowest["compute_only"], "comm_only_us": slowest["comm_only"],
                        "bound_us": bound, "ratio_vs_bound": slowest[key] / bound, "target_ratio": TARGET_RATIO,
                        "meets_ratio_target": slowest[key] / bound <= TARGET_RATIO,
                        "transfers_per_step": per_rank[0]["transfers_per_step"],
                        "wire_bytes_per_step_max": max((r["wire_bytes_per_step"] or 0) for r in per_rank),
                        "recv_rows_max": max(r["recv_rows_max"] for r in per_rank),
                        "expert_pairs_max": max(r["expert_pairs_max"] for r in per_rank)})
    return rows, summary


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    per_rank = run_distributed(_worker, args.world_size, args, backend="gloo" if args.cpu else "nccl",
                               timeout_s=args.timeout)
    rows, summary = _rows(args, per_rank)
    rows.append(summary)
    command = " ".join(["python experiments/moe_overlap.py"] + list(sys.argv[1:] if argv is None else argv))
    meta = make_meta("moe_overlap", args.world_size, command=command, pp=args.pp,
                     note="times: slowest rank's median; hidden_pct: comm time overlapped by compute in each "
                          "rank's trace (overlap.profiling.analyze)")
    path = write_results(os.path.join(args.out, f"{per_rank[0]['tag']}.json"), meta, rows)
    print(f"{'op':<18}{'time_us (slowest rank)':>24}")
    for op in sorted({r['op'] for r in rows if 'time_us' in r}):
        print(f"{op:<18}{max(r['time_us'] for r in rows if r['op'] == op):>24.1f}")
    for k, v in summary.items():
        if k not in ("op",) and not isinstance(v, str):
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"results: {path}")
    return summary


if __name__ == "__main__":
    main()
