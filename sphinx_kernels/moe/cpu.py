"""The cpu engine of the expert MLP (``mm_loop``): per expert, ``torch.mm`` straight into its rows of
preallocated outputs, with the SwiGLU elementwise forward and backward fused into one compiled pass each
(csrc/moe.cpp) while the expert's rows are in cache."""

from __future__ import annotations

import torch

from sphinx_kernels import _backend
from sphinx_kernels.moe.reference import group_bounds


def experts_forward(x, w1, w3, w2, offsets, save_pre):
    """Per expert: a1 = x@w1, a3 = x@w3, h = silu(a1)*a3 (one compiled pass while a1, a3 are in cache),
    y = h@w2; every GEMM writes straight into its rows of the outputs. h lives in a scratch buffer the size of
    the largest expert group (the backward recomputes it in its fused pass), and so do a1/a3 without
    `save_pre`: the layer keeps 2 (M, f) activations for backward, not 3. Returns ``(y, h[:0], a1, a3)``."""
    M, f = x.shape[0], w1.shape[-1]
    bounds = group_bounds(offsets)
    largest = max((end - start for start, end in bounds), default=0)
    y, h = x.new_empty(M, w2.shape[-1]), x.new_empty(largest, f)
    rows = M if save_pre else largest
    a1, a3 = x.new_empty(rows, f), x.new_empty(rows, f)
    end = 0
    for i, (start, end) in enumerate(bounds):
        if end == start:
            continue
        pre = slice(start, end) if save_pre else slice(0, end - start)
        torch.mm(x[start:end], w1[i], out=a1[pre])
        torch.mm(x[start:end], w3[i], out=a3[pre])
        torch.ops.sphinx_kernels.swiglu_out(a1[pre], a3[pre], h[: end - start])
        torch.mm(h[: end - start], w2[i], out=y[start:end])
    y[end:].zero_()  # rows past the last expert (none when offsets end at M, as the public API checks)
    if not save_pre:
        a1, a3 = a1.new_empty(0, f), a3.new_empty(0, f)
    elif end < M:
        a1[end:].zero_()
        a3[end:].zero_()
    return y, h[:0], a1, a3


def experts_backward(grad, x, w1, w3, w2, offsets, a1, a3, grad_w1, grad_w3):
    """Per expert: dh = dy@w2.T, then one compiled pass gives (da1 in place of dh, da3, h), then dW2 = h.T@dy,
    dx = da1@w1.T + da3@w3.T (the second GEMM accumulates in place), dW1 = x.T@da1, dW3 = x.T@da3, written into
    the given `grad_w1`, `grad_w3` (any strides). The (rows, f) temporaries are three scratch buffers the size
    of the largest expert group, reused by every expert."""
    bounds = group_bounds(offsets)
    largest = max((end - start for start, end in bounds), default=0)
    dh, da3, h = (x.new_empty(largest, w1.shape[-1]) for _ in range(3))
    grad_x = torch.empty_like(x)
    grad_w2 = w2.new_empty(w2.shape)
    end = 0
    for i, (start, end) in enumerate(bounds):
        if end == start:
            for g in (grad_w1, grad_w3, grad_w2):
                g[i].zero_()
            continue
        rows, n = slice(start, end), end - start
        dy_e, x_e, d1, d3, h_e = grad[rows], x[rows], dh[:n], da3[:n], h[:n]
        torch.mm(dy_e, w2[i].T, out=d1)
        torch.ops.sphinx_kernels.swiglu_backward_(d1, a1[rows], a3[rows], d3, h_e)  # d1: dh -> da1
        torch.mm(h_e.T, dy_e, out=grad_w2[i])
        torch.mm(d1, w1[i].T, out=grad_x[rows])
        grad_x[rows].addmm_(d3, w3[i].T)
        torch.mm(x_e.T, d1, out=grad_w1[i])
        torch.mm(x_e.T, d3, out=grad_w3[i])
    grad_x[end:].zero_()
    return grad_x, grad_w2


if _backend.extension_has_kernel("swiglu_out", "CPU"):

    @torch.library.register_fake("sphinx_kernels::swiglu_out")
    def _(a1, a3, h):
        return None

    @torch.library.register_fake("sphinx_kernels::swiglu_backward_")
    def _(dh, a1, a3, da3, h):
        return None
