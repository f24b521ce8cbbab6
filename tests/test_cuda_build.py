"""The CUDA build path: kernels compile for sm_90a without torch, and the extension exists on GPUs."""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import overlap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


def test_there_are_kernels():
    assert KERNELS, "csrc/kernels/ has no .cu files"


@pytest.mark.parametrize("path", KERNELS + sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cuh"))),
                         ids=os.path.basename)
def test_kernel_sources_include_no_torch(path):
    text = open(path).read()
    bad = re.findall(r'#\s*include\s*[<"](torch/|ATen/|c10/|pybind11/)[^>"]*[>"]', text)
    assert not bad, f"{os.path.basename(path)} includes torch headers: {bad}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("path", KERNELS, ids=os.path.basename)
def test_kernel_compiles_for_sm90a(path, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
           "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"), "-c", path, "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert all(int(s) == 0 for s in spills), f"register spills in {os.path.basename(path)}:\n{proc.stderr}"


@pytest.mark.gpu
def test_cuda_extension_built_on_gpu_machines():
    # No silent fallback: a CUDA machine must have built and be able to load overlap._C.
    assert torch.version.cuda is not None
    assert overlap.cuda_extension_expected(), (
        "setup.py did not build the CUDA extension on a CUDA machine; reinstall with "
        "pip install --no-build-isolation --no-deps -e .")
    overlap.load_cuda_extension()
    assert overlap.has_cuda_extension()
