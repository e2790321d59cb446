"""`sphinx-x`: command-line entry point.

sphinx-x tiles [IMAGES...] [--canvas 448 --grid 2] [--save sheet.png]
    Plan and gather skip-token tiles for the images (default: the bundled ones), print the plan (views
    kept / skipped, LLM positions saved) and each available backend's throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sphinx_kernels as sk
from sphinx_x.data import bundled_images, load_image

TOKENS_PER_VIEW = 257  # DINOv2 cls + 16x16 patches at 224 (and CLIP-ConvNeXt's matching 257)


def _grid_picture(kept: torch.Tensor) -> str:
    return " / ".join("".join("#" if k else "." for k in row) for row in kept.tolist())


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _save_sheet(views: torch.Tensor, plan: sk.TilePlan, path: Path) -> None:
    """One row per image: its global view then its kept tiles, de-normalised to RGB."""
    mean = torch.tensor(sk.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(sk.CLIP_STD).view(3, 1, 1)
    pixels = ((views.float().cpu() * std + mean) * 255).clamp(0, 255).round().to(torch.uint8)
    t, gap = plan.tile, 4
    width = max(plan.views_per_image) * (t + gap)
    sheet = np.full((plan.num_images * (t + gap), width, 3), 255, dtype=np.uint8)
    for v, image in enumerate(plan.image_index.tolist()):
        column = v - sum(plan.views_per_image[:image])
        y, x = image * (t + gap), column * (t + gap)
        sheet[y : y + t, x : x + t] = pixels[v].permute(1, 2, 0).numpy()
    from PIL import Image

    Image.fromarray(sheet).save(path)


def tiles(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images] or bundled_images()
    images = [load_image(p) for p in paths]
    if args.device == "cuda":
        images = [img.cuda() for img in images]
    plan = sk.plan_tiles([img.shape[:2] for img in images], args.canvas, args.grid)
    print(f"canvas {args.canvas}, grid {args.grid}x{args.grid}, tile {plan.tile}; {plan.num_images} images\n")
    print(f"{'image':<32} {'H x W':>11} {'resized':>9}  tiles kept  views  LLM positions (no skip)")
    full_views = args.grid * args.grid + 1
    for i, path in enumerate(paths):
        (h, w), (rh, rw) = plan.sizes[i], plan.resized_sizes[i]
        tokens = plan.visual_tokens(TOKENS_PER_VIEW)[i]
        print(
            f"{path.name[:32]:<32} {h:>5}x{w:<5} {rh:>4}x{rw:<4}  {_grid_picture(plan.kept[i]):<10}  "
            f"{plan.views_per_image[i]:>5}  {tokens:>6} ({full_views * (TOKENS_PER_VIEW + 2)})"
        )
    n_tiles = plan.num_images * args.grid * args.grid
    saved = plan.num_images * full_views - plan.num_views
    print(
        f"\nskipped {plan.num_skipped}/{n_tiles} tiles: {saved} fewer encoder passes "
        f"({saved / (plan.num_images * full_views):.0%}), "
        f"{plan.num_images * full_views * (TOKENS_PER_VIEW + 2) - sum(plan.visual_tokens(TOKENS_PER_VIEW))} "
        f"fewer LLM positions\n"
    )

    print("backends:")
    for status in sk.backends().values():
        print(f"  {status}")
    print(f"\nthroughput ({args.dtype} views, median of {args.repeats} runs):")
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    reference = None
    for name in ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch"):
        try:
            views, _ = sk.tile_gather(images, args.canvas, args.grid, dtype=dtype, backend=name)
        except RuntimeError as exc:  # not available here: say why and go on
            print(f"  {name:<7} unavailable: {exc}")
            continue
        seconds = _median_seconds(
            lambda name=name: sk.tile_gather(images, args.canvas, args.grid, dtype=dtype, backend=name),
            args.repeats,
        )
        if reference is None:
            reference = views
        err = (views.float() - reference.float()).abs().max().item()
        print(
            f"  {name:<7} {seconds * 1e3:8.2f} ms  {plan.num_views / seconds:10.0f} views/s  "
            f"{plan.num_images / seconds:8.0f} images/s  (max |diff| vs first: {err:.2e})"
        )
    if args.save:
        views, _ = sk.tile_gather(images, args.canvas, args.grid)
        _save_sheet(views, plan, Path(args.save))
        print(f"\nwrote the views of every image to {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sphinx-x", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tiles", help="plan and gather skip-token tiles, print the plan and throughput")
    p.add_argument("images", nargs="*", help="image files (default: the bundled ones)")
    p.add_argument("--canvas", type=int, default=448)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--save", metavar="PNG", help="write a contact sheet of the views")
    p.set_defaults(func=tiles)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
