"""MoE blocks over expert-parallel ranks: gloo on CPU (one spawn per world size, many cases inside),
the same checks on NCCL when GPUs are present (marked gpu).

Oracle: every rank builds the same full model and the whole batch of every rank, and runs it in
one process with every expert local (``MoEBlock.forward_dense``, plain autograd). A rank's
outputs must equal the oracle's slice for its tokens; gradients of replicated weights summed
over ranks, and of this rank's experts, must equal the oracle's.
"""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import overlap.moe.stage as stage_mod
from overlap.moe import (Dispatched, EPComm, MoEBlock, MoEConfig, MoEStage, RecordingComm, ReplayComm, expert_rows,
                         linear, make_ep_buffer, moe_combine, moe_dispatch, permute, pp_ep_groups, unpermute)
from overlap.moe.weight_grads import weight_grad_store
from overlap.testing import gpu_world_sizes, run_distributed

TOL = dict(rtol=1e-4, atol=1e-5)
CFG = MoEConfig(hidden=16, num_heads=2, num_experts=8, topk=3, expert_ffn=8, shared_ffn=8, num_groups=4,
                topk_groups=2, route_scale=1.5)
CFG_PLAIN = MoEConfig(hidden=16, num_heads=4, num_experts=4, topk=2, expert_ffn=16, score_func="softmax",
                      norm_topk=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_grads(module, dense_modules, ep_rank, ep_size, group, what):
    """Replicated weights: grads summed over the EP group; routed experts: this rank's slice."""
    dense = torch.nn.ModuleList(dense_modules)
    for (name, p), (_, q) in zip(module.named_parameters(), dense.named_parameters()):
        assert p.grad is not None, f"{what}: {name} got no gradient"
        grad = p.grad.detach().clone()
        if ".experts." in f".{name}":
            e_l = q.shape[0] // ep_size
            want = q.grad[ep_rank * e_l:(ep_rank + 1) * e_l]
        else:
            dist.all_reduce(grad, group=group)
            want = q.grad
        assert torch.allclose(grad, want.to(grad.device), **TOL), \
            f"{what}: {name} off by {(grad - want.to(grad.device)).abs().max().item():.3g}"


# ---- cases, run inside the ranks -----------------------------------------------------------------

def _autograd_vs_dense(rank, ws, device):
    """moe_dispatch / moe_combine with grouped experts: values and gradients of tokens, routing
    weights and expert weights equal a dense single-process computation."""
    e, h, t, k = 8, 16, 12, 3
    g = _gen(5)
    X = torch.randn(ws, t, h, generator=g)
    idx = torch.rand(ws, t, e, generator=g).topk(k, dim=-1).indices
    idx[:, ::4, 1] = -1                                   # some empty slots
    W = torch.rand(ws, t, k, generator=g)
    We = torch.randn(e, h, h, generator=g) / 4
    G = torch.randn(ws, t, h, generator=g)

    Xr, Wr, Wer = X.clone().requires_grad_(), W.clone().requires_grad_(), We.clone().requires_grad_()
    ref = torch.zeros(ws, t, h)
    for r in range(ws):
        for j in range(k):
            ok = idx[r, :, j] >= 0
            y = torch.einsum("th,toh->to", Xr[r], Wer[idx[r, :, j].clamp(min=0)])
            ref[r] = ref[r] + torch.where(ok.unsqueeze(1), Wr[r, :, j:j + 1] * y, torch.zeros_like(y))
    (ref * G).sum().backward()

    buf = make_ep_buffer(MoEConfig(hidden=h, num_heads=1, num_experts=e, topk=k, expert_ffn=4), None, t)
    e_l = e // ws
    for fold in (False, True):
        x = X[rank].to(device).requires_grad_()
        w = W[rank].to(device).requires_grad_()
        we = We[rank * e_l:(rank + 1) * e_l].to(device).requires_grad_()
        recv_x, recv_idx, recv_w, counts, d = moe_dispatch(buf, x, idx[rank].to(device), w)
        assert isinstance(d, Dispatched) and counts.tolist() == expert_rows(recv_idx, e_l).counts.tolist()
        if fold:
            d.send_counts = None     # the path of backends that keep row counts on the device
        rows = expert_rows(recv_idx, e_l)
        y = unpermute(linear(permute(recv_x, rows), we, rows.counts.cumsum(0, dtype=torch.int32)), recv_w, rows)
        out = moe_combine(buf, y, d)
        (out * G[rank].to(device)).sum().backward()
        where = f"autograd dispatch/combine (fold={fold})"
        assert torch.allclose(out.cpu(), ref[rank].detach(), **TOL), where
        assert torch.allclose(x.grad.cpu(), Xr.grad[rank], **TOL), where
        assert torch.allclose(w.grad.cpu(), Wr.grad[rank], **TOL), where
        assert torch.allclose(we.grad.cpu(), Wer.grad[rank * e_l:(rank + 1) * e_l], **TOL), where
    return "ok"


def _stage_vs_dense(rank, ws, device):
    """A stage's forward, backward and no-grad forward against the dense oracle."""
    for cfg, layers in ((CFG, 2), (CFG_PLAIN, 1)):
        torch.manual_seed(11)
        dense = [MoEBlock(cfg) for _ in range(layers)]
        b, s = 2, 5
        g = _gen(12)
        X = torch.randn(ws * b, s, cfg.hidden, generator=g, requires_grad=True)
        G = torch.randn(ws * b, s, cfg.hidden, generator=g)
        y = X
        for blk in dense:
            y = blk.forward_dense(y)
        (y * G).sum().backward()
        mine = slice(rank * b, (rank + 1) * b)

        buf = make_ep_buffer(cfg, None, b * s)
        stage = MoEStage(cfg, buf, num_layers=layers).to(device).load_from_dense(dense)
        x = X[mine].detach().to(device).requires_grad_()
        out = stage(x)
        (out * G[mine].to(device)).sum().backward()
        where = f"stage vs dense ({cfg.score_func}, {layers} layers)"
        assert torch.allclose(out.detach().cpu(), y[mine].detach(), **TOL), where
        assert torch.allclose(x.grad.cpu(), X.grad[mine], **TOL), where
        _check_grads(stage, dense, rank, ws, None, where)
        with torch.no_grad():
            again = stage(x)
        assert torch.equal(again, out.detach()) and not again.requires_grad, where
    return "ok"


def _same(a, b, device) -> bool:
    """Bit for bit on CPU; on CUDA, index_add's atomics reorder fp32 sums, so nearly."""
    if device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _close(a, b, device) -> bool:
    tol = dict(rtol=1e-6, atol=1e-7) if device.type == "cpu" else dict(rtol=1e-4, atol=1e-5)
    return torch.allclose(a, b, **tol)


def _grads(*modules):
    return [p.grad.detach().clone() if p.grad is not None else None for m in modules for p in m.parameters()]


def _hook_vs_sequential(rank, ws, device):
    """The overlapped F&B equals forward then backward: losses and outputs bit for bit, gradients
    within tolerance; from outputs and from a loss; equal or unequal depths; frozen gate."""
    taken = []
    real = stage_mod.overlapped_chunks

    def spy(*args, **kwargs):
        taken.append(1)
        return real(*args, **kwargs)

    stage_mod.overlapped_chunks = spy
    try:
        for layers0, layers1, frozen_gate in ((2, 2, False), (2, 1, False), (1, 2, True)):
            torch.manual_seed(21)
            buf = make_ep_buffer(CFG, None, 10)
            s0 = MoEStage(CFG, buf, num_layers=layers0).to(device).load_from_dense(
                [MoEBlock(CFG) for _ in range(layers0)])
            s1 = MoEStage(CFG, buf, num_layers=layers1).to(device).load_from_dense(
                [MoEBlock(CFG) for _ in range(layers1)])
            if frozen_gate:
                for st in (s0, s1):
                    for blk in st.blocks:
                        blk.router.gate.weight.requires_grad_(False)
            g = _gen(22 + rank)
            xa, xb, lab, gb = (torch.randn(2, 5, 16, generator=g).to(device) for _ in range(4))
            xb.requires_grad_()
            results = {}
            for mode in ("sequential", "overlapped", "sequential_loss", "overlapped_loss"):
                s0.zero_grad(set_to_none=True)
                s1.zero_grad(set_to_none=True)
                xb.grad = None
                ob = s1(xb)
                before = len(taken)
                if mode == "sequential":
                    oa = s0(xa)
                    loss_a = F.mse_loss(oa, lab)
                    torch.autograd.backward([ob], [gb])
                elif mode == "overlapped":
                    (oa,), loss_a = MoEStage.overlapped_forward_backward(s0, [xa], F.mse_loss, [lab], s1, None,
                                                                         [ob], [gb])
                elif mode == "sequential_loss":
                    loss_b = (ob * gb).sum()
                    oa = s0(xa)
                    loss_a = F.mse_loss(oa, lab)
                    loss_b.backward()
                else:
                    loss_b = (ob * gb).sum()
                    (oa,), loss_a = MoEStage.overlapped_forward_backward(s0, [xa], F.mse_loss, [lab], s1, loss_b,
                                                                         None, None)
                    assert loss_b.grad_fn is None   # detached, as DualPipe expects
                assert len(taken) == before + mode.startswith("overlapped"), f"{mode}: overlap path not taken"
                loss_a.backward()                   # micro-batch a's own backward, plain
                results[mode] = (loss_a.detach(), oa.detach(), xb.grad.clone(), _grads(s0, s1))
            ref = results["sequential"]
            for mode, (loss, out, gx, grads) in results.items():
                where = f"{mode} layers={layers0}/{layers1} frozen_gate={frozen_gate}"
                assert _same(loss, ref[0], device) and _same(out, ref[1], device), where
                assert _close(gx, ref[2], device), where
                for a, b in zip(grads, ref[3]):
                    assert (a is None) == (b is None), where
                    assert a is None or _close(a, b, device), where
    finally:
        stage_mod.overlapped_chunks = real
    return "ok"


class _LoggingComm:
    """Log when each transfer is issued and when it is waited for."""

    def __init__(self, comm, log):
        self.comm, self.log = comm, log

    def __getattr__(self, op):
        def call(*args):
            self.log.append(f"issue {op}")
            pending = getattr(self.comm, op)(*args)
            outer = self

            class Logged:
                def wait(self):
                    outer.log.append(f"wait {op}")
                    return pending.wait()
            return Logged()
        return call


def _schedule_order(rank, ws, device):
    """The overlapped layer issues, waits and computes in DeepSeek's order (module docstring of
    overlap.moe.schedule), and runs the captured weight gradients as mlp(W) and attn(W)."""
    import overlap.moe.schedule as sched

    torch.manual_seed(31)
    buf = make_ep_buffer(CFG, None, 10)
    stage = MoEStage(CFG, buf).to(device)
    log = []
    pieces = ["attn_forward", "mlp_forward", "shared_forward", "post_forward", "shared_backward", "mlp_backward",
              "attn_backward"]
    saved = {name: MoEBlock.__dict__[name] for name in pieces}
    saved_run = sched.run_or_forward

    def logged(name, attr):
        fn = attr.__func__ if isinstance(attr, staticmethod) else attr

        def wrapper(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return staticmethod(wrapper) if isinstance(attr, staticmethod) else wrapper

    x = torch.randn(2, 5, 16, generator=_gen(32)).to(device)
    ob = stage(x)
    try:
        for name in pieces:
            setattr(MoEBlock, name, logged(name, saved[name]))
        sched.run_or_forward = lambda funcs: (log.append(f"W x{len(funcs)}"), saved_run(funcs))
        stage.comm = _LoggingComm(stage.comm, log)
        MoEStage.overlapped_forward_backward(stage, [x], None, None, stage, None, [ob], [torch.randn_like(ob)])
    finally:
        for name in pieces:
            setattr(MoEBlock, name, saved[name])
        sched.run_or_forward = saved_run
    want = ["issue combine_backward", "attn_forward", "shared_backward", "issue dispatch_forward",
            "wait combine_backward", "mlp_backward", "issue dispatch_backward", "W x4",
            "wait dispatch_forward", "mlp_forward", "issue combine_forward", "shared_forward",
            "wait dispatch_backward", "attn_backward", "W x3", "wait combine_forward", "post_forward"]
    assert log == want, log
    return "ok"


def _deferred_inside_pipeline_chunk(rank, ws, device):
    """With WeightGradStore enabled around the hook (a zero-bubble pipeline), the backward
    stage's weight gradients are handed to the store instead of run; running them later gives
    the same gradients."""
    store = weight_grad_store()
    torch.manual_seed(41)
    buf = make_ep_buffer(CFG, None, 10)
    stage = MoEStage(CFG, buf).to(device)
    x = torch.randn(2, 5, 16, generator=_gen(42 + rank)).to(device)
    gb = torch.randn(2, 5, 16, generator=_gen(43 + rank)).to(device)
    grads = {}
    for defer in (False, True):
        stage.zero_grad(set_to_none=True)
        ob = stage(x)
        saved_cache = store.cache
        store.enabled, store.cache = defer, []
        try:
            MoEStage.overlapped_forward_backward(stage, [x], None, None, stage, None, [ob], [gb])
            funcs = list(store.cache)
        finally:
            store.enabled, store.cache = False, saved_cache
        if defer:
            assert len(funcs) > 0 and stage.blocks[0].experts.w13.weight.grad is None
            for f in funcs:
                f()
        else:
            assert funcs == []
        grads[defer] = _grads(stage)
    for a, b in zip(grads[False], grads[True]):
        assert (a is None) == (b is None) and (a is None or _same(a, b, device))
    return "ok"


def _bias_update_over_group(rank, ws, device):
    """Counts summed over the group; every rank applies the same update."""
    torch.manual_seed(51)
    block = MoEBlock(CFG, ep_size=ws).to(device)
    block.router(torch.randn(20 + 10 * rank, 16, generator=_gen(52 + rank)).to(device))
    mine = block.router.tokens_per_expert.clone()
    everyone = [torch.zeros_like(mine) for _ in range(ws)]
    dist.all_gather(everyone, mine)
    total = torch.stack(everyone).sum(0)
    counts = block.router.update_bias(group=dist.group.WORLD)
    assert torch.equal(counts, total)
    want = CFG.bias_update_rate * torch.sign(total.float().mean() - total.float())
    assert torch.equal(block.router.expert_bias, want)
    biases = [torch.zeros_like(want) for _ in range(ws)]
    dist.all_gather(biases, block.router.expert_bias)
    assert all(torch.equal(b, biases[0]) for b in biases)
    return "ok"


def _measure_replay(rank, ws, device):
    """A replayed comm reproduces the recorded step's results; a changed schedule is caught."""
    torch.manual_seed(61)
    buf = make_ep_buffer(CFG, None, 10)
    stage = MoEStage(CFG, buf).to(device)
    x = torch.randn(2, 5, 16, generator=_gen(62 + rank)).to(device)
    real = stage.comm
    stage.comm = RecordingComm(real)
    want = stage(x).detach()
    calls = stage.comm.calls
    assert [op for op, _, _ in calls] == ["dispatch_forward", "combine_forward"]
    stage.comm = ReplayComm(calls)
    with torch.no_grad():
        assert _same(stage(x), want, device)
        with pytest.raises(RuntimeError, match="recording has"):
            stage.comm.combine_forward(None, None)
    with pytest.raises(ValueError, match="record"):
        ReplayComm([])
    return "ok"


class _FakeStream:
    """Stands in for a CUDA stream on CPU: logs what EPComm asks of it."""

    def __init__(self, log, name):
        self.log, self.name, self.device = log, name, torch.device("cpu")

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def _side_stream_path(rank, ws, device):
    """EPComm's CUDA side-stream path, run on CPU with stand-in streams: same results, and every
    transfer issued after, and waited for before, the compute stream's work."""
    import contextlib

    if device.type == "cuda":
        return "ok"                              # the real thing runs in the other cases
    log = []
    compute, side = _FakeStream(log, "compute"), _FakeStream(log, "side")
    current = [compute]

    @contextlib.contextmanager
    def use(stream):
        prev, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = prev

    saved = (torch.cuda.current_stream, torch.cuda.stream, torch.Tensor.record_stream)
    torch.cuda.current_stream, torch.cuda.stream = (lambda device=None: current[0]), use
    torch.Tensor.record_stream = lambda self, stream: log.append(f"record {stream.name}")
    try:
        torch.manual_seed(81)
        buf = make_ep_buffer(CFG, None, 10)
        stage = MoEStage(CFG, buf)
        x = torch.randn(2, 5, 16, generator=_gen(82 + rank))
        gb = torch.randn(2, 5, 16, generator=_gen(83 + rank))
        results = []
        for fake in (False, True):
            stage.comm.stream = side if fake else None
            stage.zero_grad(set_to_none=True)
            ob = stage(x)
            (oa,), _ = MoEStage.overlapped_forward_backward(stage, [x], None, None, stage, None, [ob], [gb])
            torch.autograd.backward([oa], [gb])
            results.append((oa.detach(), _grads(stage)))
    finally:
        torch.cuda.current_stream, torch.cuda.stream, torch.Tensor.record_stream = saved
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    # F (2 transfers), F&B (4), B (2): every issue waits for compute, every wait the reverse.
    assert log.count("side waits compute") == 8 and log.count("compute waits side") == 8, log
    assert "record side" in log and "record compute" in log
    return "ok"


def _errors(rank, ws, device):
    buf = make_ep_buffer(CFG, None, 10)
    with pytest.raises(ValueError, match="num_experts"):
        MoEStage(CFG_PLAIN, buf)
    with pytest.raises(TypeError, match="buffer"):
        MoEStage(CFG, None)
    with pytest.raises(ValueError, match="num_layers"):
        MoEStage(CFG, buf, num_layers=0)
    stage = MoEStage(CFG, buf)
    with pytest.raises(ValueError, match=r"\[batch, seq, hidden=16\]"):
        stage(torch.randn(10, 16))
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        stage(torch.randn(3, 5, 16))
    with pytest.raises(TypeError, match="buffer"):
        EPComm(object())
    with pytest.raises(TypeError, match="dispatched"):
        moe_combine(buf, torch.randn(3, 16), object())
    with pytest.raises(ValueError, match=f"pp=3 x ep=1 = 3 ranks, but the world has {ws}"):
        pp_ep_groups(3, 1)
    with pytest.raises(TypeError, match="config"):
        make_ep_buffer({"hidden": 16}, None, 10)
    from overlap.ep import available_backends
    assert make_ep_buffer(CFG, None, 10, backend="auto").backend_name in available_backends()
    dist.barrier()
    return "ok"


def _pp_ep_dualpipev(rank, ws, device):
    """PP2 x EP2 on 4 ranks: DualPipeV with MoE stages (hook overlapping F&B pairs, zero-bubble
    weight deferral) equals the dense oracle: loss, and every gradient."""
    from overlap.pipeline import DualPipeV

    pp, ep = 2, ws // 2
    groups = pp_ep_groups(pp, ep)
    assert dist.get_process_group_ranks(groups.ep_group) == [groups.pp_rank * ep + e for e in range(ep)]
    assert dist.get_process_group_ranks(groups.pp_group) == [p * ep + groups.ep_rank for p in range(pp)]
    cfg = MoEConfig(hidden=16, num_heads=2, num_experts=4, topk=2, expert_ffn=8, shared_ffn=8)
    torch.manual_seed(71)
    dense = [[MoEBlock(cfg)] for _ in range(2 * pp)]
    chunks, mb, s, h = 2 * pp, 2, 4, 16
    g = _gen(72)
    X, L = torch.randn(ep, chunks * mb, s, h, generator=g), torch.randn(ep, chunks * mb, s, h, generator=g)
    ref = []
    for m in range(chunks):
        y = torch.cat([X[e, m * mb:(m + 1) * mb] for e in range(ep)])
        for blocks in dense:
            y = blocks[0].forward_dense(y)
        losses = [F.mse_loss(y[e * mb:(e + 1) * mb], L[e, m * mb:(m + 1) * mb]) for e in range(ep)]
        sum(losses).backward()
        ref.append(torch.stack(losses))
    ref = torch.stack(ref)

    buf = make_ep_buffer(cfg, groups.ep_group, mb * s)
    r = groups.pp_rank
    owned = (r, 2 * pp - 1 - r)
    mods = [MoEStage(cfg, buf).to(device).load_from_dense(dense[j], groups.ep_rank) for j in owned]
    taken = []
    real = stage_mod.overlapped_chunks
    stage_mod.overlapped_chunks = lambda *a, **k: (taken.append(1), real(*a, **k))[1]
    try:
        pipe = DualPipeV(mods, process_group=groups.pp_group)
        pipe.set_p2p_tensor_shapes([(mb, s, h)])
        pipe.set_p2p_tensor_dtype(torch.float32)
        if r == 0:
            x, lab = X[groups.ep_rank].to(device), L[groups.ep_rank].to(device)
            loss, _ = pipe.step(x, num_chunks=chunks, criterion=F.mse_loss, labels=(lab,))
            assert torch.allclose(loss.cpu(), ref[:, groups.ep_rank], **TOL), (loss, ref)
        else:
            loss, _ = pipe.step(num_chunks=chunks)
            assert loss is None
    finally:
        stage_mod.overlapped_chunks = real
    assert taken and any(op.startswith("[") for op in pipe.trace), pipe.trace
    for mod, j in zip(mods, owned):
        _check_grads(mod, dense[j], groups.ep_rank, ep, groups.ep_group, f"DualPipeV stage {j}")
    return len(taken)


CASES = {"autograd_vs_dense": _autograd_vs_dense, "stage_vs_dense": _stage_vs_dense,
         "hook_vs_sequential": _hook_vs_sequential, "schedule_order": _schedule_order,
         "deferred_inside_pipeline_chunk": _deferred_inside_pipeline_chunk,
         "bias_update_over_group": _bias_update_over_group, "measure_replay": _measure_replay,
         "errors": _errors, "side_stream_path": _side_stream_path, "pp_ep_dualpipev": _pp_ep_dualpipev}


def _run_cases(rank, world_size, names, device_kind):
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    return {name: CASES[name](rank, world_size, device) for name in names}


EP2 = ["autograd_vs_dense", "stage_vs_dense", "hook_vs_sequential", "schedule_order",
       "deferred_inside_pipeline_chunk", "bias_update_over_group", "measure_replay", "side_stream_path", "errors"]


def test_moe_on_two_gloo_ranks():
    per_rank = run_distributed(_run_cases, 2, EP2, "cpu", backend="gloo", timeout_s=240)
    assert all(r == {name: "ok" for name in EP2} for r in per_rank), per_rank


def test_moe_in_dualpipev_on_pp2_x_ep2_gloo_ranks():
    per_rank = run_distributed(_run_cases, 4, ["pp_ep_dualpipev"], "cpu", backend="gloo", timeout_s=240)
    assert all(r["pp_ep_dualpipev"] > 0 for r in per_rank), per_rank


@pytest.mark.parametrize("budget", ["auto", "on"])
def test_experiment_runs_on_cpu(tmp_path, budget):
    """experiments/moe_overlap.py --cpu: the lead's check before GPU time (auto: exact mode on
    the torch backend; on: budget mode)."""
    import subprocess
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "moe_overlap.py")
    proc = subprocess.run([sys.executable, path, "--cpu", "--out", str(tmp_path), "--figures", "", "--iters", "2",
                           "--warmup", "1", "--trace-steps", "1", "--timeout", "150", "--budget", budget],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = "moe_overlap_cpu_ws2" + ("_budget" if budget == "on" else "")
    data = json.loads((tmp_path / f"{tag}.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["study"] == "moe_overlap"
    ops = {row["op"] for row in data["rows"]}
    assert {"fb_overlapped", "fb_serialized", "compute_only", "comm_only", "trace_fb_overlapped", "summary"} <= ops
    summary = next(row for row in data["rows"] if row["op"] == "summary")
    assert summary["transfers_per_step"] == 4 and summary["bound_us"] > 0 and summary["wire_bytes_per_step_max"] > 0
    assert summary["token_budget"] == ("budget" if budget == "on" else "exact")
    if budget == "on":   # the default budget: world_size * tokens rows; what arrived fits in it
        assert summary["num_worst_tokens"] == 2 * 32 and 0 < summary["recv_rows_max"] <= 64
        assert summary["expert_capacity"] == 64 * 2 and summary["expert_pairs_max"] <= 128
    for rank in (0, 1):
        assert (tmp_path / "traces" / f"{tag}_overlapped_rank{rank}.json").stat().st_size > 1000
    assert all(0 <= row["hidden_pct"] <= 100 for row in data["rows"] if row["op"].startswith("trace_"))


@pytest.mark.gpu
@pytest.mark.parametrize("n", gpu_world_sizes((2, 4)) or [0])
def test_moe_on_nccl_ranks(n):
    if n == 0:
        pytest.skip("needs 2 GPUs")
    names = EP2 if n == 2 else ["pp_ep_dualpipev"]
    per_rank = run_distributed(_run_cases, n, names, "cuda", backend="nccl", timeout_s=300)
    assert all(set(r) == set(names) for r in per_rank)
