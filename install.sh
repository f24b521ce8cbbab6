#!/usr/bin/env bash
# Install overlap and what its tests and benchmarks need, on a fresh CPU machine or the GPU image.
# Keeps an existing torch (the GPU image's CUDA build); installs the CPU wheel only when torch is absent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing the CPU build torch==2.13.0"
  pip_install torch==2.13.0
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "[install] triton not found: installing triton==3.6.0 (the GPU image's version)"
  pip_install triton==3.6.0 || pip_install triton || echo "[install] no triton wheel here: Triton tests will skip"
fi
for mod_pkg in pytest:pytest pytest_timeout:pytest-timeout pytest_benchmark:pytest-benchmark \
               matplotlib:matplotlib tqdm:tqdm numpy:numpy; do
  mod=${mod_pkg%%:*}; pkg=${mod_pkg##*:}
  "$PY" -c "import $mod" 2>/dev/null || pip_install "$pkg"
done
# The editable build needs a setuptools with PEP 660 and bdist_wheel built in (>= 70.1).
if ! "$PY" -c "import setuptools, sys; v = tuple(int(p) for p in setuptools.__version__.split('.')[:2]); sys.exit(v < (70, 1))" 2>/dev/null; then
  echo "[install] upgrading setuptools (needs >= 70.1 for editable builds without isolation)"
  pip_install "setuptools>=70.1"
fi
# --no-build-isolation: the CUDA extension compiles against the torch installed above.
pip_install --no-build-isolation --no-deps -e .
"$PY" -c "import overlap; print('[install] overlap', overlap.__version__, '| CUDA extension:', 'built' if overlap.has_cuda_extension() else 'not built (pure Python)')"
