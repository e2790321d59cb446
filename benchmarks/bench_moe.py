"""Benchmark the grouped MoE expert layer (`moe_mlp`, forward and forward + backward).

CPU: Mixtral's shape scaled down 8x (d 512, f 1792, E 8, top 2, 2048 tokens), each backend that is a CPU
backend (the Triton interpreter is a correctness tool, not one) against the per-expert loop reference and
against ``torch._grouped_mm`` on tokens already sorted by expert (the issue's peer: no routing, no
permutation), as median ratios; the ceiling is this CPU's dense GEMM rate at the same FLOPs.

GPU (when CUDA is available): Mixtral shapes (d 4096, f 14336, E 8, top 2; 4k, 16k, 32k tokens; balanced
and skewed routing), bf16, TFLOP/s of the expert MLP per backend next to a dense GEMM of the same FLOPs.

    PYTHONPATH=. python benchmarks/bench_moe.py [--quick] [--no-gpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Row, environment, median_seconds, print_table, round_robin_medians, write_rows  # noqa: E402

import sphinx_kernels  # noqa: E402
from sphinx_kernels import _backend, moe  # noqa: E402


def expert_flops(tokens: int, top_k: int, d: int, f: int, backward: bool) -> float:
    """3 GEMMs of 2*d*f per (token, slot) forward; backward is twice that (dX and dW per GEMM)."""
    fwd = 6.0 * tokens * top_k * d * f
    return fwd * (3.0 if backward else 1.0)


def make_layer(tokens, d, f, E, dtype, device, *, skew=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    rw = torch.randn(E, d, generator=g) / d**0.5
    if skew:
        # A constant input feature steers the router: expert e gets logit bias -skew * e (Zipf-like load).
        x[:, 0] = 1.0
        rw[:, 0] = -skew * torch.arange(E, dtype=torch.float32)
    w1 = torch.randn(E, d, f, generator=g) / d**0.5
    w3 = torch.randn(E, d, f, generator=g) / d**0.5
    w2 = torch.randn(E, f, d, generator=g) / f**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, rw, w1, w3, w2)]


def moe_step(tensors, top_k, backend, backward):
    leaves = [t.detach().requires_grad_(backward) for t in tensors]
    grad = torch.randn_like(tensors[0])  # a fixed output gradient, as the peer's
    aux_weight = torch.tensor(0.01, device=grad.device)

    def step():
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(backward):
            out, aux = moe.moe_mlp(*leaves, top_k=top_k, backend=backend)
            if backward:
                torch.autograd.backward([out, aux.load_balancing_loss], [grad, aux_weight])
        return out

    return step


def sorted_peer_step(tensors, top_k, backward, expert_mlp):
    """A peer that runs `expert_mlp(x_sorted, w1, w3, w2, offsets, bounds)` on tokens already sorted by expert:
    the expert MLP alone, no routing or permutation (the issue's peers). `bounds`: host (start, end) per
    expert, read once here, outside the timed step."""
    x, rw, w1, w3, w2 = tensors
    with torch.no_grad():
        _, ids = torch.topk(x.float() @ rw.float().T, top_k, dim=-1)
        x_sorted, _, offsets = moe.permute_ref(x, ids, rw.shape[0])
    ends = offsets.tolist()
    bounds = list(zip([0, *ends[:-1]], ends, strict=True))
    leaves = [t.detach().requires_grad_(backward) for t in (x_sorted, w1, w3, w2)]
    grad = torch.randn_like(x_sorted)

    def step():
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(backward):
            y = expert_mlp(*leaves, offsets, bounds)
            if backward:
                y.backward(grad)
        return y

    return step


def grouped_mm_peer_step(tensors, top_k, backward):
    """torch._grouped_mm on sorted tokens."""

    def mlp(xs, a, b, c, offsets, _bounds):
        h = F.silu(torch._grouped_mm(xs, a, offsets)) * torch._grouped_mm(xs, b, offsets)
        return torch._grouped_mm(h, c, offsets)

    return sorted_peer_step(tensors, top_k, backward, mlp)


def loop_peer_step(tensors, top_k, backward):
    """A per-expert loop of matmuls on sorted tokens (the issue's "loop")."""

    def mlp(xs, a, b, c, _offsets, bounds):
        return torch.cat(
            [(F.silu(xs[s:e] @ a[i]) * (xs[s:e] @ b[i])) @ c[i] for i, (s, e) in enumerate(bounds)]
        )

    return sorted_peer_step(tensors, top_k, backward, mlp)


def candidates(tensors, top_k, backends, backward) -> dict:
    """name -> step: each backend's `moe_mlp`, and the sorted-token peers (the loop; `_grouped_mm` where present)."""
    fns = {b: moe_step(tensors, top_k, b, backward) for b in backends}
    fns["loop sorted (peer)"] = loop_peer_step(tensors, top_k, backward)
    if hasattr(torch, "_grouped_mm"):
        fns["_grouped_mm sorted (peer)"] = grouped_mm_peer_step(tensors, top_k, backward)
    return fns


def dense_rate(tokens, top_k, d, f, dtype, device) -> float:
    """FLOP/s of one dense GEMM with the expert MLP's forward FLOPs: (T*k, d) @ (d, 3f)."""
    a = torch.randn(tokens * top_k, d, dtype=dtype, device=device)
    b = torch.randn(d, 3 * f, dtype=dtype, device=device)
    seconds = median_seconds(lambda: a @ b, device, repeats=5, warmup=1)
    return 2.0 * tokens * top_k * d * 3 * f / seconds


def cpu_rows(quick: bool) -> list[Row]:
    tokens, d, f, E, k = (512, 256, 896, 8, 2) if quick else (2048, 512, 1792, 8, 2)
    shape = f"T={tokens} d={d} f={f} E={E} k={k} fp32"
    tensors = make_layer(tokens, d, f, E, torch.float32, "cpu")
    ceiling = dense_rate(tokens, k, d, f, torch.float32, "cpu") / 1e12
    rows = []
    backends = ["torch"] + [
        b for b in ("cpu", "grouped_mm") if _backend._runs_on(b, torch.device("cpu"), "moe_permute")[0]
    ]
    env = environment("cpu")  # measured on the CPU, also on a machine with a GPU
    for backward in (False, True):
        case = f"moe_mlp {'fwd+bwd' if backward else 'fwd'} (cpu)"
        flops = expert_flops(tokens, k, d, f, backward)
        timings = round_robin_medians(candidates(tensors, k, backends, backward), rounds=3 if quick else 5)
        peer = timings.get("_grouped_mm sorted (peer)")
        for b, s in timings.items():
            note = f"{timings['torch'] / s:.2f}x torch, {timings['loop sorted (peer)'] / s:.2f}x loop-sorted"
            if peer:
                note += f", {peer / s:.2f}x _grouped_mm-sorted"
            rows.append(
                Row("moe", case, b, shape, s, flops / s / 1e12, "TFLOP/s", round(ceiling, 4), note, env)
            )
    return rows


def gpu_rows(quick: bool, budget_s: float) -> list[Row]:
    """Mixtral shapes, bf16. Rows are appended to the CSV case by case and the sweep stops once `budget_s` is
    spent (the prepared GPU check gives each benchmark 120 s, autotuning included)."""
    d, f, E, k = 4096, 14336, 8, 2
    dtype = torch.bfloat16
    start = time.monotonic()
    rows = []
    backends = [
        b
        for b in ("triton", "cuda", "grouped_mm", "megablocks", "torch")
        if _backend._runs_on(b, torch.device("cuda"), "moe_permute")[0]
    ]
    for tokens in (4096,) if quick else (4096, 16384, 32768):
        ceiling = dense_rate(tokens, k, d, f, dtype, "cuda") / 1e12
        for skew in (0.0, 1.0):
            tensors = make_layer(tokens, d, f, E, dtype, "cuda", skew=skew)
            routing = "skewed" if skew else "balanced"
            shape = f"T={tokens} d={d} f={f} E={E} k={k} bf16 {routing}"
            for backward in (True, False):
                if time.monotonic() - start > budget_s:
                    print(f"time budget of {budget_s:.0f} s spent: stopping the GPU sweep")
                    return rows
                case = f"moe_mlp {'fwd+bwd' if backward else 'fwd'} T={tokens} {routing}"
                flops = expert_flops(tokens, k, d, f, backward)
                case_rows = []
                for name, fn in candidates(tensors, k, backends, backward).items():
                    try:
                        s = median_seconds(fn, "cuda")
                    except Exception as exc:  # a peer failing on a shape must not hide the other rows
                        print(f"  {name}: failed ({type(exc).__name__}: {exc})")
                        continue
                    note = "ceiling: dense bf16 GEMM of the same FLOPs"
                    case_rows.append(
                        Row("moe", case, name, shape, s, flops / s / 1e12, "TFLOP/s", round(ceiling, 1), note)
                    )
                print_table(case_rows, baseline="_grouped_mm sorted (peer)")
                write_rows(case_rows, "moe")
                rows += case_rows
            del tensors
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    parser.add_argument("--no-gpu", action="store_true", help="CPU rows only")
    parser.add_argument("--no-cpu", action="store_true", help="GPU rows only")
    parser.add_argument(
        "--gpu-budget",
        type=float,
        default=100.0,
        help="seconds for the whole run: the GPU sweep stops when they are spent",
    )
    args = parser.parse_args()
    start = time.monotonic()
    print("backends:", *sphinx_kernels.backends().values(), sep="\n  ")
    rows = []
    if not args.no_cpu:
        cpu = cpu_rows(args.quick)
        print_table(cpu, baseline="_grouped_mm sorted (peer)")
        for r in cpu:
            print(f"  {r.case:<22} {r.backend:<26} {r.note}")
        rows += cpu
    if rows:
        print(f"\nCPU rows appended to {write_rows(rows, 'moe')}")
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_rows(args.quick, args.gpu_budget - (time.monotonic() - start))


if __name__ == "__main__":
    main()
