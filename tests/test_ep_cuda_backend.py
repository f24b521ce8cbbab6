"""The `cuda` backend's own checks that need no GPU: the module imports and says why it is
unavailable, its timeout setting, its buffer layout, and the FP8 reference it is held to.

Its GPU tests (oracle cases, equality with the reference backend, back-to-back calls, FP8,
timeouts that raise) are shared with every kernel backend: tests/test_ep_kernel_backends.py.
"""
import os

import pytest
import torch

from overlap.testing.ep_kernel_checks import _fp8_reference


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
    # Arrival flags (one u64 per dispatch row, then per combine row) follow the signal area and
    # are zeroed with it; the data regions start on the next 4 KiB.
    assert lay.dispatch_flags_offset == 8192 and lay.combine_flags_offset == 8192 + rows * 8
    assert lay.zero_bytes == lay.x_offset and lay.x_offset % 4096 == 0 and lay.x_offset >= 8192 + 2 * rows * 8
    assert lay.meta_offset % 16 == 0 and lay.combine_offset % 4096 == 0
    assert lay.meta_offset - lay.x_offset == rows * 208          # 200-byte rows padded to 16
    assert lay.combine_offset >= lay.meta_offset + rows * 8 * 8
    assert lay.nbytes == lay.combine_offset + rows * 208
    assert lay.fits(2, 8) and lay.fits(1, 3) and not lay.fits(4, 8) and not lay.fits(2, 9)


# ---------------------------------------------------------------------------------------------- GPU helpers


















# ---------------------------------------------------------------------------------------------- GPU: rank bodies












# ---------------------------------------------------------------------------------------------- GPU tests








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






def test_kernel_tuning_env(monkeypatch):
    from overlap.ep.backends.cuda_backend import KernelTuning

    names = ("OVERLAP_CUDA_SEND_WARPS", "OVERLAP_CUDA_FP8_SEND_WARPS", "OVERLAP_CUDA_SEND_CHUNK",
             "OVERLAP_CUDA_COPY_UNROLL", "OVERLAP_CUDA_STAMPS", "OVERLAP_CUDA_COMBINE_SEND_CHUNK")
    for name in names:
        monkeypatch.delenv(name, raising=False)

    def tuning():
        return KernelTuning.from_env(16, 6, 32, 4, 10, 16, 5)

    assert tuning() == KernelTuning(send_warps=6, fp8_send_warps=10, send_chunk=4, copy_unroll=16, stamps=False,
                                    combine_send_chunk=5)
    for name, value in zip(names, ("12", "3", "1", "8", "1", "2")):
        monkeypatch.setenv(name, value)
    assert tuning() == KernelTuning(send_warps=12, fp8_send_warps=3, send_chunk=1, copy_unroll=8, stamps=True,
                                    combine_send_chunk=2)
    t = tuning()
    assert t.split("dispatch") == (12, 1) and t.split("dispatch", fp8=True) == (3, 1) and t.split("combine") == (12, 2)
    with pytest.raises(ValueError, match="op"):
        t.split("notify")
    for name, bad in (("OVERLAP_CUDA_SEND_WARPS", "16"), ("OVERLAP_CUDA_SEND_WARPS", "0"),
                      ("OVERLAP_CUDA_FP8_SEND_WARPS", "16"), ("OVERLAP_CUDA_SEND_CHUNK", "33"),
                      ("OVERLAP_CUDA_SEND_CHUNK", "x"), ("OVERLAP_CUDA_COMBINE_SEND_CHUNK", "0"),
                      ("OVERLAP_CUDA_COPY_UNROLL", "12"),
                      ("OVERLAP_CUDA_STAMPS", "yes")):
        good = os.environ[name]
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            tuning()
        monkeypatch.setenv(name, good)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tuning_variants_and_phase_stamps(world_size):
    from overlap.testing import assert_ranks_pass, gpu_world_sizes
    from overlap.testing.ep_kernel_checks import cuda_tuning_variants

    if world_size not in gpu_world_sizes((1, 2, 4)):
        pytest.skip(f"needs {world_size} GPUs")
    variants = [{"OVERLAP_CUDA_COPY_UNROLL": "8", "OVERLAP_CUDA_STAMPS": "1"},
                {"OVERLAP_CUDA_SEND_WARPS": "3", "OVERLAP_CUDA_FP8_SEND_WARPS": "13", "OVERLAP_CUDA_SEND_CHUNK": "1"},
                {"OVERLAP_CUDA_STAMPS": "1"}]
    assert_ranks_pass(cuda_tuning_variants, world_size, variants, backend="nccl", timeout_s=300)
