"""Multi-GPU checks shared by the kernel backends (``cuda``, ``triton``): run inside ranks.

Each ``rank`` function takes the backend name and returns a list of failure messages (or, for
the failure-injection checks, what was raised and when), so one spawn reports every failing
case; tests/test_ep_kernel_backends.py runs them for every kernel backend.
"""
from __future__ import annotations

import time

import torch

from overlap.testing.ep_cases import EPCase, standard_cases
from overlap.testing.ep_check import check_case


def _device():
    return torch.device("cuda", torch.cuda.current_device())


def _odd_row_cases(world_size):
    """Rows whose byte size is not a multiple of 16 (8-, 4- and 2-byte vector paths)."""
    W = world_size
    return [
        EPCase("bf16_hidden_100", [33] * W, 100, 4 * W, 2, torch.bfloat16, "random", seed=21),
        EPCase("fp16_hidden_36", [19] * W, 36, 2 * W, 2, torch.float16, "random", seed=22),
        EPCase("fp32_hidden_3", [17] * W, 3, 2 * W, 2, torch.float32, "random", seed=23),
        EPCase("bf16_hidden_7_k9", [29] * W, 7, 16 * W, 9, torch.bfloat16, "sparse", seed=24),
    ]


def _random_routing(num_tokens, num_experts, topk, gen, device):
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    drop = torch.rand(num_tokens, topk, generator=gen) < 0.05
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    w = torch.rand(num_tokens, topk, generator=gen)
    return idx.to(device), w.to(device)


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _compare_dispatch(tag, got, ref):
    names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert")
    fails = [f"{tag} {n} differs from the torch backend" for n, g, r in zip(names, got[:4], ref[:4]) if not _same(g, r)]
    if got[4].recv_counts != ref[4].recv_counts:
        fails.append(f"{tag} recv_counts {got[4].recv_counts} != {ref[4].recv_counts}")
    return fails


def _compare_combine(tag, got, ref, world_size):
    # Two ranks sum (0 + a) + b in fp32 either way: bit-identical. More ranks may reorder.
    if world_size <= 2:
        return [] if _same(got, ref) else [f"{tag} combine differs from the torch backend"]
    try:
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    except AssertionError as exc:
        return [f"{tag} combine: {exc}"]
    return []


def _expert_rows(recv_x):
    """A stand-in for the experts: any per-row function works for comparing backends."""
    return (recv_x.float() * 1.25 - 0.5).to(recv_x.dtype)


def _fp8_reference(x):
    """Blockwise e4m3 quantisation (numpy), the contract of dispatch_fp8: ``scale = amax / 448``,
    ``inv = 1 / scale`` (IEEE fp32 divisions, once per 128 channels), ``value = x * inv``."""
    import numpy as np

    rows, hidden = x.shape
    xf = x.float().cpu().numpy().reshape(rows, hidden // 128, 128)
    amax = np.abs(xf).max(axis=2) if rows else np.zeros((0, hidden // 128), np.float32)
    scale = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    q = torch.from_numpy((xf * inv[..., None]).astype(np.float32)).to(torch.float8_e4m3fn)
    return q.reshape(rows, hidden), torch.from_numpy(scale)


def oracle_cases(rank, world_size, backend, modes):
    fails = []
    for case in standard_cases(world_size) + _odd_row_cases(world_size):
        for mode in modes:
            fails += check_case(case, rank, world_size, backend, _device(), mode)
    return fails


def realistic_vs_torch(rank, world_size, backend, num_sms_list):
    """4096 x 7168 bf16, top-8 of 256: dispatch equals the torch backend exactly, combine too
    (within fp32 reordering on > 2 ranks), and the combine equals the CUDA backend's bit for bit."""
    from overlap.ep import EPBuffer

    T, H, E, K = 4096, 7168, 256, 8
    dev = _device()
    gen = torch.Generator().manual_seed(100 + rank)
    kw = dict(num_experts=E, hidden=H, max_tokens_per_rank=T, validate_values=False)
    ref_buf = EPBuffer(None, backend="torch", **kw)
    fails = []
    for num_sms in num_sms_list:
        buf = EPBuffer(None, backend=backend, num_sms=num_sms, **kw)
        cuda_buf = EPBuffer(None, backend="cuda", num_sms=num_sms, **kw) if backend != "cuda" else None
        for it in range(2):
            x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
            idx, w = _random_routing(T, E, K, gen, dev)
            tag = f"[rank{rank}/num_sms={num_sms}/iter{it}]"
            ref = ref_buf.dispatch(x, idx, w)
            if it == 0:
                got = buf.dispatch(x, idx, w)
            else:
                *got, event = buf.dispatch_async(x, idx, w)
                event.wait()
            fails += _compare_dispatch(tag, got, ref)
            y = _expert_rows(ref[0])
            ref_out = ref_buf.combine(y, ref[4])
            if it == 0:
                out = buf.combine(y, got[4])
            else:
                out, event = buf.combine_async(y, got[4])
                event.wait()
            fails += _compare_combine(tag, out, ref_out, world_size)
            if cuda_buf is not None:
                cuda_out = cuda_buf.combine(y, cuda_buf.dispatch(x, idx, w)[4])
                if not _same(out, cuda_out):
                    fails.append(f"{tag} combine differs from the cuda backend's")
    torch.cuda.synchronize()
    return fails


def back_to_back(rank, world_size, backend):
    """Many calls with no host sync between combines: flags and regions are reused correctly."""
    from overlap.ep import EPBuffer

    T, H, E, K = 512, 512, 8 * world_size, 4
    dev = _device()
    gen = torch.Generator().manual_seed(7 + rank)
    ref_buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch", validate_values=False)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend=backend, num_sms=8,
                   validate_values=False)
    fails = []
    for rnd, dtype in enumerate((torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16)):
        inputs = []
        for _ in range(3):
            n = int(torch.randint(0, T + 1, (1,), generator=gen))
            x = (torch.randn(n, H, generator=gen) * 3).to(dtype).to(dev)
            inputs.append((x, *_random_routing(n, E, K, gen, dev)))
        pending = [buf.dispatch_async(*inp) for inp in inputs]
        for p in pending:
            p[5].wait()
        outs = [buf.combine_async(_expert_rows(p[0]), p[4]) for p in pending]
        for _, event in outs:
            event.wait()
        for j, (inp, p, (out, _)) in enumerate(zip(inputs, pending, outs)):
            ref = ref_buf.dispatch(*inp)
            tag = f"[rank{rank}/round{rnd}/{dtype}/call{j}]"
            fails += _compare_dispatch(tag, p[:5], ref)
            fails += _compare_combine(tag, out, ref_buf.combine(_expert_rows(ref[0]), ref[4]), world_size)
    torch.cuda.synchronize()
    return fails


def fp8_vs_reference(rank, world_size, backend):
    """dispatch_fp8 equals the torch backend's dispatch followed by the reference quantisation."""
    from overlap.ep import EPBuffer

    dev = _device()
    gen = torch.Generator().manual_seed(300 + rank)
    fails = []
    for T, H, E, K, dtype, num_sms in ((4096, 7168, 256, 8, torch.bfloat16, 24),
                                       (100, 256, 8 * world_size, 3, torch.float32, 3),
                                       (37, 128, 4 * world_size, 2, torch.float16, 1)):
        ref_buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch")
        buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend=backend, num_sms=num_sms)
        x = (torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen) * 50).to(dtype)
        x[0, :128] = 0
        x = x.to(dev)
        idx, w = _random_routing(T, E, K, gen, dev)
        tag = f"[rank{rank}/fp8/{dtype}/H={H}]"
        ref = ref_buf.dispatch(x, idx, w)
        q, scales, ridx, rw, counts, handle, event = buf.dispatch_fp8_async(x, idx, w)
        event.wait()
        exp_q, exp_s = _fp8_reference(ref[0])
        if not torch.equal(q.view(torch.uint8).cpu(), exp_q.view(torch.uint8)):
            bad = (q.view(torch.uint8).cpu() != exp_q.view(torch.uint8)).sum().item()
            fails.append(f"{tag} e4m3 values differ from the reference in {bad} of {q.numel()} places")
        if not torch.equal(scales.cpu(), exp_s):
            fails.append(f"{tag} scales differ from the reference")
        for name, got, exp in (("recv_topk_idx", ridx, ref[1]), ("recv_topk_weights", rw, ref[2]),
                               ("counts", counts, ref[3])):
            if not _same(got, exp):
                fails.append(f"{tag} {name} differs from the torch backend")
        y = _expert_rows(ref[0])
        fails += _compare_combine(tag, buf.combine(y, handle), ref_buf.combine(y, ref[4]), world_size)
    torch.cuda.synchronize()
    return fails


def one_rank_skips_combine(rank, world_size, backend, timeout_s):
    """Rank 1 skips a combine: rank 0's kernel must time out and raise, naming rank 1."""
    from overlap.ep import EPBuffer

    T, H, E, K = 64, 128, 4 * world_size, 2
    dev = _device()
    gen = torch.Generator().manual_seed(rank)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend=backend, num_sms=4)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
    idx, w = _random_routing(T, E, K, gen, dev)
    recv_x, _, _, _, handle = buf.dispatch(x, idx, w)
    y = _expert_rows(recv_x)
    buf.combine(y, handle)  # compiles the combine kernel before the timed part
    torch.cuda.synchronize()
    start = time.monotonic()
    if rank == 1:
        time.sleep(timeout_s + 3)
    buf.combine(y, handle)
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    try:
        buf.combine(y, handle)
    except RuntimeError as exc:
        return {"raised": str(exc), "elapsed": elapsed}
    return {"raised": None, "elapsed": elapsed}


def mismatched_operations(rank, world_size, backend):
    """Rank 0 combines while rank 1 dispatches under the same sequence number: both raise fast."""
    from overlap.ep import EPBuffer

    T, H, E, K = 32, 64, 2 * world_size, 2
    dev = _device()
    gen = torch.Generator().manual_seed(rank)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend=backend, num_sms=2)
    x = torch.randn(T, H, generator=gen).to(dev)
    idx, w = _random_routing(T, E, K, gen, dev)
    recv_x, _, _, _, handle = buf.dispatch(x, idx, w)
    buf.combine(recv_x, handle)  # both kernels compiled before the timed part
    torch.cuda.synchronize()
    start = time.monotonic()
    try:
        if rank == 0:
            buf.combine(recv_x, handle)
            torch.cuda.synchronize()
            buf.combine(recv_x, handle)
        else:
            buf.dispatch(x, idx, w)
    except RuntimeError as exc:
        return {"raised": str(exc), "elapsed": time.monotonic() - start}
    return {"raised": None, "elapsed": time.monotonic() - start}


def cuda_tuning_variants(rank, world_size, variants):
    """The cuda backend under other kernel tunings (``variants``: env dicts, e.g. 8 vectors per
    lane, other sender/receiver splits) equals the torch backend, and its FP8 dispatch equals
    the default tuning's bit for bit. With ``OVERLAP_CUDA_STAMPS=1`` in a variant, the phase
    stamps must account for every row: senders for every token (dispatch) or returned row
    (combine), receivers for every row from a peer (dispatch) or every token (combine)."""
    from overlap.ep import EPBuffer
    from overlap.ep.kernel_stamps import summarize
    from overlap.testing.env import temporary_env

    T, H, E, K = 1024, 7168, 64, 8
    dev = _device()
    gen = torch.Generator().manual_seed(300 + rank)
    kw = dict(num_experts=E, hidden=H, max_tokens_per_rank=T, validate_values=False)
    ref_buf = EPBuffer(None, backend="torch", **kw)
    default_buf = EPBuffer(None, backend="cuda", num_sms=12, **kw)
    fails = []
    for env in variants:
        with temporary_env(env):  # the backend reads its tuning when the buffer is set up
            buf = EPBuffer(None, backend="cuda", num_sms=12, **kw)
            buf.dispatch(torch.randn(4, H, device=dev).to(torch.bfloat16), *_random_routing(4, E, K, gen, dev))
        tag = f"[rank{rank}/{env}]"
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
        idx, w = _random_routing(T, E, K, gen, dev)
        ref = ref_buf.dispatch(x, idx, w)
        got = buf.dispatch(x, idx, w)
        fails += _compare_dispatch(tag, got, ref)
        stamps = env.get("OVERLAP_CUDA_STAMPS") == "1"
        from_peers = got[0].shape[0] - int(got[4].layout.num_tokens_per_rank[rank])
        if stamps:
            s = summarize(buf._backend.last_phase_stamps("dispatch"))
            if s.get("send_rows") != T or s.get("recv_rows") != from_peers:
                fails.append(f"{tag} dispatch stamps count {s.get('send_rows')} sent / {s.get('recv_rows')} received "
                             f"rows, expected {T} / {from_peers}")
        y = _expert_rows(ref[0])
        fails += _compare_combine(tag, buf.combine(y, got[4]), ref_buf.combine(y, ref[4]), world_size)
        if stamps:
            s = summarize(buf._backend.last_phase_stamps("combine"))
            if s.get("send_rows") != from_peers or s.get("recv_rows") != T:
                fails.append(f"{tag} combine stamps count {s.get('send_rows')} returned / {s.get('recv_rows')} reduced "
                             f"rows, expected {from_peers} / {T}")
        q, scales = buf.dispatch_fp8(x, idx, w)[:2]
        q0, scales0 = default_buf.dispatch_fp8(x, idx, w)[:2]
        if not (torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and _same(scales, scales0)):
            fails.append(f"{tag} FP8 dispatch differs from the default tuning's")
    torch.cuda.synchronize()
    return fails
