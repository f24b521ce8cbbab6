#!/usr/bin/env python3
"""How many SMs should communication hold? A num_sms sweep over every dispatch/combine backend.

    python experiments/sm_ablation.py                         # all local GPUs, parts a b c
    python experiments/sm_ablation.py --world-size 2 --parts a b --num-sms 8 20
    python experiments/sm_ablation.py --cpu                   # gloo ranks, tiny sizes (a smoke test)

For every backend and every k in --num-sms:

(a) dispatch and combine alone: time, wire and logical GB/s (ep_bench's byte conventions).
(b) a bf16 GEMM (M=N=K=--gemm) and a grouped GEMM (G x [m x K] @ [K x N], equal groups, one
    torch.bmm) timed alone, then while the backend's dispatch+combine loop runs on a side stream
    for the whole GEMM window: TFLOP/s, ratio to alone, against the ideal (SMs - k) / SMs.
(c) an MoE layer of two micro-batches, dispatch -> experts -> combine, overlapped
    (dispatch B flies under experts(A), combine A under experts(B)) against the same layer
    serialized, compute only and communication only.

Backends: "nccl" is all_to_all_single on a process group whose NCCL communicator is capped at
k CTAs (ProcessGroupNCCL.Options config.min_ctas = max_ctas = k); in (c) it is the EPBuffer
"torch" backend on that group. Every other backend that overlap.ep.available_backends() lists
runs as an EPBuffer with num_sms=k. "copy_engine" is EPBuffer.low_latency_dispatch/combine with
transport="copy_engine" at decode size (--ll-tokens): transfers hold no SM, so it is one point
at k=0 (parts a and b). Backends missing here are skipped and named in the summary's notes.

Experts in (c): the received rows are gathered into (E/W) equal groups of as many rows as the
routing sends this rank (token, local expert) pairs, run through up- and down-projection
batched GEMMs with SiLU between, and scattered back (fp32 accumulate): the FLOPs and bytes of
the real layer with no host synchronisation, not the exact token-to-expert assignment.

Writes RESULTS/sm_ablation_{gpu,cpu}_ws{N}.json (DESIGN.md §5 rows), a markdown summary next to
it and one PNG per part under --fig-dir (see experiments/plot_sm_ablation.py, which redraws them
from the JSON). time_us is the slowest rank's median.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

from ep_bench import make_routing  # noqa: E402
from plot_sm_ablation import plot_all, summary_markdown  # noqa: E402

from overlap.bench import make_meta, time_fn, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

RESULTS_DIR = os.path.join(_HERE, "results")
FIGURES_DIR = os.path.join(_HERE, "figures")
PARTS = ("a", "b", "c")
GEMM_WINDOW_US = 8000.0     # target GEMM window per concurrent sample on GPU
COMM_COVER = 2.0            # comm issued for this many GEMM-alone windows, so it outlasts the slowed GEMMs


# --------------------------------------------------------------------------------------- rank context
class Ctx:
    """What every part of one rank needs: device, streams, cross-rank reductions, timing."""

    def __init__(self, rank, world_size, args):
        self.rank, self.world_size, self.args = rank, world_size, args
        self.on_gpu = args.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.sm_count = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.on_gpu else args.cpu_sm_count)
        self.side = torch.cuda.Stream(device=self.device) if self.on_gpu else None
        self.layer = None      # part c's MoELayer, built once
        self.groups = []       # CTA-limited NCCL groups stay alive: destroying subgroups mid-run is fragile

    def barrier(self):
        if self.on_gpu:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def all_max(self, v: float) -> float:
        t = torch.tensor([float(v)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def all_mean(self, v: float) -> float:
        t = torch.tensor([float(v)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def all_true(self, ok: bool) -> bool:
        t = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item()) == 0.0

    def time(self, fn) -> float:
        """The slowest rank's median time of ``fn`` in microseconds."""
        t = time_fn(fn, warmup=self.args.warmup, iters=self.args.iters, barrier=self.barrier)
        return self.all_max(t["time_us"])

    def side_stream(self):
        return torch.cuda.stream(self.side) if self.on_gpu else contextlib.nullcontext()


def routing_bytes(ctx, idx, hidden, elem_size):
    """Per-rank wire/logical bytes of a dispatch and its combine (ep_bench's conventions)."""
    from overlap.ep.layout import routing_layout

    lay = routing_layout(idx, ctx.args.experts, ctx.world_size)
    sent = lay.num_tokens_per_rank.to(torch.int64)
    recv = torch.empty_like(sent)
    dist.all_to_all_single(recv, sent)
    sent_l, recv_l = sent.tolist(), recv.tolist()
    row = hidden * elem_size
    r = ctx.rank
    return {"send_counts": sent_l, "recv_counts": recv_l,
            "dispatch": ((sum(sent_l) - sent_l[r]) * row, sum(recv_l) * row),
            "combine": ((sum(recv_l) - recv_l[r]) * row, sum(sent_l) * row)}


# --------------------------------------------------------------------------------------- comm cases
class NcclCase:
    """all_to_all_single on exactly the dispatch's row counts, there (dispatch) and back (combine)."""

    def __init__(self, ctx, group, x, idx):
        self.group = group
        self.bytes = routing_bytes(ctx, idx, x.shape[1], x.element_size())
        sc, rc = self.bytes["send_counts"], self.bytes["recv_counts"]
        self.sc, self.rc = sc, rc
        self.send = torch.randn(sum(sc), x.shape[1], device=x.device).to(x.dtype)
        self.recv = x.new_empty(sum(rc), x.shape[1])
        self.back = x.new_empty(sum(sc), x.shape[1])

    def dispatch(self):
        dist.all_to_all_single(self.recv, self.send, self.rc, self.sc, group=self.group)

    def combine(self):
        dist.all_to_all_single(self.back, self.recv, self.sc, self.rc, group=self.group)

    def step(self):
        self.dispatch()
        self.combine()


class EPCase:
    """EPBuffer.dispatch then EPBuffer.combine of the returned handle."""

    def __init__(self, ctx, buf, x, idx, w):
        self.buf, self.x, self.idx, self.w = buf, x, idx, w
        self.bytes = routing_bytes(ctx, idx, x.shape[1], x.element_size())
        recv_x, _, _, _, self.handle = buf.dispatch(x, idx, w)
        self.y = torch.randn(recv_x.shape, device=x.device).to(x.dtype)

    def dispatch(self):
        self.buf.dispatch(self.x, self.idx, self.w)

    def combine(self):
        self.buf.combine(self.y, self.handle)

    def step(self):
        self.dispatch()
        self.combine()


class LowLatencyCase:
    """EPBuffer.low_latency_dispatch/combine over copy engines: no SM held while data flies."""

    def __init__(self, ctx, buf, x, idx, w, transport="copy_engine"):
        self.buf, self.x, self.idx, self.w, self.transport = buf, x, idx, w, transport
        self.bytes = routing_bytes(ctx, idx, x.shape[1], x.element_size())
        recv_x, _, self.handle, _ = buf.low_latency_dispatch(x, idx, w, transport=transport)
        self.y = torch.randn(recv_x.shape, device=x.device).to(torch.bfloat16)

    def dispatch(self):
        self.buf.low_latency_dispatch(self.x, self.idx, self.w, transport=self.transport)

    def combine(self):
        self.buf.low_latency_combine(self.y, self.idx, self.w, self.handle)

    def step(self):
        self.dispatch()
        self.combine()


def nccl_group(ctx, k):
    """A group over all ranks whose NCCL communicator uses k CTAs; (group, how it was limited)."""
    if not ctx.on_gpu:
        return dist.group.WORLD, "none (gloo)"
    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=False)
    try:
        opts.config.min_ctas = k
        opts.config.max_ctas = k
    except AttributeError as exc:     # a torch without the NCCL config binding
        raise RuntimeError(f"ProcessGroupNCCL.Options has no config.min_ctas/max_ctas ({exc}); "
                           "rerun with NCCL_MAX_CTAS=k in the environment, one run per k") from exc
    group = dist.new_group(list(range(ctx.world_size)), backend="nccl", pg_options=opts)
    return group, f"pg_options min_ctas=max_ctas={k}"


# --------------------------------------------------------------------------------------- part b: GEMMs
class Gemms:
    """The two compute workloads of part (b) and their alone times."""

    def __init__(self, ctx):
        a, dev = ctx.args, ctx.device
        dt = torch.bfloat16
        n = a.gemm
        self.a, self.b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        g, m, kk, nn = a.grouped
        self.ga = torch.randn(g, m, kk, device=dev, dtype=dt)
        self.gb = torch.randn(g, kk, nn, device=dev, dtype=dt) / math.sqrt(kk)
        self.flops = {"gemm": 2.0 * n ** 3, "grouped_gemm": 2.0 * g * m * kk * nn}
        self.shape = {"gemm": f"{n}x{n}x{n}", "grouped_gemm": f"{g}x[{m}x{kk}]@[{kk}x{nn}]"}
        self.fns = {"gemm": lambda: torch.mm(self.a, self.b), "grouped_gemm": lambda: torch.bmm(self.ga, self.gb)}
        self.alone_us: dict[str, float] = {}

    def measure_alone(self, ctx, tag="gemm_alone"):
        rows = []
        for name, fn in self.fns.items():
            t = ctx.time(fn)
            if tag == "gemm_alone":
                self.alone_us[name] = t
            rows.append({"op": tag, "gemm": name, "shape": self.shape[name], "backend": "none", "num_sms": 0,
                         "time_us": t, "tflops": self.flops[name] / t / 1e6, "ratio_alone": self.alone_us[name] / t,
                         "ideal_ratio": 1.0})
        return rows


def concurrent_sample(ctx, gemm_fn, n_gemm, comm_step, n_comm):
    """One window: n_gemm GEMMs on the main stream while n_comm comm steps run on a side stream.

    Returns (GEMM time per call us, comm time per step us, comm outlasted the GEMMs). The first
    comm step is issued before the GEMMs so its blocks are resident when they start.
    """
    ctx.barrier()
    if not ctx.on_gpu:   # gloo: nothing runs concurrently; this only exercises the code path
        comm_step()
        t0 = time.perf_counter()
        for _ in range(n_gemm):
            gemm_fn()
        gemm_us = (time.perf_counter() - t0) * 1e6 / n_gemm
        t1 = time.perf_counter()
        for _ in range(n_comm - 1):
            comm_step()
        return gemm_us, (time.perf_counter() - t1) * 1e6 / max(1, n_comm - 1), None
    ev = {k: torch.cuda.Event(enable_timing=True) for k in ("c0", "c1", "g0", "g1")}
    main = torch.cuda.current_stream(ctx.device)
    ctx.side.wait_stream(main)
    with ctx.side_stream():
        ev["c0"].record(ctx.side)
        comm_step()
    ev["g0"].record(main)
    for _ in range(n_gemm):
        gemm_fn()
    ev["g1"].record(main)
    with ctx.side_stream():
        for _ in range(n_comm - 1):
            comm_step()
        ev["c1"].record(ctx.side)
    main.wait_stream(ctx.side)
    ev["c1"].synchronize()
    ev["g1"].synchronize()
    gemm_us = ev["g0"].elapsed_time(ev["g1"]) * 1e3 / n_gemm
    comm_us = ev["c0"].elapsed_time(ev["c1"]) * 1e3 / n_comm
    covered = ev["g0"].elapsed_time(ev["c1"]) >= ev["g0"].elapsed_time(ev["g1"])
    return gemm_us, comm_us, covered


def part_b(ctx, gemms, case, backend, k, comm_step_us):
    """GEMM and grouped GEMM throughput while ``case`` communicates, against the ideal."""
    import statistics

    a = ctx.args
    rows = []
    for name, fn in gemms.fns.items():
        alone = gemms.alone_us[name]
        n_gemm = max(1, round(GEMM_WINDOW_US / alone)) if ctx.on_gpu else 1
        # Every rank must run the same number of comm steps: computed from all-reduced times.
        n_comm = max(2, math.ceil(COMM_COVER * n_gemm * alone / max(comm_step_us, 1e-3)))
        n_comm = min(n_comm, a.max_comm_steps)
        for _ in range(a.warmup if ctx.on_gpu else 0):
            concurrent_sample(ctx, fn, 1, case.step, 2)
        samples = [concurrent_sample(ctx, fn, n_gemm, case.step, n_comm) for _ in range(a.iters)]
        g = ctx.all_max(statistics.median(s[0] for s in samples))
        c = ctx.all_max(statistics.median(s[1] for s in samples))
        covered = None if samples[0][2] is None else ctx.all_true(all(s[2] for s in samples))
        rows.append({"op": "gemm_with_comm", "gemm": name, "shape": gemms.shape[name], "backend": backend,
                     "num_sms": k, "time_us": g, "tflops": gemms.flops[name] / g / 1e6,
                     "alone_us": alone, "alone_tflops": gemms.flops[name] / alone / 1e6,
                     "ratio_alone": alone / g, "ideal_ratio": (ctx.sm_count - k) / ctx.sm_count,
                     "comm_step_us_alone": comm_step_us, "comm_step_us_during_gemm": c,
                     "comm_covered_window": covered, "gemms_per_window": n_gemm, "comm_steps_per_window": n_comm})
    return rows


# --------------------------------------------------------------------------------------- part c: MoE layer
class MoELayer:
    """Two micro-batches through dispatch -> experts -> combine on one EPBuffer."""

    def __init__(self, ctx, buf, seed):
        a, dev = ctx.args, ctx.device
        self.ctx, self.buf = ctx, buf
        half = a.tokens // 2
        self.mbs = []
        for i in range(2):
            torch.manual_seed(seed + 17 * i + ctx.rank)
            x = torch.randn(half, a.hidden, device=dev).to(torch.bfloat16)
            idx, w = make_routing(half, a.experts, a.topk, seed=seed + 1000 * i + ctx.rank, device=dev)
            self.mbs.append((x, idx, w))
        L = a.experts // ctx.world_size
        self.L = L
        torch.manual_seed(seed + 999)   # same expert weights on every rank is fine: only FLOPs matter
        self.w1 = torch.randn(L, a.hidden, a.expert_ffn, device=dev).div_(math.sqrt(a.hidden)).to(torch.bfloat16)
        self.w2 = torch.randn(L, a.expert_ffn, a.hidden, device=dev).div_(math.sqrt(a.expert_ffn)).to(torch.bfloat16)
        # Rows each rank's experts see per micro-batch = (token, local expert) pairs routed here;
        # fixed once so the timed loop needs no host synchronisation.
        self.gather = []
        self.recv_rows = []
        for x, idx, w in self.mbs:
            recv_x = buf.dispatch(x, idx, w)[0]
            pairs = self._local_pairs(idx)
            per_expert = max(1, math.ceil(pairs / L))
            gen = torch.Generator(device="cpu").manual_seed(seed + 7 * ctx.rank)
            n = recv_x.shape[0]
            g = torch.randint(0, max(1, n), (L * per_expert,), generator=gen).to(dev)
            self.gather.append(g)
            self.recv_rows.append(n)
        self.flops = sum(4.0 * g.numel() * a.hidden * a.expert_ffn for g in self.gather)

    def _local_pairs(self, idx):
        ctx = self.ctx
        L = self.L
        dest = torch.where(idx >= 0, idx // L, torch.full_like(idx, -1))
        per_rank = torch.stack([(dest == r).sum() for r in range(ctx.world_size)]).to(torch.int64)
        got = torch.empty_like(per_rank)
        dist.all_to_all_single(got, per_rank)
        return int(got.sum())

    def experts(self, i, recv_x):
        g = self.gather[i]
        h = recv_x.index_select(0, g).view(self.L, -1, recv_x.shape[1])
        h = torch.nn.functional.silu(torch.bmm(h, self.w1))
        h = torch.bmm(h, self.w2).view(-1, recv_x.shape[1])
        out = torch.zeros(recv_x.shape[0], recv_x.shape[1], dtype=torch.float32, device=recv_x.device)
        out.index_add_(0, g, h.float())
        return out.to(recv_x.dtype)

    def overlapped(self):
        buf = self.buf
        d = [buf.dispatch_async(*mb) for mb in self.mbs]       # dispatch B is in flight during experts(A)
        c = []
        for i in range(2):
            d[i][5].wait()
            y = self.experts(i, d[i][0])
            c.append(buf.combine_async(y, d[i][4]))            # combine A is in flight during experts(B)
        for out, ev in c:
            ev.wait()

    def serial(self):
        for i, mb in enumerate(self.mbs):
            recv_x, _, _, _, handle = self.buf.dispatch(*mb)
            self.buf.combine(self.experts(i, recv_x), handle)

    def prepare_compute_only(self):
        self._recv = [torch.randn(n, self.ctx.args.hidden, device=self.ctx.device).to(torch.bfloat16)
                      for n in self.recv_rows]

    def compute_only(self):
        for i in range(2):
            self.experts(i, self._recv[i])

    def comm_only(self):
        for i, mb in enumerate(self.mbs):
            recv_x, _, _, _, handle = self.buf.dispatch(*mb)
            self.buf.combine(recv_x, handle)


def part_c(ctx, layer, backend, k):
    layer.prepare_compute_only()
    t = {name: ctx.time(getattr(layer, name)) for name in ("overlapped", "serial", "compute_only", "comm_only")}
    bound = max(t["compute_only"], t["comm_only"])
    base = {"backend": backend, "num_sms": k, "num_tokens": ctx.args.tokens, "micro_batches": 2,
            "expert_ffn": ctx.args.expert_ffn, "expert_tflop": layer.flops / 1e12}
    rows = []
    for name, us in t.items():
        rows.append(dict(base, op=f"moe_{name}", time_us=us, bound_us=bound, ratio_to_bound=us / bound,
                         speedup_vs_serial=t["serial"] / us))
    return rows


# --------------------------------------------------------------------------------------- the sweep
def part_a_rows(ctx, case, backend, k, num_tokens):
    rows = []
    times = {"dispatch": ctx.time(case.dispatch), "combine": ctx.time(case.combine)}
    for op, us in times.items():
        wire, logical = case.bytes[op]
        wire_b, logical_b = ctx.all_mean(wire), ctx.all_mean(logical)
        rows.append({"op": op, "backend": backend, "num_sms": k, "num_tokens": num_tokens, "time_us": us,
                     "wire_gbps": wire_b / us / 1e3, "logical_gbps": logical_b / us / 1e3,
                     "wire_bytes_per_rank": wire_b, "logical_bytes_per_rank": logical_b})
    return rows, times["dispatch"] + times["combine"]


def observed_blocks(ctx, fn, tag):
    """Thread blocks of the widest communication kernel one call of ``fn`` launches (from a trace).

    This checks that a limit took effect (NCCL's CTA cap in particular). None where the trace has
    no launch geometry (CPU) or the capture failed.
    """
    import shutil
    import tempfile

    from overlap.profiling import COMM, analyze_trace, capture_trace

    tmp = tempfile.mkdtemp(prefix="sm_ablation_trace_")
    try:
        path = capture_trace(fn, os.path.join(tmp, tag), warmup=1, active=1, rank=ctx.rank)
        kernels = [kst for kst in analyze_trace(path).kernels
                   if kst.cls == COMM and kst.kind == "kernel" and kst.blocks]
        if not kernels:
            return None, ""
        widest = max(kernels, key=lambda kst: kst.blocks)
        return widest.blocks, widest.short_name
    except Exception as exc:   # a diagnostic: never lose the sweep over it
        return None, f"capture failed: {type(exc).__name__}: {exc}"[:200]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _collect():
    """Drop the last case's buffers before the next one allocates its own."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _rank_main(rank, world_size, args):
    from overlap.ep import EPBuffer, available_backends

    ctx = Ctx(rank, world_size, args)
    a = args
    notes = []
    built = available_backends()
    comm_name = "nccl" if ctx.on_gpu else "gloo"
    wanted = a.backends if a.backends else [comm_name] + [b for b in built if b != "torch"] + ["copy_engine"]
    sweep = []      # (backend, [k...])
    for b in wanted:
        if b in ("nccl", "gloo"):
            sweep.append((comm_name, list(a.num_sms)))
        elif b == "copy_engine":
            ok, why = _low_latency_available(ctx)
            if ok:
                sweep.append(("copy_engine", [0]))
            else:
                notes.append(f"copy_engine skipped: {why}")
        elif b in built:   # "torch" only when named: NCCL's own limit is the "nccl" entry
            sweep.append((b, list(a.num_sms)))
        else:
            notes.append(f"{b} skipped: not in available_backends() = {built}")
    for k in a.num_sms:
        if ctx.on_gpu and k > ctx.sm_count:
            raise ValueError(f"--num-sms {k} exceeds this GPU's {ctx.sm_count} SMs")

    torch.manual_seed(1234 + rank)
    dt = torch.bfloat16
    x = torch.randn(a.tokens, a.hidden, device=ctx.device).to(dt)
    idx, w = make_routing(a.tokens, a.experts, a.topk, seed=99 + rank, device=ctx.device)
    rows = []
    gemms = Gemms(ctx) if "b" in a.parts else None
    if gemms is not None:
        rows += gemms.measure_alone(ctx)

    tasks = [(b, k) for b, ks in sweep for k in ks]
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="sm_ablation", unit="case", file=sys.stdout, dynamic_ncols=True)
    for backend, ks in sweep:
        for k in ks:
            if bar is not None:
                bar.set_postfix_str(f"{backend} k={k}")
            try:
                rows += _run_case(ctx, backend, k, x, idx, w, gemms, EPBuffer, notes)
                _collect()
                if rank == 0:   # a run cut short (device time limit, a hang) still leaves its rows
                    _write_partial(ctx, rows, notes)
            finally:
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    if gemms is not None:   # the same GEMMs again after the sweep: the run's noise
        rows += gemms.measure_alone(ctx, tag="gemm_alone_repeat")
    return (_finish_rows(ctx, rows), notes) if rank == 0 else None


def _finish_rows(ctx, rows):
    a = ctx.args
    common = {"hidden": a.hidden, "topk": a.topk, "num_experts": a.experts, "dtype": "bf16",
              "world_size": ctx.world_size, "device_sms": ctx.sm_count}
    out = [dict(common, **r) for r in rows]
    for r in out:
        r.setdefault("num_tokens", a.tokens)
    return out


def _write_partial(ctx, rows, notes):
    meta = make_meta("sm_ablation", ctx.world_size, command=ctx.args.command, parts=list(ctx.args.parts),
                     notes=list(notes), partial=True)
    write_results(os.path.join(ctx.args.out, f"{ctx.args.stem}.json"), meta, _finish_rows(ctx, rows))


def _low_latency_available(ctx):
    if not ctx.on_gpu:
        return False, "needs CUDA GPUs (decode path over copy engines)"
    try:
        import overlap

        overlap.load_cuda_extension()
        torch.ops.overlap.ll_layout
    except (RuntimeError, AttributeError, ImportError) as exc:
        return False, f"overlap._C has no low-latency ops ({exc})"
    if ctx.args.hidden % 128:
        return False, "hidden must be a multiple of 128"
    return True, ""


def _run_case(ctx, backend, k, x, idx, w, gemms, EPBuffer, notes):
    try:
        built = _build_case(ctx, backend, k, x, idx, w, EPBuffer, notes)
        err = None
    except (RuntimeError, ValueError, NotImplementedError, TypeError, AttributeError) as exc:
        built, err = None, f"{type(exc).__name__}: {exc}"
    # Every rank must skip together, or the ones that built would wait in a collective forever.
    if not ctx.all_true(err is None):
        notes.append(f"{backend} k={k} skipped: could not be built here ({err or 'failed on another rank'})"[:400])
        return []
    return _measure_case(ctx, backend, k, gemms, notes, *built)


def _build_case(ctx, backend, k, x, idx, w, EPBuffer, notes):
    """(comm case, EPBuffer for part c or None, extra row keys) of one backend at k SMs."""
    a = ctx.args
    layer_buf = None
    if backend in ("nccl", "gloo"):
        group, how = nccl_group(ctx, k)
        ctx.groups.append(group)
        case = NcclCase(ctx, group, x, idx)
        if "c" in a.parts:
            layer_buf = EPBuffer(group, num_experts=a.experts, hidden=a.hidden, max_tokens_per_rank=a.tokens,
                                 backend="torch", validate_values=False, device=ctx.device)
        extra = {"sm_limit": how}
    elif backend == "copy_engine":
        T = a.ll_tokens
        torch.manual_seed(4321 + ctx.rank)
        xl = torch.randn(T, a.hidden, device=ctx.device).to(torch.bfloat16)
        il, wl = make_routing(T, a.experts, a.topk, seed=77 + ctx.rank, device=ctx.device)
        buf = EPBuffer(None, num_experts=a.experts, hidden=a.hidden, max_tokens_per_rank=T, backend="torch",
                       validate_values=False, device=ctx.device)
        case = LowLatencyCase(ctx, buf, xl, il, wl)
        extra = {"sm_limit": "copy engines (pack/unpack kernels only)", "num_tokens": T}
        if "copy_engine: GB/s" not in " ".join(notes):
            notes.append(f"copy_engine: GB/s count payload rows of {T} decode tokens; the transport moves a fixed "
                         "worst-case region per peer, so the bytes on the wire are more")
    else:
        buf = EPBuffer(None, num_experts=a.experts, hidden=a.hidden, max_tokens_per_rank=a.tokens, backend=backend,
                       num_sms=k, validate_values=False, device=ctx.device)
        case = EPCase(ctx, buf, x, idx, w)
        layer_buf = buf
        extra = {"sm_limit": f"EPBuffer num_sms={k}" if backend != "torch" else
                 "none (EPBuffer torch backend on the world group; num_sms only recorded)"}
    return case, layer_buf, extra


def _measure_case(ctx, backend, k, gemms, notes, case, layer_buf, extra):
    a = ctx.args
    rows = []
    ntok = extra.get("num_tokens", a.tokens)
    ra, step_us = part_a_rows(ctx, case, backend, k, ntok)
    if "a" in a.parts:
        rows += ra
    if "b" in a.parts:
        rows += [dict(r, comm_tokens=ntok) for r in part_b(ctx, gemms, case, backend, k, step_us)]
    if "c" in a.parts:
        if layer_buf is None:
            if k == 0:
                notes.append(f"{backend}: part c skipped (decode path has a per-expert layout, not an MoE layer "
                             "of --tokens)")
        else:
            if ctx.layer is None:   # inputs, weights and row counts do not depend on the backend
                ctx.layer = MoELayer(ctx, layer_buf, seed=555)
            ctx.layer.buf = layer_buf
            rows += part_c(ctx, ctx.layer, backend, k)
            ctx.layer.buf = None
    if a.verify_blocks and "a" in a.parts:   # last, so the profiler never runs before this case's timings
        for r in ra:
            blocks, name = observed_blocks(ctx, getattr(case, r["op"]), f"{backend}_{k}_{r['op']}")
            most = ctx.all_max(-1 if blocks is None else blocks)
            r["comm_kernel_blocks"] = None if most < 0 else int(most)
            r["comm_kernel"] = name
    for r in rows:
        for key, v in extra.items():
            r.setdefault(key, v)
    return rows


# --------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs, or 2 CPU ranks)")
    p.add_argument("--cpu", action="store_true", help="gloo CPU ranks and tiny sizes (a smoke test, not results)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--backends", nargs="*", default=None,
                   help="subset of: nccl copy_engine and EPBuffer backends (default: every one available)")
    p.add_argument("--num-sms", type=int, nargs="+", default=None, help="k values (default 4 8 16 20 24 32)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (GPU 4096, CPU 64)")
    p.add_argument("--hidden", type=int, default=None, help="GPU 7168, CPU 128")
    p.add_argument("--topk", type=int, default=None, help="GPU 8, CPU 2")
    p.add_argument("--experts", type=int, default=None, help="GPU 256, CPU 8")
    p.add_argument("--ll-tokens", type=int, default=128, help="tokens per rank of the copy-engine decode path")
    p.add_argument("--gemm", type=int, default=None, help="M=N=K of the bf16 GEMM (GPU 8192, CPU 128)")
    p.add_argument("--grouped", type=int, nargs=4, metavar=("G", "M", "K", "N"), default=None,
                   help="grouped GEMM G x [M x K] @ [K x N] (GPU 32 512 7168 2048, CPU 4 32 128 64)")
    p.add_argument("--expert-ffn", type=int, default=None, help="expert intermediate size in part c (GPU 2048, CPU 64)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed runs per median (GPU 10)")
    p.add_argument("--max-comm-steps", type=int, default=400, help="cap on comm steps per concurrent window")
    p.add_argument("--no-verify-blocks", dest="verify_blocks", action="store_false",
                   help="skip the profiler capture that records each comm kernel's grid (comm_kernel_blocks)")
    p.add_argument("--cpu-sm-count", type=int, default=132, help="SM count assumed for ideal ratios on CPU")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON and markdown summary")
    p.add_argument("--fig-dir", default=FIGURES_DIR, help="directory for PNGs ('' for none)")
    p.add_argument("--tag", default="", help="suffix for output file names")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds before every rank is killed")
    args = p.parse_args(argv)
    args.command = " ".join([os.path.basename(sys.executable)] + (sys.argv if argv is None else [sys.argv[0], *argv]))
    use_gpu = gpus > 0 and not args.cpu
    args.device = "cuda" if use_gpu else "cpu"
    g = lambda v, gpu, cpu: v if v is not None else (gpu if use_gpu else cpu)  # noqa: E731
    args.world_size = g(args.world_size, gpus, 2)
    args.num_sms = g(args.num_sms, [4, 8, 16, 20, 24, 32], [4, 8])
    args.tokens, args.hidden = g(args.tokens, 4096, 64), g(args.hidden, 7168, 128)
    args.topk, args.experts = g(args.topk, 8, 2), g(args.experts, 256, 8)
    args.gemm, args.grouped = g(args.gemm, 8192, 128), g(args.grouped, [32, 512, 7168, 2048], [4, 32, 128, 64])
    args.expert_ffn = g(args.expert_ffn, 2048, 64)
    args.warmup, args.iters = g(args.warmup, 3, 1), g(args.iters, 10, 2)
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    if use_gpu and args.world_size > gpus:
        p.error(f"--world-size {args.world_size} needs {args.world_size} GPUs; this machine has {gpus}")
    if args.experts % args.world_size:
        p.error(f"--experts {args.experts} must be a multiple of --world-size {args.world_size}")
    for name in ("tokens", "hidden", "topk", "experts", "gemm", "expert_ffn", "iters", "ll_tokens", "max_comm_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tokens < 2:
        p.error("--tokens must be >= 2 (part c splits them into two micro-batches)")
    if args.topk > args.experts:
        p.error(f"--topk {args.topk} exceeds --experts {args.experts}")
    if any(k < 1 for k in args.num_sms):
        p.error("--num-sms values must be >= 1")
    if min(args.grouped) < 1:
        p.error("--grouped values must be >= 1")
    args.stem = f"sm_ablation_{'gpu' if use_gpu else 'cpu'}_ws{args.world_size}{args.tag}"
    return args


def main(argv=None):
    args = parse_args(argv)
    kind = "gpu" if args.device == "cuda" else "cpu"
    print(f"[sm_ablation] {args.world_size} {'GPUs (NCCL)' if kind == 'gpu' else 'gloo CPU ranks'}; parts "
          f"{' '.join(args.parts)}; k in {args.num_sms}; {args.tokens} tokens x {args.hidden}, top-{args.topk}, "
          f"{args.experts} experts", flush=True)
    t0 = time.time()
    out = run_distributed(_rank_main, args.world_size, args, backend="nccl" if kind == "gpu" else "gloo",
                          timeout_s=args.timeout)
    rows, notes = out[0]
    stem = args.stem
    meta = make_meta("sm_ablation", args.world_size, command=args.command, parts=list(args.parts), notes=notes,
                     partial=False,
                     wall_s=round(time.time() - t0, 1),
                     bytes_counted="x payload rows only; wire excludes rows a rank keeps; logical counts all "
                                   "received rows; ideal_ratio = (device SMs - k) / device SMs")
    path = write_results(os.path.join(args.out, f"{stem}.json"), meta, rows)
    data = {"meta": meta, "rows": rows}
    md = summary_markdown(data)
    md_path = os.path.join(args.out, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(md)
    pngs = plot_all(data, args.fig_dir, stem) if args.fig_dir else []
    print(md)
    print(f"[sm_ablation] wrote {path}, {md_path}" + "".join(f", {p}" for p in pngs))
    return data


if __name__ == "__main__":
    main()
