"""Data loading for SPHINX-X: images as raw uint8 tensors (the tile kernel normalises them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

ASSETS = Path(__file__).parent / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 ``(H, W, 3)`` RGB tensor (grey, palette and alpha converted)."""
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header alone (no pixel is decoded), for planning and packing."""
    with Image.open(path) as img:
        width, height = img.size
    return height, width


def bundled_images() -> list[Path]:
    """The small images shipped with the package (different aspect ratios), sorted by name."""
    return sorted(p for p in (ASSETS / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
