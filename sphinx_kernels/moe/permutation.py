"""Permutation of the ``T*k`` (token, slot) rows into expert groups and back (the weighted sum of each
token's k expert outputs).

Engines (see `validation.ENGINES`): ``extension`` (compiled moe_permute / moe_unpermute, csrc/moe.cpp and
csrc/cuda/moe.cu, which guard the inputs' device themselves), ``triton`` (row copies after a device-side
sort) and ``sort`` (the reference's indexing). Every engine is bit-exact for the row copies and sums each
token's k rows in float32 in slot order.
"""

from __future__ import annotations

import torch

from sphinx_kernels import _backend
from sphinx_kernels._common import common_device, on_device
from sphinx_kernels._triton import tl, triton
from sphinx_kernels.moe.reference import permute_ref, sort_by_expert, unpermute_ref
from sphinx_kernels.moe.validation import (
    ENGINES,
    FLOAT_DTYPES,
    check_expert_ids,
    check_num_experts,
    check_tensor,
    check_unpermute_args,
    select,
)

__all__ = ["permute", "unpermute"]

# ----------------------------------------------------------------------------------------------------
# Triton kernels.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, dst_ptr, D, K_SLOTS, BLOCK_D: tl.constexpr):
    """dst[index[s]] = src[s // K_SLOTS]: the permutation's row copy (bit-exact)."""
    s = tl.program_id(0)
    dest = tl.load(index_ptr + s)
    src = src_ptr + (s // K_SLOTS).to(tl.int64) * D
    dst = dst_ptr + dest.to(tl.int64) * D
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        tl.store(dst + cols, tl.load(src + cols, mask=cols < D), mask=cols < D)


@triton.jit
def _unpermute_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, D, K_SLOTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[row_map[t, j]] in fp32, slots in order (as every backend)."""
    t = tl.program_id(0).to(tl.int64)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(K_SLOTS):
            row = tl.load(row_map_ptr + t * K_SLOTS + j)
            w = tl.load(w_ptr + t * K_SLOTS + j)
            acc += w * tl.load(y_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 16)), 1024)


def _permute_impl(x, expert_ids, num_experts, engine):
    if engine == "extension":
        return torch.ops.sphinx_kernels.moe_permute(x, expert_ids, num_experts)
    if engine == "sort":
        return permute_ref(x, expert_ids, num_experts)
    tokens, k = expert_ids.shape
    _, row_map, offsets = sort_by_expert(expert_ids, num_experts)  # device-side sort: no host sync
    x_sorted = torch.empty(tokens * k, x.shape[1], dtype=x.dtype, device=x.device)
    if x_sorted.numel():
        with on_device(x):
            _gather_rows_kernel[(tokens * k,)](
                x, row_map, x_sorted, x.shape[1], k, BLOCK_D=_block_d(x.shape[1])
            )
    return x_sorted, row_map, offsets


def _unpermute_impl(y_sorted, row_map, weights, engine):
    if engine == "extension":
        return torch.ops.sphinx_kernels.moe_unpermute(y_sorted, row_map, weights)
    if engine == "sort":
        return unpermute_ref(y_sorted, row_map, weights)
    tokens, k = row_map.shape
    out = torch.empty(tokens, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    if out.numel():
        with on_device(y_sorted):
            _unpermute_kernel[(tokens,)](
                y_sorted,
                row_map,
                weights,
                out,
                y_sorted.shape[1],
                K_SLOTS=k,
                BLOCK_D=_block_d(y_sorted.shape[1]),
            )
    return out


def _unpermute_backward_impl(grad, y_sorted, row_map, weights, engine, needs_y, needs_w):
    """``(d y_sorted, d weights)`` of `unpermute`: the compiled pass where the extension has one (CPU)."""
    if engine == "extension" and _backend.extension_has_kernel(
        "moe_unpermute_backward", grad.device.type.upper()
    ):
        grad_y, grad_w = torch.ops.sphinx_kernels.moe_unpermute_backward(grad, y_sorted, row_map, weights)
        return grad_y, grad_w.to(weights.dtype)
    grad_y = grad_w = None
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if needs_y:
        # Each sorted row belongs to exactly one (token, slot): a scatter, never a sum.
        rows = (weights.to(acc).unsqueeze(-1) * grad.to(acc).unsqueeze(1)).to(y_sorted.dtype)
        grad_y = torch.empty_like(y_sorted).index_copy_(
            0, row_map.reshape(-1), rows.reshape(-1, grad.shape[1])
        )
    if needs_w:
        grad_w = (grad.to(acc).unsqueeze(1) * y_sorted[row_map].to(acc)).sum(-1).to(weights.dtype)
    return grad_y, grad_w


# ----------------------------------------------------------------------------------------------------
# Registered ops (and the fake kernels of the extension's own ops, for torch.compile).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("sphinx_kernels::permute", mutates_args=())
def _permute_op(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, engine: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _permute_impl(x, expert_ids, num_experts, engine)


@_permute_op.register_fake
def _(x, expert_ids, num_experts, engine):
    tokens, k = expert_ids.shape
    return (
        x.new_empty(tokens * k, x.shape[1]),
        expert_ids.new_empty(tokens, k),
        expert_ids.new_empty(num_experts, dtype=torch.int32),
    )


def _permute_setup(ctx, inputs, output):
    ctx.engine = inputs[3]
    ctx.save_for_backward(output[1])


def _permute_backward(ctx, grad_sorted, _grad_map, _grad_offsets):
    (row_map,) = ctx.saved_tensors
    ones = torch.ones(row_map.shape, dtype=torch.float32, device=row_map.device)
    # d x[t] = sum_j d x_sorted[row_map[t, j]]: the un-permutation with unit weights.
    return _unpermute_op(grad_sorted.contiguous(), row_map, ones, ctx.engine), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("sphinx_kernels::unpermute", mutates_args=())
def _unpermute_op(
    y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, engine: str
) -> torch.Tensor:
    return _unpermute_impl(y_sorted, row_map, weights, engine)


@_unpermute_op.register_fake
def _(y_sorted, row_map, weights, engine):
    return y_sorted.new_empty(row_map.shape[0], y_sorted.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y_sorted, row_map, weights, engine = inputs
    ctx.engine = engine
    ctx.save_for_backward(y_sorted, row_map, weights)


def _unpermute_backward(ctx, grad):
    y_sorted, row_map, weights = ctx.saved_tensors
    needs_y, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_y, grad_w = _unpermute_backward_impl(
        grad.contiguous(), y_sorted, row_map, weights, ctx.engine, needs_y, needs_w
    )
    return grad_y, None, grad_w, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


if _backend.extension_has_kernel("moe_permute", "CPU") or _backend.extension_has_kernel(
    "moe_permute", "CUDA"
):

    @torch.library.register_fake("sphinx_kernels::moe_permute")
    def _(x, expert_ids, num_experts):
        tokens, k = expert_ids.shape
        return (
            x.new_empty(tokens * k, x.shape[1]),
            expert_ids.new_empty(tokens, k),
            expert_ids.new_empty(num_experts, dtype=torch.int32),
        )

    @torch.library.register_fake("sphinx_kernels::moe_unpermute")
    def _(y_sorted, row_map, weights):
        return y_sorted.new_empty(row_map.shape[0], y_sorted.shape[1])


if _backend.extension_has_kernel("moe_unpermute_backward", "CPU"):

    @torch.library.register_fake("sphinx_kernels::moe_unpermute_backward")
    def _(grad, y_sorted, row_map, weights):
        return torch.empty_like(y_sorted), torch.empty_like(weights)


# ----------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``T*k`` (token, slot) rows by expert, stable within an expert. Differentiable in `x`.

    Args:
        x: ``(T, d)`` float. expert_ids: int64/int32 ``(T, k)`` in ``[0, num_experts)``, on x's device.
        backend: ``"cuda" | "megablocks" | "triton" | "cpu" | "grouped_mm" | "torch"``; default: automatic
            (the peers own GEMMs only: they permute with the reference's sort).

    Returns:
        ``(x_sorted, row_map, offsets)``: `x_sorted` ``(T*k, d)`` (``x_sorted[row_map[t, j]] == x[t]``
        bit-exactly), `row_map` int64 ``(T, k)``, `offsets` int32 ``(E,)`` cumulative ends, on x's device.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_num_experts(num_experts)
    check_tensor("expert_ids", expert_ids, 2, (torch.int64, torch.int32))
    device = common_device(x=x, expert_ids=expert_ids)
    check_expert_ids(expert_ids, x.shape[0], num_experts)  # after the device check: it reads CPU ids
    chosen = select(device, None, backend)
    expert_ids = expert_ids.to(torch.int64).contiguous()
    if chosen == "torch":
        return permute_ref(x, expert_ids, num_experts)
    return _permute_op(x.contiguous(), expert_ids, num_experts, ENGINES[chosen].permute)


def unpermute(
    y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Weighted sum of each token's k expert rows: ``out[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]]``.

    Args:
        y_sorted: ``(T*k, d)`` float. row_map: int64 ``(T, k)`` from `permute`. weights: float ``(T, k)``
            (used in float32). All on one device. Differentiable in `y_sorted` and `weights`.

    Returns:
        ``(T, d)`` of y_sorted's dtype, accumulated in float32.
    """
    check_unpermute_args(y_sorted, row_map, weights)
    device = common_device(y_sorted=y_sorted, row_map=row_map, weights=weights)
    chosen = select(device, None, backend)
    if chosen == "torch":
        return unpermute_ref(y_sorted, row_map, weights)
    w = weights.to(torch.float32).contiguous()
    return _unpermute_op(y_sorted.contiguous(), row_map.contiguous(), w, ENGINES[chosen].permute)
