"""benchmarks/bench_e2e.py: its candidates compute the same thing, so its ratios compare like with like.

- Every training variant with skip tokens on (ours, skip only) computes the same loss and gradients as the
  plain-PyTorch padded path in float64, and every variant with skip tokens off (original, packing only, kernels
  only) those of its own float64 padded path: packing, padding and the backends change the cost, not the result.
- The original's views: every sub-image, a skipped tile as a zero view, equal to the paper's canvas (resize,
  paste top-left, normalise, crop) built here with F.interpolate; the skipped ones exactly zero on both sides.
- The work it reports as avoided (views not encoded, positions not computed) equals the tile geometry's count.
- The padded generation (left padding, padded cache) gives the packed path's logits and greedy tokens.
- A smoke run of the script at its smallest size writes a row for every candidate.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference

import sphinx_kernels as sk
from sphinx_x.model import SphinxX

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_e2e", module)
    spec.loader.exec_module(module)
    return module


def small_model(bench, seed: int) -> SphinxX:
    # Odd LLM sizes (head_dim 18, ffn 88) on the tiny towers, two layers: small enough for the test budget.
    return bench.build_model(
        "tiny", "cpu", seed, llm={"dim": 72, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 88}
    )


def twin(model: SphinxX, dtype: torch.dtype) -> SphinxX:
    """The same parameters in `dtype`."""
    other = SphinxX(model.config, dtype=dtype, tokenizer=model.tokenizer)
    other.load_state_dict(model.state_dict())
    other.train()
    return other


def mixed_samples(bench, seed: int) -> list[dict]:
    """A wide image (2 of 4 tiles skipped at grid 2), a portrait, a text-only sample; odd sizes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [
        (rng.randint(90, 110), rng.randint(230, 250)),
        (rng.randint(150, 170), rng.randint(101, 131)),
        None,
    ]
    samples = []
    for size in sizes:
        image = None if size is None else torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=gen)
        samples.append({"image": image, "conversations": bench._conversation(rng, "short")})
    return samples


def loss_and_grads(model: SphinxX, workload, variant) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = workload.loss(variant)
    loss.backward()
    grads = [
        p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
        for p in model.trainable_parameters()
    ]
    return loss.detach(), torch.cat(grads)


def test_variants_compute_the_same_loss_and_gradients(bench, seed):
    model = small_model(bench, seed)
    model64 = twin(model, torch.float64)
    samples = mixed_samples(bench, seed)
    wl, wl64 = bench.Workload(model, samples), bench.Workload(model64, samples)
    for skip in (True, False):
        # The plain-PyTorch path (padded SDPA, torch backends) in float64 and in float32 is the yardstick.
        reference = bench.Variant("reference", skip, packed=False, best=False)
        loss64, grads64 = loss_and_grads(model64, wl64, reference)
        loss32, grads32 = loss_and_grads(model, wl, reference)
        variants = [v for v in bench.VARIANTS if v.skip == skip]
        assert len(variants) >= 2
        for v in variants:
            loss, grads = loss_and_grads(model, wl, v)
            assert_close_to_reference(loss, loss64, loss32, name=f"{v.name} loss")
            assert_close_to_reference(grads, grads64, grads32, name=f"{v.name} gradients")


def test_work_avoided_matches_the_tile_geometry(bench, seed):
    model = small_model(bench, seed)
    samples = mixed_samples(bench, seed)
    wl = bench.Workload(model, samples)
    cfg, N = model.config, model.tokens_per_view
    t, g = cfg.tile, cfg.grid
    skipped = []
    for s in samples:
        if s["image"] is None:
            skipped.append(0)
            continue
        h, w = sk.resized_size(*s["image"].shape[:2], cfg.canvas)
        skipped.append(sum(r * t >= h or c * t >= w for r in range(g) for c in range(g)))
    assert sum(skipped) > 0
    assert wl.views_all - wl.views_kept == sum(skipped)
    assert wl.encoded_views(bench.ORIGINAL) == wl.views_all and wl.encoded_views(bench.OURS) == wl.views_kept
    ours = [model.sample_length(s) for s in samples]
    # A skipped tile: one skip token instead of [s] N tokens [e].
    original = [n + k * (N + 1) for n, k in zip(ours, skipped, strict=True)]
    assert wl.tokens == wl.positions(bench.OURS) == sum(ours)
    assert wl.positions(bench.Variant("packed, no skip", False, True, False)) == sum(original)
    assert wl.positions(bench.ORIGINAL) == len(samples) * max(original)
    assert wl.positions(bench.Variant("padded, skip", True, False, False)) == len(samples) * max(ours)


def canvas_views(image: torch.Tensor, canvas: int, grid: int, dtype: torch.dtype) -> torch.Tensor:
    """Every view the original encodes: normalise, resize (F.interpolate), paste top-left on a zero canvas
    (zero = the normalised padding colour), crop all tiles; the global view at long side ``canvas / grid``."""
    t = canvas // grid
    mean = torch.tensor(sk.CLIP_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(sk.CLIP_STD, dtype=dtype).view(1, 3, 1, 1)
    x = (image.permute(2, 0, 1)[None].to(dtype) / 255 - mean) / std

    def padded(side: int) -> torch.Tensor:
        size = sk.resized_size(*image.shape[:2], side)
        board = torch.zeros(3, side, side, dtype=dtype)
        board[:, : size[0], : size[1]] = F.interpolate(x, size=size, mode="bilinear", antialias=True)[0]
        return board

    full = padded(canvas)
    tiles = [full[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(grid) for c in range(grid)]
    return torch.stack([padded(t), *tiles])


def test_original_views_are_every_tile_with_zero_views_where_skipped(bench, seed):
    model = small_model(bench, seed)
    samples = mixed_samples(bench, seed)
    wl = bench.Workload(model, samples)
    cfg = model.config
    images = [s["image"] for s in samples if s["image"] is not None]
    views = wl.views(skip=False)
    ref64 = torch.cat([canvas_views(im, cfg.canvas, cfg.grid, torch.float64) for im in images])
    ref32 = torch.cat([canvas_views(im, cfg.canvas, cfg.grid, torch.float32) for im in images])
    assert_close_to_reference(views, ref64, ref32, name="original views")
    kept = torch.zeros(wl.views_all, dtype=torch.bool)
    kept[wl.slots] = True
    assert (~kept).any()
    # A skipped tile holds no image pixel: the canvas there is padding only, exactly 0 after normalisation.
    assert (ref64[~kept] == 0).all() and (views[~kept] == 0).all()
    assert (views[kept] == wl.views(skip=True)).all()


def test_padded_generation_matches_the_packed_path(bench, seed):
    model = small_model(bench, seed)
    model64 = twin(model, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(3, 40, (3,), generator=gen)]
    ids = [torch.randint(0, model.config.llm.vocab_size, (n,), generator=gen) for n in lengths]
    with torch.no_grad():
        prompts = [model.llm.tok_embeddings(i) for i in ids]
        prompts64 = [model64.llm.tok_embeddings(i) for i in ids]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        packed = model.llm(
            inputs_embeds=torch.cat(prompts), cu_seqlens=cu, logits_rows=cu[1:].long() - 1
        ).logits
    new = 4
    tokens64, logits64 = bench.padded_generate(model64.llm, prompts64, new)
    tokens32, logits32 = bench.padded_generate(model.llm, prompts, new)
    assert_close_to_reference(packed, logits64, logits32, name="prefill logits, packed vs padded")
    ours = bench.packed_generate(model.llm, prompts, new)
    assert ours == tokens64 and len(ours[0]) == new


def test_smoke_run_writes_every_candidate(bench, tmp_path):
    rows = bench.main(["--smoke", "--results", str(tmp_path)])
    with (tmp_path / "e2e.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    train = {r["backend"] for r in written if r["case"].startswith("train")}
    assert train == {v.name for v in bench.VARIANTS}
    generate = {(r["case"], r["backend"]) for r in written if r["case"].startswith("generate")}
    assert {b for _, b in generate} == {bench.OURS_GEN, bench.PADDED_GEN}
    assert len(generate) == 8  # prefill and decode at two batch sizes
    for r in written:
        assert math.isfinite(float(r["rate"])) and float(r["rate"]) > 0, r
        assert r["device"] and r["cpu"] and r["cores"] and r["torch"], r
        assert "equal" in r["note"] if r["case"].startswith("generate") else "loss" in r["note"], r
