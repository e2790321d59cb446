"""Skip-token tile gathering: our backends vs the PyTorch reference and torchvision.transforms.v2.

    python benchmarks/bench_tiles.py [--images 32] [--canvas 448 --grid 2] [--rounds 10] [--threads 1,2]
    pytest benchmarks/bench_tiles.py --benchmark-only      # the same workload under pytest-benchmark

CPU: a realistic mix of photo sizes (640x480 .. 1920x1080, portrait and 3:1 panoramas among them) to bf16
views; the candidates take turns (harness.round_robin_medians), so load from other processes hits them
alike; medians and ratios against the torch reference and against torchvision v2 doing the same resize
(antialias) / normalise / pad / crop on uint8 tensors (the fastest CPU peer we found), all in one run.
`--threads` repeats the CPU run at each intra-op thread count (all candidates use PyTorch's thread pool).
GPU (when present): achieved GB/s (uint8 read + views written) of the cuda and triton backends against the
device's copy bandwidth measured in the same run (do_bench medians).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from harness import Row, environment, median_seconds, print_table, round_robin_medians, write_rows  # noqa: E402

from sphinx_kernels import CLIP_MEAN, CLIP_STD, backends, plan_tiles, tile_gather  # noqa: E402

# (H, W) of common photo / screenshot / document sizes; 3:1 panoramas and portraits included.
SIZE_MIX = [
    (480, 640),
    (640, 480),
    (720, 1280),
    (1080, 1920),
    (768, 1024),
    (1024, 768),
    (1080, 1080),
    (1920, 1080),
    (640, 1920),
    (600, 1800),
    (1280, 720),
    (900, 1200),
]


def make_images(n: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [rng.choice(SIZE_MIX) for _ in range(n)]
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).to(device) for h, w in sizes]


def torchvision_peer(images, canvas: int, grid: int, dtype: torch.dtype) -> torch.Tensor:
    """torchvision.transforms.v2 on uint8 tensors: resize (antialias, uint8 SIMD path) -> float ->
    normalise -> pad -> crop the kept tiles, plus the global view. Not bit-equal to ours (it rounds the
    resized image to uint8), but the same work a user would write with it."""
    from torchvision.transforms.v2 import functional as TF

    plan = plan_tiles([img.shape[:2] for img in images], canvas, grid)
    t = plan.tile
    views = []
    for i, img in enumerate(images):
        chw = img.permute(2, 0, 1)  # a channels-last view: torchvision's fast uint8 layout

        def normalised(size: tuple[int, int], side: int, chw=chw) -> torch.Tensor:
            x = TF.resize(chw, list(size), antialias=True)
            x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), CLIP_MEAN, CLIP_STD)
            return F.pad(x, (0, side - size[1], 0, side - size[0]))

        views.append(normalised(plan.global_sizes[i], t).to(dtype))
        full = normalised(plan.resized_sizes[i], canvas)
        for r, c in plan.kept[i].nonzero().tolist():
            views.append(full[:, r * t : (r + 1) * t, c * t : (c + 1) * t].to(dtype))
    return torch.stack(views)


ISA_VAR = "SPHINX_KERNELS_TILES_ISA"


def with_isa(isa: str, fn):
    """`fn()` with the CPU tiling kernel forced onto one code path (csrc/tiles.cpp reads
    SPHINX_KERNELS_TILES_ISA on every call)."""
    old = os.environ.get(ISA_VAR)
    os.environ[ISA_VAR] = isa
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[ISA_VAR]
        else:
            os.environ[ISA_VAR] = old


def narrower_isas() -> list[str]:
    """The code paths below this CPU's widest that the built kernel can be forced onto."""
    if ISA_VAR in os.environ or not backends()["cpu"].available:
        return []  # a forced path already: measure only that one
    probe = [torch.zeros(20, 20, 3, dtype=torch.uint8)]
    have = []
    for isa in ("avx512", "avx2", "scalar"):
        try:
            with_isa(isa, lambda: tile_gather(probe, 28, 2, dtype=torch.bfloat16, backend="cpu"))
        except RuntimeError:
            continue
        have.append(isa)
    return have[1:]  # the widest is what the plain `cpu` candidate runs


def copy_bandwidth(nbytes: int, device: str) -> float:
    """GB/s of a device-to-device copy of `nbytes` (the ceiling a gather-and-write kernel can approach)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device) / 1e9


def run(n_images: int, canvas: int, grid: int, rounds: int, device: str) -> list[Row]:
    images = make_images(n_images, device)
    dtype = torch.bfloat16
    plan = plan_tiles([img.shape[:2] for img in images], canvas, grid)
    bytes_in = sum(img.numel() for img in images)
    bytes_out = plan.num_views * 3 * plan.tile**2 * dtype.itemsize
    shape = f"{n_images} imgs, canvas {canvas}, grid {grid}, {plan.num_views} views, bf16"
    threads = torch.get_num_threads()
    case = f"tile_gather {device}" + (f" {threads} threads" if device == "cpu" else "")

    candidates = {"torch": lambda: tile_gather(images, canvas, grid, dtype=dtype, backend="torch")}
    for name in ("cpu",) if device == "cpu" else ("cuda", "triton"):
        if backends()[name].available:
            candidates[name] = lambda name=name: tile_gather(images, canvas, grid, dtype=dtype, backend=name)
    if device == "cpu" and "cpu" in candidates:
        # The narrower code paths of the same build in the same run: an AVX-512 machine also reports what
        # an AVX2-only CPU and the portable build (scalar) get.
        for isa in narrower_isas():
            candidates[f"cpu[{isa}]"] = lambda isa=isa: with_isa(
                isa, lambda: tile_gather(images, canvas, grid, dtype=dtype, backend="cpu")
            )
    if device == "cpu":
        candidates["torchvision.v2"] = lambda: torchvision_peer(images, canvas, grid, dtype)
        timings = round_robin_medians(candidates, rounds, device)
        ceiling = ""
    else:
        timings = {name: median_seconds(fn, device) for name, fn in candidates.items()}
        ceiling = round(copy_bandwidth(bytes_in + bytes_out, device), 1)

    rows = []
    for name, seconds in timings.items():
        gbps = (bytes_in + bytes_out) / seconds / 1e9
        ratios = [
            f"{timings[peer] / seconds:.2f}x {peer}"
            for peer in ("torchvision.v2", "torch")
            if peer in timings
        ]
        note = ", ".join([f"{plan.num_views / seconds:.0f} views/s", *ratios])
        rows.append(
            Row("tiles", case, name, shape, seconds, gbps, "GB/s", ceiling, note, environment(device))
        )
    return rows


def report_skipping(n_images: int, canvas: int, grid: int) -> None:
    images = make_images(n_images, "cpu")
    plan = plan_tiles([img.shape[:2] for img in images], canvas, grid)
    tiles = plan.num_images * grid * grid
    # Encoder work per view is the same for every view, so work saved = views saved / views otherwise.
    print(
        f"\nskip tokens: {plan.num_skipped}/{tiles} tiles skipped ({plan.num_skipped / tiles:.1%}); encoder work "
        f"saved {plan.num_skipped / (tiles + plan.num_images):.1%} (views {plan.num_views} instead of "
        f"{tiles + plan.num_images}); LLM positions with 257 tokens/view: "
        f"{sum(plan.visual_tokens(257))} instead of {(tiles + plan.num_images) * 259}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--canvas", type=int, default=448)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="CPU: runs of each candidate, taking turns")
    parser.add_argument(
        "--threads", default="", help="CPU: comma-separated thread counts to run at (default: PyTorch's)"
    )
    parser.add_argument("--no-gpu", action="store_true", help="CPU rows only")
    args = parser.parse_args()
    rows = []
    for threads in [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        cpu = run(args.images, args.canvas, args.grid, args.rounds, "cpu")
        print_table(cpu, baseline="torchvision.v2")
        rows += cpu
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = run(args.images, args.canvas, args.grid, args.rounds, "cuda")
        print_table(gpu, baseline="torch")
        for r in gpu:
            if r.backend != "torch":
                print(f"  {r.backend}: {r.rate / r.ceiling:.0%} of the copy ceiling ({r.ceiling} GB/s)")
        rows += gpu
    report_skipping(args.images, args.canvas, args.grid)
    print(f"\nrows appended to {write_rows(rows, 'tiles')}")


# pytest-benchmark entry points: the same CPU workload, one benchmark per implementation.
def _pytest_images():
    return make_images(32, "cpu")


def test_bench_tiles_cpu_backend(benchmark):
    images = _pytest_images()
    benchmark(lambda: tile_gather(images, dtype=torch.bfloat16, backend="cpu"))


def test_bench_tiles_torch_reference(benchmark):
    images = _pytest_images()
    benchmark(lambda: tile_gather(images, dtype=torch.bfloat16, backend="torch"))


def test_bench_tiles_torchvision_v2(benchmark):
    images = _pytest_images()
    benchmark(lambda: torchvision_peer(images, 448, 2, torch.bfloat16))


if __name__ == "__main__":
    main()
