"""Benchmark the SPHINX-X model end to end: a training step (prepare + forward + backward) in tokens/s.

One step packs multimodal samples (the bundled images of six aspect ratios, each with a multi-turn
conversation of random length, plus text-only samples) into one batch with `SphinxX.prepare` (one
`tile_gather` over all images, skipped tiles), then runs forward + backward. Each config is timed with every
kernel on its automatic backend ("sphinx") and with every kernel on the PyTorch reference
(``SPHINX_KERNELS_BACKEND=torch``: tile gather, varlen attention, RoPE, MoE), the two taking turns step by
step in one run (harness.round_robin_medians), on the same model and the same batch; their losses are checked
to agree first (each row's note gives its loss).

Configs: ``tiny`` and ``tiny-moe`` (the test presets), ``100m`` (a 100M-class dense Llama: d 768, 12 layers,
GQA 12/4, ffn 2048, vocab 32000) and ``100m-moe`` (the same with top-2-of-8 experts of width 1024); tiny
vision towers throughout (the LLM and the kernels are what is measured). CPU: fp32; CUDA: bf16.

    PYTHONPATH=. python benchmarks/bench_model.py [--configs tiny,100m] [--samples 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Row, environment, print_table, round_robin_medians, write_rows  # noqa: E402

from sphinx_x.config import get_config  # noqa: E402
from sphinx_x.data import bundled_images, load_image  # noqa: E402
from sphinx_x.model import SphinxX  # noqa: E402

LLM_100M = {"dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "ffn_dim": 2048, "vocab_size": 32000}
CONFIGS = {
    "tiny": ("tiny", {}),
    "tiny-moe": ("tiny-moe", {}),
    "100m": ("tiny", {"llm": LLM_100M}),
    "100m-moe": ("tiny-moe", {"llm": {**LLM_100M, "n_experts": 8, "top_k": 2, "moe_ffn_dim": 1024}}),
}
WORDS = (
    "the a image shows dog cat person car tree sky red blue green small large near on in under two three "
    "what where how many is are there sitting standing walking building street water"
).split()


def make_samples(n: int, seed: int) -> list[dict]:
    """`n` samples: the bundled images in turn (every third sample text-only), 1-3 turns of 8-60 words."""
    rng = random.Random(seed)
    images = [load_image(p) for p in bundled_images()]
    samples = []
    for i in range(n):
        conv = []
        for _ in range(rng.randint(1, 3)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) + "."
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        image = None if i % 3 == 2 else images[i % len(images)]
        samples.append({"image": image, "conversations": conv})
    return samples


def step_fn(model: SphinxX, samples: list[dict], backend: str | None):
    def step():
        previous = os.environ.get("SPHINX_KERNELS_BACKEND")
        if backend is not None:
            os.environ["SPHINX_KERNELS_BACKEND"] = backend
        try:
            for p in model.trainable_parameters():
                p.grad = None
            batch = model.prepare(samples)
            loss = model(batch).loss
            loss.backward()
            return loss.detach()
        finally:
            if previous is None:
                os.environ.pop("SPHINX_KERNELS_BACKEND", None)
            else:
                os.environ["SPHINX_KERNELS_BACKEND"] = previous

    return step


def bench_config(name: str, n_samples: int, rounds: int, device: torch.device) -> list[Row]:
    preset, overrides = CONFIGS[name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = SphinxX(get_config(preset, **overrides), dtype=dtype, device=device)
    model.train()
    samples = make_samples(n_samples, seed=0)
    batch = model.prepare(samples)
    plan = batch.plan
    shape = (
        f"{name}: B={batch.num_samples} T={batch.num_tokens} views={plan.num_views} skipped={plan.num_skipped} "
        f"sup={batch.num_supervised} {str(dtype).removeprefix('torch.')}"
    )
    llm_params = model.llm.num_parameters()
    if model.config.llm.is_moe:  # active parameters per token: top_k of the experts
        cfg = model.config.llm
        llm_params -= cfg.n_layers * (cfg.n_experts - cfg.top_k) * 3 * cfg.dim * cfg.moe_ffn_dim
    flops = 6.0 * llm_params * batch.num_tokens  # forward + backward of the LLM (towers excluded)
    fns = {
        "sphinx (auto backends)": step_fn(model, samples, None),
        "torch backend": step_fn(model, samples, "torch"),
    }
    # The two candidates must compute the same step (else the ratio compares different work): their losses
    # agree to fp32 rounding (bf16 on CUDA: a few bf16 ulps of the loss).
    losses = {backend: float(fn()) for backend, fn in fns.items()}
    ref = losses["torch backend"]
    rel = max(abs(v - ref) for v in losses.values()) / max(abs(ref), 1e-12)
    if rel > (1e-4 if dtype == torch.float32 else 3e-2):
        raise SystemExit(f"{name}: the candidates' losses differ ({losses}): not the same computation")
    times = round_robin_medians(fns, rounds=rounds, device=device)
    rows = []
    for backend, seconds in times.items():
        rows.append(
            Row(
                family="model",
                case=f"{name} prepare+fwd+bwd",
                backend=backend,
                shape=shape,
                seconds=seconds,
                rate=batch.num_tokens / seconds,
                unit="tokens/s",
                note=f"{flops / seconds / 1e12:.3f} TFLOP/s (6 x {llm_params / 1e6:.1f}M active LLM params x T); "
                f"loss {losses[backend]:.6f}",
                env=environment(device),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,tiny-moe,100m", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--samples", type=int, default=None, help="samples per batch (default 6 CPU, 32 GPU)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (the median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-write", action="store_true", help="do not append to benchmarks/results/model.csv"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.samples or (32 if device.type == "cuda" else 6)
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        case = bench_config(name, n, args.rounds, device)
        print_table(case, baseline="torch backend")
        rows += case
    if not args.no_write:
        print(f"\nrows appended to {write_rows(rows, 'model')}")


if __name__ == "__main__":
    main()
