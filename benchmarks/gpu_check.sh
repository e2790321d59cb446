#!/usr/bin/env bash
# The one prepared GPU check (device tool, H200 image: python3 with torch 2.11 / triton 3.6 / nvcc 13,
# pytest and hypothesis; no internet). Builds the extension for sm_90a only, runs the GPU tests, the test
# suites of the three kernel families on CUDA tensors (real Triton, not the interpreter), the kernels demo
# and every benchmark, and leaves logs and CSV rows under $OUT. Run from the repository root:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# Every step stops at a shared deadline (BUDGET_S, default 480 s after the start) so that the tarball is
# always written before the device tool's own limit; steps are ordered correctness first.
set -uo pipefail
FINAL=${OUT:-/tmp/gpu_check}
# The device tool returns at most 8 files: logs go to a work folder, packed into one tarball at the end.
OUT=$FINAL/work
mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-480}))

# step NAME MAX_SECONDS COMMAND...: output to $OUT/NAME.txt, status and time to env.txt.
step() {
  local name=$1 max=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 15)); then
    echo "$name: skipped (deadline)" >> "$OUT/env.txt"
    return
  fi
  ((max > left)) && max=$left
  local t0
  t0=$(date +%s)
  timeout "$max" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: rc=$? in $(($(date +%s) - t0)) s (limit $max s)" >> "$OUT/env.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

step build 200 $PY setup.py -q build_ext --inplace
$PY -c "import sphinx_kernels as sk; print(*sk.backends().values(), sep='\n')" >> "$OUT/env.txt" 2>&1

# Correctness before speed: the GPU-only tests, then the families' suites on CUDA tensors (their DEVICE is
# cuda when a GPU is present, so every Triton test compiles and runs for real, bf16 included).
step tests_gpu 150 $PY -m pytest -q -x -p no:cacheprovider -m gpu tests
step tests_cuda 150 $PY -m pytest -q -p no:cacheprovider -m "not gpu" \
  tests/test_attention.py tests/test_moe.py tests/test_tiles.py tests/test_packing.py
step flash_matrix 120 $PY -m pytest -q -p no:cacheprovider -k triton tests/test_attention_flash_matrix.py
step demo_kernels 60 $PY -m sphinx_x.cli kernels

# GPU rows only (the CPU rows are measured on the CI-class machine).
step bench_attention 90 $PY benchmarks/bench_attention.py --gpu-only
step bench_moe 90 $PY benchmarks/bench_moe.py --no-cpu
step bench_tiles 60 $PY benchmarks/bench_tiles.py
step bench_transformers 60 $PY benchmarks/bench_transformers.py
step bench_e2e 150 $PY benchmarks/bench_e2e.py --gpu --parts train,generate

cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
echo "total: $(($(date +%s) - START)) s" >> "$OUT/env.txt"
cp "$OUT/env.txt" "$FINAL/summary.txt"
tar czf "$FINAL/gpu_check.tgz" -C "$FINAL" work && rm -rf "$OUT"
cat "$FINAL/summary.txt"
