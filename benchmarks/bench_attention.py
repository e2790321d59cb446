"""Varlen packed attention: our packed path against padded and per-sequence SDPA (and peers on the GPU).

    python benchmarks/bench_attention.py [--sequences 8] [--heads 4 --kv-heads 1 --head-dim 64] [--repeats 7]
    python benchmarks/bench_attention.py --gpu-only       # the GPU rows alone (needs CUDA)
    python benchmarks/bench_attention.py --threads 1      # CPU rows on a shared machine (see below)

On a 2-core machine shared with other jobs, 2 OpenMP threads made single runs 2-40x slower at random
(oversubscribed spin-waits); one thread gave runs within 5% of each other.

CPU: a multimodal length mix (each sequence 300..3000 tokens, drawn with a fixed seed), causal, fp32, bf16 and
fp16, forward + backward, median of repeated runs (round-robin over the variants), as ratios against padded SDPA:
every sequence right-padded to the longest and one batched ``scaled_dot_product_attention``, either
``is_causal=True`` (``padded_sdpa``: with right padding the causal mask already hides the padding keys from
every real query, so this is the cheapest correct padded baseline) or with the explicit causal + key-padding
mask a padded pipeline passes (``padded_sdpa(mask)``, Hugging Face's 4-D mask); and against per-sequence SDPA
(a Python loop, K/V heads via ``enable_gqa``, plain autograd). Our CPU path is the ``torch`` backend (the
automatic choice on CPU): the same CPU flash kernels per sequence, but inside one registered op whose backward
writes packed gradients directly and repeats k/v per q head (so it is not the per-sequence loop's autograd).
In fp16 all of it runs in fp32 (this CPU has no fast fp16 kernel), in bf16 the backward runs plain ops with
bf16 GEMMs for S, dP and dQ and float32 GEMMs and sums for dK/dV (PyTorch's low-precision CPU backward misses
flash-attn's accuracy bar; see sphinx_kernels/attention/cpu.py): the bf16/fp16 rows show what that costs
against per-sequence SDPA in the same dtype. The fp16 rows leave out the padded variants (native fp16 SDPA on
the padded batch takes minutes per round here).

Sequence-length sweep (CPU and GPU; ``--no-sweep`` leaves it out): the same comparison, causal fwd+bwd, at a
fixed token count per step (CPU 8192, GPU 16384) for longest sequences of 512 to 4096 tokens (GPU 1k to
16k): one sequence of that length, the others drawn between 1/8 of it and it, so that padding waste grows
with the spread as in real data. Case ``cpu seqlen sweep`` / ``gpu seqlen sweep`` (dtype appended unless
float32), the longest sequence in the shape's ``Lmax`` (benchmarks/plots.py draws throughput against it).
CPU dtypes: ``--sweep-dtypes`` (default float32); GPU: bf16, without flex_attention (it recompiles for every
new length).

Decode (CPU and GPU): one new query per sequence against its cached keys (Hq 32, Hkv 8, D 128), our packed
cache with ``cu_seqlens_k`` against one batched SDPA over the right-padded cache with a key-padding mask; the
rate is K/V bytes read per second.

GPU (when CUDA is present): TFLOP/s forward and forward+backward, causal, d=128, bf16, 16k tokens, for one
long sequence and for a skewed mix (one 8k document and many short ones): ``triton`` vs padded SDPA vs
``flex_attention`` with a document mask vs ``flash_attn`` (when importable). FLOPs counted as flash-attn
does: forward ``4 * sum(L^2) * D * Hq / 2`` (causal), backward 2.5x forward.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from harness import (  # noqa: E402
    Row,
    environment,
    median_seconds,
    print_table,
    pytest_benchmark_test,
    round_robin_medians,
    write_rows,
)

from sphinx_kernels import varlen_attention  # noqa: E402


def cu_seqlens_of(lengths: list[int], device: str) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def causal_flops(lengths: list[int], heads: int, head_dim: int, backward: bool) -> float:
    fwd = 4 * sum(n * n for n in lengths) * head_dim * heads / 2
    return fwd * (3.5 if backward else 1.0)


def make_inputs(lengths, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v, do = (
        torch.randn(total, h, head_dim, generator=gen).to(device=device, dtype=dtype)
        for h in (heads, kv_heads, kv_heads, heads)
    )
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(T, H, D) packed -> (B, H, Lmax, D) right-padded with zeros."""
    lmax = max(lengths)
    out = x.new_zeros(len(lengths), lmax, x.shape[1], x.shape[2])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start : start + n]
        start += n
    return out.transpose(1, 2)


def step_fns(lengths, q, k, v, do, device, backward: bool, flex: bool = True):
    """name -> zero-argument callable running one step (forward, or forward + backward)."""
    cu = cu_seqlens_of(lengths, device)
    lmax = max(lengths)
    group = q.shape[1] // k.shape[1]

    def finish(out, grad):
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    def packed(backend):
        return lambda: finish(varlen_attention(q, k, v, cu, lmax, backend=backend), do)

    # Padded inputs built once, outside the timed region (a real padded pipeline holds them already).
    qp, kp, vp, dop = (padded(t.detach(), lengths) for t in (q, k, v, do))
    qp.requires_grad_(), kp.requires_grad_(), vp.requires_grad_()

    def padded_sdpa():
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=group > 1)
        if backward:
            torch.autograd.grad(out, (qp, kp, vp), dop)

    # What a padded pipeline that passes its attention mask does (Hugging Face's 4-D mask): causal AND the
    # key is not padding, as a boolean (B, 1, Lmax, Lmax) mask.
    keys_ok = torch.arange(lmax, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    causal = torch.ones(lmax, lmax, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & keys_ok[:, None, :])[:, None]

    def padded_sdpa_mask():
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=group > 1)
        if backward:
            torch.autograd.grad(out, (qp, kp, vp), dop)

    def per_sequence_sdpa():
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1),
                k[sl].transpose(0, 1),
                v[sl].transpose(0, 1),
                is_causal=True,
                enable_gqa=group > 1,
            )
            outs.append(o.transpose(0, 1))
            start += n
        finish(torch.cat(outs), do)

    fns = {"padded_sdpa": padded_sdpa, "padded_sdpa(mask)": padded_sdpa_mask}
    if device == "cpu" and q.dtype == torch.float16:
        fns = {}
    if device == "cpu":
        fns["per_sequence_sdpa"] = per_sequence_sdpa
        fns["sphinx_kernels(torch)"] = packed("torch")
        return fns
    fns["sphinx_kernels(triton)"] = packed("triton")
    if flex:
        fns.update(_flex(lengths, q, k, v, do, backward))
    if _has_flash_attn():
        fns["flash_attn"] = packed("flash_attn")
    return fns


def _flex(lengths, q, k, v, do, backward):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return {}
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
    )

    def document_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    total = q.shape[0]
    mask = create_block_mask(document_causal, None, None, total, total, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    qf, kf, vf = (t.detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
    dof = do.transpose(0, 1)[None]

    def run():
        out = flex(qf, kf, vf, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        if backward:
            torch.autograd.grad(out, (qf, kf, vf), dof)

    return {"flex_attention(doc mask)": run}


def measure(
    case, lengths, heads, kv_heads, head_dim, dtype, device, repeats, backward, flex: bool = True
) -> list[Row]:
    q, k, v, do = make_inputs(lengths, heads, kv_heads, head_dim, dtype, device)
    flops = causal_flops(lengths, heads, head_dim, backward)
    shape = (
        f"B={len(lengths)} T={sum(lengths)} Lmax={max(lengths)} Hq={heads} Hkv={kv_heads} D={head_dim} "
        f"{str(dtype).removeprefix('torch.')} causal {'fwd+bwd' if backward else 'fwd'}"
    )
    fns = step_fns(lengths, q, k, v, do, device, backward, flex)
    if device == "cpu":
        medians = round_robin_medians(fns, repeats)
    else:
        medians = {name: median_seconds(fn, device, repeats=repeats, warmup=1) for name, fn in fns.items()}
    rows = []
    for name, seconds in medians.items():
        unit = "TFLOP/s" if device == "cuda" else "GFLOP/s"
        rate = flops / seconds / (1e12 if device == "cuda" else 1e9)
        ceiling = "FA2 fwd ~190-335 causal (H100)" if device == "cuda" and not backward else ""
        rows.append(
            Row(
                "attention",
                case,
                name,
                shape,
                seconds,
                rate,
                unit,
                ceiling,
                "useful causal FLOPs",
                environment(device),
            )
        )
    return rows


def decode_rows(case, lengths, dtype, device, repeats, heads=32, kv_heads=8, head_dim=128) -> list[Row]:
    """One decoding step: a new query per sequence against its cached keys, the cache packed (ours, with
    `cu_seqlens_k`) or right-padded with a key-padding mask (the padded peer; its cache is laid out outside the
    timed region, as a padded KV cache holds it). Memory-bound: the rate is K/V bytes read per second."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k, v = (
        torch.randn(sum(lengths), kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        for _ in "kv"
    )
    cu_k, one_each = cu_seqlens_of(lengths, device), cu_seqlens_of([1] * len(lengths), device)
    kp, vp = padded(k, lengths), padded(v, lengths)
    keys_ok = (
        torch.arange(max(lengths), device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    )
    mask = keys_ok[:, None, None, :]
    fns = {
        "padded_sdpa": lambda: F.scaled_dot_product_attention(
            q[:, :, None], kp, vp, attn_mask=mask, enable_gqa=True
        )
    }
    names = ["torch"] if device == "cpu" else ["triton"] + (["flash_attn"] if _has_flash_attn() else [])
    for name in names:
        fns[f"sphinx_kernels({name})"] = lambda name=name: varlen_attention(
            q, k, v, one_each, 1, cu_seqlens_k=cu_k, max_seqlen_k=max(lengths), backend=name
        )
    with torch.no_grad():
        medians = round_robin_medians(fns, repeats, device)
    shape = (
        f"B={len(lengths)} cache T={sum(lengths)} Lmax={max(lengths)} Hq={heads} Hkv={kv_heads} D={head_dim} "
        f"{str(dtype).removeprefix('torch.')} 1 query per sequence"
    )
    kv_bytes = 2 * k.numel() * k.element_size()
    return [
        Row(
            "attention",
            case,
            name,
            shape,
            sec,
            kv_bytes / sec / 1e9,
            "GB/s",
            "",
            "K/V bytes read",
            environment(device),
        )
        for name, sec in medians.items()
    ]


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def sweep_lengths(longest: int, total: int, rng: random.Random) -> list[int]:
    """Sequence lengths summing to `total`: one of `longest`, the others drawn in ``[longest // 8, longest]``
    (the last one cut to fit)."""
    lengths = [longest]
    while sum(lengths) < total:
        lengths.append(min(rng.randint(max(longest // 8, 1), longest), total - sum(lengths)))
    return lengths


def sweep_rows(
    device: str, longest: list[int], total: int, dtypes, heads, kv_heads, head_dim, args
) -> list[Row]:
    """Throughput against the longest sequence at a fixed token count (module docstring), fwd+bwd, causal."""
    rows = []
    where = "gpu" if device == "cuda" else "cpu"
    for dtype in dtypes:
        for lmax in longest:
            lengths = sweep_lengths(lmax, total, random.Random(args.seed + lmax))
            case = f"{where} seqlen sweep" + (
                "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
            )
            rows += measure(
                case, lengths, heads, kv_heads, head_dim, dtype, device, args.repeats, True, flex=False
            )
    return rows


def cpu_rows(args) -> list[Row]:
    rng = random.Random(args.seed)
    lengths = [rng.randint(300, 3000) for _ in range(args.sequences)]
    rows = []
    for name in filter(None, args.dtypes.split(",")):  # --dtypes "": the sweep and decode rows only
        dtype = getattr(torch, name)
        case = "cpu multimodal mix 300..3000" + ("" if dtype == torch.float32 else f" {name}")
        rows += measure(
            case, lengths, args.heads, args.kv_heads, args.head_dim, dtype, "cpu", args.repeats, True
        )
    if not args.no_sweep:
        dtypes = [getattr(torch, name) for name in args.sweep_dtypes.split(",")]
        rows += sweep_rows(
            "cpu", [512, 1024, 2048, 4096], 8192, dtypes, args.heads, args.kv_heads, args.head_dim, args
        )
    if args.no_decode:
        return rows
    return rows + decode_rows("cpu decode, caches 300..3000", lengths, torch.float32, "cpu", 3 * args.repeats)


def gpu_rows(args) -> list[Row]:
    total = 16384
    rng = random.Random(args.seed)
    skewed = [8192]
    while sum(skewed) < total:
        skewed.append(min(rng.randint(64, 1024), total - sum(skewed)))
    rows = []
    for case, lengths in (("gpu one long sequence 16k", [total]), ("gpu skewed mix 16k", skewed)):
        for backward in (False, True):
            rows += measure(
                f"{case} {'fwd+bwd' if backward else 'fwd'}",
                lengths,
                32,
                8,
                128,
                torch.bfloat16,
                "cuda",
                args.repeats,
                backward,
            )
    if not args.no_sweep:
        rows += sweep_rows("cuda", [1024, 2048, 4096, 8192, 16384], total, [torch.bfloat16], 32, 8, 128, args)
    caches = [rng.randint(256, 8192) for _ in range(32)]
    return rows + decode_rows("gpu decode, 32 caches 256..8192", caches, torch.bfloat16, "cuda", args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: torch's default); 1 is stable on a shared box"
    )
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16,float16", help='CPU mix rows\' dtypes ("": none)'
    )
    parser.add_argument("--no-decode", action="store_true", help="leave out the CPU decode rows")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the sequence-length sweep")
    parser.add_argument("--sweep-dtypes", default="float32", help="CPU sweep's dtypes (comma-separated)")
    parser.add_argument("--no-write", action="store_true", help="do not append rows to benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [] if args.gpu_only else cpu_rows(args)
    if torch.cuda.is_available():
        rows += gpu_rows(args)
    elif args.gpu_only:
        raise SystemExit("--gpu-only needs a CUDA device")
    print_table(rows, baseline="padded_sdpa")
    if not args.no_write:
        print(f"\nrows appended to {write_rows(rows, 'attention')}")


def _pytest_candidates() -> dict:
    """The CPU fp32 multimodal mix's fwd+bwd candidates at the script's default sizes."""
    rng = random.Random(0)
    lengths = [rng.randint(300, 3000) for _ in range(8)]
    q, k, v, do = make_inputs(lengths, 4, 1, 64, torch.float32, "cpu")
    return step_fns(lengths, q, k, v, do, "cpu", True)


# pytest-benchmark (``pytest benchmarks/bench_attention.py --benchmark-only``): the CPU mix, one test per candidate.
test_bench_attention_cpu_mix = pytest_benchmark_test(
    _pytest_candidates, ["padded_sdpa", "padded_sdpa(mask)", "per_sequence_sdpa", "sphinx_kernels(torch)"]
)


if __name__ == "__main__":
    main()
