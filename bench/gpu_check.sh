#!/usr/bin/env bash
# The GPU checks in one prepared run (about 8 minutes on a lent H200, under the 10-minute limit
# of one device command): build the CPU core and the CUDA module, run the GPU tests, the GPU
# kernel benchmark (isofast._cuda vs the reference loop, default shapes), then an end-to-end
# `isofast merge --device cuda` of an LLM-shaped bf16 set against `cat` and the CPU merge.
# Everything it prints goes to $OUT/gpu_check.log (or ./gpu_check.log) as well, with the device
# named; the benchmark's JSON goes beside it (bench_gpu.json).
#
#   bash bench/gpu_check.sh                      # on the device machine, from the repository root
#   GPU_CHECK_QUICK=1 bash bench/gpu_check.sh    # build and tests only, no benchmarks
#   GPU_CHECK_SUITE=1 bash bench/gpu_check.sh    # also the whole test suite (minutes more)
#   GPU_CHECK_SECONDS=540 (default): the whole run's budget (run it with a 600 s limit); the
#   benchmark steps shrink their timeouts to what is left, and are skipped, saying so, when
#   too little is.
#
# CUDA libraries: the toolkit's cuBLAS/cuSOLVER when it has them, else the nvidia-cu13 wheel
# folder beside torch (ISOFAST_CUDA_LIBS_ROOT). The reference loop is bench/reference_impl.py
# on torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
BUDGET="${GPU_CHECK_SECONDS:-540}"
step() { printf '\n=== %s (%s, %d s in)\n' "$1" "$(date +%T)" "$SECONDS"; }
left() { echo $((BUDGET - SECONDS)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 --version
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true
nproc

step "build (CPU core + CUDA module, sm_90)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
LIBS_ROOT="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)"
DEFINES=(-Ccmake.define.ISOFAST_CUDA=ON "-Ccmake.define.CMAKE_CUDA_COMPILER=$NVCC"
         -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90)
[ -n "$LIBS_ROOT" ] && [ -d "$LIBS_ROOT/lib" ] && DEFINES+=("-Ccmake.define.ISOFAST_CUDA_LIBS_ROOT=$LIBS_ROOT")
ls .whl/scipy_openblas32-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps .whl/scipy_openblas32-*.whl
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip install -q --no-build-isolation --no-deps . \
  -Cbuild-dir=build/gpu "${DEFINES[@]}" || { echo "BUILD FAILED"; exit 1; }
# From here on, Python imports the installed package, never the source checkout in the
# current folder (which has no compiled modules).
export PYTHONSAFEPATH=1
python3 -c "import isofast._cuda as c; print('isofast._cuda available:', c.available(), c.device_name(0) if c.available() else '')"

step "GPU tests (tests/test_cuda_parity.py, tests/test_device.py, Ray GPU tasks if Ray is there)"
timeout 240 python3 -m pytest tests/test_cuda_parity.py tests/test_device.py \
  tests/test_ray.py::test_gpu_tasks_give_the_local_gpu_bytes -ra -q \
  -p no:cacheprovider --durations=5
GPU_TESTS=$?

SUITE=0
if [ -n "${GPU_CHECK_SUITE:-}" ]; then
  step "whole suite (CUDA build; lint deselected)"
  python3 -m pytest -q -ra -p no:cacheprovider -x --deselect tests/test_lint.py
  SUITE=$?
fi

BENCH=skipped
E2E=skipped
if [ -z "${GPU_CHECK_QUICK:-}" ]; then
  # Keep about 170 s for the end-to-end step; the benchmark starts no new (shape, method)
  # after its --budget and its last one takes up to ~60 s (4096x4096 Iso-CTS, both sides and
  # the float64 reference).
  T_BENCH=$(min 230 $(( $(left) - 170 )))
  if [ "$T_BENCH" -ge 90 ]; then
    step "GPU benchmark: iso_c, iso_cts, tsv_m at T = 8, _cuda.merge_matrix vs bench/reference_impl.py (timeout ${T_BENCH} s)"
    timeout "$T_BENCH" python3 bench/bench_gpu.py --budget $((T_BENCH - 70)) \
      --out "$OUT_DIR/bench_gpu.json"
    BENCH=$?
  else
    step "GPU benchmark skipped: $(left) s left"
  fi

  T_E2E=$(min 240 $(( $(left) - 10 )))
  if [ "$T_E2E" -ge 120 ]; then
    step "end to end: isofast merge --device cuda vs cpu vs cat, LLM bf16 (4096/14336, 2 layers, base + 4) (timeout ${T_E2E} s)"
    timeout "$T_E2E" python3 bench/bench_gpu.py --e2e --methods iso_c,iso_cts \
      --e2e-dir /tmp/isofast-gpu-e2e --cpu-timeout 30 --gpu-timeout 90
    E2E=$?
  else
    step "end to end skipped: $(left) s left"
  fi
fi

step "summary"
echo "GPU tests exit $GPU_TESTS; whole suite exit $SUITE$([ -z "${GPU_CHECK_SUITE:-}" ] && echo ' (not run)'); benchmark $BENCH; end to end $E2E; log: $LOG"
[ "$GPU_TESTS" -eq 0 ] && [ "$SUITE" -eq 0 ]
