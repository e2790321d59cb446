"""End-to-end SPHINX-X throughput: our way against the original way, on the same samples, in one run.

    python benchmarks/bench_e2e.py [--batch 8] [--rounds 3] [--parts train,aspect,batch,generate]
                                   [--gpu | --cpu] [--gen-rounds 9] [--smoke] [--no-write]
    pytest benchmarks/bench_e2e.py --benchmark-only    # the training-step candidates under pytest-benchmark

Training step (tile gathering + vision towers + LLM forward + backward + AdamW step), the candidates taking
turns step by step (`harness.round_robin_medians`: CPU median of repeated runs; GPU synchronised):

- ``ours``: skip tokens (a tile that holds no image pixel is never encoded and takes one position), samples
  packed into one stream (``model.prepare`` / ``model(batch)``: ``cu_seqlens``, logits of supervised rows
  only), the best backend here for every kernel (``SPHINX_KERNELS_BACKEND`` unset).
- ``original``: the LLaMA2-Accessory way: every sub-image encoded, batches right-padded to the longest sample
  as ``(B, L)`` through ``F.scaled_dot_product_attention(is_causal=True)``, logits for every position, the
  PyTorch (``torch``) backend for the other kernels (tile gathering, RoPE).
- each part alone: ``skip only``, ``packing only``, ``kernels only`` (the two others as the original), so
  the ratio ours / original is explained.

Same samples, same parameters, same loss: with skip tokens on (or off) every layout and backend computes the
loss of the same sequences (tests/test_bench_e2e.py checks it against float64). Tokens/s counts the samples'
positions in the skip-token layout (``model.sample_length``) for every candidate, so rates compare as the
inverse of step time. Data: synthetic uint8 images in a mix of aspect ratios (square, 4:3, 16:9, 2:1, 3:1
and portraits) and conversations from one-word answers to long multi-turn and text-only ones.

Generation (prefill + greedy decode with a KV cache, batch 1 and 16): ``generate_stream`` on the packed cache
(``cu_seqlens_k``, no padding) against the padded way (prompts left-padded to the longest, a ``(B, Hkv, L, D)``
cache, masked SDPA, the torch backend), on the same prompt embeddings.

Where it runs: the ``tiny`` preset in float32 on the CPU and, when CUDA is available, then the 1B-class preset
``sphinx-tiny`` (TinyLlama-1.1B + DINOv2 ViT-g + ConvNeXt-XXL, random weights, bf16) on the GPU, so that
``make bench`` measures every size the machine can run; ``--gpu`` runs the GPU sizes alone
(benchmarks/gpu_check.sh), ``--cpu`` the CPU ones alone. Rows go to benchmarks/results/e2e.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from harness import (  # noqa: E402
    RESULTS,
    Row,
    environment,
    print_table,
    pytest_benchmark_test,
    round_robin_medians,
    write_rows,
)

import sphinx_kernels as sk  # noqa: E402
from sphinx_x.batch import pack  # noqa: E402
from sphinx_x.config import get_config  # noqa: E402
from sphinx_x.model import SphinxBatch, SphinxX  # noqa: E402
from sphinx_x.template import IGNORE_INDEX, tokenize_conversation  # noqa: E402

ENV_VAR = "SPHINX_KERNELS_BACKEND"
OURS_GEN, PADDED_GEN = "ours (packed cache)", "padded (left-pad, padded cache)"

# (H, W) of typical source photos per aspect ratio (width:height), with the share of each in the default mix:
# LLaVA-style data is mostly landscape photos, a tenth documents/portraits, a few panoramas and screenshots.
ASPECTS: dict[str, tuple[tuple[int, int], float]] = {
    "1:1": ((800, 800), 0.20),
    "4:3": ((480, 640), 0.25),
    "16:9": ((720, 1280), 0.15),
    "2:1": ((512, 1024), 0.08),
    "3:1": ((640, 1920), 0.05),
    "3:4": ((640, 480), 0.12),
    "9:16": ((1280, 720), 0.08),
    "1:2": ((1024, 512), 0.07),
}
# Conversation kinds and their shares: (turns, words per answer) ranges; "text" has no image.
KINDS: dict[str, tuple[tuple[int, int], tuple[int, int], float]] = {
    "short": ((1, 1), (1, 8), 0.35),  # VQA: one question, a word or a phrase
    "detail": ((1, 1), (40, 120), 0.20),  # detailed description
    "multi": ((2, 5), (6, 40), 0.30),  # multi-turn
    "text": ((1, 3), (60, 200), 0.15),  # text-only instruction data
}
_WORDS = (
    "the a image shows picture left right top bottom red blue green yellow small large circle square person "
    "street car tree building sky water table window dog cat two three several near behind front of with "
    "and is are there what where how many colour which side text sign reads people standing sitting on in"
).split()


# ----------------------------------------------------------------------------------------------- data
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _conversation(rng: random.Random, kind: str) -> list[dict]:
    (t0, t1), (w0, w1), _ = KINDS[kind]
    turns = []
    for _ in range(rng.randint(t0, t1)):
        turns.append({"from": "human", "value": _words(rng, rng.randint(5, 14)).rstrip(".") + "?"})
        turns.append({"from": "gpt", "value": _words(rng, rng.randint(w0, w1))})
    return turns


def _pick(rng: random.Random, shares: dict) -> str:
    names = list(shares)
    return rng.choices(names, weights=[shares[n][-1] for n in names])[0]


def make_samples(
    model: SphinxX,
    n: int,
    *,
    seed: int,
    aspect: str | None = None,
    kinds: Sequence[str] | None = None,
    reserve: int = 0,
    device: str = "cpu",
) -> list[dict]:
    """`n` training samples: uint8 ``(H, W, 3)`` images on `device` (all of aspect `aspect`, else drawn from
    the `ASPECTS` mix) and conversations drawn from `KINDS` (only `kinds` if given); a sample whose no-skip
    layout plus `reserve` positions (tokens to generate) would exceed the LLM's ``max_seq_len`` is drawn
    again."""
    rng = random.Random(seed)
    shares = {k: v for k, v in KINDS.items() if kinds is None or k in kinds}
    gen = torch.Generator().manual_seed(seed)
    g = model.config.grid
    per_view = model.tokens_per_view + 2
    samples = []
    while len(samples) < n:
        kind = _pick(rng, shares)
        if aspect is not None and kind == "text":
            kind = "short"  # an aspect sweep has an image in every sample
        conv = _conversation(rng, kind)
        size = None if kind == "text" else ASPECTS[aspect or _pick(rng, ASPECTS)][0]
        text = len(tokenize_conversation(model.tokenizer, conv)[0]) + 1
        if text + reserve + (0 if size is None else (1 + g * g) * per_view) > model.config.llm.max_seq_len:
            continue
        image = None
        if size is not None:
            image = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=gen).to(device)
        samples.append({"image": image, "conversations": conv})
    return samples


# ----------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class EveryTileKept:
    """The original layout's plan for `batch.pack`: every image's `1 + grid^2` views kept (no skip token)."""

    grid: int
    num_images: int

    @property
    def views_per_image(self) -> list[int]:
        return [1 + self.grid * self.grid] * self.num_images

    @property
    def num_views(self) -> int:
        return sum(self.views_per_image)

    def kept_tiles(self, i: int) -> list[tuple[int, int]]:
        return [(r, c) for r in range(self.grid) for c in range(self.grid)]


def full_layout(model: SphinxX, samples: Sequence[dict]) -> tuple[SphinxBatch, torch.Tensor]:
    """The original layout of `samples` (every sub-image encoded, no skip token) as a packed `SphinxBatch`
    (``views=None``: filled per step), and the rows that tile_gather's kept views take among the
    ``n_images * (1 + grid^2)`` views (per image: global view, then every tile row-major).

    The model's own `pack` with every tile kept: the same positions as ``model.prepare`` (BOS,
    ``[s] view tokens [e]`` per view, the text), except that a tile without image pixels keeps its
    ``[s] N tokens [e]`` instead of one skip token.
    """
    cfg, N = model.config, model.tokens_per_view
    g = cfg.grid
    per_image = 1 + g * g
    images = [s["image"] for s in samples if s.get("image") is not None]
    plan = sk.plan_tiles([tuple(im.shape[:2]) for im in images], cfg.canvas, cfg.grid) if images else None
    texts = [tokenize_conversation(model.tokenizer, s["conversations"]) for s in samples]
    sample_images, lengths = [], []
    for sample, (ids, _) in zip(samples, texts, strict=True):
        has_image = sample.get("image") is not None
        sample_images.append(sum(x is not None for x in sample_images) if has_image else None)
        lengths.append(int(model.bos_id is not None) + has_image * per_image * (N + 2) + len(ids))
    every = EveryTileKept(g, len(images))
    batch = pack(texts, sample_images, every, None, lengths, tokens_per_view=N, bos_id=model.bos_id,
                 device=model.device)  # fmt: skip
    batch = dataclasses.replace(batch, plan=plan, sample_images=[None] * len(samples))
    slots = []
    if plan is not None:
        for i in range(len(images)):
            slots.append(i * per_image)
            slots += [i * per_image + 1 + r * g + c for r, c in plan.kept_tiles(i)]
    return batch, torch.tensor(slots, dtype=torch.int64, device=model.device)


@dataclass
class PadMap:
    """A packed batch right-padded to ``(B, L)``: `index` int64 ``(T,)`` its rows in the flat ``B*L`` grid,
    `targets` int64 ``(B*L,)`` (-100 at pads: the loss ignores them)."""

    B: int
    L: int
    index: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, batch: SphinxBatch) -> PadMap:
        cu = batch.cu_seqlens.tolist()
        B, L = len(cu) - 1, max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
        index = torch.cat([torch.arange(cu[i + 1] - cu[i]) + i * L for i in range(B)]).to(
            batch.targets.device
        )
        targets = batch.targets.new_full((B * L,), IGNORE_INDEX).index_copy(0, index, batch.targets)
        return cls(B, L, index, targets)


# ----------------------------------------------------------------------------------------------- backends
@contextlib.contextmanager
def kernels(best: bool) -> Iterator[None]:
    """Every sphinx_kernels call inside on the automatic best backend (`best`) or forced to ``torch``."""
    old = os.environ.pop(ENV_VAR, None)
    if not best:
        os.environ[ENV_VAR] = "torch"
    try:
        yield
    finally:
        os.environ.pop(ENV_VAR, None)
        if old is not None:
            os.environ[ENV_VAR] = old


# ----------------------------------------------------------------------------------------------- padded LLM
def _block(layer, h: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
    """One `sphinx_x.llm.Block` on ``(B, L, dim)`` with PyTorch ops: `attend(q, k, v)` gets ``(B, H, L, D)``
    queries and ``(B, Hkv, L, D)`` keys/values after RoPE (torch backend) and returns ``(B, Hq, L, D)``."""
    a = layer.attention
    B, L, _ = h.shape
    y = layer.attention_norm(h)
    q = a.wq(y).view(B * L, a.n_heads, a.head_dim)
    k = a.wk(y).view(B * L, a.n_kv_heads, a.head_dim)
    v = a.wv(y).view(B, L, a.n_kv_heads, a.head_dim).transpose(1, 2)
    q = sk.apply_rotary(q, pos, a.rope_theta, backend="torch").view(B, L, a.n_heads, a.head_dim)
    k = sk.apply_rotary(k, pos, a.rope_theta, backend="torch").view(B, L, a.n_kv_heads, a.head_dim)
    o = attend(q.transpose(1, 2), k.transpose(1, 2), v)
    h = h + a.wo(o.transpose(1, 2).reshape(B, L, a.n_heads * a.head_dim))
    x = layer.ffn_norm(h)
    ff = layer.feed_forward(x.view(B * L, -1))
    ff = ff[0] if isinstance(ff, tuple) else ff  # MoE: (out, aux, logits); pads are routed too, as originally
    return h + ff.view(B, L, -1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # The original (and HF's repeat_kv) copies each k/v head for its query heads before SDPA.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def padded_sdpa_hidden(llm, x: torch.Tensor) -> torch.Tensor:
    """The original decoder pass: right-padded ``(B, L, dim)`` embeddings -> final normed hidden ``(B, L, dim)``
    through ``F.scaled_dot_product_attention(is_causal=True)`` (with right padding, causal attention never
    lets a real token see a pad, so real rows are exact)."""
    B, L, _ = x.shape
    pos = torch.arange(L, device=x.device).repeat(B)
    groups = llm.cfg.n_heads // llm.cfg.n_kv_heads

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), is_causal=True)

    h = x
    for layer in llm.layers:
        h = _block(layer, h, pos, attend)
    return llm.norm(h)


def padded_loss(model: SphinxX, batch: SphinxBatch, pad: PadMap, *, sdpa: bool) -> torch.Tensor:
    """Mean cross-entropy over the supervised tokens of `batch`, computed right-padded as ``(B, L)`` with logits
    for every position (the original). `sdpa`: the original padded-SDPA decoder; else the LLM's own forward
    on ``(B, L)`` (our kernels over the padded rows)."""
    embeds = model.embed(batch)  # vision towers + projection scattered into the token embeddings, (T, dim)
    x = embeds.new_zeros(pad.B * pad.L, embeds.shape[1]).index_copy(0, pad.index, embeds)
    x = x.view(pad.B, pad.L, -1)
    if sdpa:
        logits = model.llm.output(padded_sdpa_hidden(model.llm, x))
    else:
        logits = model.llm(inputs_embeds=x).logits
    logits = logits.reshape(pad.B * pad.L, -1)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(logits, pad.targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(batch.num_supervised, 1)


# ----------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Variant:
    name: str
    skip: bool  # skip tokens (else every sub-image encoded)
    packed: bool  # one packed stream (else right-padded (B, L) with padded SDPA / full logits)
    best: bool  # best kernel backends (else the torch backend)


OURS = Variant("ours", True, True, True)
ORIGINAL = Variant("original", False, False, False)
VARIANTS = (
    OURS,
    ORIGINAL,
    Variant("skip only", True, False, False),
    Variant("packing only", False, True, False),
    Variant("kernels only", False, False, True),
)


class Workload:
    """One batch of samples laid out both ways (skip-token layout from ``model.prepare``, the original from
    `full_layout`) and padded both ways; `loss(variant)` gathers the views from the uint8 images (inside the
    timed step: it is per-step work) and computes the loss."""

    def __init__(self, model: SphinxX, samples: Sequence[dict]) -> None:
        self.model = model
        self.samples = list(samples)
        self.images = [s["image"] for s in samples if s.get("image") is not None]
        with torch.no_grad():
            self.skip = model.prepare(samples)
        self.full, self.slots = full_layout(model, samples)
        self.pad = {True: PadMap.of(self.skip), False: PadMap.of(self.full)}
        self.view_dtype = self.skip.views.dtype if self.skip.views is not None else model.dtype
        g = model.config.grid
        self.views_all = len(self.images) * (1 + g * g)
        self.views_kept = 0 if self.skip.plan is None else self.skip.plan.num_views

    def views(self, skip: bool) -> torch.Tensor | None:
        """Normalised views, uint8 images -> ``(V, 3, t, t)``, on the backend in force. Without skip tokens, a
        skipped tile is the original's crop of pure padding: padding is the normalisation mean, so that view is
        exactly zero (tests/test_bench_e2e.py checks it against an F.interpolate canvas); it is written as
        zeros and still goes through the encoders, as in the original."""
        if not self.images:
            return None
        cfg = self.model.config
        with torch.no_grad():
            kept, _ = sk.tile_gather(self.images, cfg.canvas, cfg.grid, dtype=self.view_dtype)
            if skip:
                return kept
            full = kept.new_zeros(self.views_all, *kept.shape[1:])
            return full.index_copy_(0, self.slots, kept)

    def loss(self, v: Variant) -> torch.Tensor:
        with kernels(v.best):
            layout = self.skip if v.skip else self.full
            batch = dataclasses.replace(layout, views=self.views(v.skip))
            if v.packed:
                return self.model(batch).loss
            return padded_loss(self.model, batch, self.pad[v.skip], sdpa=not v.best)

    # -- work counts -------------------------------------------------------------------------------------
    def positions(self, v: Variant) -> int:
        """LLM positions the variant computes (padding included)."""
        if v.packed:
            return (self.skip if v.skip else self.full).num_tokens
        pad = self.pad[v.skip]
        return pad.B * pad.L

    def encoded_views(self, v: Variant) -> int:
        return self.views_kept if v.skip else self.views_all

    @property
    def tokens(self) -> int:
        """The samples' positions in the skip-token layout: the one numerator of every variant's tokens/s."""
        return self.skip.num_tokens


def train_step(workload: Workload, v: Variant, opt: torch.optim.Optimizer) -> None:
    loss = workload.loss(v)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def env_row(device: torch.device | str | None = None) -> dict[str, str]:
    """`harness.environment(device)` (device, CPU model and ISA, cores, threads, GPU, date, versions, load
    average); `device`: where the row was measured (a CPU row on a GPU machine stamps the CPU)."""
    return environment(device)


def shape_of(model: SphinxX, wl: Workload, aspect: str) -> str:
    return (
        f"config={model.config.name} dtype={str(model.dtype).removeprefix('torch.')} B={len(wl.samples)} "
        f"images={len(wl.images)} tokens={wl.tokens} aspect={aspect}"
    )


def train_rows(
    model: SphinxX,
    samples: Sequence[dict],
    case: str,
    aspect: str,
    variants: Sequence[Variant],
    rounds: int,
    report: bool = True,
) -> list[Row]:
    """Interleaved training steps of `variants` on `samples`: one Row each (tokens/s, images/s in the note)."""
    device = model.device
    wl = Workload(model, samples)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6, betas=(0.9, 0.95))
    # Same loss for every variant of one skip setting: printed here, asserted against float64 in the tests.
    with torch.no_grad():
        losses = {v.name: float(wl.loss(v)) for v in variants}
    fns = {v.name: (lambda v=v: train_step(wl, v, opt)) for v in variants}
    seconds = round_robin_medians(fns, rounds, device)
    env = env_row(device)
    base = seconds.get(ORIGINAL.name)
    rows = []
    for v in variants:
        s = seconds[v.name]
        note = (
            f"{len(wl.images) / s:.2f} images/s; {wl.encoded_views(v)} views encoded; "
            f"{wl.positions(v)} positions computed; loss {losses[v.name]:.6f}"
        )
        if base is not None:
            note += f"; {base / s:.2f}x original"
        rows.append(
            Row("e2e", case, v.name, shape_of(model, wl, aspect), s, wl.tokens / s, "tokens/s", "", note, env)
        )
    if report:
        _report_train(wl, variants, seconds, losses)
    return rows


def _report_train(wl: Workload, variants, seconds: dict[str, float], losses: dict[str, float]) -> None:
    full_real = wl.full.num_tokens
    pad = wl.pad[False]
    if wl.views_all:
        print(
            f"\n  views encoded: ours {wl.views_kept}, original {wl.views_all} "
            f"({wl.views_all - wl.views_kept} not encoded, {100 * (1 - wl.views_kept / wl.views_all):.0f}%)"
        )
    else:
        print("\n  no image in this batch")
    print(
        f"  LLM positions: ours {wl.tokens} packed; original {pad.B * pad.L} = {pad.B} x {pad.L} padded "
        f"({pad.B * pad.L - full_real} pads + {full_real - wl.tokens} positions of tiles skip tokens replace: "
        f"{pad.B * pad.L - wl.tokens} not computed, {pad.B * pad.L / wl.tokens:.2f}x the work)"
    )
    for skip in (True, False):
        same = [losses[v.name] for v in variants if v.skip == skip]
        if len(same) > 1:
            spread = (max(same) - min(same)) / abs(statistics.mean(same))
            print(
                f"  loss, skip tokens {'on' if skip else 'off'}: {same[0]:.6f}, relative spread {spread:.1e}"
            )
    if ORIGINAL.name in seconds and OURS.name in seconds:
        print(f"  ours / original: {seconds[ORIGINAL.name] / seconds[OURS.name]:.2f}x")


# ----------------------------------------------------------------------------------------------- generation
@torch.inference_mode()
def padded_generate(
    llm, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, timings: dict | None = None
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy generation the padded way: prompts ``(L_i, dim)`` left-padded to ``(B, Lmax, dim)``, one
    ``(B, Hkv, Lmax + max_new_tokens, D)`` cache per layer, masked SDPA (pads masked as keys; a pad query sees
    itself so that no row is fully masked), positions counted from each prompt's first real token.
    Returns the tokens per prompt and the prefill's last-position logits ``(B, V)``; `timings` gets
    ``prefill`` / ``decode`` seconds."""
    cfg = llm.cfg
    w = llm.tok_embeddings.weight
    device, dtype = w.device, w.dtype
    B, Lmax = len(prompts), max(int(p.shape[0]) for p in prompts)
    cap = Lmax + max_new_tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    x = torch.zeros(B, Lmax, cfg.dim, dtype=dtype, device=device)
    real = torch.zeros(B, cap, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        x[i, Lmax - p.shape[0] :] = p.to(dtype)
        real[i, Lmax - p.shape[0] :] = True
    real[:, Lmax:] = True
    pos = (real[:, :Lmax].long().cumsum(1) - 1).clamp(min=0)
    lengths = real[:, :Lmax].sum(1)
    caches = [
        (
            torch.zeros(B, cfg.n_kv_heads, cap, cfg.head_dim, dtype=dtype, device=device),
            torch.zeros(B, cfg.n_kv_heads, cap, cfg.head_dim, dtype=dtype, device=device),
        )
        for _ in llm.layers
    ]
    groups = cfg.n_heads // cfg.n_kv_heads

    def run(h: torch.Tensor, pos: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        n = h.shape[1]
        for layer, (kc, vc) in zip(llm.layers, caches, strict=True):

            def attend(q, k, v, kc=kc, vc=vc):
                kc[:, :, start : start + n] = k
                vc[:, :, start : start + n] = v
                K, V = _repeat_kv(kc[:, :, : start + n], groups), _repeat_kv(vc[:, :, : start + n], groups)
                return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)

            h = _block(layer, h, pos.reshape(-1), attend)
        return llm.output(llm.norm(h[:, -1]))

    causal = torch.ones(Lmax, Lmax, dtype=torch.bool, device=device).tril()
    eye = torch.eye(Lmax, dtype=torch.bool, device=device)
    mask = (causal[None] & real[:, None, :Lmax]) | eye[None]
    first_logits = run(x, pos, 0, mask[:, None])
    tokens = first_logits.argmax(-1)
    out = [tokens]
    sync()
    t1 = time.perf_counter()
    for step in range(1, max_new_tokens):
        at = Lmax + step - 1
        h = llm.tok_embeddings(tokens)[:, None]
        tokens = run(h, (lengths + step - 1)[:, None], at, real[:, None, None, : at + 1]).argmax(-1)
        out.append(tokens)
    sync()
    if timings is not None:
        timings["prefill"], timings["decode"] = t1 - t0, time.perf_counter() - t1
    return torch.stack(out, 1).tolist(), first_logits


def packed_generate(
    llm, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, timings: dict | None = None
) -> list[list[int]]:
    """Ours: `sphinx_x.generate.generate_stream` (greedy, packed KV cache); its first yield ends the prefill."""
    from sphinx_x.generate import generate_stream

    device = llm.tok_embeddings.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: list[list[int]] = [[] for _ in prompts]
    sync()
    t0 = time.perf_counter()
    t1 = None
    for row in generate_stream(llm, list(prompts), max_new_tokens=max_new_tokens):
        if t1 is None:
            sync()
            t1 = time.perf_counter()
        for seq, t in zip(out, row, strict=True):
            seq.append(t)
    sync()
    if timings is not None:
        timings["prefill"], timings["decode"] = t1 - t0, time.perf_counter() - t1
    return out


def prompt_embeddings(model: SphinxX, samples: Sequence[dict]) -> list[torch.Tensor]:
    """Per sample (conversation cut before its last answer) its prompt embeddings ``(L_i, dim)``, images in."""
    asks = [{**s, "conversations": s["conversations"][:-1]} for s in samples]
    with torch.inference_mode():
        batch = model.prepare(asks, generation=True)
        embeds = model.embed(batch)
    cu = batch.cu_seqlens.tolist()
    return [embeds[a:b].clone() for a, b in zip(cu[:-1], cu[1:], strict=True)]


def generation_rows(
    model: SphinxX, samples: Sequence[dict], batch: int, new_tokens: int, rounds: int
) -> list[Row]:
    """Prefill and decode tokens/s of ours and the padded way on the first `batch` samples' prompts."""
    prompts = prompt_embeddings(model, samples[:batch])
    impls = {
        OURS_GEN: lambda t: packed_generate(model.llm, prompts, new_tokens, timings=t),
        PADDED_GEN: lambda t: padded_generate(model.llm, prompts, new_tokens, timings=t)[0],
    }
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in impls}
    tokens: dict[str, list] = {}
    model.eval()
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn in impls.items():
            t: dict[str, float] = {}
            with kernels(name.startswith("ours")):
                tokens[name] = fn(t)
            if r:
                for phase in t:
                    times[name][phase].append(t[phase])
    model.train()
    same = tokens[OURS_GEN] == tokens[PADDED_GEN]
    env = env_row(model.llm.tok_embeddings.weight.device)
    prefill_tokens = sum(int(p.shape[0]) for p in prompts)
    decode_tokens = len(prompts) * (new_tokens - 1)
    shape = (
        f"config={model.config.name} dtype={str(model.dtype).removeprefix('torch.')} B={len(prompts)} "
        f"prompt tokens={prefill_tokens} Lmax={max(int(p.shape[0]) for p in prompts)} new={new_tokens}"
    )
    rows = []
    for phase, count in (("prefill", prefill_tokens), ("decode", max(decode_tokens, 1))):
        base = statistics.median(times[PADDED_GEN][phase])
        for name in impls:
            s = statistics.median(times[name][phase])
            note = f"{base / s:.2f}x padded; greedy tokens {'equal' if same else 'DIFFER'}"
            rows.append(
                Row(
                    "e2e",
                    f"generate {phase} b={len(prompts)}",
                    name,
                    shape,
                    s,
                    count / s,
                    "tokens/s",
                    "",
                    note,
                    env,
                )
            )
    return rows


# ----------------------------------------------------------------------------------------------- main
# --smoke: the tiny preset with a one-layer LLM of width 64 (the towers are tiny already).
SMOKE_OVERRIDES = {"llm": {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96}}


def build_model(name: str, device: str, seed: int = 0, **overrides) -> SphinxX:
    torch.manual_seed(seed)
    model = SphinxX(get_config(name, **overrides), device=device)
    model.train()
    return model


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=None, help="preset (default: tiny on the CPU, sphinx-tiny on CUDA)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="samples per training step (default 8; 8 GPU)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per candidate (median)")
    parser.add_argument(
        "--gen-rounds",
        type=int,
        default=9,
        help="timed generations per candidate (median; a tiny decode step is ~2 ms of dispatch: at 3 rounds "
        "the batch-1 ratio swung 0.5x-1.4x between runs of the same code on a quiet VM)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gpu", action="store_true", help="CUDA only: the 1B-class preset sphinx-tiny in bf16 (no CPU run)"
    )
    parser.add_argument("--cpu", action="store_true", help="the CPU only, also where CUDA is available")
    parser.add_argument(
        "--parts",
        default="train,aspect,batch,generate",
        help="comma-separated: train (the mix, every variant), aspect (ours vs original per aspect ratio, "
        "batch/2 samples), batch (ours vs original at batch/4 and batch/2), generate",
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 16; 64 GPU)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, one round (tests)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="do not append rows to <results>/e2e.csv")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and args.cpu:
        raise SystemExit("--gpu and --cpu exclude each other (neither: the CPU, then the GPU when present)")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    both = torch.cuda.is_available() and not (args.cpu or args.smoke)  # --smoke: the tests' CPU run only
    devices = ["cuda"] if args.gpu else ["cpu", "cuda"] if both else ["cpu"]
    rows: list[Row] = []
    for device in devices:
        rows += run_device(args, device)
    print_table([r for r in rows if r.case.startswith("train")], baseline=ORIGINAL.name)
    print_table([r for r in rows if r.case.startswith("generate")], baseline=PADDED_GEN)
    if not args.no_write and rows:
        print(f"\nrows appended to {args.results / 'e2e.csv'}")
    return rows


def run_device(args: argparse.Namespace, device: str) -> list[Row]:
    """Every part of `args.parts` on `device`: ``--config``, else tiny on the CPU and sphinx-tiny on CUDA."""
    gpu = device == "cuda"
    name = args.config or ("sphinx-tiny" if gpu else "tiny")
    batch = args.batch or (2 if args.smoke else 8)
    rounds = 1 if args.smoke else args.rounds
    new_tokens = args.new_tokens or (3 if args.smoke else 64 if gpu else 16)
    model = build_model(name, device, args.seed, **(SMOKE_OVERRIDES if args.smoke else {}))
    where = "gpu" if gpu else "cpu"

    parts = set(args.parts.split(","))
    rows: list[Row] = []

    def done(new: list[Row]) -> None:
        # Rows are appended as each part ends: a long CPU run that is stopped keeps what it measured.
        rows.extend(new)
        if not args.no_write and new:
            write_rows(new, "e2e", args.results)

    kinds = ("short",) if args.smoke else None
    if "train" in parts:
        mix = make_samples(model, batch, seed=args.seed, kinds=kinds, device=device)
        print(
            f"training step, {name} on {device}, {batch} samples of the aspect/conversation mix, "
            f"{rounds} rounds"
        )
        done(train_rows(model, mix, f"train {where} mix", "mix", VARIANTS, rounds))
    pair = (OURS, ORIGINAL)
    if "aspect" in parts and not args.smoke:
        sweep = max(batch // 2, 2)
        for aspect in ASPECTS:
            samples = make_samples(model, sweep, seed=args.seed + 1, aspect=aspect, device=device)
            print(f"\naspect {aspect}: {sweep} samples")
            done(train_rows(model, samples, f"train {where} aspect {aspect}", aspect, pair, rounds))
    if "batch" in parts and not args.smoke:
        for b in (batch // 4, batch // 2):
            if b >= 2:
                samples = make_samples(model, b, seed=args.seed + 2, device=device)
                print(f"\nmix, {b} samples")
                done(train_rows(model, samples, f"train {where} mix B={b}", "mix", pair, rounds))
    if "generate" in parts:
        sizes = (1, 2) if args.smoke else (1, 16)
        gen_samples = make_samples(
            model, max(sizes), seed=args.seed + 3, kinds=kinds, reserve=new_tokens, device=device
        )
        for b in sizes:
            done(generation_rows(model, gen_samples, b, new_tokens, 1 if args.smoke else args.gen_rounds))
    del model
    if gpu:
        torch.cuda.empty_cache()
    return rows


def _pytest_candidates() -> dict:
    """The CPU training-step candidates of the default run (tiny, 8 samples of the mix), one per variant."""
    model = build_model("tiny", "cpu")
    wl = Workload(model, make_samples(model, 8, seed=0))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6, betas=(0.9, 0.95))
    return {v.name: (lambda v=v: train_step(wl, v, opt)) for v in VARIANTS}


# pytest-benchmark (``pytest benchmarks/bench_e2e.py --benchmark-only``): one test per training variant.
test_bench_e2e_train_step = pytest_benchmark_test(_pytest_candidates, [v.name for v in VARIANTS])


if __name__ == "__main__":
    main()
