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
