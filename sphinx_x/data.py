"""Conversation data for SPHINX-X: reading, mixing, token-budget packing and image decoding in workers.

The pipeline, in the order a run meets it:

1. ``read_samples`` reads one dataset in the LLaVA / LLaMA2-Accessory schema (a JSON list or JSONL file of
   ``{"id", "image"?, "conversations": [{"from": "human" | "gpt", "value"}, ...]}``), strips ``<image>``
   markers and resolves image paths against the dataset's root. ``load_mix`` reads a YAML list of datasets
   ``{path, root?, ratio?}`` and mixes them by ratio.
2. ``measure`` gives every sample its exact LLM length from the image header alone (``image_size``) and a
   length function (the model's ``sample_length``: text tokens plus the image's positions from
   ``plan_tiles``, skip tokens included); no pixel is decoded. Missing images and samples longer than the
   budget are handled here (skipped / cut at a turn boundary / dropped) and counted in ``DataStats``.
3. ``plan_epoch`` packs the samples of one epoch into token-budget bins with ``sphinx_kernels.pack_bins``
   (first-fit decreasing inside shuffled windows), so every micro-batch is one padding-free packed stream.
4. ``PackedBins`` is the DataLoader dataset: its ``__getitem__`` runs in the worker processes and decodes the
   bin's images with Pillow (EXIF orientation applied, RGB) into uint8 ``(H, W, 3)`` tensors; normalisation
   and tiling happen later, in one ``tile_gather`` pass on the training device.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps

import sphinx_kernels as sk

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ROLES = ("human", "gpt")
# EXIF orientations 5..8 are the transposed ones (a 90 or 270 degree turn): height and width swap.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)
# `<image>` with the newline LLaVA puts next to it; the model places the image itself (after BOS).
_IMAGE_MARKER = re.compile(r"\n?<image>\n?")
# What Pillow raises for a missing, truncated or undecodable file (DecompressionBombError is not an OSError).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

LengthFn = Callable[[dict, "tuple[int, int] | None"], int]


# ---------------------------------------------------------------------------------------------- images


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 ``(H, W, 3)`` RGB tensor: EXIF orientation applied (as a viewer shows
    the photo), grey, palette and alpha converted."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header alone (no pixel is decoded), as `load_image` will return
    it (EXIF orientation applied), for planning and packing."""
    with Image.open(path) as img:
        width, height = img.size
        if _orientation(img) in _TRANSPOSED:
            return width, height
    return height, width


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation from what `Image.open` parsed. A PNG's ``getexif()`` would decode the whole
    image to look for an eXIf chunk after the pixels; one before them (where Pillow writes it) is read
    at open. (One after them is rare; `PackedBins` then reports the size mismatch.)"""
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return None
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(_EXIF_ORIENTATION)
    return img.getexif().get(_EXIF_ORIENTATION)


def bundled_images() -> list[Path]:
    """The small images shipped with the package (different aspect ratios), sorted by name."""
    return sorted(p for p in (ASSETS / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# -------------------------------------------------------------------------------------- reading samples


def _normalise(raw: Any, where: str, root: Path) -> dict:
    """One raw record -> ``{"id", "image": str | None, "conversations": [...], **extra}``; a structural
    problem is a ValueError naming `where` (file and line or index)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a sample must be a JSON object, got {type(raw).__name__}")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    conversations = []
    for k, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in ROLES
            or not isinstance(turn.get("value"), str)
        ):
            raise ValueError(
                f"{where}: conversations[{k}] must be {{'from': 'human' | 'gpt', 'value': str}}, got {turn!r}"
            )
        if turn["from"] != ROLES[k % 2]:
            raise ValueError(
                f"{where}: conversations[{k}] is a {turn['from']!r} turn; turns alternate human, gpt, ..."
            )
        conversations.append({**turn, "value": _IMAGE_MARKER.sub("", turn["value"]).strip()})
    if not any(t["from"] == "gpt" for t in conversations):
        raise ValueError(f"{where}: no 'gpt' turn: nothing to learn from this sample")
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a relative or absolute path string, got {image!r}")
    sample = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
    sample["id"] = str(raw.get("id", where))
    sample["image"] = str(root / image) if image else None
    sample["conversations"] = conversations
    return sample


def read_samples(path: str | Path, root: str | Path | None = None) -> list[dict]:
    """Read one dataset: a JSON list or a JSONL file (one sample per line) in the LLaVA schema.

    ``<image>`` markers are stripped from the turns; image paths are resolved against `root` (default: the
    file's folder). A malformed line or a sample that breaks the schema is a ValueError naming the file and
    the line (JSONL) or the list index (JSON).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
        if not isinstance(records, list):
            raise ValueError(
                f"{path}: a JSON dataset must be a list of samples, got {type(records).__name__}"
            )
        return [_normalise(r, f"{path}[{i}]", root) for i, r in enumerate(records)]
    samples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: malformed JSON line: {exc.msg}") from None
        samples.append(_normalise(raw, f"{path}:{lineno}", root))
    return samples


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of a data mix: a JSON/JSONL file, the root its image paths are relative to, and its ratio
    (the fraction of its samples taken per epoch: 0.5 half of them, 2 every sample twice)."""

    path: Path
    root: Path | None = None
    ratio: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and self.ratio >= 0):
            raise ValueError(f"ratio of dataset {self.path} must be a finite number >= 0, got {self.ratio!r}")


def parse_mix(source: str | Path | Sequence[dict]) -> list[DatasetSpec]:
    """The datasets of a mix: a YAML file (a list, or a mapping with a ``META`` or ``datasets`` list, as in
    LLaMA2-Accessory) of ``{path, root?, ratio?}`` (paths relative to the YAML file), a single JSON/JSONL
    dataset file, or such a list given inline (paths as they are)."""
    base = Path(".")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() in (".json", ".jsonl"):
            return [DatasetSpec(path)]
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise ValueError(f"data {path}: expected a .yaml mix or a .json/.jsonl dataset")
        base = path.parent
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(entries, dict):
            keys = [k for k in ("META", "datasets") if k in entries]
            if not keys:
                raise ValueError(f"{path}: a mix must be a list or have a 'META' or 'datasets' list")
            entries = entries[keys[0]]
    else:
        entries, path = list(source), "data"
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: the mix must list at least one dataset")
    specs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(
                f"{path}: dataset {i} must be a mapping with 'path' (and 'root', 'ratio'), got {entry!r}"
            )
        unknown = set(entry) - {"path", "root", "ratio", "type"}  # `type` is Accessory's, ignored
        if unknown:
            raise ValueError(
                f"{path}: dataset {i} has unknown key(s) {sorted(unknown)}; valid: path, root, ratio"
            )
        root = entry.get("root")
        specs.append(
            DatasetSpec(
                base / entry["path"],
                base / root if root is not None else None,
                float(entry.get("ratio", 1.0)),
            )
        )
    return specs


def load_mix(source: str | Path | Sequence[dict], *, seed: int = 0) -> list[dict]:
    """Read every dataset of a mix (see `parse_mix`) and take each by its ratio: ``floor(ratio * n)``
    samples, whole copies for the integer part and a seeded random subset for the rest. Each sample gets a
    ``"dataset"`` key (the file it came from)."""
    samples = []
    for spec in parse_mix(source):
        data = read_samples(spec.path, spec.root)
        whole, part = divmod(spec.ratio, 1.0)
        rng = random.Random(f"{seed}:{spec.path}")
        chosen = list(range(len(data))) * int(whole) + sorted(
            rng.sample(range(len(data)), int(part * len(data)))
        )
        samples += [{**data[i], "dataset": str(spec.path)} for i in chosen]
        logger.info("dataset %s: %d samples, ratio %g -> %d", spec.path, len(data), spec.ratio, len(chosen))
    if not samples:
        raise ValueError(f"the data mix {source} gives no sample (empty files or ratios of 0)")
    return samples


# ------------------------------------------------------------------------------------ lengths and limits


@dataclass
class DataStats:
    """What the pipeline skipped, cut or dropped, so that nothing is lost silently: each case is a logged
    warning naming the sample; the counts go into the run's result, its checkpoints' trainer state and the
    ``sphinx-x train`` summary (``bad_images`` also into each step's metrics row)."""

    samples: int = 0
    images: int = 0
    missing_images: int = 0  # no readable header when measuring: skipped
    bad_images: int = 0  # decoding failed in a worker (truncated, corrupt, size unlike its header): skipped
    truncated: int = 0  # longer than the budget: cut at a turn boundary
    dropped_too_long: int = 0  # longer than the budget even with one exchange, or the flag says drop
    examples: list[str] = field(default_factory=list)  # a few ids with their reason, for the log

    def note(self, what: str, sample: dict, reason: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.examples) < 20:
            self.examples.append(f"{what}: {sample.get('id')} ({reason})")
        logger.warning("%s: sample %s: %s", what, sample.get("id"), reason)

    def as_dict(self) -> dict:
        return asdict(self)


def _cut_at_turns(sample: dict, keep: int) -> dict:
    """The sample with its first `keep` human/gpt exchanges (a turn boundary after a gpt reply)."""
    ends = [k + 1 for k, t in enumerate(sample["conversations"]) if t["from"] == "gpt"]
    return {**sample, "conversations": sample["conversations"][: ends[keep - 1]]}


def measure(
    samples: Sequence[dict],
    length_fn: LengthFn,
    budget: int,
    *,
    too_long: str = "truncate",
    on_bad_image: str = "skip",
    stats: DataStats | None = None,
    threads: int = 8,
) -> tuple[list[dict], list[int], DataStats]:
    """Exact LLM length of every sample from its image header, before any pixel is decoded.

    Args:
        samples: normalised samples (`read_samples` / `load_mix`).
        length_fn: ``length_fn(sample, (H, W) | None) -> int`` positions (the model's ``sample_length``).
        budget: tokens per packed bin; a longer sample is cut at a turn boundary (``too_long="truncate"``:
            the most leading exchanges that fit, dropped if even the first does not) or dropped
            (``"drop"``), and counted.
        on_bad_image: ``"skip"`` (warn and count) or ``"error"`` (raise naming the sample and the file) for a
            missing or unreadable image.
        threads: header reads in flight (file-system bound, not CPU bound).

    Returns:
        ``(kept samples, their lengths, stats)``, the kept ones in input order, each sample with a
        ``"image_size"`` key (``(H, W)`` or None).
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    stats = stats if stats is not None else DataStats()

    def header(sample: dict):
        if sample["image"] is None:
            return None
        try:
            return image_size(sample["image"])
        except _IMAGE_ERRORS as exc:
            return exc

    with ThreadPoolExecutor(max(1, threads)) as pool:
        sizes = list(pool.map(header, samples))
    kept, lengths = [], []
    for sample, size in zip(samples, sizes, strict=True):
        stats.samples += 1
        if isinstance(size, BaseException):
            if on_bad_image == "error":
                raise ValueError(
                    f"sample {sample['id']}: image {sample['image']} cannot be read: {size}"
                ) from size
            stats.note("missing_images", sample, f"{sample['image']}: {size}")
            continue
        n = length_fn(sample, size)
        if n > budget:
            exchanges = sum(t["from"] == "gpt" for t in sample["conversations"])
            keep = 0
            if too_long == "truncate":
                lo, hi = 0, exchanges - 1  # the longest prefix of exchanges that fits (lengths grow with it)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if length_fn(_cut_at_turns(sample, mid), size) <= budget:
                        lo = mid
                    else:
                        hi = mid - 1
                keep = lo
            if keep == 0:
                stats.note("dropped_too_long", sample, f"{n} tokens > budget {budget}")
                continue
            stats.note(
                "truncated", sample, f"{n} tokens > budget {budget}: kept {keep} of {exchanges} exchanges"
            )
            sample = _cut_at_turns(sample, keep)
            n = length_fn(sample, size)
        stats.images += size is not None
        kept.append({**sample, "image_size": size})
        lengths.append(n)
    return kept, lengths, stats


# ------------------------------------------------------------------------------------------------ packing


def plan_epoch(
    lengths: Sequence[int], budget: int, *, seed: int, epoch: int, window: int = 4096
) -> list[list[int]]:
    """The bins of one epoch: sample indices shuffled by ``(seed, epoch)``, packed first-fit decreasing
    (`sphinx_kernels.pack_bins`) in windows of `window` samples (multipack-style: the fill of FFD without
    its cost growing with the whole dataset), and the bins shuffled. Every rank computes the same plan."""
    if window < 1:
        raise ValueError(f"window must be >= 1 samples, got {window}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    bins = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        bins += [[chunk[k] for k in b] for b in sk.pack_bins([lengths[i] for i in chunk], budget)]
    return [bins[i] for i in rng.permutation(len(bins)).tolist()]


def bin_fill(bins: Sequence[Sequence[int]], lengths: Sequence[int], budget: int) -> float:
    """Fraction of the bins' token budget holding real tokens (1.0: no position wasted)."""
    return sum(lengths[i] for b in bins for i in b) / max(1, len(bins) * budget)


# ------------------------------------------------------------------------------------------ the dataset


class PackedBins(torch.utils.data.Dataset):
    """DataLoader dataset of packed bins; ``__getitem__`` runs in the worker processes.

    ``dataset[j]`` is ``{"samples": [...], "bad": [(id, reason), ...]}``: the samples of bin ``bins[j]``
    with each image decoded to a uint8 ``(H, W, 3)`` tensor (or None for text-only ones). A sample whose
    image fails to decode, or decodes to another size than its header promised, is left out and reported in
    ``"bad"`` (the trainer counts and logs it) or, with ``on_bad_image="error"``, raises.
    """

    def __init__(self, samples: Sequence[dict], bins: Sequence[Sequence[int]], *, on_bad_image: str = "skip"):
        self.samples, self.bins, self.on_bad_image = samples, bins, on_bad_image

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, j: int) -> dict:
        out, bad = [], []
        for i in self.bins[j]:
            sample = self.samples[i]
            image = None
            if sample["image"] is not None:
                try:
                    image = load_image(sample["image"])
                    if tuple(image.shape[:2]) != tuple(sample["image_size"]):
                        raise ValueError(
                            f"decoded size {tuple(image.shape[:2])} != header {sample['image_size']}"
                        )
                except _IMAGE_ERRORS as exc:
                    if self.on_bad_image == "error":
                        raise ValueError(f"sample {sample['id']}: image {sample['image']}: {exc}") from exc
                    bad.append((sample["id"], f"{sample['image']}: {exc}"))
                    continue
            out.append({**sample, "image": image})
        return {"samples": out, "bad": bad}
