#!/usr/bin/env bash
# Seed sweeps: proof that the accuracy rule (tests/conftest.py) holds beyond the seeds CI happens to draw.
# Each part runs its accuracy tests --seed-repeat N times, every round with a fresh logged seed, and appends
# one row per part to tests/seed_sweeps.csv (date, CPU, its widest vector ISA, part, rounds, passed, failed,
# the failing seeds to replay with SPHINX_TEST_SEED=...).
#
#   kernels-default   the C++ CPU kernels' accuracy tests (the SwiGLU experts, permutation and routing on the
#                     `cpu` backend; each code path of the tile kernel) against the extension as `make build`
#                     makes it (AVX2 / AVX-512 target_clones on x86)
#   kernels-portable  the same tests against a -DSPHINX_KERNELS_PORTABLE build (plain C++ loops, what non-x86
#                     hosts get), built in a scratch copy under build/seed_sweep/portable
#   pytorch-engines   the paths that run PyTorch's own CPU kernels, which the C++ build does not touch: the MoE
#                     `torch` and `grouped_mm` backends and the peers' adapters, the CPU attention engines, RoPE
#   triton            the Triton kernels in the interpreter, at TRITON_SEEDS rounds (~1 s per case there)
#
# Usage: bash tests/seed_sweep.sh [part ...]     (default: all four; needs `make build` first)
# Env:   SEEDS (300), TRITON_SEEDS (10), PYTHON (.venv/bin/python), SWEEP_LOGS (build/seed_sweep: logs;
#        a separate folder per concurrent run)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
SEEDS=${SEEDS:-300}
TRITON_SEEDS=${TRITON_SEEDS:-10}
LOGS=${SWEEP_LOGS:-$ROOT/build/seed_sweep}
CSV=$ROOT/tests/seed_sweeps.csv
mkdir -p "$LOGS"

cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/,/ /g')
isa=scalar
grep -qw avx2 /proc/cpuinfo && isa=avx2
grep -qw avx512f /proc/cpuinfo && isa=avx512
[ -f "$CSV" ] || echo "date,cpu,cores,isa,part,rounds,passed,failed,failing_seeds" > "$CSV"

KERNEL_TESTS=(tests/test_moe.py tests/test_tiles.py::test_cpu_kernel_paths_meet_the_contract
    -k "cpu and not opcheck and not compile and not triton")
PYTORCH_TESTS=(tests/test_moe.py tests/test_moe_peers.py tests/test_attention.py tests/test_attention_flash_matrix.py
    -k "(attention or not cpu) and not triton and not opcheck and not compile")
TRITON_TESTS=(tests/test_moe.py tests/test_attention.py tests/test_attention_flash_matrix.py tests/test_tiles.py
    -k "triton and not opcheck and not compile and not sm90")

# A copy of the tracked files with the portable extension, rebuilt only when the C++ sources or the build changed.
portable_tree() {
    local tree=$LOGS/portable
    rm -rf "$tree.new" && mkdir -p "$tree.new"
    git ls-files -z | xargs -0 cp --parents -t "$tree.new"
    if [ -d "$tree" ] && diff -rq "$tree/csrc" "$tree.new/csrc" > /dev/null && cmp -s setup.py "$tree/setup.py"; then
        mv "$tree"/sphinx_kernels/_C*.so "$tree.new/sphinx_kernels/" 2> /dev/null
        mv "$tree/build" "$tree.new/" 2> /dev/null
    fi
    rm -rf "$tree" && mv "$tree.new" "$tree"
    if ! ls "$tree"/sphinx_kernels/_C*.so > /dev/null 2>&1; then
        (cd "$tree" && SPHINX_KERNELS_CUDA=0 SPHINX_KERNELS_PORTABLE=1 "$PY" setup.py -q build_ext --inplace) \
            > "$LOGS/portable-build.log" 2>&1 || { tail -20 "$LOGS/portable-build.log" >&2; return 1; }
    fi
    echo "$tree"
}

status=0
run_part() {
    local part=$1 tree=$2 rounds=$3
    shift 3
    local log=$LOGS/$part.log
    echo "[$part] $rounds rounds in $tree (log: $log)"
    (cd "$tree" && PYTHONPATH=$tree "$PY" -m pytest -q -p no:cacheprovider --seed-repeat "$rounds" "$@") \
        > "$log" 2>&1
    local rc=$?
    local summary passed failed seeds
    summary=$(tail -1 "$log")
    passed=$(grep -oE "[0-9]+ passed" <<< "$summary" | cut -d' ' -f1)
    failed=$(grep -oE "[0-9]+ (failed|errors?)" <<< "$summary" | awk '{n += $1} END {print n + 0}')
    seeds=$(grep -oE "SPHINX_TEST_SEED=[0-9]+" "$log" | cut -d= -f2 | sort -u | paste -sd' ')
    echo "$(date -u +%F),$cpu,$(nproc),$isa,$part,$rounds,${passed:-0},${failed:-0},$seeds" >> "$CSV"
    echo "[$part] $summary${seeds:+ (failing seeds: $seeds)}"
    [ "$rc" -eq 0 ] || status=1
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(kernels-default kernels-portable pytorch-engines triton)
for part in "${parts[@]}"; do
    case $part in
    kernels-default) run_part "$part" "$ROOT" "$SEEDS" "${KERNEL_TESTS[@]}" ;;
    kernels-portable)
        tree=$(portable_tree) || exit 1
        run_part "$part" "$tree" "$SEEDS" "${KERNEL_TESTS[@]}"
        ;;
    pytorch-engines) run_part "$part" "$ROOT" "$SEEDS" "${PYTORCH_TESTS[@]}" ;;
    triton) run_part "$part" "$ROOT" "$TRITON_SEEDS" "${TRITON_TESTS[@]}" ;;
    *) echo "unknown part '$part' (kernels-default, kernels-portable, pytorch-engines, triton)" >&2; exit 2 ;;
    esac
done
exit $status
