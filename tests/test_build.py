"""The build and the dispatch: the extension (with its CUDA kernels where nvcc exists) and the fallbacks."""

import os
from pathlib import Path

import pytest
import torch
from conftest import run_python
from torch.utils.cpp_extension import CUDA_HOME

import sphinx_kernels
from sphinx_kernels import _backend


def test_cpu_kernels_registered():
    assert _backend.extension_has_kernel("tile_gather_out", "CPU"), _backend._extension()[1]


@pytest.mark.skipif(
    not (torch.version.cuda and CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists())
    or os.environ.get("SPHINX_KERNELS_CUDA") == "0",
    reason="torch is not a CUDA build or nvcc is missing: the CUDA sources are not built here",
)
def test_cuda_kernels_compiled_and_linked():
    """Proves the .cu sources compiled and linked into the extension (they cannot run without a GPU)."""
    assert _backend.extension_has_kernel("tile_gather_out", "CUDA")


def test_backends_report_every_backend_with_a_reason():
    status = sphinx_kernels.backends()
    assert set(status) == set(_backend.ALL_BACKENDS)
    assert status["torch"].available and status["cpu"].available
    assert all(s.reason for s in status.values())
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "no CUDA device" in status["cuda"].reason


def test_import_without_extension_falls_back_to_torch(tmp_path):
    """No compiler, no build: `import sphinx_kernels` still works and the automatic choice is the reference."""
    code = """
import sys, torch
sys.modules["sphinx_kernels._C"] = None  # makes `import sphinx_kernels._C` fail like a missing build
import sphinx_kernels as sk
from sphinx_kernels import _backend
assert not sk.backends()["cpu"].available and "not importable" in sk.backends()["cpu"].reason
img = torch.randint(0, 256, (30, 50, 3), dtype=torch.uint8)
views, plan = sk.tile_gather([img], 64, 2)
assert views.shape == (plan.num_views, 3, 32, 32)
try:
    sk.tile_gather([img], 64, 2, backend="cpu")
except RuntimeError as exc:
    assert "not importable" in str(exc)
else:
    raise AssertionError("forcing a missing backend must fail")
print("ok")
"""
    assert run_python(code, tmp_path).strip() == "ok"
