#!/usr/bin/env bash
# The one prepared GPU check (device tool, H200 image: python3 with torch 2.11 / triton 3.6 / nvcc 13,
# pytest and hypothesis; no internet). Builds the extension for sm_90a only, runs the GPU tests (the
# flash-attn matrix's GPU-size cases among them), the end-to-end benchmark at GPU sizes, the test suites of
# the three kernel families on CUDA tensors (real Triton, not the interpreter), the kernel benchmarks and the
# kernels demo, and leaves logs and CSV rows under $OUT. Run from the repository root:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# Every step has its own cap and all stop at one shared deadline (BUDGET_S, default 480 s after the start),
# so the tarball is always written before the device tool's own limit. The caps add up to 455 s, under the
# budget, so no step is skipped because an earlier one ran long; the order puts what matters most first:
# build, GPU correctness, the headline end-to-end numbers, the families' suites, kernel benchmarks, the demo.
# Each step's time is in summary.txt: resize the caps from it.
set -uo pipefail
FINAL=${OUT:-/tmp/gpu_check}
# The device tool returns at most 8 files: logs go to a work folder, packed into one tarball at the end.
OUT=$FINAL/work
mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1 # a step stopped at its cap keeps its output up to that moment
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-480}))

# step NAME MAX_SECONDS COMMAND...: output to $OUT/NAME.txt, status and time to env.txt. At its cap a step
# gets SIGINT first (pytest then prints the summary of what ran; a benchmark keeps the rows it wrote), and
# SIGKILL 5 s later.
step() {
  local name=$1 max=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 5))
  if ((left < 15)); then
    echo "$name: skipped (deadline)" >> "$OUT/env.txt"
    return
  fi
  ((max > left)) && max=$left
  local t0
  t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$max" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: rc=$? in $(($(date +%s) - t0)) s (cap $max s)" >> "$OUT/env.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

PYTEST=($PY -m pytest -q -rfE -p no:cacheprovider --durations=10)
step build 130 $PY setup.py -q build_ext --inplace
timeout 30 $PY -c "import sphinx_kernels as sk; print(*sk.backends().values(), sep='\n')" \
  >> "$OUT/env.txt" 2>&1

# Correctness first: every test marked gpu (the flash-attn matrix's GPU-size cases on the Triton kernels,
# bf16, flash-attn's own sequence lengths, and the families' GPU-only tests). No -x: one failure must not
# hide the rest.
step tests_gpu 80 "${PYTEST[@]}" -m gpu tests
# The headline numbers next (the 1B-class preset, bf16): before the long suites, so no deadline skips them.
step bench_e2e 90 $PY benchmarks/bench_e2e.py --gpu --parts train,generate
# The families' suites on CUDA tensors (their DEVICE is cuda when a GPU is present, so every Triton test
# compiles and runs for real, bf16 included), and the flash-attn matrix's small cases on CUDA.
step tests_cuda 60 "${PYTEST[@]}" -m "not gpu" \
  tests/test_attention.py tests/test_moe.py tests/test_tiles.py tests/test_packing.py
step flash_matrix 25 "${PYTEST[@]}" -m "not gpu" -k triton tests/test_attention_flash_matrix.py

# Kernel benchmarks: GPU rows only where the benchmark can leave the CPU out (the CPU rows are measured on
# the CI-class machine).
# --no-sweep: the sequence-length sweep (5 lengths x 4 candidates) does not fit this step's cap; it runs in
# `make bench` (python benchmarks/bench_attention.py --gpu-only on a lent GPU).
step bench_attention 20 $PY benchmarks/bench_attention.py --gpu-only --no-sweep
step bench_moe 20 $PY benchmarks/bench_moe.py --no-cpu
step bench_tiles 10 $PY benchmarks/bench_tiles.py --rounds 3
step bench_transformers 10 $PY benchmarks/bench_transformers.py
step demo_kernels 10 $PY -m sphinx_x.cli kernels

cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
echo "total: $(($(date +%s) - START)) s" >> "$OUT/env.txt"
cp "$OUT/env.txt" "$FINAL/summary.txt"
tar czf "$FINAL/gpu_check.tgz" -C "$FINAL" work && rm -rf "$OUT"
cat "$FINAL/summary.txt"
