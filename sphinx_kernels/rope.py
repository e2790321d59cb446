"""Rotary position embeddings (Llama's rotate-half convention) on packed positions that restart at 0 in every
sequence: the reference, a fused Triton kernel with its backward, the registered op
``sphinx_kernels::apply_rotary`` (so torch.compile(fullgraph=True) traces through it) and `apply_rotary`.

Backends (family ``rope`` in ``SPHINX_KERNELS_BACKEND``, e.g. ``attention:triton,rope:triton``): ``triton``
and ``torch`` (the reference).
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sphinx_kernels import _backend
from sphinx_kernels._common import common_device, on_device
from sphinx_kernels._triton import tl, triton

__all__ = ["apply_rotary", "apply_rotary_ref", "position_ids_from_cu_seqlens", "rotary_inv_freq"]

BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# 1. Reference: Hugging Face Llama's rotate-half rotary embedding.
# ----------------------------------------------------------------------------------------------------


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``(head_dim // 2,)`` inverse frequencies, computed exactly as Hugging Face Llama does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return 1.0 / (theta**exponent)


@functools.lru_cache(maxsize=64)
def _remembered_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whichever mode asks first
        return rotary_inv_freq(head_dim, theta, device)


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """`rotary_inv_freq`, computed once per head_dim, theta and device (four small ops, ~45 us on a CPU, twice
    per layer of every decode step); made afresh under torch.compile (folded there anyway) and under any
    dispatch mode (a fake tensor must never be remembered)."""
    theta = float(theta)  # one computation for an int and a float theta (pow rounds them differently)
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return rotary_inv_freq(head_dim, theta, device)
    return _remembered_inv_freq(head_dim, theta, device)


def apply_rotary_ref(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama rotary embedding (rotate-half convention), plain PyTorch. Shapes as `apply_rotary`.

    Angles in float32 (``position * inv_freq``), cos/sin cast to x's dtype, then
    ``x*cos + rotate_half(x)*sin`` in x's dtype: the Hugging Face computation.
    """
    inv_freq = _inv_freq(x.shape[-1], theta, x.device)
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().to(x.dtype)[:, None, :]
    sin = emb.sin().to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------------
# 2. Triton kernel.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(
    X,
    POS,
    INV_FREQ,
    OUT,
    num_tokens,
    num_heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    SIGN: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per block of tokens, looping over the heads: cos/sin are computed once per (token,
    frequency) and reused by every head. out = x*cos + rotate_half(x)*sin*SIGN; SIGN = -1 is the inverse
    rotation, i.e. the backward (the rotation is orthogonal)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = tl.arange(0, BLOCK_HALF)
    tokens_ok = offs_t < num_tokens
    freq_ok = offs_f < HALF
    mask = tokens_ok[:, None] & freq_ok[None, :]
    pos = tl.load(POS + offs_t, mask=tokens_ok, other=0).to(tl.float32)
    inv_freq = tl.load(INV_FREQ + offs_f, mask=freq_ok, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]  # float32, the single rounding of Hugging Face's product
    # cos/sin rounded to x's dtype first, as Hugging Face does; the rotation itself in float32.
    cos = tl.cos(angle).to(X.dtype.element_ty).to(tl.float32)
    sin = tl.sin(angle).to(X.dtype.element_ty).to(tl.float32) * SIGN
    offs_t64 = offs_t.to(tl.int64)
    x_ptrs = X + offs_t64[:, None] * stride_xt + offs_f[None, :]
    o_ptrs = OUT + offs_t64[:, None] * stride_ot + offs_f[None, :]
    for h in range(0, num_heads):
        x1 = tl.load(x_ptrs + h * stride_xh, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + h * stride_xh + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs + h * stride_oh, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + h * stride_oh + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# 3. Launcher.
# ----------------------------------------------------------------------------------------------------


def _rotary_triton(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, sign: int
) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_heads == 0:
        return out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # ~2048 (token, frequency) pairs per program: 32 tokens x 64 frequencies at head_dim 128; in the
    # interpreter one program covers up to 512 tokens (its cost is per block operation).
    budget = 512 * block_half if _backend.triton_interpreting() else 2048
    block_t = min(triton.next_power_of_2(num_tokens), max(1, budget // block_half))
    _rotary_kernel[(triton.cdiv(num_tokens, block_t),)](
        x,
        position_ids,
        inv_freq,
        out,
        num_tokens,
        num_heads,
        *x.stride()[:2],
        *out.stride()[:2],
        SIGN=sign,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_T=block_t,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# 4. Registered op.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("sphinx_kernels::apply_rotary", mutates_args=())
def _apply_rotary_op(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, sign: int
) -> torch.Tensor:
    """Rotate ``x`` (T, H, D) by ``sign * position * inv_freq`` (rotate-half convention)."""
    common_device(x=x, position_ids=position_ids, inv_freq=inv_freq)
    with on_device(x):
        return _rotary_triton(x, position_ids, inv_freq, sign)


@_apply_rotary_op.register_fake
def _(x, position_ids, inv_freq, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _apply_rotary_setup_context(ctx, inputs, output) -> None:
    _, position_ids, inv_freq, sign = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.sign = sign


def _apply_rotary_backward(ctx, grad):
    position_ids, inv_freq = ctx.saved_tensors
    # The rotation is orthogonal: its adjoint is the rotation by the opposite angle.
    return _apply_rotary_op(grad, position_ids, inv_freq, -ctx.sign), None, None, None


_apply_rotary_op.register_autograd(_apply_rotary_backward, setup_context=_apply_rotary_setup_context)


# ----------------------------------------------------------------------------------------------------
# 5. Public functions.
# ----------------------------------------------------------------------------------------------------


def _check_rotary_args(x: torch.Tensor, position_ids: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (T, heads, head_dim), got {tuple(x.shape)}")
    if x.shape[2] % 2:
        raise ValueError(f"x's head_dim must be even for rotate-half rotary, got {x.shape[2]}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if (
        position_ids.dtype.is_floating_point
        or position_ids.dtype.is_complex
        or position_ids.dtype == torch.bool
    ):
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.shape != (x.shape[0],):
        raise ValueError(
            f"position_ids must have shape ({x.shape[0]},) (one per token), got {tuple(position_ids.shape)}"
        )
    common_device(x=x, position_ids=position_ids)


def apply_rotary(
    x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0, *, backend: str | None = None
) -> torch.Tensor:
    """Rotary position embedding, Llama's rotate-half convention (matches Hugging Face's Llama).

    Args:
        x: ``(T, H, D)`` float16, bfloat16, float32 (float64: torch backend only), D even.
        position_ids: integer ``(T,)`` on x's device: each token's position in its own sequence
            (`position_ids_from_cu_seqlens` for a packed batch).
        theta: the rotary base (Llama 2: 10000, Llama 3: 500000, Mixtral: 1e6).
        backend: ``"triton" | "torch"``; default: the fastest available.

    Returns:
        ``(T, H, D)`` in x's dtype; differentiable in x.
    """
    _check_rotary_args(x, position_ids)
    if x.dtype == torch.float64:
        if backend not in (None, "torch"):
            raise TypeError(f"backend={backend!r} cannot run float64; use backend='torch'")
        chosen = "torch"
    else:
        chosen = _backend.select("rope", BACKENDS, torch.device(x.device.type), backend=backend)
    if chosen == "torch":
        return apply_rotary_ref(x, position_ids, theta)
    inv_freq = _inv_freq(x.shape[2], theta, x.device)
    return _apply_rotary_op(x, position_ids.contiguous(), inv_freq, 1)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """int64 ``(T,)`` positions restarting at 0 in every packed sequence, on cu_seqlens' device.

    Args:
        cu_seqlens: integer ``(B+1,)`` boundaries (``0, ..., T``).
        num_tokens: ``T``; pass it to avoid reading ``cu_seqlens[-1]`` back from the device.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (B+1,), got {tuple(cu_seqlens.shape)}")
    if num_tokens is None:
        num_tokens = int(cu_seqlens[-1])
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(num_tokens, device=cu.device, dtype=torch.int64)
    # Sequence of each token: the last boundary <= it (empty sequences share a boundary and are skipped).
    seq = torch.searchsorted(cu, tokens, right=True) - 1
    return tokens - cu[seq]
