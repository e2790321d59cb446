"""`sphinx-x`: command-line entry point.

sphinx-x tiles [IMAGES...] [--canvas 448 --grid 2] [--save sheet.png]
    Plan and gather skip-token tiles for the images (default: the bundled ones), print the plan (views
    kept / skipped, LLM positions saved) and each available backend's throughput.

sphinx-x kernels [IMAGES...] [--samples 24 --budget 4096]
    The packed-sequence and MoE kernels on a token stream shaped by the images: one multimodal sample per
    image in turn (BOS, its visual tokens with skipped tiles, a random-length text), packed into bins of at
    most `budget` tokens; then RoPE, varlen attention and a top-2-of-8 SwiGLU MoE layer on the first bin,
    forward + backward on every backend that runs here, each against a float64 reference, and padded SDPA
    on the same bin beside them.

sphinx-x make-demo-data DIR
    Write the demo set (shapes on images of varied aspect ratios, multi-turn questions, text-only
    conversations, a held-out split) into DIR.

sphinx-x train --config FILE [key=value ...] [--out DIR] [--max-steps N] [--resume]
    One-stage training (also under torchrun: FSDP2 over the ranks); see configs/*.yaml for the keys.

sphinx-x chat --checkpoint DIR [--image IMG] "question"
    Stream the answer of a trained model (a save_pretrained folder, or a training run's --out folder).

sphinx-x eval --checkpoint DIR --data FILE
    Answer accuracy and loss on held-out conversations (JSON/JSONL).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sphinx_kernels as sk
from sphinx_x.data import bundled_images, image_size, load_image

TOKENS_PER_VIEW = 257  # DINOv2 cls + 16x16 patches at 224 (and CLIP-ConvNeXt's matching 257)
# Each family's backends in the library's order of preference; the demo forces each in turn.
ATTENTION_BACKENDS = ("flash_attn", "triton", "torch")
MOE_BACKENDS = ("cuda", "megablocks", "triton", "cpu", "grouped_mm", "torch")


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
    kept, visual = plan.kept, plan.visual_tokens(TOKENS_PER_VIEW)  # each built from the plan on access
    for i, path in enumerate(paths):
        (h, w), (rh, rw) = plan.sizes[i], plan.resized_sizes[i]
        tokens = visual[i]
        print(
            f"{path.name[:32]:<32} {h:>5}x{w:<5} {rh:>4}x{rw:<4}  {_grid_picture(kept[i]):<10}  "
            f"{plan.views_per_image[i]:>5}  {tokens:>6} ({full_views * (TOKENS_PER_VIEW + 2)})"
        )
    n_tiles = plan.num_images * args.grid * args.grid
    saved = plan.num_images * full_views - plan.num_views
    print(
        f"\nskipped {plan.num_skipped}/{n_tiles} tiles: {saved} fewer encoder passes "
        f"({saved / (plan.num_images * full_views):.0%}), "
        f"{plan.num_images * full_views * (TOKENS_PER_VIEW + 2) - sum(visual)} "
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


def _sample_lengths(paths: list[Path], args: argparse.Namespace) -> tuple[list[int], int]:
    """One sample per image, in turn: BOS + the image's LLM positions + a text of random length.
    Returns the lengths and how many of their tokens are visual."""
    plan = sk.plan_tiles([image_size(p) for p in paths], args.canvas, args.grid)
    visual = plan.visual_tokens(args.tokens_per_view)
    gen = torch.Generator().manual_seed(args.seed)
    texts = torch.randint(args.min_text, args.max_text + 1, (args.samples,), generator=gen).tolist()
    images = [visual[i % len(paths)] for i in range(args.samples)]
    return [1 + v + t for v, t in zip(images, texts, strict=True)], sum(images)


def _leaves(gen: torch.Generator, shapes, dtype, device, scale: float = 1.0) -> list[torch.Tensor]:
    return [
        (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()
        for shape in shapes
    ]


def _forward_backward(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """``fn(*inputs)`` forward and backward; returns the output and the inputs' gradients."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in inputs]


def _float64_reference(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    return _forward_backward(fn, inputs, grad_out.double())


def _max_abs_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True))


def _time_backends(names, step, reference: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median seconds of ``step(name)`` per backend that runs here; prints each one's error against
    `reference` (the output and every gradient)."""
    seconds = {}
    for name in names:
        try:
            got = step(name)
        except (RuntimeError, TypeError) as exc:  # cannot run here, or not in this dtype: say why, go on
            print(f"  {name:<11} unavailable: {exc}")
            continue
        seconds[name] = _median_seconds(lambda name=name: step(name), repeats)
        error = _max_abs_diff(got, reference)
        print(f"  {name:<11} {seconds[name] * 1e3:8.1f} ms   max |diff| vs float64: {error:.1e}")
    return seconds


def _attention_demo(lengths: list[int], args: argparse.Namespace, dtype, device, gen) -> None:
    packed = sk.pack_sequences([torch.empty(n) for n in lengths])
    cu_seqlens, max_seqlen, total = packed.cu_seqlens.to(device), packed.max_seqlen, sum(lengths)
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim

    x = torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    positions = sk.position_ids_from_cu_seqlens(cu_seqlens)
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    got = _forward_backward(lambda x: sk.apply_rotary(x, positions), [x], grad)
    want = _float64_reference(lambda x: sk.apply_rotary_ref(x, positions), [x], grad)
    print(
        f"\nRoPE on packed positions (restarting at each sample), forward + backward: "
        f"max |diff| vs float64 {_max_abs_diff(got, want):.1e}"
    )

    print(
        f"\nvarlen attention: T {total}, Hq {heads}, Hkv {kv_heads}, D {dim}, causal, {args.dtype}, "
        f"forward + backward, median of {args.repeats}"
    )
    q, k, v = _leaves(
        gen, [(total, heads, dim), (total, kv_heads, dim), (total, kv_heads, dim)], dtype, device
    )
    grad_out = torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype)
    reference = _float64_reference(
        lambda q, k, v: sk.varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen), [q, k, v], grad_out
    )
    seconds = _time_backends(
        ATTENTION_BACKENDS,
        lambda name: _forward_backward(
            lambda q, k, v: sk.varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=name),
            [q, k, v],
            grad_out,
        ),
        reference,
        args.repeats,
    )

    # The padded peer: every sample right-padded to the longest, one batched SDPA (is_causal hides the
    # padding keys from every real query), inputs laid out outside the timed region.
    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(t.detach().split(lengths), batch_first=True).transpose(1, 2)

    qp, kp, vp = (padded(t).requires_grad_() for t in (q, k, v))
    grad_padded = padded(grad_out)
    sdpa = _median_seconds(
        lambda: _forward_backward(
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=heads != kv_heads
            ),
            [qp, kp, vp],
            grad_padded,
        ),
        args.repeats,
    )
    positions_padded = len(lengths) * max_seqlen
    print(
        f"  {'padded SDPA':<11} {sdpa * 1e3:8.1f} ms   ({positions_padded} positions, "
        f"{1 - total / positions_padded:.0%} padding)"
    )
    for name, s in seconds.items():
        print(f"  {name} is {sdpa / s:.2f}x padded SDPA")

    # Serving: each sample's last token again, as one decoding step against its cached keys (the keys get
    # their own boundaries); it must reproduce the last row of each sample's full causal attention.
    with torch.no_grad():
        last = packed.cu_seqlens[1:].to(device) - 1
        one_each = torch.arange(len(lengths) + 1, dtype=torch.int32, device=device)
        decode = lambda: sk.varlen_attention(  # noqa: E731
            q[last], k, v, one_each, 1, cu_seqlens_k=cu_seqlens, max_seqlen_k=max_seqlen
        )
        error = (decode().double() - sk.varlen_attention(q, k, v, cu_seqlens, max_seqlen)[last]).abs().max()
        print(
            f"  decoding: one new query per sample ({len(lengths)}) against the packed KV cache ({total} tokens) "
            f"{_median_seconds(decode, args.repeats) * 1e3:.2f} ms, max |diff| vs the full pass's last rows "
            f"{error.item():.1e}"
        )


def _moe_demo(total: int, args: argparse.Namespace, dtype, device, gen) -> None:
    d, f, experts, top_k = args.model_dim, args.ffn_dim, args.experts, args.top_k
    print(
        f"\nMoE SwiGLU layer: T {total}, d {d}, f {f}, top-{top_k} of {experts} experts, {args.dtype}, "
        f"forward + backward, median of {args.repeats}"
    )
    x, router, w1, w3 = _leaves(
        gen, [(total, d), (experts, d), (experts, d, f), (experts, d, f)], dtype, device, d**-0.5
    )
    (w2,) = _leaves(gen, [(experts, f, d)], dtype, device, f**-0.5)
    inputs = [x, router, w1, w3, w2]
    grad_out = torch.randn(total, d, generator=gen).to(device=device, dtype=dtype)
    # Choosing experts is discrete: a near-tie between two experts can go either way in bf16 and in float64
    # logits, so the reference takes the experts chosen in the inputs' dtype and does the rest in float64.
    _, expert_ids = sk.route(x.detach() @ router.detach().T, top_k)

    def moe_reference(x, router, w1, w3, w2):
        probs = torch.softmax(x @ router.T, dim=-1).gather(1, expert_ids)  # Mixtral: renormalised top-k
        return sk.moe_experts_ref(x, expert_ids, probs / probs.sum(-1, keepdim=True), w1, w3, w2)

    reference = _float64_reference(moe_reference, inputs, grad_out)
    _time_backends(
        MOE_BACKENDS,
        lambda name: _forward_backward(
            lambda *t: sk.moe_mlp(*t, top_k=top_k, backend=name)[0], inputs, grad_out
        ),
        reference,
        args.repeats,
    )
    with torch.no_grad():
        _, aux = sk.moe_mlp(*inputs, top_k=top_k)
        print(
            f"  tokens per expert {aux.tokens_per_expert.tolist()}, "
            f"load-balancing loss {aux.load_balancing_loss.item():.3f} (1 = balanced)"
        )
        # The paper evaluates 1..E active experts at inference: the same weights, another top_k.
        sweep = [k for k in (1, 2, 4, experts) if k <= experts]
        times = [_median_seconds(lambda k=k: sk.moe_mlp(*inputs, top_k=k), args.repeats) for k in sweep]
        print(
            "  inference, forward only: "
            + ", ".join(f"top-{k} {t * 1e3:.1f} ms" for k, t in zip(sweep, times, strict=True))
        )


def kernels(args: argparse.Namespace) -> int:
    if args.samples < 1 or not 0 <= args.min_text <= args.max_text:
        raise SystemExit("sphinx-x kernels: needs --samples >= 1 and 0 <= --min-text <= --max-text")
    paths = [Path(p) for p in args.images] or bundled_images()
    lengths, visual = _sample_lengths(paths, args)
    total = sum(lengths)
    bins = sk.pack_bins(lengths, args.budget)
    print(
        f"{args.samples} samples from {len(paths)} images: {total} tokens ({visual / total:.0%} visual), "
        f"lengths {min(lengths)}..{max(lengths)}"
    )
    fill = total / (len(bins) * args.budget)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in bins)
    print(
        f"packed into {len(bins)} bin(s) of at most {args.budget} tokens, {fill:.1%} full "
        f"(padding each bin's samples to its longest instead: {padded / total - 1:.0%} more positions)"
    )
    first = [lengths[i] for i in bins[0]]
    print(f"first bin: {len(first)} samples, lengths {first}")

    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    _attention_demo(first, args, dtype, device, gen)
    _moe_demo(sum(first), args, dtype, device, gen)
    return 0


# ------------------------------------------------------------------------------- data, training, chat


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


def make_demo_data_cmd(args: argparse.Namespace) -> int:
    from sphinx_x.demo_data import make_demo_data

    demo = make_demo_data(
        args.dir,
        train_images=args.train_images,
        heldout_images=args.heldout_images,
        train_text=args.train_text,
        heldout_text=args.heldout_text,
        seed=args.seed,
    )
    print(f"wrote the demo set to {demo.root}: train mix {demo.train}, held-out {demo.heldout}")
    print("held-out showcase questions (sphinx-x chat --checkpoint RUN --image IMAGE QUESTION):")
    for image, question, answer in demo.showcases:
        print(f"  {image}  {question!r}  (answer: {answer})")
    return 0


def train_cmd(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from sphinx_x.train import TrainConfig, train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    try:
        cfg = TrainConfig.load(args.config, overrides)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"sphinx-x train: {exc}") from None
    _logging()
    with logging_redirect_tqdm():
        try:
            result = train(cfg, resume=args.resume, progress=not args.no_progress)
        except ValueError as exc:  # bad data, config or folder: the message says which and where
            raise SystemExit(f"sphinx-x train: {exc}") from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.losses:
        k = max(1, len(result.losses) // 10)
        first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
        print(f"\nloss: {first:.4f} (mean of the first {k} steps) -> {last:.4f} (last {k})")
    print(
        f"throughput: {result.tokens_per_second:.0f} tokens/s; skip tokens saved "
        f"{result.visual_positions_saved} visual positions"
    )
    s = result.stats
    if s:  # what the data pipeline left out, also when it is nothing (bad data is never lost silently)
        print(
            f"data: {s['samples']} samples read; skipped {s['missing_images']} unreadable and "
            f"{s['bad_images']} undecodable images; too long: {s['truncated']} cut at a turn, "
            f"{s['dropped_too_long']} dropped"
        )
    for name, ev in (("before", result.eval_before), ("after", result.eval_after)):
        if ev is not None:
            print(f"held-out {name} training: {ev.summary()}")
    if result.model_dir is not None:
        print(f"model saved to {result.model_dir} (sphinx-x chat --checkpoint {result.model_dir} ...)")
    return 0


def _load_model(checkpoint: str, device: str):
    from sphinx_x.model import SphinxX

    path = Path(checkpoint)
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        path = path / "model"  # a training run's --out folder
    if not (path / "config.json").exists():
        raise SystemExit(
            f"sphinx-x: {checkpoint} holds no save_pretrained model (config.json + model.safetensors)"
        )
    return SphinxX.from_pretrained(path, device=device)


def chat_cmd(args: argparse.Namespace) -> int:
    model = _load_model(args.checkpoint, args.device)
    sample = {"image": args.image, "conversations": [{"from": "human", "value": args.question}]}
    print(f"Q: {args.question}" + (f"  [{args.image}]" if args.image else ""))
    print("A: ", end="", flush=True)
    for piece in model.stream(
        sample,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    ):
        print(piece, end="", flush=True)
    print()
    return 0


def eval_cmd(args: argparse.Namespace) -> int:
    from sphinx_x.data import read_samples
    from sphinx_x.evaluate import evaluate

    model = _load_model(args.checkpoint, args.device)
    samples = read_samples(args.data)
    if args.limit:
        samples = samples[: args.limit]
    result = evaluate(model, samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(result.summary())
    for kind, (right, asked) in sorted(result.per_kind.items()):
        print(f"  {kind:<10} accuracy {right / asked:.1%} ({right}/{asked})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sphinx-x", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = sub.add_parser("tiles", help="plan and gather skip-token tiles, print the plan and throughput")
    p.add_argument("images", nargs="*", help="image files (default: the bundled ones)")
    p.add_argument("--canvas", type=int, default=448)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--save", metavar="PNG", help="write a contact sheet of the views")
    p.set_defaults(func=tiles)

    p = sub.add_parser("kernels", help="varlen attention and MoE on packed multimodal samples, every backend")
    p.add_argument("images", nargs="*", help="image files that shape the samples (default: the bundled ones)")
    p.add_argument("--samples", type=int, default=24, help="samples, one per image in turn")
    p.add_argument("--min-text", type=int, default=32, help="fewest text tokens per sample")
    p.add_argument("--max-text", type=int, default=1024, help="most text tokens per sample")
    p.add_argument("--budget", type=int, default=4096, help="tokens per packed bin")
    p.add_argument("--tokens-per-view", type=int, default=TOKENS_PER_VIEW, help="encoder tokens per view")
    p.add_argument("--canvas", type=int, default=448)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--model-dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=704)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=kernels)

    p = sub.add_parser("make-demo-data", help="write the demo conversation set (train mix + held-out split)")
    p.add_argument("dir", help="output folder")
    from sphinx_x.demo_data import make_demo_data

    defaults = inspect.signature(make_demo_data).parameters  # one source of truth: the function's defaults
    for name in ("train_images", "heldout_images", "train_text", "heldout_text"):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=defaults[name].default,
            help="default %(default)s",
        )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=make_demo_data_cmd)

    p = sub.add_parser("train", help="one-stage training from a YAML config (torchrun for several ranks)")
    p.add_argument(
        "--config", help="YAML training config (configs/*.yaml); keys as sphinx_x.train.TrainConfig"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)"
    )
    p.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, model/); overrides the config's")
    p.add_argument("--max-steps", type=int, help="optimizer steps of the whole run (the schedule's length)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train_cmd)

    p = sub.add_parser("chat", help="answer a question about an image with a trained model (streamed)")
    p.add_argument(
        "--checkpoint", required=True, help="save_pretrained folder or a training run's --out folder"
    )
    p.add_argument("--image", help="image file (none: a text-only question)")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.set_defaults(func=chat_cmd)

    p = sub.add_parser("eval", help="answer accuracy and loss of a trained model on held-out conversations")
    p.add_argument(
        "--checkpoint", required=True, help="save_pretrained folder or a training run's --out folder"
    )
    p.add_argument(
        "--data", required=True, help="JSON/JSONL conversations (image paths relative to the file)"
    )
    p.add_argument("--limit", type=int, default=0, help="first N samples only (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.set_defaults(func=eval_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
