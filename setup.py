"""Build script for overlap.

`pip install --no-build-isolation -e .` builds the CUDA extension `overlap._C` when the torch it
finds was built with CUDA and nvcc is available; otherwise it installs pure Python. The choice is
written into `overlap/_build_config.py`, so the package can tell "not built on purpose" apart from
"built but failed to load" (see `overlap.has_cuda_extension` and `overlap.cuda_extension_expected`).
Build isolation must be off: the extension is compiled against the torch already installed.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "overlap",
    "overlap.ep",
    "overlap.ep.backends",
    "overlap.moe",
    "overlap.pipeline",
    "overlap.eplb",
    "overlap.profiling",
    "overlap.bench",
    "overlap.testing",
    "overlap.triton_kernels",
]


def _cuda_build_wanted():
    """Return (wanted, reason). Never raises: a CPU machine installs pure Python."""
    if os.environ.get("OVERLAP_NO_CUDA_EXT", "0") == "1":
        return False, "OVERLAP_NO_CUDA_EXT=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # torch missing in an isolated build env
        return False, f"torch not importable at build time ({exc.__class__.__name__})"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if CUDA_HOME is None:
        return False, "nvcc/CUDA_HOME not found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _write_build_config(expected, reason):
    path = os.path.join(ROOT, "overlap", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at install time; do not edit.\n")
        f.write(f"CUDA_EXTENSION_EXPECTED = {expected!r}\n")
        f.write(f"BUILD_REASON = {reason!r}\n")


def _extensions():
    wanted, reason = _cuda_build_wanted()
    _write_build_config(wanted, reason)
    if not wanted:
        print(f"[overlap] building pure Python: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch = os.environ.get("OVERLAP_CUDA_ARCH", "90a")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/kernels/*.cu"))
    ext = CUDAExtension(
        name="overlap._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                     "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    print(f"[overlap] building CUDA extension overlap._C for sm_{arch}: {reason}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="overlap",
    version="0.1.0",
    description="Overlapping communication with computation in MoE training and inference",
    packages=PACKAGES,
    package_dir={"overlap.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-timeout", "pytest-benchmark"],
        "plots": ["matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
