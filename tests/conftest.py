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


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_within_reference_error(out, ref64, ref_lowp, *, name="output", atol=0.0):
    """DESIGN.md's rule for low precision: the error of `out` against a float64 reference is at most twice
    the error of the PyTorch reference computed in the same dtype (plus `atol` for exact-zero cases)."""
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: max error {err:.3g} > 2 x reference error {ref_err:.3g}"


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
