#!/usr/bin/env bash
# One command for a GPU machine: build overlap (CUDA extension included), run the GPU tests, run
# every benchmark at each world size the machine serves, and leave logs + results in OUTDIR.
#
#   experiments/device_suite.sh OUTDIR [--tests-only|--bench-only] [--ws "2 4"] [-k PYTEST_EXPR]
#                               [--tests "tests/a.py tests/b.py"] [--studies "ep_bench pipeline_step_time"]
#
# The GPU image has no network: install.sh installs only what is missing and builds with
# --no-build-isolation --no-deps, so it uses what the image has.
# The commit recorded in results comes from OVERLAP_GIT_COMMIT/OVERLAP_GIT_DIRTY when the tree
# has no .git (the device machine gets a copy of the working tree).
set -uo pipefail
OUTDIR=${1:?usage: device_suite.sh OUTDIR [--tests-only|--bench-only] [--ws "2 4"] [-k EXPR]}
shift
MODE=all; WS=""; KEXPR=""; TESTS="tests"; STUDIES="link_probe kernel_phases ep_bench pipeline_step_time eplb_zipf moe_overlap decode_bench decode_overlap sm_ablation capture_traces triton"
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) MODE=tests ;;
    --bench-only) MODE=bench ;;
    --ws) WS="$2"; shift ;;
    -k) KEXPR="$2"; shift ;;
    --tests) TESTS="$2"; shift ;;
    --studies) STUDIES="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUTDIR/results"
LOG="$OUTDIR/suite.log"
status=0
step() { echo; echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
wanted() { case " $STUDIES " in *" $1 "*) return 0 ;; esac; return 1; }

step "machine"
{ nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm --format=csv; nvidia-smi topo -m; \
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"; } 2>&1 | tee -a "$LOG"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ -n "$WS" ] || WS=$(for w in 2 4 8; do [ "$w" -le "$NGPU" ] && printf "%s " "$w"; done)

step "build (./install.sh, the README's install step)"
t0=$(date +%s)
./install.sh >"$OUTDIR/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUTDIR/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
python3 -c "import overlap; print('cuda extension expected:', overlap.cuda_extension_expected(), 'loaded:', overlap.has_cuda_extension())" | tee -a "$LOG"

if [ "$MODE" != bench ]; then
  step "GPU tests"
  python3 -m pytest -m gpu -q -rfE -p no:cacheprovider --timeout ${PYTEST_TIMEOUT:-900} ${KEXPR:+-k "$KEXPR"} $TESTS \
    --junitxml="$OUTDIR/results/gpu_tests.xml" 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "$MODE" != tests ]; then
  for w in $WS; do
    if wanted ep_bench; then
      step "ep_bench world size $w"
      timeout 420 python3 experiments/ep_bench.py --world-size "$w" --out "$OUTDIR/results" 2>&1 | tee -a "$LOG" | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    fi
    # Each study takes --world-size and --out; extra flags per script after the colon.
    for entry in "experiments/link_probe.py:" "experiments/kernel_phases.py:" \
                 "experiments/pipeline_step_time.py:--figures $OUTDIR/results" "experiments/eplb_zipf.py:--fig-dir $OUTDIR/results --backend cuda" \
                 "experiments/moe_overlap.py:--figures $OUTDIR/results" \
                 "experiments/moe_overlap.py:--figures $OUTDIR/results --pp 2" "experiments/decode_bench.py:" \
                 "experiments/decode_overlap.py:" "experiments/sm_ablation.py:--fig-dir $OUTDIR/results" \
                 "experiments/capture_traces.py:--figures $OUTDIR/results"; do
      script=${entry%%:*}; extra=${entry#*:}
      case "$extra" in *"--pp 2"*) [ "$w" -ge 4 ] || continue ;; esac   # PP2 x EP2 needs 4 ranks
      if [ -f "$script" ] && wanted "$(basename "$script" .py)"; then
        step "$script world size $w"
        timeout 600 python3 "$script" --world-size "$w" --out "$OUTDIR/results" $extra 2>&1 | tee -a "$LOG" | tail -30
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      fi
    done
  done
  if [[ " $STUDIES " == *" triton "* ]] && python3 -c "import overlap.triton_kernels.bench" 2>/dev/null; then
    step "triton local-kernel bench"
    python3 -m overlap.triton_kernels.bench --out "$OUTDIR/results/triton_local_kernels.json" 2>&1 | tee -a "$LOG" | tail -20 || status=1
  fi
fi

step "pack"
# The device tool returns at most 8 files of 16 MiB: results without traces in one archive,
# traces in another, cut to rank 0's when all of them do not fit.
tar czf "$OUTDIR/results.tar.gz" -C "$OUTDIR" --exclude=traces results
if [ -d "$OUTDIR/results/traces" ]; then
  tar czf "$OUTDIR/traces.tar.gz" -C "$OUTDIR/results" traces
  if [ "$(stat -c %s "$OUTDIR/traces.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    (cd "$OUTDIR/results" && tar czf "$OUTDIR/traces.tar.gz" $(find traces -name '*rank0*'))
  fi
fi
ls -la "$OUTDIR" "$OUTDIR/results" | tee -a "$LOG"
echo "suite status: $status" | tee -a "$LOG"
exit $status
