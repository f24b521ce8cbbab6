"""The `cuda` backend (NVLink kernels over symmetric memory): oracle cases, equality with the
torch backend at realistic size, SM budgets, back-to-back calls, and timeouts that raise.

GPU tests need >= 2 GPUs on one NVLink host; the CPU tests check the module imports and
explains why it is unavailable.
"""
import time

import pytest
import torch

from overlap.testing import assert_ranks_pass, gpu_world_sizes, run_distributed
from overlap.testing.ep_cases import EPCase, standard_cases
from overlap.testing.ep_check import check_case

MODES = ("sync", "async", "expert_major")


# ---------------------------------------------------------------------------------------------- CPU
def test_module_imports_and_says_why_not_available(monkeypatch):
    from overlap.ep.backends import backend_names, get_backend_class
    from overlap.ep.backends.cuda_backend import CudaBackend

    assert "cuda" in backend_names()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = CudaBackend.availability()
    assert not ok and "CUDA" in why, why
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        get_backend_class("cuda")


def test_timeout_env(monkeypatch):
    from overlap.ep.backends.cuda_backend import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, kernel_timeout_s

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert kernel_timeout_s() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert kernel_timeout_s() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            kernel_timeout_s()


def test_region_layout_fits_and_aligns():
    from overlap.ep.backends.cuda_backend import _RegionLayout

    lay = _RegionLayout(8192, world=4, max_tokens=33, hidden=100, elem_cap=2, topk_cap=8)
    rows = 4 * 33
    assert lay.x_offset == 8192 and lay.meta_offset % 16 == 0 and lay.combine_offset % 4096 == 0
    assert lay.meta_offset - lay.x_offset == rows * 208          # 200-byte rows padded to 16
    assert lay.combine_offset >= lay.meta_offset + rows * 8 * 8
    assert lay.nbytes == lay.combine_offset + rows * 208
    assert lay.fits(2, 8) and lay.fits(1, 3) and not lay.fits(4, 8) and not lay.fits(2, 9)


# ---------------------------------------------------------------------------------------------- GPU helpers
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


def _oracle_cases(rank, world_size, modes):
    fails = []
    for case in standard_cases(world_size) + _odd_row_cases(world_size):
        for mode in modes:
            fails += check_case(case, rank, world_size, "cuda", _device(), mode)
    return fails


def _need(world_size):
    if world_size not in gpu_world_sizes((1, 2, 4, 8)):
        pytest.skip(f"needs {world_size} GPUs")


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


# ---------------------------------------------------------------------------------------------- GPU: rank bodies
def _realistic_vs_torch(rank, world_size, num_sms_list):
    from overlap.ep import EPBuffer

    T, H, E, K = 4096, 7168, 256, 8
    dev = _device()
    gen = torch.Generator().manual_seed(100 + rank)
    ref_buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch", validate_values=False)
    fails = []
    for num_sms in num_sms_list:
        buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="cuda", num_sms=num_sms,
                       validate_values=False)
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
    torch.cuda.synchronize()
    return fails


def _back_to_back(rank, world_size):
    """Many calls with no host sync between combines: flags and regions are reused correctly."""
    from overlap.ep import EPBuffer

    T, H, E, K = 512, 512, 8 * world_size, 4
    dev = _device()
    gen = torch.Generator().manual_seed(7 + rank)
    ref_buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch", validate_values=False)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="cuda", num_sms=8,
                   validate_values=False)
    fails = []
    # bf16 rounds, then fp32 rounds (the buffer grows in between), then bf16 again.
    for rnd, dtype in enumerate((torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16)):
        inputs = []
        for j in range(3):
            n = int(torch.randint(0, T + 1, (1,), generator=gen))
            x = (torch.randn(n, H, generator=gen) * 3).to(dtype).to(dev)
            idx, w = _random_routing(n, E, K, gen, dev)
            inputs.append((x, idx, w))
        # Three dispatches in a row (async), then three combines in a row (async), one wait at the end.
        pending = [buf.dispatch_async(*inp) for inp in inputs]
        for p in pending:
            p[5].wait()
        outs = [buf.combine_async(_expert_rows(p[0]), p[4]) for p in pending]
        for out, event in outs:
            event.wait()
        for j, (inp, p, (out, _)) in enumerate(zip(inputs, pending, outs)):
            ref = ref_buf.dispatch(*inp)
            tag = f"[rank{rank}/round{rnd}/{dtype}/call{j}]"
            fails += _compare_dispatch(tag, p[:5], ref)
            fails += _compare_combine(tag, out, ref_buf.combine(_expert_rows(ref[0]), ref[4]), world_size)
    torch.cuda.synchronize()
    return fails


def _fp8_reference(x):
    """Blockwise e4m3 quantisation with IEEE fp32 division (numpy), the contract of dispatch_fp8."""
    import numpy as np

    rows, hidden = x.shape
    xf = x.float().cpu().numpy().reshape(rows, hidden // 128, 128)
    amax = np.abs(xf).max(axis=2) if rows else np.zeros((0, hidden // 128), np.float32)
    scale = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    q = torch.from_numpy((xf / scale[..., None]).astype(np.float32)).to(torch.float8_e4m3fn)
    return q.reshape(rows, hidden), torch.from_numpy(scale)


def _fp8_vs_reference(rank, world_size):
    """dispatch_fp8 equals the torch backend's dispatch followed by the reference quantisation."""
    from overlap.ep import EPBuffer

    dev = _device()
    gen = torch.Generator().manual_seed(300 + rank)
    fails = []
    for T, H, E, K, dtype, num_sms in ((4096, 7168, 256, 8, torch.bfloat16, 24), (100, 256, 8 * world_size, 3,
                                       torch.float32, 3), (37, 128, 4 * world_size, 2, torch.float16, 1)):
        ref_buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch")
        buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="cuda", num_sms=num_sms)
        x = (torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen) * 50).to(dtype)
        x[0, :128] = 0  # an all-zero block: scale 1
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
        # The handle of an FP8 dispatch combines like any other.
        y = _expert_rows(ref[0])
        fails += _compare_combine(tag, buf.combine(y, handle), ref_buf.combine(y, ref[4]), world_size)
    torch.cuda.synchronize()
    return fails


def _one_rank_skips_combine(rank, world_size, timeout_s):
    """Rank 1 skips a combine: rank 0's kernel must time out and raise, naming rank 1."""
    from overlap.ep import EPBuffer

    T, H, E, K = 64, 128, 4 * world_size, 2
    dev = _device()
    gen = torch.Generator().manual_seed(rank)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="cuda", num_sms=4)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
    idx, w = _random_routing(T, E, K, gen, dev)
    recv_x, _, _, _, handle = buf.dispatch(x, idx, w)
    y = _expert_rows(recv_x)
    torch.cuda.synchronize()
    start = time.monotonic()
    if rank == 1:
        time.sleep(timeout_s + 3)  # rank 0 has given up by now
    buf.combine(y, handle)  # rank 0: waits for a rank that is not there; rank 1: for data that never comes
    torch.cuda.synchronize()  # must return: the kernel gives up after timeout_s
    elapsed = time.monotonic() - start
    try:
        buf.combine(y, handle)
    except RuntimeError as exc:
        return {"raised": str(exc), "elapsed": elapsed}
    return {"raised": None, "elapsed": elapsed}


def _mismatched_operations(rank, world_size):
    """Rank 0 combines while rank 1 dispatches under the same sequence number: both raise fast."""
    from overlap.ep import EPBuffer

    T, H, E, K = 32, 64, 2 * world_size, 2
    dev = _device()
    gen = torch.Generator().manual_seed(rank)
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="cuda", num_sms=2)
    x = torch.randn(T, H, generator=gen).to(dev)
    idx, w = _random_routing(T, E, K, gen, dev)
    recv_x, _, _, _, handle = buf.dispatch(x, idx, w)
    start = time.monotonic()
    try:
        if rank == 0:
            buf.combine(recv_x, handle)
            torch.cuda.synchronize()
            buf.combine(recv_x, handle)
        else:
            buf.dispatch(x, idx, w)  # its counts exchange meets rank 0's combine and fails
    except RuntimeError as exc:
        return {"raised": str(exc), "elapsed": time.monotonic() - start}
    return {"raised": None, "elapsed": time.monotonic() - start}


# ---------------------------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_cuda_backend_oracle_cases(world_size):
    _need(world_size)
    assert_ranks_pass(_oracle_cases, world_size, MODES, backend="nccl", timeout_s=400)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_cuda_dispatch_equals_torch_backend_at_realistic_size(world_size):
    _need(world_size)
    assert_ranks_pass(_realistic_vs_torch, world_size, (1, 8, 24), backend="nccl", timeout_s=400)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_cuda_back_to_back_calls(world_size):
    _need(world_size)
    assert_ranks_pass(_back_to_back, world_size, backend="nccl", timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_cuda_fp8_dispatch(world_size):
    _need(world_size)
    assert_ranks_pass(_fp8_vs_reference, world_size, backend="nccl", timeout_s=300)


def test_fp8_reference_quantisation():
    """The CPU reference itself: round trip within e4m3 precision, and zero blocks stay zero."""
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)) * 30
    x[1, 128:] = 0
    q, s = _fp8_reference(x)
    back = (q.float().view(5, 2, 128) * s[..., None]).view(5, 256)
    # 3 mantissa bits: relative error <= 2^-4; subnormals (below 2^-6 * scale) err by <= 2^-10 * scale.
    assert torch.allclose(back, x, rtol=2 ** -4, atol=float(s.max()) * 2 ** -10)
    assert s[1, 1] == 1 and torch.all(q[1, 128:].float() == 0)
    assert torch.all(q.float().abs() <= 448)


@pytest.mark.gpu
def test_cuda_timeout_raises_instead_of_hanging():
    _need(2)
    timeout_s = 2.0
    results = run_distributed(_one_rank_skips_combine, 2, timeout_s, backend="nccl", timeout_s=120,
                              env={"OVERLAP_KERNEL_TIMEOUT_S": str(timeout_s)})
    r0, r1 = results
    assert r0["raised"] and "combine" in r0["raised"] and "rank 1" in r0["raised"], r0
    assert "start the same operation" in r0["raised"], r0
    assert r1["raised"] and "rank 0" in r1["raised"], r1
    assert r0["elapsed"] < timeout_s + 10, r0


@pytest.mark.gpu
def test_cuda_mismatched_operations_raise():
    _need(2)
    results = run_distributed(_mismatched_operations, 2, backend="nccl", timeout_s=120,
                              env={"OVERLAP_KERNEL_TIMEOUT_S": "5"})
    for rank, res in enumerate(results):
        assert res["raised"] and "different operation" in res["raised"], (rank, res)
        assert f"rank {1 - rank}" in res["raised"], (rank, res)
        assert res["elapsed"] < 5, (rank, res)  # detected at once, not by the timeout
