"""`sphinx-x make-demo-data`: a small multimodal conversation set that a tiny model learns on a CPU.

Images of varied aspect ratios (square to 3:1, landscape and portrait, so skip tokens matter) with one to
three solid shapes of distinct colours and kinds on a light background, and multi-turn questions whose
answer the image decides: how many shapes, the colour of a kind, the kind of a colour, whether a colour is
present, on which side a shape lies, and its grounding box ``[x0, y0, x1, y1]`` (coordinates normalised to
0..1 with two decimals, as SPHINX answers). The answer vocabulary is small (five colours, three kinds,
1..3, yes/no, two sides) so a model of a few million parameters learns from a few hundred steps; plus
text-only conversations (colour mixing, opposites, counting on) that keep the text side trained.

Every turn carries a ``"kind"`` key (the question type) for per-type accuracy; the first three held-out
samples are fixed showcases (their images and questions do not depend on the seed) for `sphinx-x chat`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 195, 30),
    "purple": (145, 55, 185),
}
KINDS = ("circle", "square", "triangle")
# Width:height; from 1:3 portraits to 3:1 panoramas (at grid 2, 2:1 and wider skip half of the tiles).
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (2, 1), (1, 2), (3, 1), (1, 3))
MIXES = {
    ("blue", "yellow"): "green",
    ("red", "yellow"): "orange",
    ("red", "blue"): "purple",
    ("red", "white"): "pink",
    ("black", "white"): "grey",
}
OPPOSITES = {"big": "small", "hot": "cold", "up": "down", "left": "right", "day": "night", "open": "closed"}
OPPOSITES.update({v: k for k, v in OPPOSITES.items()})

# Questions per image sample: several share one image and one system prompt (a sample's fixed cost).
MIN_TURNS, MAX_TURNS = 2, 3
# How often each kind of question is asked (relative): a box answer is ~26 tokens of digits against 3-8 for
# the others, so at equal odds boxes would be half of all supervised tokens while being the slowest to learn.
KIND_WEIGHTS = {"count": 1.0, "colour": 3.0, "shape": 1.0, "exists": 1.0, "side": 1.0, "box": 0.3}
# Most images hold one large shape: its colour then fills a good share of the visual tokens, a signal
# a tiny decoder picks up in a few hundred steps (small shapes among many tokens take it thousands).
SHAPE_COUNTS, SHAPE_COUNT_ODDS = (1, 2, 3), (0.7, 0.2, 0.1)

# The three showcase images of the held-out split: (width, height, [(colour, kind, x0, y0, x1, y1)], question,
# answer, question kind). Fixed so that `make demo` can name them; asked about colour, what the tiny model
# reads from the image most reliably after one epoch (~80% held-out; kinds ~60%, count/side/box near their
# priors), on a 3:1 panorama (half its tiles skipped), a 1:2 portrait and a 4:3 landscape, one shape each:
# which of two shapes has which colour stays a coin toss at this size (a two-shape showcase was answered
# with the other shape's colour after a change that only reordered a gradient sum).
SHOWCASES = (
    (192, 64, [("blue", "square", 14, 8, 62, 56)],
     "What colour is the square?", "blue", "colour"),
    (72, 144, [("green", "triangle", 8, 40, 64, 96)],
     "What colour is the triangle?", "green", "colour"),
    (160, 120, [("red", "triangle", 96, 54, 146, 104)],
     "What colour is the triangle?", "red", "colour"),
)  # fmt: skip


@dataclass(frozen=True)
class DemoData:
    """Where `make_demo_data` wrote everything (all inside its output folder)."""

    root: Path
    train: Path  # the YAML mix: image conversations + text-only conversations
    heldout: Path  # JSONL: held-out image and text samples
    showcases: list[tuple[Path, str, str]]  # (image, question, expected answer) for `sphinx-x chat`


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _render(path: Path, width: int, height: int, shapes, background) -> None:
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    for colour, kind, *box in shapes:
        _draw(draw, kind, tuple(box), COLOURS[colour])
    img.save(path)


def _random_image(rng: np.random.Generator):
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    long_side = int(rng.integers(144, 193))
    scale = long_side / max(aw, ah)
    width, height = max(24, round(aw * scale)), max(24, round(ah * scale))
    n = int(rng.choice(SHAPE_COUNTS, p=SHAPE_COUNT_ODDS))
    colours = rng.choice(list(COLOURS), size=n, replace=False).tolist()
    kinds = rng.choice(KINDS, size=n, replace=False).tolist()
    short = min(width, height)
    shapes = []
    for colour, kind in zip(colours, kinds, strict=True):
        for _ in range(200):  # rejection sampling of non-overlapping boxes (with a margin)
            side = int(short * (rng.uniform(0.6, 0.9) if n == 1 else rng.uniform(0.4, 0.6)))
            side = min(side, short - 4)
            x0, y0 = int(rng.integers(2, width - side - 1)), int(rng.integers(2, height - side - 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[2] + 3 < b[2] or b[4] + 3 < box[0] or box[3] + 3 < b[3] or b[5] + 3 < box[1]
                for b in shapes
            ):
                shapes.append((colour, kind, *box))
                break
    return width, height, shapes


def _box_text(box, width: int, height: int) -> str:
    x0, y0, x1, y1 = box
    return f"[{x0 / width:.2f}, {y0 / height:.2f}, {x1 / width:.2f}, {y1 / height:.2f}]"


def _questions(rng: np.random.Generator, width: int, height: int, shapes) -> list[tuple[str, str, str]]:
    """Every question the image answers: (question, answer, kind)."""
    qs = [("How many shapes are there?", str(len(shapes)), "count")]
    present = {s[0] for s in shapes}
    for colour, kind, *box in shapes:
        qs.append((f"What colour is the {kind}?", colour, "colour"))
        qs.append((f"What shape is the {colour} one?", kind, "shape"))
        qs.append((f"Give the box of the {colour} {kind}.", _box_text(box, width, height), "box"))
        # Which side, only where it is clear (centre outside the middle fifth), along the long axis.
        if width >= height:
            centre = (box[0] + box[2]) / 2 / width
            q, sides = f"Is the {colour} {kind} on the left or the right?", ("left", "right")
        else:
            centre = (box[1] + box[3]) / 2 / height
            q, sides = f"Is the {colour} {kind} at the top or the bottom?", ("top", "bottom")
        if abs(centre - 0.5) > 0.1:
            qs.append((q, sides[centre > 0.5], "side"))
    colour = str(rng.choice(list(COLOURS)))
    qs.append((f"Is there a {colour} shape?", "yes" if colour in present else "no", "exists"))
    return qs


def _conversation(turns: list[tuple[str, str, str]]) -> list[dict]:
    out = []
    for question, answer, kind in turns:
        out.append({"from": "human", "value": question})
        out.append({"from": "gpt", "value": answer, "kind": kind})
    return out


def _image_samples(rng, folder: Path, prefix: str, count: int) -> list[dict]:
    samples = []
    for i in range(count):
        width, height, shapes = _random_image(rng)
        name = f"{prefix}_{i:05d}.png"
        _render(folder / name, width, height, shapes, tuple(int(c) for c in rng.integers(238, 256, size=3)))
        qs = _questions(rng, width, height, shapes)
        weights = np.array([KIND_WEIGHTS[q[2]] for q in qs])
        turns = min(len(qs), int(rng.integers(MIN_TURNS, MAX_TURNS + 1)))
        picks = rng.choice(len(qs), size=turns, replace=False, p=weights / weights.sum())
        samples.append(
            {
                "id": f"{prefix}-{i}",
                "image": f"images/{name}",
                "conversations": _conversation([qs[k] for k in picks]),
            }
        )
    return samples


def _text_samples(rng, prefix: str, count: int) -> list[dict]:
    samples = []
    for i in range(count):
        turns = []
        for _ in range(int(rng.integers(1, 4))):
            pick = rng.integers(3)
            if pick == 0:
                (a, b), mixed = list(MIXES.items())[rng.integers(len(MIXES))]
                a, b = (a, b) if rng.random() < 0.5 else (b, a)
                turns.append((f"What colour do you get by mixing {a} and {b}?", mixed, "mix"))
            elif pick == 1:
                word = list(OPPOSITES)[rng.integers(len(OPPOSITES))]
                turns.append((f"What is the opposite of {word}?", OPPOSITES[word], "opposite"))
            else:
                n = int(rng.integers(0, 9))
                turns.append((f"What number comes after {n}?", str(n + 1), "next"))
        samples.append({"id": f"{prefix}-text-{i}", "conversations": _conversation(turns)})
    return samples


def _write_jsonl(path: Path, samples: list[dict]) -> None:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")


def make_demo_data(
    out: str | Path,
    *,
    train_images: int = 6000,
    heldout_images: int = 60,
    train_text: int = 600,
    heldout_text: int = 20,
    seed: int = 0,
) -> DemoData:
    """Write the demo set into `out`: ``images/*.png``, ``train_images.jsonl``, ``train_text.jsonl``,
    ``train.yaml`` (the mix of both, ratio 1 each) and ``heldout.jsonl`` (held-out images, the three
    showcases first, and held-out text conversations). Deterministic for a given `seed`."""
    if min(train_images, heldout_images, train_text, heldout_text) < 0:
        raise ValueError("sample counts must be >= 0")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = _image_samples(rng, root / "images", "train", train_images)
    text = _text_samples(rng, "train", train_text)

    held_rng = np.random.default_rng([seed, 1])  # its own stream: the split does not move with train sizes
    showcases, heldout = [], []
    for i, (width, height, shapes, question, answer, kind) in enumerate(SHOWCASES):
        name = f"showcase_{i}.png"
        _render(root / "images" / name, width, height, shapes, (245, 245, 245))
        extra = [q for q in _questions(held_rng, width, height, shapes) if q[0] != question][:2]
        heldout.append(
            {
                "id": f"showcase-{i}",
                "image": f"images/{name}",
                "conversations": _conversation([(question, answer, kind), *extra]),
            }
        )
        showcases.append((root / "images" / name, question, answer))
    heldout += _image_samples(held_rng, root / "images", "heldout", max(0, heldout_images - len(SHOWCASES)))
    heldout += _text_samples(held_rng, "heldout", heldout_text)

    _write_jsonl(root / "train_images.jsonl", train)
    _write_jsonl(root / "train_text.jsonl", text)
    _write_jsonl(root / "heldout.jsonl", heldout)
    (root / "train.yaml").write_text(
        "# The demo mix: {path, root?, ratio?} per dataset, paths relative to this file.\n"
        "META:\n  - path: train_images.jsonl\n    ratio: 1.0\n  - path: train_text.jsonl\n    ratio: 1.0\n",
        encoding="utf-8",
    )
    return DemoData(root, root / "train.yaml", root / "heldout.jsonl", showcases)


def chance_accuracy(answers_by_kind: dict[str, list[str]]) -> dict[str, float]:
    """Per question kind, the accuracy of always giving that kind's most frequent answer (the bar a model
    that ignores the image would reach; boxes: 0, as no fixed box matches most)."""
    out = {}
    for kind, answers in answers_by_kind.items():
        if kind == "box" or not answers:
            out[kind] = 0.0
            continue
        values, counts = np.unique(np.asarray(answers), return_counts=True)
        out[kind] = float(counts.max() / len(answers))
    return out


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(text: str) -> list[float] | None:
    """``[x0, y0, x1, y1]`` from an answer, or None when it holds no such box."""
    import re

    m = re.search(r"\[\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\]", text)
    if not m:
        return None
    try:
        box = [float(v) for v in m.groups()]
    except ValueError:
        return None
    return box if all(math.isfinite(v) for v in box) else None
