"""The low-latency (decode) path: per-expert dispatch, weighted combine, receive hooks, slots,
CUDA-graph capture and timeouts, against the communication-free oracle of ep_cases.

GPU tests need 2 or 4 GPUs on one NVLink host (each spawns once and runs many cases); the CPU
tests check the byte layout, argument validation and the errors without CUDA.
"""
import types

import pytest
import torch

from overlap.bench import capture_graph
from overlap.testing import assert_ranks_pass, gpu_world_sizes
from overlap.testing.ep_cases import EPCase, expected_combine, expected_dispatch, expert_fn, make_inputs

TRANSPORTS = ("copy_engine", "sm", "nccl")


# ---------------------------------------------------------------------------------------------- CPU
def test_layout_offsets_are_aligned_and_disjoint():
    from overlap.ep.low_latency_layout import (COMBINE, DISPATCH, LowLatencyLayout, combine_row_stride,
                                               dispatch_row_stride, header_bytes, region_stride)

    assert header_bytes(1) == 32 and header_bytes(4) == 32 and header_bytes(8) == 48 and header_bytes(16) == 96
    assert dispatch_row_stride(7168, 8, fp8=False) == 48 + 7168 * 2
    assert dispatch_row_stride(7168, 8, fp8=True) == 48 + 7168 + 56 * 4
    assert combine_row_stride(7168) == 14336
    assert region_stride(128, 14400) == 16 + 128 * 14400
    lay = LowLatencyLayout(world_size=4, max_tokens=128, hidden=7168, num_slots=3, signal_bytes=20480)
    spans = []
    for kind in (DISPATCH, COMBINE):
        for s in range(3):
            off = lay.slot_offset(kind, s)
            assert off % 4096 == 0 and off >= 20480
            spans.append((off, off + lay.slot_bytes(kind)))
            assert lay.staging_offset(kind, s) == off - 20480
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == lay.nbytes and lay.staging_bytes == lay.nbytes - 20480
    # fp8 rows and smaller topk fit in a slot sized for bf16 rows with topk 16
    for fp8 in (False, True):
        assert 4 * region_stride(128, dispatch_row_stride(7168, 8, fp8)) <= lay.slot_bytes(DISPATCH)
    with pytest.raises(ValueError, match="slot"):
        lay.slot_offset(DISPATCH, 3)


def test_dispatch_argument_validation():
    from overlap.ep.low_latency import check_dispatch_args, check_transport

    cpu = torch.device("cpu")
    x = torch.randn(8, 256).bfloat16()
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(8)])
    w = torch.rand(8, 4)
    kw = dict(hidden=256, num_experts=16, max_tokens=8, device=cpu, check_values=True)
    check_dispatch_args(x, idx, w, **kw)
    check_dispatch_args(x, idx, None, **kw)
    with pytest.raises(TypeError, match="bfloat16"):
        check_dispatch_args(x.float(), idx, w, **kw)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        check_dispatch_args(torch.randn(9, 256).bfloat16(), torch.cat([idx, idx[:1]]), None, **kw)
    with pytest.raises(ValueError, match="hidden"):
        check_dispatch_args(x[:, :200], idx, w, **{**kw, "hidden": 200})
    with pytest.raises(ValueError, match="topk_weights"):
        check_dispatch_args(x, idx, w[:, :3], **kw)
    with pytest.raises(ValueError, match="topk_idx values"):
        check_dispatch_args(x, idx + 16, w, **kw)
    with pytest.raises(ValueError, match="k <= 16"):
        check_dispatch_args(x, torch.stack([torch.randperm(64)[:17] for _ in range(8)]), None,
                            **{**kw, "num_experts": 64})
    with pytest.raises(TypeError, match="topk_idx"):
        check_dispatch_args(x, idx.float(), w, **kw)
    with pytest.raises(ValueError, match="transport"):
        check_transport("rdma")
    assert check_transport("sm") == "sm"


@pytest.mark.parametrize("sms,experts,want", [(132, 128, 1), (132, 64, 2), (132, 8, 16), (132, 256, 1), (78, 32, 2)])
def test_hook_parts_cover_the_sms(sms, experts, want):
    from overlap.ep.low_latency import hook_parts

    assert hook_parts(sms, experts) == want


def test_hook_parts_rejects_nonpositive():
    from overlap.ep.low_latency import hook_parts

    with pytest.raises(ValueError, match="sm_count"):
        hook_parts(0, 8)


def test_copies_behind_compute_flags_serialized_copies():
    ev = types.SimpleNamespace

    def step(t0, copy_at, gemm_at):   # a send kernel, its copy and the GEMM after it (us)
        return [ev(name="dispatch_send_kernel", ts=t0, dur=5.0), ev(name="Memcpy PtoP", ts=t0 + copy_at, dur=3.0),
                ev(name="nvjet_gemm", ts=t0 + gemm_at, dur=100.0), ev(name="dispatch_recv_kernel", ts=t0 + 150, dur=5)]

    assert copies_behind_compute(step(0, 7, 8)) == []          # copy under the GEMM
    assert copies_behind_compute(step(0, 7, 20)) == []         # copy done before the GEMM started
    bad = copies_behind_compute(step(0, 110, 8))               # copy queued behind the GEMM
    assert len(bad) == 1 and "after the compute" in bad[0]
    assert "no copy" in copies_behind_compute([ev(name="combine_send_kernel", ts=0, dur=5), ev(name="gemm", ts=6, dur=9)])[0]


def test_needs_cuda_and_nccl():
    from overlap.ep import EPBuffer
    from overlap.ep.low_latency import LowLatencyEP

    assert hasattr(EPBuffer, "low_latency_dispatch") and hasattr(EPBuffer, "low_latency_combine")
    fake = types.SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        LowLatencyEP(fake)


def test_hook_runs_once():
    from overlap.ep.low_latency import RecvHook

    calls = []
    hook = RecvHook(lambda: calls.append(1))
    hook()
    hook()
    assert calls == [1] and hook.called


def test_slot_ring_reuses_only_consumed_slots():
    from overlap.ep.low_latency import LowLatencyEP
    from overlap.ep.low_latency_layout import COMBINE, DISPATCH

    ll = LowLatencyEP.__new__(LowLatencyEP)  # the ring is host state: no GPU needed
    ll.num_slots = 3
    ll._busy = {DISPATCH: [False] * 3, COMBINE: [False] * 3}
    ll._next = {DISPATCH: 0, COMBINE: 0}
    assert [ll._acquire(DISPATCH) for _ in range(3)] == [0, 1, 2]
    assert ll._acquire(COMBINE) == 0  # kinds have separate rings
    with pytest.raises(RuntimeError, match="in flight"):
        ll._acquire(DISPATCH)
    ll._release(DISPATCH, 1)          # hooks may run out of order
    assert ll._acquire(DISPATCH) == 1
    ll._release(DISPATCH, 0)
    ll._release(DISPATCH, 2)
    assert ll._acquire(DISPATCH) == 2 and ll._acquire(DISPATCH) == 0


def test_hook_copy_unroll_reads_the_environment(monkeypatch):
    from overlap.ep.low_latency import DEFAULT_HOOK_COPY_UNROLL, hook_copy_unroll

    monkeypatch.delenv("OVERLAP_LL_COPY_UNROLL", raising=False)
    assert hook_copy_unroll() == DEFAULT_HOOK_COPY_UNROLL
    monkeypatch.setenv("OVERLAP_LL_COPY_UNROLL", "8")
    assert hook_copy_unroll() == 8
    for bad in ("12", "x"):
        monkeypatch.setenv("OVERLAP_LL_COPY_UNROLL", bad)
        with pytest.raises(ValueError, match="OVERLAP_LL_COPY_UNROLL"):
            hook_copy_unroll()


# ---------------------------------------------------------------------------------------------- GPU helpers
def _device():
    return torch.device("cuda", torch.cuda.current_device())


def _need(world_size):
    if world_size not in gpu_world_sizes((2, 4, 8)):
        pytest.skip(f"needs {world_size} GPUs")


def _cases(W):
    bf16 = torch.bfloat16
    return [
        EPCase("random", [48 + 3 * r for r in range(W)], 256, 8 * W, 4, bf16, "random", seed=31),
        EPCase("last_rank_receives_nothing", [40] * W, 128, 4 * W, 3, bf16, "skip_last_rank", seed=32),
        EPCase("sparse_minus_one", [56] * W, 384, 8 * W, 6, bf16, "sparse", seed=33),
        EPCase("zero_tokens_on_rank_1", [30 if r != 1 else 0 for r in range(W)], 128, 4 * W, 2, bf16, "random",
               seed=34),
        EPCase("hidden_1152_k8", [64] * W, 1152, 16 * W, 8, bf16, "random", seed=35),
    ]


def _per_expert(recv_x, recv_idx, num_local):
    """The oracle's rows regrouped like the low-latency layout: expert e's rows in receive order."""
    return [recv_x[(recv_idx == e).any(dim=1)] for e in range(num_local)]


def _quantise_ref(x):
    """e4m3 values and per-128-channel scales as the pack kernel computes them."""
    xf = x.float().reshape(x.shape[0], x.shape[1] // 128, 128)
    amax = xf.abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (xf * (1.0 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.squeeze(2)


def _expert_outputs(recv_x, counts, rank, num_local):
    """bf16 y in the receive layout: f_e applied to expert e's valid rows (ep_cases.expert_fn)."""
    y = torch.zeros(recv_x.shape, dtype=torch.bfloat16, device=recv_x.device)
    for e, n in enumerate(counts.tolist()):
        if n:
            y[e, :n] = expert_fn(recv_x[e, :n], rank * num_local + e).to(torch.bfloat16)
    return y


def _check_dispatch(tag, case, rank, W, recv, counts, fp8):
    fails = []
    L = case.num_experts // W
    exp_x, exp_idx, _, exp_counts = expected_dispatch(case, rank, W)
    if not torch.equal(counts.cpu(), exp_counts):
        return [f"{tag} counts {counts.tolist()} != {exp_counts.tolist()}"]
    for e, ref in enumerate(_per_expert(exp_x, exp_idx, L)):
        n = ref.shape[0]
        if fp8:
            q, s = recv
            ref_q, ref_s = _quantise_ref(ref)
            got_q, got_s = q[e, :n].cpu(), s[e, :n].cpu()
            if not torch.allclose(got_s, ref_s, rtol=1e-6, atol=0):
                fails.append(f"{tag} expert {e}: fp8 scales differ")
            bad = (got_q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item() if n else 0.0
            if bad > 1e-3:
                fails.append(f"{tag} expert {e}: {bad:.2%} of fp8 values differ from the reference quantisation")
        elif not torch.equal(recv[e, :n].cpu(), ref):
            fails.append(f"{tag} expert {e}: rows differ from the oracle")
    return fails


def _check_combine(tag, case, rank, W, out, rtol=1.6e-2):
    """Norm-wise relative error (bf16 rounds the expert outputs, the partial sums and the result)."""
    ref = expected_combine(case, rank, W)
    got = out.float().cpu()
    if got.shape != ref.shape:
        return [f"{tag} combine shape {tuple(got.shape)} != {tuple(ref.shape)}"]
    if not torch.isfinite(got).all():
        return [f"{tag} combine has non-finite values"]
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-6)).item() if ref.numel() else 0.0
    return [f"{tag} combine relative error {err:.4f} > {rtol}"] if err > rtol else []


def _make_buffer(case, W, max_tokens=None):
    from overlap.ep import EPBuffer

    M = max_tokens or max(max(case.tokens_per_rank), 1)
    return EPBuffer(None, num_experts=case.num_experts, hidden=case.hidden, max_tokens_per_rank=M,
                    backend="torch", device=_device())


# ---------------------------------------------------------------------------------------------- GPU: rank bodies
def _oracle_rank(rank, W):
    fails = []
    dev = _device()
    for case in _cases(W):
        buf = _make_buffer(case, W, max_tokens=64)
        L = buf.num_local_experts
        x, idx, w = (t.to(dev) for t in make_inputs(case, rank, W))
        for transport in TRANSPORTS:
            for fp8 in (False, True):
                for use_hook in (False, True):
                    tag = f"[{case.name}/{transport}/fp8={fp8}/hook={use_hook}/rank{rank}]"
                    recv, counts, handle, hook = buf.low_latency_dispatch(
                        x, idx, w, use_fp8=fp8, return_recv_hook=use_hook, transport=transport)
                    hook()
                    torch.cuda.synchronize()
                    fails += _check_dispatch(tag, case, rank, W, recv, counts, fp8)
                    if fp8:
                        continue
                    y = _expert_outputs(recv, counts, rank, L)
                    out, chook = buf.low_latency_combine(y, idx, w, handle, return_recv_hook=use_hook)
                    chook()
                    torch.cuda.synchronize()
                    fails += _check_combine(tag, case, rank, W, out)
        buf._low_latency.check_status()
    return fails


def _unroll_and_stamps_rank(rank, W):
    """The dispatch hook's copy at both unrolls against the oracle, bf16 and FP8 (hidden 1152: the
    FP8 scales do not fill whole 16-byte words and are copied one by one), with phase stamps on:
    kernel_stamps must report every phase of the pack and of the hook, in order."""
    from overlap.ep.low_latency import HOOK_COPY_UNROLLS, low_latency_state
    from overlap.testing.env import temporary_env

    fails = []
    dev = _device()
    for case in (_cases(W)[0], _cases(W)[4]):
        buf = _make_buffer(case, W, max_tokens=64)
        with temporary_env({"OVERLAP_LL_STAMPS": "1"}):   # read when the state is built (collective)
            state = low_latency_state(buf)
        x, idx, w = (t.to(dev) for t in make_inputs(case, rank, W))
        for unroll in HOOK_COPY_UNROLLS:
            state.copy_unroll = unroll
            for fp8 in (False, True):
                tag = f"[{case.name}/unroll={unroll}/fp8={fp8}/rank{rank}]"
                recv, counts, _, hook = buf.low_latency_dispatch(x, idx, w, use_fp8=fp8, return_recv_hook=True)
                hook()
                torch.cuda.synchronize()
                fails += _check_dispatch(tag, case, rank, W, recv, counts, fp8)
                stamps = state.kernel_stamps()
                for kernel in ("pack", "hook"):
                    phases = stamps.get(kernel, {})
                    medians = [phases[ph][1] for ph in state.STAMP_PHASES if ph in phases]
                    if len(medians) != len(state.STAMP_PHASES) or medians != sorted(medians):
                        fails.append(f"{tag} {kernel} stamps missing or out of order: {phases}")
        state.check_status()
    return fails


def _in_flight_rank(rank, W):
    """Three operations in flight (combine A, dispatch B, dispatch C), hooks called out of order;
    a fourth dispatch while three dispatches are pending raises instead of deadlocking."""
    fails = []
    dev = _device()
    cases = [EPCase(f"mb{i}", [32] * W, 256, 8 * W, 4, torch.bfloat16, "random", seed=40 + i) for i in range(4)]
    buf = _make_buffer(cases[0], W, max_tokens=32)
    L = buf.num_local_experts
    inputs = [tuple(t.to(dev) for t in make_inputs(c, rank, W)) for c in cases]
    for transport in TRANSPORTS:
        tag = f"[in_flight/{transport}/rank{rank}]"
        ra, ca, ha, hook_a = buf.low_latency_dispatch(*inputs[0], return_recv_hook=True, transport=transport)
        hook_a()
        ya = _expert_outputs(ra, ca, rank, L)
        out_a, chook_a = buf.low_latency_combine(ya, None, None, ha, return_recv_hook=True)
        rb, cb, hb, hook_b = buf.low_latency_dispatch(*inputs[1], return_recv_hook=True, transport=transport)
        rc, cc, hc, hook_c = buf.low_latency_dispatch(*inputs[2], return_recv_hook=True, transport=transport)
        # Work between send and hook must not disturb the transfers.
        z = torch.randn(512, 512, device=dev)
        for _ in range(4):
            z = torch.tanh(z @ z * 1e-3)
        hook_c()
        chook_a()
        hook_b()
        torch.cuda.synchronize()
        fails += _check_dispatch(tag + "[B]", cases[1], rank, W, rb, cb, False)
        fails += _check_dispatch(tag + "[C]", cases[2], rank, W, rc, cc, False)
        fails += _check_combine(tag + "[A]", cases[0], rank, W, out_a)
        # Three dispatches pending: the fourth must raise (same decision on every rank).
        pending = [buf.low_latency_dispatch(*inputs[i], return_recv_hook=True, transport=transport)
                   for i in range(3)]
        try:
            buf.low_latency_dispatch(*inputs[3], return_recv_hook=True, transport=transport)
            fails.append(f"{tag} a fourth dispatch with three in flight did not raise")
        except RuntimeError as exc:
            if "in flight" not in str(exc):
                fails.append(f"{tag} unexpected error: {exc}")
        for i, (r, c, _, hk) in enumerate(pending):
            hk()
        torch.cuda.synchronize()
        for i, (r, c, _, _) in enumerate(pending):
            fails += _check_dispatch(f"{tag}[again {i}]", cases[i], rank, W, r, c, False)
    buf._low_latency.check_status()
    return fails


def _graph_rank(rank, W):
    """A whole decode step (dispatch, hook, experts, combine, hook) captured once, replayed with
    fresh inputs copied into the static tensors."""
    fails = []
    dev = _device()
    T, H, E, K = 48, 512, 8 * W, 4
    L = E // W
    a = (1.0 + torch.arange(rank * L, (rank + 1) * L, dtype=torch.float32, device=dev) / 16.0).view(L, 1, 1)
    b = torch.sin(torch.arange(rank * L, (rank + 1) * L, dtype=torch.float32, device=dev)).view(L, 1, 1)
    # nccl too: its graph-captured all_to_all_single once hung on its first replay.
    for transport, fp8 in (("copy_engine", False), ("sm", False), ("copy_engine", True), ("nccl", False)):
        case0 = EPCase("graph", [T] * W, H, E, K, torch.bfloat16, "random", seed=50)
        buf = _make_buffer(case0, W, max_tokens=T)
        x0, i0, w0 = (t.to(dev) for t in make_inputs(case0, rank, W))
        sx, si, sw = x0.clone(), i0.clone(), w0.clone()
        sout = torch.empty(T, H, dtype=torch.bfloat16, device=dev)

        def step():
            recv, counts, handle, hook = buf.low_latency_dispatch(sx, si, sw, use_fp8=fp8, return_recv_hook=True,
                                                                  transport=transport)
            hook()
            if fp8:
                q, s = recv
                xr = (q.float().view(L, -1, H // 128, 128) * s.unsqueeze(-1)).view(L, -1, H)
            else:
                xr = recv.float()
            y = (xr * a + b).to(torch.bfloat16)  # rows past counts[e] are ignored by the combine
            _, chook = buf.low_latency_combine(y, si, sw, handle, return_recv_hook=True, out=sout)
            chook()

        graph = capture_graph(step)  # the eager warm-up builds the low-latency state (collective)
        for it in range(4):
            case = EPCase("graph", [T] * W, H, E, K, torch.bfloat16, "sparse" if it % 2 else "random",
                          seed=60 + it)
            x, i, w = make_inputs(case, rank, W)
            sx.copy_(x)
            si.copy_(i)
            sw.copy_(w)
            graph.replay()
            torch.cuda.synchronize()
            tag = f"[graph/{transport}/fp8={fp8}/replay{it}/rank{rank}]"
            if fp8:
                # Compare with the oracle on the dequantised inputs every rank can compute.
                fails += _check_combine(tag, case, rank, W, sout, rtol=0.08)  # e4m3 inputs
            else:
                fails += _check_combine(tag, case, rank, W, sout)
        buf._low_latency.check_status()
        del graph
    return fails


def copies_behind_compute(events, slack_us=1.0) -> list:
    """Copies that ran after the compute they were meant to hide under. For each send kernel
    (``*_send_kernel``), take the first copy and the first compute kernel (anything but our
    kernels, copies and memsets) that start once it ended: the copy must end by the time that
    compute ends. A copy that finished before the compute even started passes too: it held no SM
    and delayed nothing (with copies of a few microseconds, which of the two a graph launches
    first is the graph executor's choice). ``events``: objects with name, ts, dur (us)."""
    def ours(name):
        return "_send_kernel" in name or "_recv_kernel" in name

    evs = sorted(events, key=lambda e: e.ts)
    problems = []
    for i, send in enumerate(evs):
        if "_send_kernel" not in send.name:
            continue
        end = send.ts + send.dur
        later = [e for e in evs[i + 1:] if e.ts >= end - slack_us]
        copy = next((e for e in later if e.name.startswith("Memcpy")), None)
        compute = next((e for e in later if not e.name.startswith(("Memcpy", "Memset")) and not ours(e.name)), None)
        if copy is None or compute is None:
            problems.append(f"{send.name}@{send.ts - evs[0].ts:.1f}: no {'copy' if copy is None else 'compute'} after it")
        elif copy.ts + copy.dur > compute.ts + compute.dur + slack_us:
            problems.append(f"copy after {send.name}@{send.ts - evs[0].ts:.1f} ended "
                            f"{copy.ts + copy.dur - compute.ts - compute.dur:.1f} us after the compute it should "
                            f"hide under")
    return problems


def _graph_copies_overlap_rank(rank, W):
    """Copy-engine dispatch and combine captured in a CUDA graph, each with a GEMM between send and
    hook (decode_overlap's schedule in miniature): in the profiled replays no copy (zero SMs) may
    run after the GEMM that follows its send (see copies_behind_compute), and the kernels all run
    on one hardware queue (nothing joins the copies into the caller's chain)."""
    import os
    import tempfile

    from overlap.profiling import analyze_trace, capture_trace, load_trace

    dev = _device()
    case = EPCase("graph_overlap", [64] * W, 2048, 8 * W, 4, torch.bfloat16, "random", seed=80)
    buf = _make_buffer(case, W, max_tokens=64)
    x, idx, w = (t.to(dev) for t in make_inputs(case, rank, W))
    g = torch.Generator(device="cpu").manual_seed(81)
    a = torch.randn(4096, 4096, generator=g).to(dev, torch.bfloat16)
    out = torch.empty(64, case.hidden, dtype=torch.bfloat16, device=dev)
    problems = _hook_outside_capture_raises(buf, x, idx, w)

    def step():
        recv, _, handle, hook = buf.low_latency_dispatch(x, idx, w, return_recv_hook=True, transport="copy_engine")
        z = a @ a                      # ~0.1 ms: long enough to cover any copy
        hook()
        _, chook = buf.low_latency_combine(recv, None, None, handle, return_recv_hook=True, out=out)
        z = z @ a
        chook()
        return z

    graph = capture_graph(step)
    path = capture_trace(graph.replay, os.path.join(tempfile.mkdtemp(), "ll_graph.json.gz"), warmup=1, active=3,
                         rank=rank, barrier=False)
    buf._low_latency.check_status()
    # A peer copy may be recorded as a local DtoD copy; this step makes no local copy of its own.
    d = max(analyze_trace(path, comm=[r"^Memcpy DtoD"]).devices, key=lambda d: d.comm_us)
    if not d.transfer_us:
        return [f"rank {rank}: no copy-engine transfer in the traced graph replays"]
    events = load_trace(path).gpu_events
    problems += copies_behind_compute(events)
    # The copies hang off the graph as a branch nothing joins: the caller's kernels keep one
    # hardware queue (a join moved everything after each hook to another one, ~4 us each time).
    queues = {e.stream for e in events if not e.name.startswith(("Memcpy", "Memset"))}
    if len(queues) > 1:
        problems.append(f"the step's kernels ran on {len(queues)} hardware queues, not one")
    if problems:
        return [f"rank {rank}: {'; '.join(problems)} ({100 * d.transfer_overlap_share:.0f}% of the copies ran beside "
                f"compute; timeline: {_gpu_timeline(path)})"]
    return []


def _hook_outside_capture_raises(buf, x, idx, w) -> list:
    """A copy-engine send captured in a graph whose hook is called after the capture ended: the
    hook raises (its copies could not join the graph) before it launches anything, and the
    buffer still works."""
    buf.low_latency_dispatch(x, idx, w, transport="copy_engine")   # eager warm-up: state built
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, _, _, hook = buf.low_latency_dispatch(x, idx, w, return_recv_hook=True, transport="copy_engine")
    problems = []
    try:
        hook()
        problems.append("a captured send's hook called outside the capture did not raise")
    except RuntimeError as exc:
        if "inside that capture" not in str(exc):
            problems.append(f"unexpected error from a hook outside its capture: {exc}")
    del graph   # never replayed: its pack never ran
    recv, counts, _, _ = buf.low_latency_dispatch(x, idx, w, transport="copy_engine")
    torch.cuda.synchronize()
    buf._low_latency.check_status()
    return problems


def _gpu_timeline(path, limit=40):
    """``name@start+dur`` (us from the first GPU event, by stream) of a trace's first GPU events:
    enough to see in a failure message which copy ran outside compute, and why."""
    from overlap.profiling import kernel_label, load_trace

    evs = load_trace(path).gpu_events[:limit]
    t0 = evs[0].ts if evs else 0.0
    return " ".join(f"[s{e.stream}]{kernel_label(e.name)[:24]}@{e.ts - t0:.1f}+{e.dur:.1f}"
                    for e in evs)


def _timeout_rank(rank, W):
    """Rank 1 never sends: rank 0's hook must time out and raise, not hang."""
    import torch.distributed as dist

    dev = _device()
    case = EPCase("timeout", [16] * W, 128, 4 * W, 2, torch.bfloat16, "random", seed=70)
    buf = _make_buffer(case, W)
    x, idx, w = (t.to(dev) for t in make_inputs(case, rank, W))
    buf.low_latency_dispatch(x, idx, w)  # one good round
    torch.cuda.synchronize()
    dist.barrier()
    fails = []
    if rank == 0:
        _, _, _, hook = buf.low_latency_dispatch(x, idx, w, return_recv_hook=True)
        hook()
        try:
            buf._low_latency.check_status(wait=True)
            fails.append("rank 0: check_status did not raise after a hook whose data never came")
        except RuntimeError as exc:
            if "rank 1" not in str(exc) or "timed out" not in str(exc):
                fails.append(f"rank 0: unexpected message: {exc}")
        try:
            buf.low_latency_dispatch(x, idx, w)
            fails.append("rank 0: the buffer kept working after a timeout")
        except RuntimeError:
            pass
    dist.barrier()
    return fails


# ---------------------------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_low_latency_matches_oracle(world_size):
    _need(world_size)
    assert_ranks_pass(_oracle_rank, world_size, backend="nccl", timeout_s=300)


@pytest.mark.gpu
def test_dispatch_hook_copy_unrolls_and_stamps():
    _need(2)
    assert_ranks_pass(_unroll_and_stamps_rank, 2, backend="nccl", timeout_s=180)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_three_operations_in_flight(world_size):
    _need(world_size)
    assert_ranks_pass(_in_flight_rank, world_size, backend="nccl", timeout_s=240)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_decode_step_cuda_graph(world_size):
    _need(world_size)
    assert_ranks_pass(_graph_rank, world_size, backend="nccl", timeout_s=240)


@pytest.mark.gpu
def test_graph_replay_copies_not_queued_behind_compute():
    _need(2)
    assert_ranks_pass(_graph_copies_overlap_rank, 2, backend="nccl", timeout_s=180)


@pytest.mark.gpu
def test_hook_timeout_raises():
    _need(2)
    assert_ranks_pass(_timeout_rank, 2, backend="nccl", timeout_s=120, env={"OVERLAP_KERNEL_TIMEOUT_S": "2"})
