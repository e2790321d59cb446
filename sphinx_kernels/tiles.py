"""Skip-token tile gathering: raw uint8 images -> normalised global view + kept tiles, padded tiles skipped.

Geometry (DESIGN.md): an ``H x W`` image is resized keeping its aspect ratio so its long side is ``canvas``
and placed at the top-left of a ``canvas x canvas`` canvas; the rest is padding with the mean colour, which
is exactly 0 after normalisation. The canvas is cut into ``grid x grid`` tiles of side ``t = canvas //
grid``; a tile that holds no image pixel is *skipped*: no pixels, no encoder work, one skip token in the
model. Per image the views are: the global view (the image resized to long side ``t`` on a ``t x t`` padded
view), then the kept tiles row-major.

Resampling matches ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on the float
image; a tile is exactly a crop of the resized image, so every backend computes each view straight from
the source pixels. Backends: ``cuda`` and ``cpu`` (compiled extension), ``triton``, ``torch`` (reference).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sphinx_kernels import _backend
from sphinx_kernels._common import common_device, on_device
from sphinx_kernels._triton import tl, triton

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageBatch",
    "TilePlan",
    "plan_tiles",
    "resized_size",
    "tile_gather",
    "tile_gather_ref",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKENDS = ("cuda", "triton", "cpu", "torch")
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Columns of the view table handed to the kernels (csrc/resample.h, enum ViewColumn).
VIEW_COLUMNS = ("offset", "height", "width", "out_h", "out_w", "y0", "x0")


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size of an ``height x width`` image resized keeping its aspect ratio to long side `long_side`.

    Integer round-half-up, at least 1: ``max(1, (2*H*L + M) // (2*M))`` with ``M = max(H, W)``.
    """
    m = max(height, width)
    return max(1, (2 * height * long_side + m) // (2 * m)), max(1, (2 * width * long_side + m) // (2 * m))


def _check_geometry(canvas: int, grid: int) -> int:
    for name, value in (("canvas", canvas), ("grid", grid)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if canvas % grid:
        raise ValueError(f"canvas ({canvas}) must be divisible by grid ({grid})")
    return canvas // grid


@dataclass(frozen=True)
class TilePlan:
    """Which views every image produces, decided from image sizes alone (no pixel is read).

    Attributes:
        sizes: ``(H, W)`` per image.
        canvas, grid, tile: canvas side, tiles per side, tile side (``canvas // grid``).
        resized_sizes: ``(h', w')`` per image: the image resized to long side ``canvas``.
        global_sizes: per image, the image resized to long side ``tile`` (its global view's content).
        kept: bool ``(N, grid, grid)``: ``kept[i, r, c]`` iff tile ``(r, c)`` of image ``i`` holds pixels.
        views_per_image: per image, 1 (global view) + its kept tiles.
        image_index: int64 ``(V,)``: the image each output view belongs to.
        view_tile: int64 ``(V, 2)``: ``(r, c)`` of each view's tile, ``(-1, -1)`` for a global view.
    """

    sizes: tuple[tuple[int, int], ...]
    canvas: int
    grid: int
    tile: int
    resized_sizes: tuple[tuple[int, int], ...]
    global_sizes: tuple[tuple[int, int], ...]
    views_per_image: list[int]
    # Per view (image, H, W, out_h, out_w, y0, x0) and (r, c): the plan itself, in host ints (kernels'
    # table, torch.compile constants); the tensors below are views of it.
    _geometry: list[tuple[int, ...]] = field(repr=False)
    _tiles: list[tuple[int, int]] = field(repr=False)

    @property
    def kept(self) -> torch.Tensor:
        kept = torch.zeros(self.num_images, self.grid, self.grid, dtype=torch.bool)
        for (i, *_), (r, c) in zip(self._geometry, self._tiles, strict=True):
            if r >= 0:
                kept[i, r, c] = True
        return kept

    @property
    def image_index(self) -> torch.Tensor:
        return torch.tensor([g[0] for g in self._geometry], dtype=torch.int64)

    @property
    def view_tile(self) -> torch.Tensor:
        return torch.tensor(self._tiles, dtype=torch.int64).reshape(-1, 2)

    @property
    def num_images(self) -> int:
        return len(self.sizes)

    @property
    def num_views(self) -> int:
        return len(self._geometry)

    @property
    def skipped_per_image(self) -> list[int]:
        return [self.grid * self.grid - (n - 1) for n in self.views_per_image]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped_per_image)

    def kept_tiles(self, image: int) -> list[tuple[int, int]]:
        """``(r, c)`` of image `image`'s kept tiles, row-major (host ints, no tensor read)."""
        first = sum(self.views_per_image[:image]) + 1  # past the image's global view
        return self._tiles[first : first + self.views_per_image[image] - 1]

    def visual_tokens(self, tokens_per_view: int, *, delimiters_per_view: int = 2) -> list[int]:
        """Sequence positions each image takes in the LLM: per kept view its encoder tokens plus the
        ``[img_start]``/``[img_end]`` delimiters, plus one skip token per skipped tile."""
        per_view = tokens_per_view + delimiters_per_view
        return [n * per_view + s for n, s in zip(self.views_per_image, self.skipped_per_image, strict=True)]

    def view_table(
        self, offsets: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """int64 ``(V, 7)`` kernel table (columns `VIEW_COLUMNS`), given each image's byte offset."""
        offsets = _host_ints(offsets, "offsets")
        if len(offsets) != self.num_images:
            raise ValueError(f"offsets needs {self.num_images} entries (one per image), got {len(offsets)}")
        rows = [(offsets[g[0]], *g[1:]) for g in self._geometry]
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 7)


def plan_tiles(sizes: Sequence[tuple[int, int]], canvas: int = 448, grid: int = 2) -> TilePlan:
    """Plan the views of images of the given ``(H, W)`` sizes. Pure and cheap (Python integers only).

    Tile ``(r, c)`` is skipped iff ``r*t >= h'`` or ``c*t >= w'``, with ``(h', w') = resized_size(H, W,
    canvas)`` and ``t = canvas // grid``.
    """
    tile = _check_geometry(canvas, grid)
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    sizes = tuple((int(h), int(w)) for h, w in sizes)
    if not sizes:
        raise ValueError("sizes must name at least one image")
    for i, (h, w) in enumerate(sizes):
        if h < 1 or w < 1:
            raise ValueError(f"sizes[{i}] = {(h, w)}: an image needs at least one pixel")
    resized = tuple(resized_size(h, w, canvas) for h, w in sizes)
    global_sizes = tuple(resized_size(h, w, tile) for h, w in sizes)
    views_per_image, view_tile, geometry = [], [], []
    for i, ((h, w), (rh, rw), (gh, gw)) in enumerate(zip(sizes, resized, global_sizes, strict=True)):
        tiles = [(r, c) for r in range(grid) for c in range(grid) if r * tile < rh and c * tile < rw]
        geometry += [(i, h, w, gh, gw, 0, 0)] + [(i, h, w, rh, rw, r * tile, c * tile) for r, c in tiles]
        view_tile += [(-1, -1)] + tiles
        views_per_image.append(1 + len(tiles))
    return TilePlan(
        sizes=sizes,
        canvas=canvas,
        grid=grid,
        tile=tile,
        resized_sizes=resized,
        global_sizes=global_sizes,
        views_per_image=views_per_image,
        _geometry=geometry,
        _tiles=view_tile,
    )


@dataclass(frozen=True)
class ImageBatch:
    """A ragged batch of uint8 RGB images in one flat buffer.

    Attributes:
        data: uint8 ``(sum of H*W*3,)``, each image HWC (RGB) contiguous, on any device.
        offsets: element offset of each image in `data` (host ints: a tuple; lists/tensors are converted).
        sizes: ``(H, W)`` of each image (host ints, likewise).
    """

    data: torch.Tensor
    offsets: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        data = self.data
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        if data.dtype != torch.uint8:
            raise TypeError(f"data must be uint8, got {data.dtype}")
        if data.dim() != 1:
            raise ValueError(f"data must be 1-D (a flat buffer), got shape {tuple(data.shape)}")
        # Host metadata as Python ints: cheap to validate, and constants under torch.compile.
        offsets = _host_ints(self.offsets, "offsets")
        sizes = _host_ints(self.sizes, "sizes")
        if not sizes:
            raise ValueError("an ImageBatch needs at least one image")
        if any(not isinstance(hw, list) or len(hw) != 2 for hw in sizes):
            raise ValueError("sizes must hold one (H, W) pair per image")
        if any(isinstance(o, list) for o in offsets) or len(offsets) != len(sizes):
            raise ValueError(
                f"offsets has {len(offsets)} entries but sizes has {len(sizes)}: need one int per image"
            )
        for i, ((h, w), start) in enumerate(zip(sizes, offsets, strict=True)):
            if h <= 0 or w <= 0:
                raise ValueError(f"sizes[{i}] = {(h, w)}: an image needs at least one pixel")
            if start < 0 or start + h * w * 3 > data.numel():
                raise ValueError(
                    f"offsets[{i}] = {start} with sizes[{i}] = {(h, w)} reads elements [{start}, "
                    f"{start + h * w * 3}) outside data (numel {data.numel()})"
                )
        object.__setattr__(self, "data", data.contiguous())
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "sizes", tuple((h, w) for h, w in sizes))

    @classmethod
    def from_images(cls, images: Sequence[torch.Tensor]) -> ImageBatch:
        """Pack a list of uint8 ``(H, W, 3)`` RGB tensors (all on one device) into one buffer."""
        _check_images(images)
        offsets = (0, *itertools.accumulate(img.numel() for img in images[:-1]))
        data = torch.cat([img.reshape(-1) for img in images])
        return cls(data, offsets, tuple((img.shape[0], img.shape[1]) for img in images))

    def __len__(self) -> int:
        return len(self.sizes)

    def image(self, i: int) -> torch.Tensor:
        """Image `i` as a uint8 ``(H, W, 3)`` view of the buffer."""
        h, w = self.sizes[i]
        start = self.offsets[i]
        return self.data[start : start + h * w * 3].view(h, w, 3)


def _check_images(images: Sequence[torch.Tensor]) -> None:
    """A clear error for anything but a non-empty list of uint8 ``(H, W, 3)`` tensors on one device."""
    if isinstance(images, torch.Tensor) or not isinstance(images, Sequence):
        raise TypeError("images must be a list of uint8 (H, W, 3) tensors or an ImageBatch")
    if len(images) == 0:
        raise ValueError("images is empty: tile_gather needs at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(img).__name__}")
        if img.dtype != torch.uint8:
            raise TypeError(f"images[{i}] must be uint8 (raw pixels), got {img.dtype}")
        if img.dim() != 3 or img.shape[2] != 3:
            hint = (
                " (channels first? use img.permute(1, 2, 0))" if img.dim() == 3 and img.shape[0] == 3 else ""
            )
            raise ValueError(f"images[{i}] must have shape (H, W, 3) RGB, got {tuple(img.shape)}{hint}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"images[{i}] has zero size {tuple(img.shape)}")
        if img.device != images[0].device:
            raise ValueError(f"images[{i}] is on {img.device} but images[0] is on {images[0].device}")


def _host_ints(value, name: str) -> list:
    """A (nested) list of Python ints from a sequence or tensor of integers."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must hold integers, got {value.dtype}")
        return value.tolist()
    try:
        return [_host_ints(v, name) if isinstance(v, (Sequence, torch.Tensor)) else int(v) for v in value]
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of integers, got {value!r}") from exc


def _normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """(x/255 - mean)/std as x*scale + shift, per channel."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return [1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std, strict=True)]


# ----------------------------------------------------------------------------------------------------
# 1. Reference: the obvious multi-step way (resize the float image, normalise, pad, crop).
# ----------------------------------------------------------------------------------------------------


def _resize_antialias(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(bilinear, antialias) of a ``(1, C, H, W)`` float image to ``size``.

    PyTorch's CPU kernel repeats its first output row for every row when it resizes rows at width 1
    (torch 2.14: a (296, 1) column resized to (5, 1) gives five copies of row 0; the global view of a
    296x10 image is 25x1). Resizing the transpose computes the same function without that pass.
    """
    if size[1] == 1 and size[0] != x.shape[2]:
        x = F.interpolate(
            x.transpose(2, 3), size=size[::-1], mode="bilinear", antialias=True, align_corners=False
        )
        return x.transpose(2, 3)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def tile_gather_ref(
    images: Sequence[torch.Tensor] | ImageBatch,
    canvas: int = 448,
    grid: int = 2,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain PyTorch `tile_gather` (computed in float32, float64 when `dtype` is float64); returns the views."""
    batch = images if isinstance(images, ImageBatch) else ImageBatch.from_images(images)
    plan = plan_tiles(batch.sizes, canvas, grid)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    mean_t = torch.tensor(mean, dtype=compute, device=batch.data.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=compute, device=batch.data.device).view(1, 3, 1, 1)

    def resized_padded(image: torch.Tensor, size: tuple[int, int], side: int) -> torch.Tensor:
        x = _resize_antialias(image.permute(2, 0, 1).unsqueeze(0).to(compute), size)
        x = (x / 255.0 - mean_t) / std_t
        return F.pad(x, (0, side - size[1], 0, side - size[0]))  # normalised mean colour is 0

    t = plan.tile
    views = []
    for i in range(len(batch)):
        image = batch.image(i)
        views.append(resized_padded(image, plan.global_sizes[i], t))
        full = resized_padded(image, plan.resized_sizes[i], canvas)
        for r, c in plan.kept_tiles(i):
            views.append(full[:, :, r * t : (r + 1) * t, c * t : (c + 1) * t])
    return torch.cat(views).to(dtype)


# ----------------------------------------------------------------------------------------------------
# 2. Triton kernel: program (view, block of rows) computes BLOCK_Y x BLOCK_X output pixels, 3 channels.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _triangle(x):
    x = tl.abs(x)
    return tl.where(x < 1.0, 1.0 - x, 0.0)


@triton.jit
def _tile_gather_fwd_kernel(
    data_ptr,
    table_ptr,
    out_ptr,
    scale0,
    scale1,
    scale2,
    shift0,
    shift1,
    shift2,
    TILE: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    view = tl.program_id(0)
    row = table_ptr + view * 7
    offset = tl.load(row + 0)
    height = tl.load(row + 1)
    width = tl.load(row + 2)
    out_h = tl.load(row + 3)
    out_w = tl.load(row + 4)
    y0 = tl.load(row + 5)
    x0 = tl.load(row + 6)

    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.arange(0, BLOCK_X)
    in_tile = (ys < TILE)[:, None] & (xs < TILE)[None, :]
    sy = y0 + ys
    sx = x0 + xs
    inside = (sy < out_h)[:, None] & (sx < out_w)[None, :] & in_tile

    # Antialias taps as in csrc/resample.h (PyTorch's scheme): scale = in/out, filter widened by max(scale, 1).
    scale_y = height.to(tl.float32) / out_h.to(tl.float32)
    scale_x = width.to(tl.float32) / out_w.to(tl.float32)
    support_y = tl.maximum(scale_y, 1.0)
    support_x = tl.maximum(scale_x, 1.0)
    center_y = scale_y * (sy.to(tl.float32) + 0.5)
    center_x = scale_x * (sx.to(tl.float32) + 0.5)
    start_y = tl.maximum((center_y - support_y + 0.5).to(tl.int32), 0)
    start_x = tl.maximum((center_x - support_x + 0.5).to(tl.int32), 0)
    count_y = tl.minimum((center_y + support_y + 0.5).to(tl.int32), height.to(tl.int32)) - start_y
    count_x = tl.minimum((center_x + support_x + 0.5).to(tl.int32), width.to(tl.int32)) - start_x
    # Loop bounds: 2*ceil(support)+1 taps at most, in exact integer arithmetic.
    taps_y = 2 * tl.maximum((height + out_h - 1) // out_h, 1) + 1
    taps_x = 2 * tl.maximum((width + out_w - 1) // out_w, 1) + 1

    total_x = tl.zeros((BLOCK_X,), dtype=tl.float32)
    for j in range(0, taps_x):
        wx = _triangle(((start_x + j).to(tl.float32) - center_x + 0.5) / support_x)
        total_x += tl.where(j < count_x, wx, 0.0)

    total_y = tl.zeros((BLOCK_Y,), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    for i in range(0, taps_y):
        src_y = start_y + i
        wy = tl.where(i < count_y, _triangle((src_y.to(tl.float32) - center_y + 0.5) / support_y), 0.0)
        total_y += wy
        row_ptr = data_ptr + offset + src_y.to(tl.int64)[:, None] * width * 3
        for j in range(0, taps_x):
            src_x = start_x + j
            wx = tl.where(j < count_x, _triangle((src_x.to(tl.float32) - center_x + 0.5) / support_x), 0.0)
            mask = inside & (i < count_y)[:, None] & (j < count_x)[None, :]
            ptr = row_ptr + src_x.to(tl.int64)[None, :] * 3
            w = wy[:, None] * wx[None, :]
            acc_r += w * tl.load(ptr, mask=mask, other=0).to(tl.float32)
            acc_g += w * tl.load(ptr + 1, mask=mask, other=0).to(tl.float32)
            acc_b += w * tl.load(ptr + 2, mask=mask, other=0).to(tl.float32)

    norm = 1.0 / tl.where(inside, total_y[:, None] * total_x[None, :], 1.0)
    dst = out_ptr + view.to(tl.int64) * (3 * TILE * TILE) + ys[:, None] * TILE + xs[None, :]
    # Padding (outside the resized image) is the mean colour: exactly 0 after normalisation.
    tl.store(dst, tl.where(inside, acc_r * norm * scale0 + shift0, 0.0), mask=in_tile)
    tl.store(dst + TILE * TILE, tl.where(inside, acc_g * norm * scale1 + shift1, 0.0), mask=in_tile)
    tl.store(dst + 2 * TILE * TILE, tl.where(inside, acc_b * norm * scale2 + shift2, 0.0), mask=in_tile)


# ----------------------------------------------------------------------------------------------------
# 3. Launchers.
# ----------------------------------------------------------------------------------------------------


def _tile_gather_triton(
    data: torch.Tensor, view_table: torch.Tensor, scale: list[float], shift: list[float], out: torch.Tensor
) -> None:
    num_views, tile = out.shape[0], out.shape[2]
    if num_views == 0:
        return
    block_x = triton.next_power_of_2(tile)
    # On the GPU 8 rows x 256 columns per program (2048 pixels, 4 warps); in the interpreter one program per
    # view, because there each tap iteration costs the same whatever the block size.
    block_y = triton.next_power_of_2(tile) if _backend.triton_interpreting() else max(1, 2048 // block_x)
    grid = (num_views, triton.cdiv(tile, block_y))
    with on_device(data):  # the inputs' GPU, not the current one
        _tile_gather_fwd_kernel[grid](
            data, view_table, out, *scale, *shift, TILE=tile, BLOCK_Y=block_y, BLOCK_X=block_x
        )


# ----------------------------------------------------------------------------------------------------
# 4. Registered op (compiled kernels and Triton behind one schema, traceable by torch.compile).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("sphinx_kernels::tile_gather", mutates_args=("out",))
def _tile_gather_op(
    data: torch.Tensor,
    view_table: torch.Tensor,
    scale: list[float],
    shift: list[float],
    backend: str,
    out: torch.Tensor,
) -> None:
    common_device(data=data, view_table=view_table, out=out)
    if backend == "triton":
        _tile_gather_triton(data, view_table, scale, shift, out)
    elif backend in ("cpu", "cuda"):
        torch.ops.sphinx_kernels.tile_gather_out(data, view_table, scale, shift, out)
    else:
        raise ValueError(f"sphinx_kernels::tile_gather runs backends triton, cpu and cuda, got {backend!r}")


@_tile_gather_op.register_fake
def _(data, view_table, scale, shift, backend, out) -> None:
    return None


@torch.library.custom_op("sphinx_kernels::tile_gather_list", mutates_args=("out",))
def _tile_gather_list_op(
    images: list[torch.Tensor],
    view_table: torch.Tensor,
    scale: list[float],
    shift: list[float],
    out: torch.Tensor,
) -> None:
    """The CPU kernel straight from a list of images (the table's offset column holds image indices): no copy
    of the images into one buffer, which costs more than the kernel (97 MB for 32 photos)."""
    torch.ops.sphinx_kernels.tile_gather_list_out(images, view_table, scale, shift, out)


@_tile_gather_list_op.register_fake
def _(images, view_table, scale, shift, out) -> None:
    return None


if _backend.extension_has_kernel("tile_gather_out", "CPU") or _backend.extension_has_kernel(
    "tile_gather_out", "CUDA"
):

    @torch.library.register_fake("sphinx_kernels::tile_gather_out")
    def _(data, view_table, scale, shift, out) -> None:
        return None


# Decided once at import: torch.compile cannot trace the extension lookup.
_HAS_LIST_KERNEL = _backend.extension_has_kernel("tile_gather_list_out", "CPU")

if _HAS_LIST_KERNEL:

    @torch.library.register_fake("sphinx_kernels::tile_gather_list_out")
    def _(images, view_table, scale, shift, out) -> None:
        return None


# ----------------------------------------------------------------------------------------------------
# 5. Public function.
# ----------------------------------------------------------------------------------------------------


def tile_gather(
    images: Sequence[torch.Tensor] | ImageBatch,
    canvas: int = 448,
    grid: int = 2,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, TilePlan]:
    """Gather every image's global view and kept tiles, normalised, in one pass over the source pixels.

    Args:
        images: list of uint8 ``(H, W, 3)`` RGB tensors on one device, or an `ImageBatch`.
        canvas: canvas side (448; 672 for SPHINX-X 2K). grid: tiles per side (2; 3); ``canvas % grid == 0``.
        mean, std: per-channel normalisation, ``(x/255 - mean)/std`` (default CLIP's).
        dtype: output dtype: float32, float16, bfloat16 (or float64).
        out: optional ``(V, 3, t, t)`` contiguous tensor of `dtype` on the images' device, written in full.
        backend: ``"cuda" | "triton" | "cpu" | "torch"``; default: the fastest available (`_backend`).

    Returns:
        ``(views, plan)``: `views` ``(V, 3, t, t)`` of `dtype`, per image its global view then its kept tiles
        row-major; `plan` the `TilePlan` (``plan.image_index[v]`` is view v's image).
    """
    if isinstance(images, ImageBatch):
        batch, device, sizes = images, images.data.device, images.sizes
    else:
        _check_images(images)
        batch, device, sizes = None, images[0].device, [tuple(img.shape[:2]) for img in images]
    plan = plan_tiles(sizes, canvas, grid)
    scale, shift = _normalisation(mean, std)
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, OUTPUT_DTYPES))}, got {dtype}")
    shape = (plan.num_views, 3, plan.tile, plan.tile)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        common_device(images=batch.data if batch is not None else images[0], out=out)
        if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {shape} {dtype} tensor on {device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}{'' if out.is_contiguous() else ' (strided)'}"
            )
    chosen = _backend.select("tiles", BACKENDS, device, op="tile_gather_out", backend=backend)
    if chosen == "torch":
        views = tile_gather_ref(
            batch if batch is not None else images, canvas, grid, mean=mean, std=std, dtype=dtype
        )
        return (out.copy_(views) if out is not None else views), plan
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    if batch is None and chosen == "cpu" and _HAS_LIST_KERNEL:
        table = plan.view_table(range(len(images)), device)
        _tile_gather_list_op([img.contiguous() for img in images], table, scale, shift, out)
        return out, plan
    batch = batch if batch is not None else ImageBatch.from_images(images)
    _tile_gather_op(batch.data, plan.view_table(batch.offsets, device), scale, shift, chosen, out)
    return out, plan
