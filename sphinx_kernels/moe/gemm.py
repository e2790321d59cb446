"""Grouped GEMM ``y[rows of e] = x[rows of e] @ w[e]`` and its weight gradient, on every GEMM engine.

Engines (see `validation.ENGINES`): ``triton`` (`gemm_kernels`), ``mm_loop`` (one ``torch.mm`` per expert
into its rows of a preallocated output), ``grouped_mm`` (``torch._grouped_mm``), ``megablocks``
(grouped_gemm's kernels, the GEMMs megablocks runs) and ``loop`` (the reference). The expert MLP
(`experts`) runs on the same engines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sphinx_kernels._common import IdentityCache, common_device, on_device
from sphinx_kernels.moe.gemm_kernels import PLAIN, launch_grouped_dw, launch_grouped_mm
from sphinx_kernels.moe.reference import group_bounds, grouped_mm_dw_ref, grouped_mm_ref
from sphinx_kernels.moe.validation import ENGINES, check_grouped_mm_args, check_offsets, select

__all__ = ["grouped_mm"]

# torch._grouped_mm needs every non-unit stride and every base pointer to be a multiple of 16 bytes (CUDA's
# CUTLASS path checks the pointers, the CPU fallback only the strides); odd K/N are zero-padded.
_ALIGN_BYTES = 16

# ----------------------------------------------------------------------------------------------------
# Engines (the Triton kernels and their launchers are in gemm_kernels.py).
# ----------------------------------------------------------------------------------------------------


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def _torch_gmm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm with K and N zero-padded to 16-byte strides (exact: zeros add nothing)."""
    align = _ALIGN_BYTES // a.element_size()
    N = b.shape[-1]
    a_p = _pad_to(a.contiguous(), 1, align)
    b_p = _pad_to(_pad_to(b, 1, align), 2, align)
    if b_p.stride(-1) != 1 and b_p.stride(-2) != 1:
        b_p = b_p.contiguous()  # _grouped_mm takes row- or column-major weights (w.transpose(1, 2) as is)
    if b_p.data_ptr() % _ALIGN_BYTES:  # a view that starts mid-storage (nothing padded, nothing copied)
        b_p = b_p.clone()
    out = torch._grouped_mm(a_p, b_p, offsets)
    return out if out.shape[1] == N else out[:, :N].contiguous()


def _torch_gmm_dw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of e].T @ b[rows of e] with torch._grouped_mm's variable-K (2-D x 2-D) form."""
    align = _ALIGN_BYTES // a.element_size()
    K, N = a.shape[1], b.shape[1]
    a_p = _pad_to(a.contiguous(), 1, align)
    b_p = _pad_to(b.contiguous(), 1, align)
    return torch._grouped_mm(a_p.T, b_p, offsets)[:, :K, :N].contiguous()


# The layer's 7 grouped GEMMs (3 forward, 4 backward) share one offsets tensor: one host copy of the sizes.
_host_sizes = IdentityCache()


def _batch_sizes(offsets: torch.Tensor) -> torch.Tensor:
    """grouped_gemm's ``batch_sizes``: int64 rows per expert on the CPU (its cuBLAS path reads them on the
    host; a CUDA tensor is accepted only by its CUTLASS build)."""
    return _host_sizes.get(
        offsets,
        "batch_sizes",
        lambda: torch.diff(offsets, prepend=offsets.new_zeros(1)).to("cpu", torch.int64),
    )


def _grouped_gemm_backend():
    """grouped_gemm's un-differentiated kernels, as megablocks exposes them (``gg.backend``): ``gmm(a, b,
    batch_sizes, trans_a=False, trans_b=False, c=None)``; bf16, contiguous a and b. (``gg.ops.gmm(a, b,
    batch_sizes, trans_b=False)`` is the autograd wrapper, with no variable-K form.)"""
    from megablocks import grouped_gemm_util as gg  # optional peer

    if not gg.grouped_gemm_is_available():
        raise RuntimeError("megablocks is installed without grouped_gemm (pip install grouped_gemm)")
    return gg.backend


def _megablocks_gmm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    backend, sizes = _grouped_gemm_backend(), _batch_sizes(offsets)
    # grouped_gemm launches on the current device and stream (no device guard of its own).
    with on_device(a):
        if b.transpose(1, 2).is_contiguous():  # a transposed view ((E, N, K) storage): its trans_b, no copy
            return backend.gmm(a.contiguous(), b.transpose(1, 2), sizes, trans_b=True)
        return backend.gmm(a.contiguous(), b.contiguous(), sizes)


def _megablocks_gmm_dw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of e].T @ b[rows of e]: grouped_gemm's variable-K form (``trans_a=True``)."""
    backend, sizes = _grouped_gemm_backend(), _batch_sizes(offsets)
    with on_device(a):
        return backend.gmm(a.contiguous(), b.contiguous(), sizes, trans_a=True)


def _mm_loop(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One ``torch.mm`` per expert straight into its rows of the output (no padding, no concatenation;
    measured up to 1.4x ``torch._grouped_mm`` for ``x @ w1`` on the CPU)."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    end = 0
    for i, (start, end) in enumerate(group_bounds(offsets)):
        if end > start:
            torch.mm(a[start:end], b[i], out=out[start:end])
    out[end:].zero_()  # rows past the last expert (none when offsets end at M, as the public API checks)
    return out


def _mm_loop_dw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e].T @ b[rows of e]``, one ``torch.mm`` per expert; zeros for an expert without rows."""
    out = a.new_empty(offsets.shape[0], a.shape[1], b.shape[1])
    for i, (start, end) in enumerate(group_bounds(offsets)):
        if end > start:
            torch.mm(a[start:end].T, b[start:end], out=out[i])
        else:
            out[i].zero_()
    return out


def gemm(engine: str, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(M, K) x (E, K, N)`` grouped by offsets -> ``(M, N)`` on GEMM engine `engine`."""
    if engine == "triton":
        out = torch.empty(a.shape[0], b.shape[-1], dtype=a.dtype, device=a.device)
        launch_grouped_mm(PLAIN, a, b, offsets, out)
        return out
    if engine == "mm_loop":
        return _mm_loop(a, b, offsets)
    if engine == "grouped_mm":
        return _torch_gmm(a, b, offsets)
    if engine == "megablocks":
        return _megablocks_gmm(a, b, offsets)
    if engine == "loop":
        return grouped_mm_ref(a, b, offsets)
    raise ValueError(f"unknown GEMM engine {engine!r}")


def gemm_dw(engine: str, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e].T @ b[rows of e]`` ``(E, K, N)`` on GEMM engine `engine`."""
    if engine == "triton":
        out = torch.empty(offsets.shape[0], a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
        launch_grouped_dw(a, b, offsets, out)
        return out
    if engine == "mm_loop":
        return _mm_loop_dw(a, b, offsets)
    if engine == "grouped_mm":
        return _torch_gmm_dw(a, b, offsets)
    if engine == "megablocks":
        return _megablocks_gmm_dw(a, b, offsets)
    if engine == "loop":
        return grouped_mm_dw_ref(a, b, offsets)
    raise ValueError(f"unknown GEMM engine {engine!r}")


# ----------------------------------------------------------------------------------------------------
# Registered ops.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("sphinx_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, engine: str) -> torch.Tensor:
    return gemm(engine, x, w, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets, engine):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sphinx_kernels::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, engine: str) -> torch.Tensor:
    return gemm_dw(engine, x, dy, offsets)


@_grouped_mm_dw_op.register_fake
def _(x, dy, offsets, engine):
    return x.new_empty(offsets.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets, engine = inputs
    ctx.engine = engine
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _grouped_mm_op(grad, w.transpose(1, 2), offsets, ctx.engine) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_dw_op(x, grad, offsets, ctx.engine) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


# ----------------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------------


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Grouped GEMM: ``y[rows of group e] = x[rows of group e] @ w[e]``. Differentiable in `x` and `w`.

    Args:
        x: ``(M, K)`` float, rows grouped by expert. w: ``(E, K, N)`` of x's dtype, any strides.
        offsets: int32 ``(E,)`` cumulative group ends (non-decreasing, ``offsets[-1] == M``); all three on
            one device.
        backend: ``"cuda" | "megablocks" | "triton" | "cpu" | "grouped_mm" | "torch"``; default: automatic.

    Returns:
        ``(M, N)`` of x's dtype (fp32 accumulation).
    """
    check_grouped_mm_args(x, w, offsets)
    device = common_device(x=x, w=w, offsets=offsets)
    check_offsets(offsets, x.shape[0], w.shape[0])  # after the device check: it reads CPU offsets
    chosen = select(device, x.dtype, backend)
    if chosen == "torch":
        return grouped_mm_ref(x, w, offsets)
    return _grouped_mm_op(x.contiguous(), w, offsets.contiguous(), ENGINES[chosen].gemm)
