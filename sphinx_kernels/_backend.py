"""The one dispatch point: which backend runs an op, and why the others cannot.

Order of automatic choice per op family: compiled CUDA extension -> Triton -> compiled CPU extension ->
PyTorch reference, with external peers (flash-attn, megablocks, ``torch._grouped_mm``) slotted in where a
family lists them. Automatic choice falls back quietly; a backend forced with ``backend=`` or
``SPHINX_KERNELS_BACKEND`` that cannot run is an error.

``SPHINX_KERNELS_BACKEND`` is either one name for every family (``triton``) or per-family choices
(``tiles:cpu,attention:triton``). Triton on CPU tensors needs ``TRITON_INTERPRET=1`` and is never chosen
automatically there: the interpreter is a correctness tool, orders of magnitude slower than the C++ path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "SPHINX_KERNELS_BACKEND"

# Every backend name a user may ask for, in automatic-choice order.
ALL_BACKENDS = ("cuda", "flash_attn", "megablocks", "triton", "grouped_mm", "cpu", "torch")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine, and if not, why."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name:<11} {'yes' if self.available else 'no ':<4} {self.reason}"


@functools.cache
def _extension() -> tuple[object | None, str]:
    try:
        module = importlib.import_module("sphinx_kernels._C")
    except ImportError as exc:  # not built (pure-Python install) or built against another torch
        return None, f"compiled extension sphinx_kernels._C not importable ({exc})"
    return module, "compiled extension loaded"


def extension_has_kernel(op: str, dispatch_key: str) -> bool:
    """True if the compiled extension registered ``sphinx_kernels::<op>`` for ``dispatch_key`` (CPU/CUDA)."""
    if _extension()[0] is None:
        return False
    name = f"sphinx_kernels::{op}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    except RuntimeError:  # an extension built before this op existed (stale build): no kernel
        return False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return True, "triton importable"


@functools.cache
def _peer_importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(name, True, "PyTorch reference, always available")
    cuda = torch.cuda.is_available()
    if name in ("cpu", "cuda"):
        module, reason = _extension()
        if module is None:
            return BackendStatus(name, False, reason)
        if name == "cpu":
            return BackendStatus(name, True, "C++ CPU kernels in sphinx_kernels._C")
        if not extension_has_kernel("tile_gather_out", "CUDA"):  # every CUDA build has the tiles kernel
            return BackendStatus(
                name, False, "extension built without CUDA (no nvcc, or SPHINX_KERNELS_CUDA=0)"
            )
        if not cuda:
            return BackendStatus(name, False, "CUDA kernels built, but no CUDA device is visible")
        return BackendStatus(name, True, "CUDA kernels in sphinx_kernels._C")
    if name == "triton":
        ok, reason = _triton_importable()
        if not ok:
            return BackendStatus(name, False, reason)
        if cuda:
            return BackendStatus(name, True, "triton on the CUDA device")
        if triton_interpreting():
            return BackendStatus(name, True, "triton interpreter on the CPU (TRITON_INTERPRET=1; slow)")
        return BackendStatus(name, False, "no CUDA device (set TRITON_INTERPRET=1 to run the interpreter)")
    if name == "grouped_mm":
        if hasattr(torch, "_grouped_mm"):
            return BackendStatus(name, True, "torch._grouped_mm")
        return BackendStatus(name, False, f"torch {torch.__version__} has no torch._grouped_mm")
    if name == "megablocks" and _peer_importable("megablocks") and not _peer_importable("grouped_gemm"):
        # megablocks imports without it (a warning), but its grouped GEMM is grouped_gemm's.
        return BackendStatus(
            name, False, "megablocks installed without grouped_gemm (pip install grouped_gemm)"
        )
    if name in ("flash_attn", "megablocks"):
        if not _peer_importable(name):
            return BackendStatus(name, False, f"{name} is not installed (optional peer, needs a GPU build)")
        if not cuda:
            return BackendStatus(name, False, f"{name} installed, but no CUDA device is visible")
        return BackendStatus(name, True, f"{name} importable")
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(ALL_BACKENDS)}")


def backends() -> dict[str, BackendStatus]:
    """Every backend and whether it can run here; ``print(*backends().values(), sep="\\n")`` explains."""
    return {name: _status(name) for name in ALL_BACKENDS}


def _requested(family: str) -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if ":" not in value:
        return value
    for part in value.split(","):
        key, _, name = part.partition(":")
        if key.strip() == family:
            return name.strip()
    return None


def _runs_on(name: str, device: torch.device, op: str) -> tuple[bool, str]:
    """Can backend `name` run op family `family`'s kernel `op` on tensors on `device`?"""
    status = _status(name)
    if name == "torch":
        return True, status.reason
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {device.type}"
        if not extension_has_kernel(op, "CPU"):
            return (
                False,
                status.reason if not status.available else f"no CPU kernel for {op} in the extension",
            )
        return True, status.reason
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got {device.type}"
        if not status.available:
            return False, status.reason
        if not extension_has_kernel(op, "CUDA"):
            return False, f"no CUDA kernel for {op} in the extension"
        return True, status.reason
    if name == "triton":
        ok, reason = _triton_importable()
        if not ok:
            return False, reason
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return True, "triton"
        return False, f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones), got {device.type}"
    if name in ("flash_attn", "megablocks"):
        if device.type != "cuda":
            return False, f"{name} runs on CUDA tensors, got {device.type}"
        return status.available, status.reason
    return status.available, status.reason


# Decided at trace time under torch.compile (the result is a constant of the graph): backend choice
# reads the environment and the extension registry, neither of which dynamo can or should trace.
@torch.compiler.assume_constant_result
def select(
    family: str,
    candidates: tuple[str, ...],
    device: torch.device,
    *,
    op: str = "",
    backend: str | None = None,
) -> str:
    """Pick the backend for one call of op family `family`.

    `candidates`: the family's backends in preference order; `op`: the extension op whose CPU/CUDA kernels
    the cpu/cuda backends need; `backend`: the caller's explicit choice, else ``SPHINX_KERNELS_BACKEND``.
    """
    requested = backend if backend is not None else _requested(family)
    if requested is not None:
        if requested not in candidates:
            raise ValueError(
                f"backend={requested!r} does not implement {family}; choose from {', '.join(candidates)}"
            )
        ok, reason = _runs_on(requested, device, op)
        if not ok:
            raise RuntimeError(f"backend {requested!r} was requested for {family} but cannot run: {reason}")
        return requested
    for name in candidates:
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter only when asked for (module docstring)
        if _runs_on(name, device, op)[0]:
            return name
    return "torch"


# The engines behind attention's backend names: one name, one meaning to the user ("torch" is PyTorch), and
# each engine a distinct path with its own name (sphinx_kernels.attention.op lists them).
def attention_engine(backend: str, device_type: str, compiling: bool) -> str:
    """The attention engine that runs backend `backend` (``select``'s answer) on `device_type` tensors.

    ``torch`` on CPU tensors is ``torch_cpu`` (PyTorch's CPU flash kernels per sequence in one registered op,
    eager or compiled); elsewhere ``torch_autograd`` (the reference under plain autograd: no recompute in
    backward) in eager mode and ``torch_formula`` (the reference inside the op with the softmax-backward
    formula) under torch.compile, whose graph cannot hold the reference's host-side loop. ``triton`` and
    ``flash_attn`` are their own engines.
    """
    if backend != "torch":
        return backend
    if device_type == "cpu":
        return "torch_cpu"
    return "torch_formula" if compiling else "torch_autograd"
