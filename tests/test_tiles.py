"""Skip-token tile gathering: geometry, every backend against the reference, errors, compile, opcheck."""

import os
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_CUDA, assert_close_to_reference, run_python
from hypothesis import given, settings
from hypothesis import strategies as st

import sphinx_kernels as sk
from sphinx_kernels import CLIP_MEAN, CLIP_STD, ImageBatch, _backend, plan_tiles, tile_gather, tile_gather_ref

# A 1x2 image, black then white: its views span the normalisation's whole output range.
FULL_RANGE = torch.tensor([[[0, 0, 0], [255, 255, 255]]], dtype=torch.uint8)

# The odd sizes: 1x1, a 1-pixel line, tiny, prime-ish, strong downscale, upscale.
ODD_SIZES = [(1, 1), (1, 500), (3, 5), (479, 641), (2000, 3000), (60, 100)]


def random_images(sizes, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).to(device) for h, w in sizes]


def random_sizes(seed, n, low=1, high=700):
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(n)]


def kernel_backends(device):
    """Backends that run a kernel (not the reference) on `device` here."""
    names = ["cpu"] if device == "cpu" else ["cuda"]
    names.append("triton")  # on CPU through the interpreter (conftest sets TRITON_INTERPRET=1)
    return names


def low_precision_dtypes(backend):
    # bf16 is wrong in Triton's interpreter: it is tested on the GPU only.
    if backend == "triton" and not HAS_CUDA:
        return [torch.float16]
    return [torch.float16, torch.bfloat16]


class References:
    """The float64 reference and the reference in each output dtype for one set of images, each computed
    once (on a 2000x3000 image a float64 reference costs seconds) and on the CPU."""

    def __init__(self, images, canvas=448, grid=2, **kwargs):
        self.args = ([img.cpu() for img in images], canvas, grid)
        self.kwargs = kwargs
        self.cache = {}

    def __call__(self, dtype):
        if dtype not in self.cache:
            self.cache[dtype] = tile_gather_ref(*self.args, dtype=dtype, **self.kwargs)
        return self.cache[dtype]

    def check(self, views, name=""):
        """The project's accuracy rule: against float64, yardstick the reference in `views`' dtype."""
        ref64, ref_lowp = self(torch.float64), self(views.dtype)
        assert_close_to_reference(views.cpu(), ref64, ref_lowp, name=f"{name} {views.dtype} views")


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


def expected_resized(h, w, side):
    """Independent statement of the rounding rule: round-half-up of the exact ratio, at least 1."""
    m = max(h, w)
    rh, rw = Fraction(h * side, m), Fraction(w * side, m)
    return max(1, int(rh + Fraction(1, 2))), max(1, int(rw + Fraction(1, 2)))


size_lists = st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=1, max_size=6)
geometries = st.sampled_from([(448, 2), (672, 3), (224, 1), (96, 4), (60, 5)])


@settings(max_examples=200, deadline=None)
@given(sizes=size_lists, geometry=geometries)
def test_plan_matches_geometric_rule(sizes, geometry):
    canvas, grid = geometry
    t = canvas // grid
    plan = plan_tiles(sizes, canvas, grid)
    assert plan.tile == t
    assert plan.kept.shape == (len(sizes), grid, grid)
    image_index, view_tile = [], []
    for i, (h, w) in enumerate(sizes):
        rh, rw = expected_resized(h, w, canvas)
        assert plan.resized_sizes[i] == (rh, rw)
        assert plan.global_sizes[i] == expected_resized(h, w, t)
        assert max(rh, rw) == canvas
        kept = [[not (r * t >= rh or c * t >= rw) for c in range(grid)] for r in range(grid)]
        assert plan.kept[i].tolist() == kept
        n_kept = sum(map(sum, kept))
        assert plan.views_per_image[i] == 1 + n_kept
        assert plan.skipped_per_image[i] + n_kept == grid * grid
        image_index += [i] * (1 + n_kept)
        view_tile += [[-1, -1]] + [[r, c] for r in range(grid) for c in range(grid) if kept[r][c]]
    assert plan.image_index.tolist() == image_index
    assert plan.view_tile.tolist() == view_tile
    assert plan.num_views == len(image_index)


@pytest.mark.parametrize(
    "canvas, grid, size, skipped",
    [
        (448, 2, (500, 1000), 2),  # 2:1 landscape: bottom row
        (448, 2, (1000, 500), 2),  # 1:2 portrait: right column
        (448, 2, (700, 700), 0),  # square
        (448, 2, (640, 1920), 2),  # 3:1
        (672, 3, (500, 1000), 3),  # 2:1 at 3x3: h' = 336 keeps two rows
        (672, 3, (640, 1920), 6),  # 3:1 at 3x3: one row
        (672, 3, (999, 999), 0),
    ],
)
def test_skip_counts(canvas, grid, size, skipped):
    plan = plan_tiles([size], canvas, grid)
    assert plan.skipped_per_image == [skipped]
    assert plan.num_views == 1 + grid * grid - skipped


def test_visual_tokens_count_views_and_skip_tokens():
    plan = plan_tiles([(500, 1000), (10, 10)], 448, 2)
    # 3 views * (257 + 2 delimiters) + 2 skip tokens; 5 views * 259.
    assert plan.visual_tokens(257) == [3 * 259 + 2, 5 * 259]


# ------------------------------------------------------------------------------------------------
# The reference against an explicitly built padded canvas
# ------------------------------------------------------------------------------------------------


def canvas_views(image, canvas, grid, mean, std):
    """The paper's picture, literally: resize, paste top-left on a mean-coloured canvas, normalise, crop."""
    t = canvas // grid
    mean_t = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    x = image.permute(2, 0, 1)[None].double()

    def padded(size, side):
        board = (mean_t * 255).expand(3, side, side).clone()
        board[:, : size[0], : size[1]] = F.interpolate(x, size=size, mode="bilinear", antialias=True)[0]
        # (sizes here avoid one-pixel-wide resizes: PyTorch's CPU kernel is wrong there, see tiles.py)
        return (board / 255 - mean_t) / std_t

    h, w = image.shape[:2]
    rh, rw = expected_resized(h, w, canvas)
    full = padded((rh, rw), canvas)
    views = [padded(expected_resized(h, w, t), t)]
    for r in range(grid):
        for c in range(grid):
            if r * t < rh and c * t < rw:
                views.append(full[:, r * t : (r + 1) * t, c * t : (c + 1) * t])
    return torch.stack(views)


@pytest.mark.parametrize("canvas, grid", [(448, 2), (672, 3)])
def test_reference_matches_explicit_canvas(seed, canvas, grid):
    # The explicit canvas resizes with F.interpolate, wrong for one-pixel-wide outputs on the CPU: random
    # sizes giving such a view (470x3 -> global view 224x1) are left to the test after this one.
    wide_enough = [hw for hw in random_sizes(seed, 40) if expected_resized(*hw, canvas // grid)[1] > 1]
    sizes = [(479, 641), (1, 500), (60, 100), (300, 900)] + wide_enough[:2]
    images = random_images(sizes, seed)
    views = tile_gather_ref(images, canvas, grid, dtype=torch.float64)
    expected = torch.cat([canvas_views(img, canvas, grid, CLIP_MEAN, CLIP_STD) for img in images])
    # Both sides run the same float64 F.interpolate: only the padding's rounding differs (~1e-17).
    assert_close_to_reference(views, expected, name="reference vs explicit canvas")


def resample_weights(n_in, n_out, dtype=np.float64):
    """``(n_out, n_in)`` antialiased bilinear weights (PIL's scheme, written from the definition), rows
    normalised in `dtype`. The tap geometry (window centres) is computed in float64 as every implementation
    defines it: at a 2000-pixel axis the centre's own rounding moves weights by ~1e-13, far above float64's
    rounding of the sums, so an 'exact' geometry would measure a different function."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    rows = np.zeros((n_out, n_in), dtype=dtype)
    for i in range(n_out):
        center = scale * (i + 0.5)
        for j in range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)):
            rows[i, j] = max(0.0, 1.0 - abs((j - center + 0.5) / support))
    return rows / rows.sum(axis=1, keepdims=True)


def separable_resample(image, size, rows=None, cols=None, dtype=np.float64):
    """Antialiased bilinear resize of a uint8 ``(H, W, 3)`` image to `size` as two explicit weight matrices,
    in `dtype` (numpy: float64, or longdouble for a reference more precise than float64); only output rows
    `rows` and columns `cols` (slices) when given. Independent of F.interpolate. Returns ``(3, h, w)``."""
    wy = resample_weights(image.shape[0], size[0], dtype)[rows or slice(None)]
    wx = resample_weights(image.shape[1], size[1], dtype)[cols or slice(None)]
    # Only the source rows and columns the kept outputs read (long double products run in plain loops).
    ny, nx = wy.any(axis=0).nonzero()[0].max() + 1, wx.any(axis=0).nonzero()[0].max() + 1
    x = image.permute(2, 0, 1).numpy().astype(dtype)[:, :ny, :nx]
    return np.stack([wy[:, :ny] @ x[c] @ wx[:, :nx].T for c in range(3)])


def normalised_explicit(image, size, rows=None, cols=None, dtype=np.float64):
    mean = np.array(CLIP_MEAN, dtype=dtype).reshape(3, 1, 1)
    std = np.array(CLIP_STD, dtype=dtype).reshape(3, 1, 1)
    return (separable_resample(image, size, rows, cols, dtype) / 255 - mean) / std


@pytest.mark.parametrize("size", [(296, 10), (10, 296), (479, 641), (60, 100), (1, 7), (7, 1)])
def test_reference_matches_explicit_weights(seed, size):
    """Catches resampling bugs that F.interpolate and a canvas built with it would share (the reference
    works around one in PyTorch's CPU kernel for one-pixel-wide outputs: 296x10 -> global view 25x1)."""
    (image,) = random_images([size], seed)
    plan = plan_tiles([size], 448, 2)
    views = tile_gather_ref([image], dtype=torch.float64)
    (gh, gw), (rh, rw) = plan.global_sizes[0], plan.resized_sizes[0]
    # The float64 reference is judged like any output: against a more precise one (the explicit weights in
    # x87 long double), with the explicit weights in float64 as the same-dtype yardstick. The top-left 112x112
    # of each view: long double products run in plain loops (the whole 479x641 case took ~10 s).
    crop = slice(0, 112)
    for name, got, size in (
        ("global view", views[0, :, : min(gh, 112), : min(gw, 112)], (gh, gw)),
        ("tile (0, 0)", views[1, :, : min(rh, 112), : min(rw, 112)], (rh, rw)),
    ):
        exact = normalised_explicit(image, size, crop, crop, np.longdouble).astype(np.float64)
        same_dtype = normalised_explicit(image, size, crop, crop)
        assert_close_to_reference(got, torch.from_numpy(exact), torch.from_numpy(same_dtype), name=name)


# ------------------------------------------------------------------------------------------------
# Every backend against the reference
# ------------------------------------------------------------------------------------------------


def run_poisoned(images, backend, dtype, canvas=448, grid=2, **kwargs):
    plan = plan_tiles([img.shape[:2] for img in images], canvas, grid)
    out = torch.full(
        (plan.num_views, 3, plan.tile, plan.tile), float("nan"), dtype=dtype, device=images[0].device
    )
    views, plan2 = tile_gather(images, canvas, grid, dtype=dtype, out=out, backend=backend, **kwargs)
    assert views.data_ptr() == out.data_ptr()
    assert plan2.views_per_image == plan.views_per_image
    assert not torch.isnan(views).any(), "an output pixel was never written"
    return views


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_backends_fp32_odd_sizes(seed, device, size):
    # With a black-to-white 1x2 image beside it: the rule's floor is the dtype's rounding at the outputs'
    # magnitude, and a lone 1x1 image near the mean colour would make that ~0 while every implementation
    # (the fp32 reference too) computes x*scale + shift, cancelling terms of ~1.8 (~1 ulp of 1.8 each).
    images = random_images([size], seed, device) + [FULL_RANGE.to(device)]
    refs = References(images)
    for backend in kernel_backends(device):
        refs.check(run_poisoned(images, backend, torch.float32), backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("canvas, grid", [(448, 2), (672, 3), (100, 4)])
def test_backends_fp32_random_batch(seed, device, canvas, grid):
    # Up to 1.5x the canvas: the interpreter's cost grows with the square of the downscale factor.
    images = random_images(random_sizes(seed, 4, high=canvas * 3 // 2), seed, device)
    refs = References(images, canvas, grid)
    for backend in kernel_backends(device):
        refs.check(run_poisoned(images, backend, torch.float32, canvas, grid), backend)


@pytest.mark.parametrize("device", DEVICES)
def test_backends_low_precision(seed, device):
    images = random_images([(479, 641), (60, 100), (3, 5)] + random_sizes(seed, 2, high=300), seed, device)
    refs = References(images)
    for backend in kernel_backends(device):
        for dtype in low_precision_dtypes(backend):
            views = run_poisoned(images, backend, dtype)
            assert views.dtype == dtype
            refs.check(views, backend)


def cpu_isas():
    """The CPU kernel's code paths this machine runs (csrc/tiles.cpp: SPHINX_KERNELS_TILES_ISA)."""
    isas = ["scalar"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" in flags:
        isas.append("avx2")
    if " avx512bw" in flags:
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", cpu_isas())
def test_cpu_kernel_paths_meet_the_contract(seed, monkeypatch, isa):
    """Every path of the CPU kernel (the plain C++ one is also what -DSPHINX_KERNELS_PORTABLE builds run):
    fp32 by the project's rule; bf16/fp16 (integer vertical pass) also by the stricter contract of the
    speed-up: at most one unit of the output dtype at the output's magnitude plus the fp32 path's error."""
    monkeypatch.setenv("SPHINX_KERNELS_TILES_ISA", isa)
    try:
        tile_gather([good()], backend="cpu", dtype=torch.bfloat16)
    except RuntimeError as exc:  # a -DSPHINX_KERNELS_PORTABLE build has the plain C++ path only
        if "does not have it" not in str(exc):
            raise
        pytest.skip(f"this build has no {isa} path")
    images = random_images([(500, 900), (5, 300), (3, 5)] + random_sizes(seed, 2, high=400), seed)
    refs = References(images)
    fp32 = run_poisoned(images, "cpu", torch.float32)
    refs.check(fp32, isa)
    ref64 = refs(torch.float64)
    fp32_err = (fp32.double() - ref64).abs().max().item()
    for dtype in (torch.bfloat16, torch.float16):
        views = run_poisoned(images, "cpu", dtype)
        refs.check(views, isa)
        err = (views.double() - ref64).abs().max().item()
        bound = torch.finfo(dtype).eps * ref64.abs().max().item() + fp32_err
        assert err <= bound, f"{isa} {dtype}: max error {err:.3g} > 1 ulp + fp32 error = {bound:.3g}"


def test_cpu_kernel_path_names_are_checked(monkeypatch):
    monkeypatch.setenv("SPHINX_KERNELS_TILES_ISA", "avx9")
    with pytest.raises(RuntimeError, match="SPHINX_KERNELS_TILES_ISA must be scalar, avx2 or avx512"):
        tile_gather([good()], backend="cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_custom_normalisation_and_padding_is_zero(seed, device):
    images = random_images([(100, 300)], seed, device)
    mean, std = sk.IMAGENET_MEAN, sk.IMAGENET_STD
    refs = References(images, mean=mean, std=std)
    for backend in kernel_backends(device):
        views = run_poisoned(images, backend, torch.float32, mean=mean, std=std)
        refs.check(views, backend)
        # 100x300 -> 149x448 on the canvas: rows >= 149 of the kept top tiles are padding, exactly 0.
        assert (views[1:, :, 149:, :] == 0).all()


def test_image_batch_with_gaps_and_any_order(seed):
    images = random_images([(37, 91), (120, 40), (5, 7)], seed)
    # Lay the images out in reverse order with junk between them: only offsets say where each one is.
    junk = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    parts, offsets, cursor = [], [0] * 3, 0
    for i in reversed(range(3)):
        parts += [junk[: 11 + i], images[i].reshape(-1)]
        cursor += 11 + i
        offsets[i] = cursor
        cursor += images[i].numel()
    batch = ImageBatch(torch.cat(parts), torch.tensor(offsets), [img.shape[:2] for img in images])
    for i in range(3):
        assert torch.equal(batch.image(i), images[i])
    # Only where the pixels sit changed, so each backend's views are bit-equal to those of the packed list
    # (whose accuracy the tests above check).
    for backend in ("cpu", "triton", "torch"):
        views, _ = tile_gather(batch, backend=backend)
        assert torch.equal(views, tile_gather(images, backend=backend)[0]), backend


def test_automatic_choice_on_cpu_is_the_compiled_kernel():
    assert _backend.select("tiles", sk.tiles.BACKENDS, torch.device("cpu"), op="tile_gather_out") == "cpu"


def test_environment_forces_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "torch")
    assert _backend.select("tiles", sk.tiles.BACKENDS, cpu, op="tile_gather_out") == "torch"
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "attention:triton,tiles:triton")
    assert _backend.select("tiles", sk.tiles.BACKENDS, cpu, op="tile_gather_out") == "triton"
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "flash_attn")
    with pytest.raises(ValueError, match="does not implement tiles"):
        tile_gather(random_images([(4, 4)], 0))
    if not HAS_CUDA:
        monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="cuda"):
            tile_gather(random_images([(4, 4)], 0))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def good():
    return torch.zeros(8, 8, 3, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: tile_gather([good().float()]), TypeError, r"images\[0\] must be uint8"),
        (
            lambda: tile_gather([good(), torch.zeros(3, 8, 8, dtype=torch.uint8)]),
            ValueError,
            "channels first",
        ),
        (lambda: tile_gather([torch.zeros(8, 8, 4, dtype=torch.uint8)]), ValueError, r"\(H, W, 3\)"),
        (lambda: tile_gather([torch.zeros(0, 8, 3, dtype=torch.uint8)]), ValueError, "zero size"),
        (lambda: tile_gather([]), ValueError, "images is empty"),
        (lambda: tile_gather(good()), TypeError, "list of uint8"),
        (lambda: tile_gather([good()], canvas=448, grid=3), ValueError, "divisible by grid"),
        (lambda: tile_gather([good()], canvas=0), ValueError, "canvas must be a positive int"),
        (lambda: tile_gather([good()], dtype=torch.int32), TypeError, "dtype must be one of"),
        (lambda: tile_gather([good()], std=(1.0, 0.0, 1.0)), ValueError, "std must be positive"),
        (lambda: tile_gather([good()], mean=(0.5, 0.5)), ValueError, "mean and std need 3"),
        (lambda: tile_gather([good()], backend="bogus"), ValueError, "does not implement tiles"),
        (
            lambda: tile_gather([good()], out=torch.empty(5, 3, 224, 224, dtype=torch.float16)),
            ValueError,
            "out must",
        ),
        (
            lambda: tile_gather([good()], out=torch.empty(4, 3, 224, 224)),
            ValueError,
            r"out must be .*\(5, 3, 224",
        ),
        (
            lambda: tile_gather([good()], out=torch.empty(5, 3, 224, 224, device="meta")),
            ValueError,
            "out is on meta but images is on cpu",
        ),
        (lambda: ImageBatch(torch.zeros(100, dtype=torch.uint8), [0], [(8, 8)]), ValueError, r"offsets\[0\]"),
        (
            lambda: ImageBatch(torch.zeros(300, dtype=torch.uint8), [-1], [(2, 2)]),
            ValueError,
            r"offsets\[0\]",
        ),
        (
            lambda: ImageBatch(torch.zeros(300, dtype=torch.uint8), [0, 1], [(2, 2)]),
            ValueError,
            "offsets has 2",
        ),
        (lambda: ImageBatch(torch.zeros(300, dtype=torch.uint8), [0], [(0, 2)]), ValueError, r"sizes\[0\]"),
        (
            lambda: ImageBatch(torch.zeros(300, dtype=torch.float32), [0], [(2, 2)]),
            TypeError,
            "data must be uint8",
        ),
        (
            lambda: ImageBatch(torch.zeros(3, 100, dtype=torch.uint8), [0], [(2, 2)]),
            ValueError,
            "data must be 1-D",
        ),
        (lambda: ImageBatch(torch.zeros(300, dtype=torch.uint8), [], []), ValueError, "at least one image"),
        (lambda: plan_tiles([]), ValueError, "at least one image"),
        (lambda: plan_tiles([(0, 5)]), ValueError, r"sizes\[0\]"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph(seed, backend):
    images = random_images([(50, 90), (33, 17)], seed)

    def fn(a, b):
        views, _ = tile_gather([a, b], 64, 2, backend=backend)
        return views * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*images), fn(*images), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(seed, backend):
    images = random_images([(20, 30), (9, 4)], seed)
    batch = ImageBatch.from_images(images)
    plan = plan_tiles(batch.sizes, 32, 2)
    table = plan.view_table(batch.offsets)
    scale, shift = sk.tiles._normalisation(CLIP_MEAN, CLIP_STD)
    out = torch.empty(plan.num_views, 3, 16, 16)
    torch.library.opcheck(
        torch.ops.sphinx_kernels.tile_gather.default, (batch.data, table, scale, shift, backend, out)
    )
    if backend == "cpu":
        torch.library.opcheck(
            torch.ops.sphinx_kernels.tile_gather_out.default, (batch.data, table, scale, shift, out)
        )
        # The list form: the table's offset column holds image indices, no packed buffer.
        by_index = plan.view_table(range(len(images)))
        for op in (
            torch.ops.sphinx_kernels.tile_gather_list.default,
            torch.ops.sphinx_kernels.tile_gather_list_out.default,
        ):
            torch.library.opcheck(op, (images, by_index, scale, shift, out))


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_cpu_kernel(seed, backend):
    images = random_images(ODD_SIZES + random_sizes(seed, 8, high=2500), seed)
    cuda_images = [img.cuda() for img in images]
    refs = References(images)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        refs.check(run_poisoned(cuda_images, backend, dtype), backend)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.gpu
@TWO_GPUS
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_second_gpu_runs_on_the_inputs_device(seed, backend):
    """Images on cuda:1 while the current device is cuda:0: the launch must follow the tensors."""
    images = random_images([(479, 641), (60, 100), (3, 5)], seed)
    torch.cuda.set_device(0)
    views = run_poisoned([img.to("cuda:1") for img in images], backend, torch.float32)
    assert views.device == torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    References(images).check(views, backend)


@pytest.mark.gpu
@TWO_GPUS
def test_inputs_on_two_gpus_are_an_error():
    a, b = good().to("cuda:0"), good().to("cuda:1")
    with pytest.raises(ValueError, match=r"images\[1\] is on cuda:1"):
        tile_gather([a, b])
    out = torch.empty(5, 3, 224, 224, device="cuda:1")
    with pytest.raises(ValueError, match="out is on cuda:1 but images is on cuda:0"):
        tile_gather([a], out=out)


AOT_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sphinx_kernels import tiles

fn = tiles._tile_gather_fwd_kernel
names = list(inspect.signature(fn.fn).parameters)
for arch in (90, 80):
    for out in ("fp32", "bf16", "fp16"):
        types = {"data_ptr": "*u8", "table_ptr": "*i64", "out_ptr": "*" + out}
        consts = dict(TILE=224, BLOCK_Y=8, BLOCK_X=256)
        sig = {n: "constexpr" if n in consts else types.get(n, "fp32") for n in names}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
print("ok")
"""


def test_triton_kernel_compiles_for_sm90_and_sm80(tmp_path):
    """The interpreter does not type-check like the compiler: compile the kernel ahead of time for Hopper and
    Ampere in a process without TRITON_INTERPRET (no GPU needed), for every output dtype."""
    assert run_python(AOT_SCRIPT, tmp_path).strip().endswith("ok")
