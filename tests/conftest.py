"""Shared test set-up: Triton's interpreter on machines without a GPU, the gpu marker, error rules."""

import os

import torch

# Must be set before any Triton kernel is defined (at import of sphinx_kernels): without a GPU the Triton
# kernels run through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_addoption(parser):
    parser.addoption(
        "--seed-repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every test that takes the `seed` fixture N times, each with a fresh seed (the cross-machine "
        "seed sweeps of benchmarks/seed_sweep.sh); SPHINX_TEST_SEED still pins one seed for all rounds",
    )


def pytest_generate_tests(metafunc):
    rounds = metafunc.config.getoption("seed_repeat")
    if rounds < 1:
        raise pytest.UsageError(f"--seed-repeat must be >= 1, got {rounds}")
    if rounds > 1 and "seed" in metafunc.fixturenames:
        metafunc.fixturenames.append("seed_round")
        metafunc.parametrize("seed_round", range(rounds), indirect=True, ids=lambda r: f"round{r}")


@pytest.fixture
def seed_round(request):
    """Which round of --seed-repeat this is (only a test id: each round draws its own seed)."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The accuracy rule, one for every family and dtype (DESIGN.md "House style"):
#     err <= 2 * ref_err + floor,   floor = FLOOR_EPS[dtype] * eps(dtype) * max|ref64|
# err: max |out - ref64|; ref_err: max |ref_lowp - ref64|, the PyTorch reference run in out's dtype.
# The factor 2 is flash-attn's rule. The floor is the dtype's own rounding at the output's magnitude (as in
# flash-attn 3's tests): without it, fp32 at small sizes compares a few ULPs with a few ULPs and the ratio
# of the two maxima swings between ~0.5 and ~2.5 with the summation order (which BLAS kernel the CPU
# picks, FMA contraction in AVX-512 clones, numpy's matmul in Triton's interpreter).
# float32 gets 8 eps: an output made by cancellation carries the rounding of its larger summands, and the
# top-k router's weight gradient (p_e * (g_e - sum_j p_j g_j), then summed over tokens) came out 5-9 eps of
# its own magnitude away from float64 on our fused path, where eager fp32 (the reference's own op order) lands
# ~1 eps away (CI seeds 1596657494, 397256414, 1974912329 needed 2.7, 3.7 and 2.2 eps beyond twice its error). 8 eps is ~1e-6 of the
# largest output, far below any real defect (a wrong index or mask is off by O(max|ref64|)). float16 and
# bfloat16 keep 2 eps: their reference errors are many eps already, and a larger floor there could hide a
# low-precision accumulation (bf16's 8 eps would be 6% of the largest output).
FLOOR_EPS = {torch.float32: 8.0}
DEFAULT_FLOOR_EPS = 2.0


def rounding_floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """FLOOR_EPS units of `dtype`'s rounding at the magnitude of the reference output."""
    if ref64.numel() == 0:
        return 0.0
    return FLOOR_EPS.get(dtype, DEFAULT_FLOOR_EPS) * torch.finfo(dtype).eps * ref64.abs().max().item()


def assert_close_to_reference(out, ref64, ref_lowp=None, *, name="output"):
    """The project's accuracy rule (see FLOOR_EPS above): `out`'s max error against the float64 reference
    `ref64` is at most twice that of `ref_lowp` (the PyTorch reference run in `out`'s dtype) plus the
    dtype's rounding floor. Without `ref_lowp` (a float64 output, or data movement judged against its own
    dtype) only the floor applies. The failure message carries the seed (see the `seed` fixture)."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    err = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    ref_err = 0.0
    if ref_lowp is not None and ref_lowp.numel():
        ref_err = (ref_lowp.double() - ref64.double()).abs().max().item()
    floor = rounding_floor(ref64.double(), out.dtype)
    bound = 2 * ref_err + floor
    # `not err <= bound` also catches NaN (a poisoned output a kernel never wrote).
    assert err <= bound, (
        f"{name}: max error {err:.3g} > 2 x reference error {ref_err:.3g} + floor {floor:.3g} "
        f"({out.dtype}, seed {CURRENT_SEED.get('value')})"
    )


# The seed of the running test, for failure messages; set by the `seed` fixture.
CURRENT_SEED: dict = {}


@pytest.fixture
def seed(request):
    """A fresh seed per test (SPHINX_TEST_SEED=N replays one), also seeding torch, numpy and random; it is
    printed with any failure of the test (see pytest_runtest_makereport)."""
    import random

    import numpy as np

    value = int(os.environ.get("SPHINX_TEST_SEED") or random.SystemRandom().randrange(2**31))
    CURRENT_SEED["value"] = value
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    np.random.seed(value)  # noqa: NPY002 (legacy global state, for tests that use it)
    random.seed(value)
    yield value
    CURRENT_SEED.pop("value", None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("seed", f"replay with SPHINX_TEST_SEED={seeds[-1]}"))
    return report


def run_python(code: str, tmp_path, *, interpret: bool = False, timeout: int = 600) -> str:
    """Run `code` in a fresh interpreter with this checkout importable and, unless `interpret`, without
    Triton's interpreter (ahead-of-time compiles for a GPU target need the real compiler). Fails the test
    with the child's stderr if it exits non-zero; returns its stdout."""
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "TRITON_CACHE_DIR": str(tmp_path),
    }
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout
