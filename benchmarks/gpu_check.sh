#!/usr/bin/env bash
# The one prepared GPU check (device tool, H200 image: python3 with torch 2.11 / triton 3.6 / nvcc 13,
# pytest and hypothesis; no internet). Builds the extension for sm_90a only, runs the GPU tests and every
# benchmark, and leaves logs and CSV rows under $OUT. Run from the repository root:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
set -uo pipefail
FINAL=${OUT:-/tmp/gpu_check}
# The device tool returns at most 8 files: logs go to a work folder, packed into one tarball at the end.
OUT=$FINAL/work
mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

start=$(date +%s)
$PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" >> "$OUT/env.txt"
$PY -c "import sphinx_kernels as sk; print(*sk.backends().values(), sep='\n')" >> "$OUT/env.txt" 2>&1

# GPU tests first (correctness before speed), then the CPU suite's device-parametrised tests on CUDA.
timeout 240 $PY -m pytest -q -x -p no:cacheprovider -m gpu tests > "$OUT/tests_gpu.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/env.txt"
timeout 120 $PY -m pytest -q -p no:cacheprovider -k "cuda" tests > "$OUT/tests_cuda_param.log" 2>&1
echo "cuda-parametrised tests rc=$?" >> "$OUT/env.txt"

# Every backend on one packed multimodal batch in bf16, each against float64 (the make-demo path on CUDA).
timeout 90 $PY -m sphinx_x.cli kernels > "$OUT/demo_kernels.txt" 2>&1
echo "sphinx-x kernels rc=$?" >> "$OUT/env.txt"

# GPU rows only (the CPU rows are measured on the CI-class machine); 120 s each at most.
for bench in "bench_tiles.py" "bench_attention.py --gpu-only" "bench_moe.py --no-cpu" "bench_transformers.py"; do
  name=${bench%%.py*}
  timeout 120 $PY benchmarks/$bench > "$OUT/$name.txt" 2>&1
  echo "$bench rc=$?" >> "$OUT/env.txt"
done
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
cp "$OUT/env.txt" "$FINAL/summary.txt"
tar czf "$FINAL/gpu_check.tgz" -C "$FINAL" work && rm -rf "$OUT"
cat "$FINAL/summary.txt"
