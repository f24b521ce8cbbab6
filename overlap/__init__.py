"""overlap: communication/computation overlap for mixture-of-experts on NVLink GPUs."""
__version__ = "0.1.0"


def cuda_extension_expected() -> bool:
    """True when setup.py built (or tried to build) the CUDA extension `overlap._C`."""
    try:
        from overlap._build_config import CUDA_EXTENSION_EXPECTED
    except ImportError:  # running from a tree that was never installed
        return False
    return bool(CUDA_EXTENSION_EXPECTED)


def has_cuda_extension() -> bool:
    """True when the compiled CUDA extension `overlap._C` imports on this machine."""
    try:
        import torch  # noqa: F401  (_C links against libtorch: load it first)
        from overlap import _C  # noqa: F401
    except ImportError:
        return False
    return True


def load_cuda_extension():
    """Import and return `overlap._C`, raising a RuntimeError that says how to build it."""
    try:
        import torch  # noqa: F401  (_C links against libtorch: load it first)
        from overlap import _C
    except ImportError as exc:
        try:
            from overlap._build_config import BUILD_REASON
        except ImportError:
            BUILD_REASON = "package not installed"
        raise RuntimeError(
            "the CUDA extension overlap._C is not available "
            f"(build said: {BUILD_REASON}; import said: {exc}). Reinstall on a machine with "
            "CUDA torch and nvcc: python3 -m pip install --no-build-isolation --no-deps -e ."
        ) from exc
    return _C
