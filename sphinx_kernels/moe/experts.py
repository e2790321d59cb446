"""The SwiGLU expert MLP on grouped rows and the two public MoE layers built on it.

One MoE layer (Mixtral, SPHINX-MoE) runs as::

    weights, expert_ids = route(x @ router_weight.T, top_k)       # fp32 softmax, top-k, renormalised
    x_sorted, row_map, offsets = permute(x, expert_ids, E)        # (token, slot) rows grouped by expert
    y_sorted = (silu(x_sorted @ w1[e]) * (x_sorted @ w3[e])) @ w2[e]   per expert group (grouped GEMMs)
    out = unpermute(y_sorted, row_map, weights)                   # weighted sum of each token's k rows

The expert MLP is one registered op per direction, on the GEMM engines of `gemm` (`validation.ENGINES`):
``triton`` fuses the SiLU-gate product into the first GEMM's epilogue (x@w1 and x@w3 in one kernel) and its
derivative into the backward's; ``mm_loop`` is the cpu engine (`cpu`); the others run three grouped GEMMs
and PyTorch's elementwise ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sphinx_kernels._common import common_device
from sphinx_kernels.moe import cpu
from sphinx_kernels.moe.gemm import gemm, gemm_dw
from sphinx_kernels.moe.gemm_kernels import DUAL, SWIGLU_BWD, SWIGLU_FWD, launch_grouped_dw, launch_grouped_mm
from sphinx_kernels.moe.permutation import _permute_op, _unpermute_op
from sphinx_kernels.moe.reference import (
    MoEAux,
    load_balancing_loss,
    moe_experts_ref,
    moe_mlp_ref,
    route_ref,
    split_gate_up,
)
from sphinx_kernels.moe.validation import (
    ENGINES,
    FLOAT_DTYPES,
    check_expert_ids,
    check_expert_weights,
    check_like_x,
    check_routing_weights,
    check_tensor,
    check_top_k,
    select,
)

__all__ = ["moe_experts", "moe_mlp"]

# ----------------------------------------------------------------------------------------------------
# Engines (forward and backward of the expert MLP on x_sorted).
# ----------------------------------------------------------------------------------------------------


def _weight_grads(
    w1: torch.Tensor, w3: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad for w1 as given, its gate half, its up half)``: with a fused gate|up `w1` (`w3` None) one buffer
    in w1's own layout, so autograd hands it to the parameter as is (no zero-filled slice gradients, no
    transposing copy); otherwise a contiguous buffer per weight (w1's gradient is then its own gate half)."""
    if w3 is None:
        fused = torch.empty_like(w1)  # keeps w1's strides when w1 is dense (e.g. a transposed (E, 2f, d))
        return (fused, *split_gate_up(fused, None))
    g1 = w1.new_empty(w1.shape)
    return g1, g1, w3.new_empty(w3.shape)


def _experts_forward(x, w1, w3, w2, offsets, engine, save_pre):
    """``(y, h, a1, a3)``: a1 = x@w1, a3 = x@w3 (empty without `save_pre`), h = silu(a1)*a3 (empty on the
    mm_loop engine, whose backward recomputes it), y = h@w2."""
    M, f = x.shape[0], w1.shape[-1]
    if engine == "mm_loop":
        return cpu.experts_forward(x, w1, w3, w2, offsets, save_pre)
    if engine == "triton":
        h = torch.empty(M, f, dtype=x.dtype, device=x.device)
        a1 = torch.empty(M if save_pre else 0, f, dtype=x.dtype, device=x.device)
        a3 = torch.empty_like(a1)
        launch_grouped_mm(SWIGLU_FWD, x, w1, offsets, h, b2=w3, aux1=a1, aux2=a3, save_pre=save_pre)
        return gemm("triton", h, w2, offsets), h, a1, a3
    a1 = gemm(engine, x, w1, offsets)
    a3 = gemm(engine, x, w3, offsets)
    h = F.silu(a1) * a3
    if not save_pre:
        a1, a3 = a1.new_empty(0, f), a3.new_empty(0, f)
    return gemm(engine, h, w2, offsets), h, a1, a3


def _experts_backward(grad, x, w1, w3, w2, offsets, h, a1, a3, engine, grad_gate, grad_up):
    """``(grad_x, grad_w2)``; the gate and up weight gradients are written into `grad_gate`, `grad_up`."""
    if engine == "mm_loop":
        return cpu.experts_backward(grad, x, w1, w3, w2, offsets, a1, a3, grad_gate, grad_up)
    grad_w2 = gemm_dw(engine, h, grad, offsets)
    if engine == "triton":
        da1, da3 = torch.empty_like(a1), torch.empty_like(a3)
        # dh = grad @ w2[e].T with the SwiGLU derivative in the epilogue: dh never reaches memory.
        launch_grouped_mm(SWIGLU_BWD, grad, w2.transpose(1, 2), offsets, da1, out2=da3, aux1=a1, aux2=a3)
        grad_x = torch.empty_like(x)
        launch_grouped_mm(DUAL, da1, w1.transpose(1, 2), offsets, grad_x, a2=da3, b2=w3.transpose(1, 2))
        launch_grouped_dw(x, da1, offsets, grad_gate, b2=da3, out2=grad_up)
        return grad_x, grad_w2
    dh = gemm(engine, grad, w2.transpose(1, 2), offsets)
    # Elementwise SwiGLU backward: silu_backward is one fused pass. Each (M, f) temporary is dropped as soon
    # as it is consumed: on the CPU fresh large buffers cost page faults (~7% of the layer at d 512, f 1792).
    da3 = dh * F.silu(a1)
    da1 = torch.ops.aten.silu_backward(dh.mul_(a3), a1)
    del dh
    grad_x = gemm(engine, da1, w1.transpose(1, 2), offsets)
    grad_gate.copy_(gemm_dw(engine, x, da1, offsets))
    del da1
    grad_x.add_(gemm(engine, da3, w3.transpose(1, 2), offsets))
    grad_up.copy_(gemm_dw(engine, x, da3, offsets))
    return grad_x, grad_w2


# ----------------------------------------------------------------------------------------------------
# Registered ops.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("sphinx_kernels::moe_experts", mutates_args=())
def _moe_experts_op(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    engine: str,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w3 None: w1 is the fused gate|up weight ``(E, d, 2f)``."""
    gate, up = split_gate_up(w1, w3)
    return _experts_forward(x_sorted, gate, up, w2, offsets, engine, save_pre)


@_moe_experts_op.register_fake
def _(x_sorted, w1, w3, w2, offsets, engine, save_pre):
    M, f = x_sorted.shape[0], w2.shape[1]
    pre = M if save_pre else 0
    keeps_h = engine != "mm_loop"  # the cpu engine recomputes h
    return (
        x_sorted.new_empty(M, w2.shape[-1]),
        x_sorted.new_empty(M if keeps_h else 0, f),
        x_sorted.new_empty(pre, f),
        x_sorted.new_empty(pre, f),
    )


@torch.library.custom_op("sphinx_kernels::moe_experts_bwd", mutates_args=())
def _moe_experts_bwd_op(
    grad: torch.Tensor,
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    h: torch.Tensor,
    a1: torch.Tensor,
    a3: torch.Tensor,
    engine: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w1, grad_w3, grad_w2)``; with a fused gate|up `w1` (w3 None) grad_w1 is the fused
    gradient and grad_w3 is empty."""
    grad_w1, grad_gate, grad_up = _weight_grads(w1, w3)
    grad_w3 = grad_up if w3 is not None else grad_up.new_empty(0)
    gate, up = split_gate_up(w1, w3)
    grad_x, grad_w2 = _experts_backward(
        grad, x_sorted, gate, up, w2, offsets, h, a1, a3, engine, grad_gate, grad_up
    )
    return grad_x, grad_w1, grad_w3, grad_w2


@_moe_experts_bwd_op.register_fake
def _(grad, x_sorted, w1, w3, w2, offsets, h, a1, a3, engine):
    grad_w1 = _weight_grads(w1, w3)[0]
    grad_w3 = w3.new_empty(w3.shape) if w3 is not None else w1.new_empty(0)
    return torch.empty_like(x_sorted), grad_w1, grad_w3, w2.new_empty(w2.shape)


def _moe_experts_setup(ctx, inputs, output):
    x_sorted, w1, w3, w2, offsets, engine, save_pre = inputs
    _, h, a1, a3 = output
    ctx.engine = engine
    ctx.save_for_backward(x_sorted, w1, w3, w2, offsets, h, a1, a3)
    # h, a1, a3 are outputs only to be saved: no zero (M, f) gradients for them (three fills of the layer's
    # largest tensors, ~3% of a CPU training step).
    ctx.set_materialize_grads(False)


def _moe_experts_backward(ctx, grad, _grad_h, _grad_a1, _grad_a3):
    if grad is None:  # y itself did not reach the loss
        return (None,) * 7
    x_sorted, w1, w3, w2, offsets, h, a1, a3 = ctx.saved_tensors
    if a1.shape[0] != x_sorted.shape[0]:
        raise RuntimeError(
            "sphinx_kernels::moe_experts ran with save_pre=False: its backward needs x@w1, x@w3"
        )
    grad_x, grad_w1, grad_w3, grad_w2 = _moe_experts_bwd_op(
        grad.contiguous(), x_sorted, w1, w3, w2, offsets, h, a1, a3, ctx.engine
    )
    return grad_x, grad_w1, None if w3 is None else grad_w3, grad_w2, None, None, None


_moe_experts_op.register_autograd(_moe_experts_backward, setup_context=_moe_experts_setup)


# ----------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------


def _routed_experts(x, ids, weights, w1, w3, w2, chosen) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute, SwiGLU experts, weighted unpermute on a kernel backend; returns ``(out, offsets)``."""
    engines = ENGINES[chosen]
    x_sorted, row_map, offsets = _permute_op(x.contiguous(), ids, w1.shape[0], engines.permute)
    leaves = (x, w1, w2) if w3 is None else (x, w1, w3, w2)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    y_sorted, _, _, _ = _moe_experts_op(x_sorted, w1, w3, w2, offsets, engines.gemm, save_pre)
    return _unpermute_op(y_sorted, row_map, weights, engines.permute), offsets


def moe_mlp(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    *,
    top_k: int = 2,
    expert_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """Sparse SwiGLU mixture of experts: ``sum_j w_j * (silu(x@w1[e_j]) * (x@w3[e_j])) @ w2[e_j]``.

    Args:
        x: ``(T, d)`` float32/float16/bfloat16 (float64 on the cpu and torch backends; bfloat16 only on
            megablocks).
        router_weight: ``(E, d)`` (bias-free gate, logits ``x @ router_weight.T``, fp32 softmax).
        w1, w3: ``(E, d, f)``, or w3 None and w1 the fused gate|up weight ``(E, d, 2f)`` (gate ``w1[..., :f]``,
            up ``w1[..., f:]``; its gradient comes as one tensor); w2: ``(E, f, d)``; all of x's dtype.
        top_k: experts per token, 1..(unpruned experts). expert_mask: optional bool ``(E,)``, False = pruned.
            Every tensor on x's device.
        backend: ``"cuda" | "megablocks" | "triton" | "cpu" | "grouped_mm" | "torch"``; default: automatic.

    Returns:
        ``(out, aux)``: `out` ``(T, d)`` of x's dtype; `aux` a `MoEAux` (router probs, expert ids, tokens per
        expert, load-balancing loss). Differentiable in x, router_weight, w1, w3, w2 (and through the loss).
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_like_x("router_weight", router_weight, 2, x)
    E = router_weight.shape[0]
    if router_weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"router_weight must have shape (E, d={x.shape[1]}), got {tuple(router_weight.shape)}"
        )
    check_expert_weights(x, w1, w3, w2, E)
    if expert_mask is not None:
        check_tensor("expert_mask", expert_mask, 1, (torch.bool,))
    device = common_device(x=x, router_weight=router_weight, w1=w1, w3=w3, w2=w2, expert_mask=expert_mask)
    check_top_k(top_k, E, expert_mask)  # after the device check: it reads the mask
    chosen = select(device, x.dtype, backend)
    if chosen == "torch":
        return moe_mlp_ref(x, router_weight, w1, w3, w2, top_k=top_k, expert_mask=expert_mask)

    weights, ids, probs = route_ref(x @ router_weight.T, top_k, expert_mask=expert_mask)
    out, offsets = _routed_experts(x, ids, weights, w1, w3, w2, chosen)
    tokens_per_expert = torch.diff(offsets, prepend=offsets.new_zeros(1))
    aux = MoEAux(probs, ids, tokens_per_expert, load_balancing_loss(probs, ids, expert_mask=expert_mask))
    return out, aux


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """SwiGLU experts with the routing already decided (the router is the caller's, e.g. a Hugging Face
    model's): ``out[t] = sum_j weights[t, j] * (silu(x[t]@w1[e]) * (x[t]@w3[e])) @ w2[e]``, ``e = expert_ids[t, j]``.

    Args:
        x: ``(T, d)`` float. expert_ids: int64/int32 ``(T, k)`` in ``[0, E)``. weights: float ``(T, k)``.
        w1, w3: ``(E, d, f)``, or w3 None and w1 the fused gate|up weight ``(E, d, 2f)`` (gate ``w1[..., :f]``,
            up ``w1[..., f:]``: Mixtral's ``gate_up_proj``, e.g. ``gate_up_proj.transpose(1, 2)``; its gradient
            comes as one tensor in w1's layout, no slice gradients); w2: ``(E, f, d)``; x's dtype; any strides
            (e.g. transposed views of ``(E, f, d)`` checkpoints). Every tensor on x's device.
        backend: as `moe_mlp`'s.

    Returns:
        ``(T, d)`` of x's dtype. Differentiable in x, weights, w1, w3, w2.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w1", w1, 3, FLOAT_DTYPES)  # its shape gives E; the full check follows
    E = w1.shape[0]
    check_expert_weights(x, w1, w3, w2, E)
    check_tensor("expert_ids", expert_ids, 2, (torch.int64, torch.int32))
    check_routing_weights(weights, expert_ids)
    device = common_device(x=x, expert_ids=expert_ids, weights=weights, w1=w1, w3=w3, w2=w2)
    check_expert_ids(expert_ids, x.shape[0], E)  # after the device check: it reads CPU ids
    chosen = select(device, x.dtype, backend)
    ids = expert_ids.to(torch.int64).contiguous()
    if chosen == "torch":
        return moe_experts_ref(x, ids, weights, w1, w3, w2)
    return _routed_experts(x, ids, weights.to(torch.float32).contiguous(), w1, w3, w2, chosen)[0]
