#!/usr/bin/env bash
# The GPU checks in one prepared run (about 5-8 minutes on a lent H200): build the CPU core and
# the CUDA module, run every GPU test and the whole suite, then the GPU benchmarks. Everything
# it prints goes to $OUT/gpu_check.log (or ./gpu_check.log) as well, with the device named.
#
#   bash bench/gpu_check.sh            # on the device machine, from the repository root
#   GPU_CHECK_QUICK=1 bash bench/gpu_check.sh   # tests only, no benchmarks
#
# CUDA libraries: the toolkit's cuBLAS/cuSOLVER when it has them, else the nvidia-cu13 wheel
# folder beside torch (ISOFAST_CUDA_LIBS_ROOT). Peers are not needed: the reference loop is
# bench/reference_impl.py on torch.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 --version
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true

step "build (CPU core + CUDA module, sm_90)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
LIBS_ROOT="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)"
DEFINES=(-Ccmake.define.ISOFAST_CUDA=ON "-Ccmake.define.CMAKE_CUDA_COMPILER=$NVCC"
         -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90)
[ -n "$LIBS_ROOT" ] && [ -d "$LIBS_ROOT/lib" ] && DEFINES+=("-Ccmake.define.ISOFAST_CUDA_LIBS_ROOT=$LIBS_ROOT")
ls .whl/scipy_openblas32-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps .whl/scipy_openblas32-*.whl
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip install -q --no-build-isolation --no-deps . \
  -Cbuild-dir=build/gpu "${DEFINES[@]}" || { echo "BUILD FAILED"; exit 1; }
python3 -c "import isofast._cuda as c; print('isofast._cuda available:', c.available())"

step "GPU tests"
PYTHONSAFEPATH=1 python3 -m pytest tests/test_cuda_parity.py tests/test_polar_iter.py -ra -q \
  -p no:cacheprovider
GPU_TESTS=$?

step "whole suite (CUDA build; lint skipped when ruff/mypy are missing)"
PYTHONSAFEPATH=1 python3 -m pytest -q -ra -p no:cacheprovider -x --deselect tests/test_lint.py
SUITE=$?

if [ -z "${GPU_CHECK_QUICK:-}" ]; then
  step "GPU benchmark: Iso-C, isofast._cuda vs the torch.linalg.svd loop"
  timeout 300 python3 bench/bench_gpu.py --shapes vit-l,llm --repeats 2 || echo "bench_gpu failed"
fi

step "summary"
echo "GPU tests exit $GPU_TESTS, whole suite exit $SUITE; log: $LOG"
[ "$GPU_TESTS" -eq 0 ] && [ "$SUITE" -eq 0 ]
