#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (none was available when it was written;
# it has not been run yet). Runs the CUDA tests, then reduced GPU runs of the benchmarks,
# within about 8 minutes. Results go to $OUT (default benchmarks/results/gpu), logs included.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root, the venv's python first in
# PATH or PYTHON=/path/to/python).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
status=0
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log, never stop the script
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc, $((SECONDS - start)) s; last lines:"
  tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
  [ "$rc" -eq 0 ] || status=1
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; \
print(torch.__version__, torch.cuda.get_device_name())" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1

# 1. tests: the CUDA ones (skipped without a GPU) and the device-sensitive modules (~2 min)
step 180 tests "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_mixed_precision.py tests/test_torch_func.py tests/test_benchmark_device.py \
  tests/test_layers.py -k "cuda or device or autocast or Cuda"
# 2. reduced benchmarks on the GPU (each prints peak CUDA memory)
step 90 solvers "$PY" -m benchmarks.solvers --quick --device cuda --out "$OUT"
step 60 steady_states "$PY" -m benchmarks.steady_states --quick --device cuda --out "$OUT"
step 90 mixed_precision_fp16 "$PY" -m benchmarks.paper --device cuda --autocast float16 \
  --epochs 4 --seeds 0 --tasks digits-mlp --models "DEQ(ode, ptc)" --name mixed_precision_fp16 \
  --threads 1 --out "$OUT"
step 90 layers "$PY" -m benchmarks.paper --device cuda --epochs 1 --seeds 0 --tasks digits-mlp \
  --models NeuralODE "NeuralODE adjoint" "DEQ(ode, ptc)" "DEQ(ode, dopri5) unrolled" \
  "DEQ(anderson)" --name layers --threads 1 --out "$OUT"
step 120 paper_quick "$PY" -m benchmarks.paper --quick --device cuda --tasks digits-mlp \
  --models NeuralODE "DEQ(ode, ptc)" "DEQ(anderson)" --out "$OUT"
step 60 step_profile "$PY" -m benchmarks.paper --profile --device cuda --epochs 1 --seeds 0 \
  --tasks digits-mlp --models "DEQ(ode, ptc)" --name step_profile --threads 1 --out "$OUT"
echo "gpu_check: done (status $status); outputs and logs in $OUT"
exit $status
