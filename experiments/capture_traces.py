#!/usr/bin/env python3
"""Per-rank Chrome traces of three MoE scenarios, analysed: our counterpart to DeepSeek's profile data.

    python experiments/capture_traces.py                                  # all local GPUs, all scenarios
    python experiments/capture_traces.py --world-size 2 --scenarios train decode
    python experiments/capture_traces.py --cpu                            # 2 gloo ranks, tiny sizes (a check)

Scenarios (each rank runs the same schedule; every transfer is issued early and waited for late):

* ``train``: the overlapped forward & backward chunk pair of an MoE stage (DualPipe's F&B pair,
  ``MoEStage.overlapped_forward_backward``; the stage and sizes of ``experiments/moe_overlap.py``):
  each step is the forward of micro-batch k+1 interleaved with the backward of micro-batch k.
* ``prefill``: a forward-only step of two micro-batches through the same stack of MoE blocks:
  micro-batch A's attention / experts run while B's dispatch or combine is in flight on the
  EPBuffer's async calls, and vice versa, layer after layer.
* ``decode``: ``--layers`` layers of two micro-batches (128 tokens per rank each) through
  attention-like GEMMs and the low-latency dispatch/combine with receive hooks, in the schedule
  ``experiments/decode_overlap.py`` measures (``run_overlapped``: A's attention runs while B's
  tokens are in flight). Traced as CUDA-graph replays by default (``--decode-timing graph``),
  as that study times it: traced eagerly, the profiler's launch overhead paces the GPU (it idled
  69% of the span in the first decode trace) and the hook kernels of the rank ahead spin for the
  other's data, so the figures describe the host, not the schedule. GPU only (the low-latency
  path needs CUDA and NCCL): skipped, with a message, under ``--cpu``.

Each scenario is warmed up, then ``--trace-steps`` steps are captured with
``overlap.profiling.capture_trace`` (one file per rank), analysed with
``overlap.profiling.analyze_trace`` (per-stream busy time, comm/compute classification,
overlapped share, exposed comm, grid and SMs per kernel, and ``overlap.profiling.breakdown``'s
split: transfers that hold no SM and how much of them compute covered, SM-holding comm kernels,
the time those kernels waited beyond the fastest launch of the same kernel on any rank, the
GPU's idle share), and rank 0's timeline is drawn with ``overlap.profiling.plot_timeline``.
DeepSeek's published training trace: 96.3% of communication time overlapped, 3.2% of the step
exposed.

Outputs: ``--out/traces/{scenario}_ws{N}_rank{r}.json.gz`` (``{scenario}_cpu_ws{N}_...`` with
``--cpu``, so a check never overwrites GPU traces), ``--out/capture_traces[_cpu]_ws{N}.json``
(DESIGN.md section 5 format: one ``op="trace"`` row per (scenario, rank) with the analyzer's
figures, plus the analyzer's ``trace_stream`` and top ``trace_kernel`` rows tagged with the
scenario and rank), and ``--figures/trace_{scenario}[_cpu]_ws{N}_rank0.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)   # the sibling studies whose stage and sizes are reused

from decode_overlap import COPY_ENGINE_COMM  # noqa: E402
from moe_overlap import CPU_SIZES, DTYPES, GPU_SIZES, _config, _device  # noqa: E402
from overlap.bench import capture_graph, make_meta, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

SCENARIOS = ("train", "prefill", "decode")
DECODE_TRANSPORTS = ("copy_engine", "sm", "nccl")
# DeepSeek-V3 decode sizes (DESIGN.md section 5): 128 tokens per rank per micro-batch.
DECODE_SIZES = dict(tokens=128, hidden=7168, experts=256, topk=8, heads=128, ctx=1024)
DECODE_CPU_SKIP = ("decode: skipped: the low-latency path (EPBuffer.low_latency_dispatch/combine) needs CUDA "
                   "tensors and an NCCL group; --cpu runs gloo ranks. Run without --cpu on >= 2 GPUs.")
DEEPSEEK_REFERENCE = "DeepSeek-V3 training trace (H800, EP64): 96.3% of comm overlapped, 3.2% of the span exposed"
# The figures of one device of TraceAnalysis that go into the per-(scenario, rank) row.
DEVICE_KEYS = ("span_us", "busy_us", "comm_us", "compute_us", "overlapped_us", "exposed_us", "num_events", "num_comm",
               "comm_mean_sms", "comm_sms_mode", "compute_mean_sms", "compute_sms_mode",
               "compute_sms_under_comm_mode", "transfer_us", "transfer_overlapped_us", "comm_kernel_us",
               "comm_kernel_overlapped_us", "comm_wait_us", "idle_us", "host_bound", "copy_start_lag_us")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs; 2 with --cpu)")
    p.add_argument("--backend", default=None,
                   help="EPBuffer backend of train/prefill (torch, cuda, triton; default: cuda where built, else "
                        "torch; torch with --cpu)")
    p.add_argument("--num-sms", type=int, default=20,
                   help="SMs for communication (EPBuffer num_sms and NCCL max_ctas of the EP group)")
    p.add_argument("--cpu", action="store_true", help="gloo CPU ranks and tiny sizes (a check)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results JSON here, traces in OUT/traces")
    p.add_argument("--figures", default=os.path.join(HERE, "figures"), help="rank 0 timelines here ('' for none)")
    p.add_argument("--layers", type=int, default=2, help="MoE layers in the train/prefill stack and decode step")
    p.add_argument("--trace-steps", type=int, default=2, help="steps in each captured trace")
    p.add_argument("--warmup", type=int, default=None, help="untraced steps first (default 2; 1 with --cpu)")
    p.add_argument("--decode-transport", choices=DECODE_TRANSPORTS, default="copy_engine",
                   help="low-latency transport of the decode scenario")
    p.add_argument("--decode-timing", choices=("graph", "eager"), default="graph",
                   help="decode steps as CUDA-graph replays (default; what decode_overlap.py times) or eager "
                        "(launch-bound under the profiler: a diagnostic of the host side)")
    p.add_argument("--top", type=int, default=20, help="trace_kernel rows per trace (longest total time first)")
    p.add_argument("--timeout", type=float, default=570.0, help="seconds before all ranks are killed")
    args = p.parse_args(argv)
    args.scenarios = list(dict.fromkeys(args.scenarios))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.cpu and gpus == 0:
        p.error("no CUDA GPU here: use --cpu")
    if args.world_size is None:
        args.world_size = 2 if args.cpu else gpus
    if args.world_size < 1 or (not args.cpu and args.world_size > gpus):
        p.error(f"--world-size {args.world_size} is not available here ({gpus} GPUs)")
    for name in ("num_sms", "layers", "trace_steps", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup is None:
        args.warmup = 1 if args.cpu else 2
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.timeout <= 0:
        p.error(f"--timeout must be positive, got {args.timeout}")
    args.backend = _resolve_backend(p, args.backend, args.cpu)
    sizes = moe_sizes(args)
    for scenario, experts in (("train/prefill", sizes.experts), ("decode", DECODE_SIZES["experts"])):
        if experts % args.world_size:
            p.error(f"--world-size {args.world_size} must divide the {experts} experts of {scenario}")
    return args


def _resolve_backend(p, backend, cpu):
    from overlap.ep import available_backends, backend_names

    if backend is None:
        return "cuda" if not cpu and "cuda" in available_backends() else "torch"
    if backend not in backend_names():
        p.error(f"--backend must be one of {backend_names()}, got {backend!r}")
    if cpu and backend != "torch":
        p.error(f"--backend {backend} needs CUDA; --cpu runs the torch backend over gloo")
    return backend


def moe_sizes(args) -> SimpleNamespace:
    """Sizes of the train/prefill stage: those of experiments/moe_overlap.py, ``--layers`` deep."""
    sizes = dict(CPU_SIZES if args.cpu else GPU_SIZES)
    sizes.update(layers=args.layers, groups=1, topk_groups=1, cpu=args.cpu)
    return SimpleNamespace(**sizes)


def tag(args, scenario: str) -> str:
    return f"{scenario}{'_cpu' if args.cpu else ''}_ws{args.world_size}"


def ping_pong(first, second, lead: int = 1):
    """Run two micro-batches, each a generator that yields where it leaves a transfer in flight,
    alternately: ``lead`` segments of ``first``, then one of ``second``, one of ``first``, ...

    Between a transfer's issue (before a ``yield``) and its wait (after it) the other
    micro-batch's next segment is queued, so that compute runs under the transfer. ``lead``
    sets the phase: it must put a compute segment of each micro-batch right after every
    transfer of the other. Returns both generators' return values.
    """
    gens, done, out = {0: first, 1: second}, set(), {}

    def advance(i):
        try:
            next(gens[i])
        except StopIteration as stop:
            done.add(i)
            out[i] = stop.value

    for _ in range(lead):
        if 0 not in done:
            advance(0)
    while len(done) < 2:
        for i in (1, 0):
            if i not in done:
                advance(i)
    return out[0], out[1]


def _label(name: str):
    # Plain words only: a range named after a transfer would be classed as communication.
    return torch.profiler.record_function(name)


# ---- scenarios, built inside the ranks -------------------------------------------------------------

def _moe_stage(args, groups, device):
    from overlap.moe import MoEStage, make_ep_buffer

    sizes = moe_sizes(args)
    cfg = _config(sizes)
    buffer = make_ep_buffer(cfg, groups.ep_group, sizes.batch * sizes.seq, backend=args.backend,
                            num_sms=args.num_sms, validate_values=False)
    torch.manual_seed(0)   # replicated weights identical on every rank
    stage = MoEStage(cfg, buffer, num_layers=args.layers, dtype=DTYPES[sizes.dtype], device=device)
    return stage, sizes


def _train(rank, stage, sizes, device):
    """A chain of F&B chunk pairs: forward of a new micro-batch with the backward of the last one."""
    from overlap.moe import MoEStage

    gen = torch.Generator().manual_seed(1000 + rank)
    dtype = DTYPES[sizes.dtype]
    x = torch.randn(sizes.batch, sizes.seq, sizes.hidden, generator=gen).to(device, dtype)
    g = torch.randn(x.shape, generator=gen).to(device, dtype)
    chain = {"out": stage(x)}

    def step():
        (out,), _ = MoEStage.overlapped_forward_backward(stage, [x], None, None, stage, None, [chain["out"]], [g])
        chain["out"] = out

    def finish():
        torch.autograd.backward([chain.pop("out")], [g])   # the chain's last micro-batch

    info = {"num_tokens": sizes.batch * sizes.seq, "micro_batches": 2, "hidden": sizes.hidden, "topk": sizes.topk,
            "num_experts": sizes.experts, "layers": len(stage.blocks), "dtype": sizes.dtype, "lead": None}
    return step, finish, info


def _prefill_microbatch(stage, x, name: str):
    """Forward of one micro-batch through the stage's blocks, yielding while a transfer flies."""
    from overlap.moe import LayerState

    comm = stage.comm
    for block in stage.blocks:
        st = LayerState()
        with _label(f"{name}:attn"):
            block.attn_forward(st, x)
        pending = comm.dispatch_forward(*block.dispatch_inputs(st))
        yield
        d = pending.wait()
        with _label(f"{name}:experts"):
            y = block.mlp_forward(st, d)
        pending = comm.combine_forward(y, d)
        with _label(f"{name}:shared"):
            block.shared_forward(st)
        yield
        x = block.post_forward(st, pending.wait())
    return x


def _prefill(rank, stage, sizes, device):
    gen = torch.Generator().manual_seed(2000 + rank)
    dtype = DTYPES[sizes.dtype]
    xa, xb = (torch.randn(sizes.batch, sizes.seq, sizes.hidden, generator=gen).to(device, dtype) for _ in "AB")

    def step():
        # Two segments per layer, both ending in an issued transfer: plain alternation (lead 1)
        # puts B's attention under A's dispatch, A's experts under B's dispatch, and so on.
        with torch.no_grad():
            return ping_pong(_prefill_microbatch(stage, xa, "A"), _prefill_microbatch(stage, xb, "B"), lead=1)

    info = {"num_tokens": sizes.batch * sizes.seq, "micro_batches": 2, "hidden": sizes.hidden, "topk": sizes.topk,
            "num_experts": sizes.experts, "layers": len(stage.blocks), "dtype": sizes.dtype, "lead": 1}
    return step, (lambda: None), info


def _decode(rank, args, groups, device):
    from decode_overlap import MLALikeAttention, make_micro_batches, run_overlapped
    from overlap.ep import EPBuffer
    from overlap.ep.low_latency import low_latency_state

    s = SimpleNamespace(**DECODE_SIZES)
    # The low-latency path keeps its own buffers; the backend only matters for normal dispatch.
    buffer = EPBuffer(groups.ep_group, num_experts=s.experts, hidden=s.hidden, max_tokens_per_rank=s.tokens,
                      backend="torch", num_sms=args.num_sms, validate_values=False, device=device)
    ll = low_latency_state(buffer)   # collective setup, outside the captured steps
    attn = MLALikeAttention(s.hidden, s.heads, s.ctx, s.tokens, device)
    mbs = make_micro_batches(s.tokens, s.hidden, s.experts, s.topk, seed=3000 + rank, device=device)

    def run():
        # The schedule decode_overlap.py times: every transfer of one micro-batch flies under an
        # attention part of the other (B's first attention and A's last transfers excepted).
        return run_overlapped(attn, ll, mbs, args.layers, args.decode_transport)

    # Graph capture happens here, outside the traced steps (it also warms up, eagerly).
    step = capture_graph(run).replay if args.decode_timing == "graph" else run
    info = {"num_tokens": s.tokens, "micro_batches": 2, "hidden": s.hidden, "topk": s.topk, "num_experts": s.experts,
            "layers": args.layers, "dtype": "bf16", "lead": None, "transport": args.decode_transport,
            "heads": s.heads, "ctx": s.ctx, "experts_compute": "identity",
            "timing": "cuda_graph_replay" if args.decode_timing == "graph" else "eager"}
    return step, (lambda: ll.check_status()), info


def _worker(rank, world_size, args):
    from overlap.moe import pp_ep_groups
    from overlap.profiling import capture_trace

    device = _device(args)
    groups = pp_ep_groups(1, world_size, num_sms=None if args.cpu else args.num_sms)
    stage = sizes = None
    captured = []
    for scenario in args.scenarios:
        if scenario == "decode" and args.cpu:
            continue
        t0 = time.perf_counter()
        if scenario == "decode":
            step, finish, info = _decode(rank, args, groups, device)
            backend = f"ll_{args.decode_transport}"
        else:
            if stage is None:
                stage, sizes = _moe_stage(args, groups, device)
            step, finish, info = (_train if scenario == "train" else _prefill)(rank, stage, sizes, device)
            backend = stage.buffer.backend_name
        for _ in range(args.warmup):   # allocator, cuBLAS, NCCL communicators: out of the trace
            step()
        prefix = os.path.join(args.out, "traces", f"{tag(args, scenario)}.json.gz")
        path = capture_trace(step, prefix, warmup=1, active=args.trace_steps)
        finish()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        if rank == 0:
            print(f"[capture_traces] {scenario}: captured {args.trace_steps} steps on {world_size} ranks "
                  f"({backend}) in {time.perf_counter() - t0:.1f} s -> {os.path.dirname(path)}/"
                  f"{tag(args, scenario)}_rank*.json.gz", flush=True)
        captured.append({"scenario": scenario, "rank": rank, "path": path, "backend": backend, **info})
    return captured


# ---- analysis, in the parent ------------------------------------------------------------------------

def _grid(k) -> str | None:
    return None if k is None or k.grid is None else "x".join(str(v) for v in k.grid)


def _comm_patterns(args, scenario: str) -> tuple:
    if scenario == "decode" and args.decode_transport == "copy_engine":
        return COPY_ENGINE_COMM
    return ()


def analyse(args, cap: dict, a, png: str | None):
    """Rows of one captured trace from its analysis ``a`` (see :func:`analyse_scenario`);
    returns ``(summary row, detail rows)``."""
    from overlap.profiling import COMM, plot_timeline

    extra = _comm_patterns(args, cap["scenario"])
    # The device that communicated (a GPU trace may list another device's stray events).
    dev = max(a.devices, key=lambda d: (d.comm_us, d.busy_us))
    lanes = [s for s in a.streams if s.device == dev.device]
    comm_lanes = [s for s in lanes if s.comm_us > 0 and s.comm_us >= s.compute_us]
    kernels = [k for k in a.kernels if k.device == dev.device]   # sorted by total time, longest first
    top = {cls: next((k for k in kernels if k.cls == cls), None) for cls in (COMM, "compute")}
    base = {"scenario": cap["scenario"], "rank": cap["rank"], "backend": cap["backend"], "num_sms": args.num_sms,
            "world_size": args.world_size}
    row = {"op": "trace", **base, **{k: v for k, v in cap.items() if k not in ("scenario", "rank", "path", "backend")},
           "trace_steps": args.trace_steps,
           "trace_file": os.path.relpath(cap["path"], args.out), "mode": a.mode, "device": dev.device,
           "device_name": dev.device_name, "device_sms": dev.num_sms}
    row.update({k: getattr(dev, k) for k in DEVICE_KEYS})
    row.update({
        "span_per_step_us": dev.span_us / args.trace_steps,
        "overlap_pct": _pct(dev.overlap_share),
        "exposed_pct_of_span": _pct(dev.exposed_share_of_span),
        # Of the transfers that hold no SM (copy engines), the share compute ran beside.
        "transfer_overlap_pct": _pct(dev.transfer_overlap_share),
        "idle_pct": _pct(dev.idle_share),
        "num_streams": len(lanes), "num_comm_streams": len(comm_lanes),
        "max_stream_busy_us": max((s.busy_us for s in lanes), default=0.0),
        "comm_streams_busy_us": sum(s.busy_us for s in comm_lanes),
        "top_comm_kernel": top[COMM].short_name if top[COMM] else None, "top_comm_grid": _grid(top[COMM]),
        "top_comm_blocks": top[COMM].blocks if top[COMM] else None,
        "top_compute_kernel": top["compute"].short_name if top["compute"] else None,
        "top_compute_grid": _grid(top["compute"]),
        "top_compute_blocks": top["compute"].blocks if top["compute"] else None,
        "extra_comm_patterns": " ".join(extra)})
    # The analyzer's own rows keep their num_sms (SMs a kernel held); the setting goes beside it.
    tagged = {k: v for k, v in base.items() if k != "num_sms"}
    details = [{**r, **tagged, "comm_num_sms_setting": args.num_sms}
               for r in a.to_rows(top=args.top) if r["op"] != "trace_device"]
    if png:
        share = "n/a" if row["overlap_pct"] is None else f"{row['overlap_pct']:.1f}%"
        title = (f"{cap['scenario']} ({args.world_size} ranks, {cap['backend']}, {args.num_sms} comm SMs), rank "
                 f"{cap['rank']}: comm {dev.comm_us / 1e3:.3f} ms, {share} overlapped by compute, exposed "
                 f"{dev.exposed_us / 1e3:.3f} ms over {args.trace_steps} step{'s' if args.trace_steps > 1 else ''}")
        plot_timeline(a, png, title=title)
    return row, details


def analyse_scenario(args, caps: list) -> list:
    """Analyses of one scenario's per-rank traces, with one wait baseline for every rank (a hook that
    waited for a lagging peer in every launch is compared with the fastest launch on any rank)."""
    from overlap.profiling import analyze_ranks

    if not caps:
        return []
    extra = _comm_patterns(args, caps[0]["scenario"])
    return analyze_ranks([c["path"] for c in caps], comm=extra)


def _pct(share):
    return None if share is None else 100.0 * share


def _fmt_pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    skipped = []
    if args.cpu and "decode" in args.scenarios:
        skipped.append(DECODE_CPU_SKIP)
        print(f"[capture_traces] {DECODE_CPU_SKIP}", flush=True)
    runnable = [s for s in args.scenarios if not (s == "decode" and args.cpu)]
    per_rank = []
    if runnable:
        print(f"[capture_traces] {', '.join(runnable)} on {args.world_size} {'gloo' if args.cpu else 'nccl'} ranks, "
              f"backend {args.backend}, {args.num_sms} comm SMs", flush=True)
        per_rank = run_distributed(_worker, args.world_size, args, backend="gloo" if args.cpu else "nccl",
                                   timeout_s=args.timeout)
    rows, details = [], []
    for scenario in runnable:
        caps = sorted((c for r in per_rank for c in r if c["scenario"] == scenario), key=lambda c: c["rank"])
        for cap, a in zip(caps, analyse_scenario(args, caps)):
            png = None
            if cap["rank"] == 0 and args.figures:
                png = os.path.join(args.figures, f"trace_{tag(args, scenario)}_rank0.png")
            row, det = analyse(args, cap, a, png)
            rows.append(row)
            details.extend(det)
        mine = [r for r in rows if r["scenario"] == scenario]
        shares = [r["overlap_pct"] for r in mine if r["overlap_pct"] is not None]
        print(f"[capture_traces] {scenario}: comm {max(r['comm_us'] for r in mine) / 1e3:.3f} ms (max over ranks), "
              f"overlapped {min(shares, default=float('nan')):.1f}-{max(shares, default=float('nan')):.1f}% by "
              f"compute, exposed up to {max(r['exposed_us'] for r in mine) / 1e3:.3f} ms per trace", flush=True)
        for r in mine:
            if r["transfer_us"]:
                print(f"[capture_traces] {scenario} rank {r['rank']}: zero-SM transfers {r['transfer_us']:.1f} us "
                      f"({_fmt_pct(r['transfer_overlap_pct'])} under compute), SM-holding comm kernels "
                      f"{r['comm_kernel_us']:.1f} us, {r['comm_wait_us']:.1f} us of it beyond each kernel's fastest "
                      "launch on any rank (waiting for a peer)", flush=True)
            if r["host_bound"]:
                print(f"[capture_traces] WARNING: {scenario} rank {r['rank']}: the GPU idled "
                      f"{_fmt_pct(r['idle_pct'])} of the span: a launch-bound trace (the host's pace, not the "
                      "device schedule)", flush=True)
    command = " ".join(["python experiments/capture_traces.py"] + list(sys.argv[1:] if argv is None else argv))
    meta = make_meta("capture_traces", args.world_size, command=command, scenarios=args.scenarios,
                     skipped=skipped, backend=args.backend, trace_steps=args.trace_steps, warmup_steps=args.warmup,
                     reference=DEEPSEEK_REFERENCE,
                     note="op=trace: one row per (scenario, rank), figures of overlap.profiling.analyze_trace on "
                          "that rank's trace (GPU kernels; CPU ops under --cpu); overlap_pct = share of comm time "
                          "with compute running on the same device")
    path = write_results(os.path.join(args.out, f"capture_traces{'_cpu' if args.cpu else ''}_ws{args.world_size}.json"),
                         meta, rows + details)
    print(f"\n{'scenario':<9}{'rank':>5}{'span ms':>10}{'comm ms':>10}{'overlap %':>11}{'exposed ms':>12}"
          f"{'comm SMs':>10}  top comm kernel")
    for r in rows:
        share = "-" if r["overlap_pct"] is None else f"{r['overlap_pct']:.1f}"
        sms = "-" if r["comm_sms_mode"] is None else str(r["comm_sms_mode"])
        print(f"{r['scenario']:<9}{r['rank']:>5}{r['span_us'] / 1e3:>10.3f}{r['comm_us'] / 1e3:>10.3f}{share:>11}"
              f"{r['exposed_us'] / 1e3:>12.3f}{sms:>10}  {r['top_comm_kernel'] or '-'}")
    print(f"reference: {DEEPSEEK_REFERENCE}")
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
