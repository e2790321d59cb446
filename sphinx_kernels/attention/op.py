"""The registered ops ``sphinx_kernels::varlen_attention_fwd`` / ``_bwd`` (opaque to torch.compile, with
autograd), the flash-attn adapter, and the public `varlen_attention`.

The public backend names are ``flash_attn``, ``triton`` and ``torch``; `_backend.attention_engine` maps each to
the engine that runs it: ``triton`` (the kernels in `triton_fwd` / `triton_bwd`), ``torch_cpu`` (CPU tensors:
PyTorch's CPU flash kernels per sequence, `cpu`), ``torch_formula`` (off the CPU under torch.compile: the
reference forward and the softmax-backward formula, `reference`), ``torch_autograd`` (off the CPU in eager
mode: the reference under plain autograd, outside the ops) and ``flash_attn``.
"""

from __future__ import annotations

import math

import torch

from sphinx_kernels import _backend
from sphinx_kernels._common import on_device
from sphinx_kernels.attention.cpu import cpu_backward, cpu_forward
from sphinx_kernels.attention.reference import formula_backward, formula_forward, varlen_attention_ref
from sphinx_kernels.attention.triton_bwd import varlen_attention_bwd_triton
from sphinx_kernels.attention.triton_fwd import varlen_attention_fwd_triton
from sphinx_kernels.attention.validation import (
    MAX_KERNEL_HEAD_DIM,
    check_attention_args,
    check_cu_seqlens_values,
)

BACKENDS = ("flash_attn", "triton", "torch")
OP_ENGINES = ("triton", "torch_cpu", "torch_formula")


def _lse_spec(q: torch.Tensor, engine: str) -> tuple[tuple[int, int], torch.dtype]:
    """Shape and dtype of the forward's LSE: ``(Hq, T)`` float32 (float64 for float64 on the CPU engine);
    ``(Hq, 0)`` for torch_formula, whose backward recomputes the probabilities."""
    tokens = 0 if engine == "torch_formula" else q.shape[0]
    wide = engine == "torch_cpu" and q.dtype == torch.float64
    return (q.shape[1], tokens), torch.float64 if wide else torch.float32


@torch.library.custom_op("sphinx_kernels::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    engine: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (T, Hq, D) q.dtype, lse)`` on `engine` (one of `OP_ENGINES`); lse is the softmax normaliser kept
    for backward (+inf where a query sees no key), shaped per `_lse_spec`: natural log (torch_cpu, PyTorch's
    convention), base 2 of the scaled scores (triton). Keys sharing the queries' boundaries pass cu_seqlens
    twice."""
    args = (q, k, v, cu_seqlens, cu_seqlens_k, causal, softmax_scale)
    if engine == "triton":
        with on_device(q):
            return varlen_attention_fwd_triton(
                q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale
            )
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if engine == "torch_cpu":
        return cpu_forward(*args)
    if engine == "torch_formula":
        return formula_forward(*args)
    raise ValueError(
        f"sphinx_kernels::varlen_attention_fwd runs engines {', '.join(OP_ENGINES)}, got {engine!r}"
    )


@_varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale, engine):
    shape, dtype = _lse_spec(q, engine)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(shape, dtype=dtype)


@torch.library.custom_op("sphinx_kernels::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    engine: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtypes, from the forward's `out` and `lse` on `engine`."""
    if engine == "triton":
        with on_device(q):
            return varlen_attention_bwd_triton(
                dout,
                q,
                k,
                v,
                out,
                lse,
                cu_seqlens,
                max_seqlen,
                cu_seqlens_k,
                max_seqlen_k,
                causal,
                softmax_scale,
            )
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if engine == "torch_cpu":
        return cpu_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, causal, softmax_scale)
    if engine == "torch_formula":
        grads = formula_backward(dout, q, k, v, out, cu_seqlens, cu_seqlens_k, causal, softmax_scale)
        return tuple(g.contiguous() for g in grads)
    raise ValueError(
        f"sphinx_kernels::varlen_attention_bwd runs engines {', '.join(OP_ENGINES)}, got {engine!r}"
    )


@_varlen_attention_bwd_op.register_fake
def _(
    dout, q, k, v, out, lse, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale, engine
):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale, engine = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k)
    ctx.max_seqlen, ctx.max_seqlen_k = max_seqlen, max_seqlen_k
    ctx.causal, ctx.softmax_scale, ctx.engine = causal, softmax_scale, engine
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd_op(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        ctx.max_seqlen,
        cu_seqlens_k,
        ctx.max_seqlen_k,
        ctx.causal,
        ctx.softmax_scale,
        ctx.engine,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale):
    """flash-attn's ``flash_attn_varlen_func`` (>= 2.1: causal masks align bottom-right, as ours), called with
    its parameter names (2.8.4: ``q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, block_table=None``); it returns ``out`` alone when
    ``return_attn_probs`` is False. Its kernels need the last dim contiguous."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=softmax_scale,
        causal=causal,
    )


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _candidates(q: torch.Tensor) -> tuple[str, ...]:
    """Backends that can run q's dtype and head_dim: flash-attn runs fp16/bf16, our Triton kernels
    fp16/bf16/fp32, both with head_dim <= 256; the torch backend runs anything."""
    if q.shape[2] > MAX_KERNEL_HEAD_DIM or q.dtype == torch.float64:
        return ("torch",)
    if q.dtype == torch.float32:
        return ("triton", "torch")
    return BACKENDS


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed sequences that never crosses a sequence boundary (flash-attn's varlen layout).

    Args:
        q: ``(T, Hq, D)`` float16, bfloat16 or float32 (float64: torch backend only); the last dim contiguous
            is fastest (other strides are copied).
        k, v: ``(T, Hkv, D)`` (``(Tk, Hkv, D)`` with `cu_seqlens_k`), q's dtype and device; ``Hq % Hkv == 0``
            (grouped-query attention: q head h attends with k/v head ``h // (Hq // Hkv)``).
        cu_seqlens: int32 ``(B+1,)`` on q's device: ``0, len_0, len_0 + len_1, ..., T`` (non-decreasing).
        max_seqlen: the longest sequence's length (an upper bound is allowed; it sizes the work table).
        causal: causal masking within each sequence (token i sees tokens <= i of its own sequence).
        softmax_scale: default ``1 / sqrt(D)``.
        cu_seqlens_k, max_seqlen_k: the keys' own boundaries ``(B+1,)`` int32 (ending at Tk) and longest key
            sequence, when queries and keys differ per sequence: decoding or chunked prefill against a KV cache,
            cross-attention. Causal masking then aligns bottom-right (flash-attn >= 2.1): query i of a sequence
            with Lq queries and Lk keys sees keys ``j <= i + Lk - Lq``, so the last query sees every key; a
            query that sees no key (Lk = 0, or Lq > Lk and i < Lq - Lk) outputs 0. Both or neither.
        backend: ``"flash_attn" | "triton" | "torch"``; default: the fastest available (`_backend`). On CPU
            tensors ``torch`` runs float16 in float32 and bfloat16's backward with float32 softmax and
            dK/dV sums (see `sphinx_kernels.attention.cpu`), within flash-attn's error bar.

    Returns:
        ``(T, Hq, D)`` in q's dtype. Differentiable in q, k and v.

    The values of `cu_seqlens` (and `cu_seqlens_k`) are checked against T (Tk) and `max_seqlen`
    (`max_seqlen_k`), one small device-to-host copy each, except under ``torch.compile``, where data-dependent
    checks cannot run.
    """
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if not torch.compiler.is_compiling():
        check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
        if cu_seqlens_k is not None:
            check_cu_seqlens_values(
                cu_seqlens_k, k.shape[0], max_seqlen_k, ("cu_seqlens_k", "max_seqlen_k", "k")
            )
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    candidates = _candidates(q)
    if backend is not None and backend in BACKENDS and backend not in candidates:
        raise TypeError(
            f"backend={backend!r} cannot run q of dtype {q.dtype} with head_dim {q.shape[2]} (Triton: "
            f"float16/bfloat16/float32, head_dim <= {MAX_KERNEL_HEAD_DIM}; flash_attn: float16/bfloat16); "
            f"choose from {', '.join(candidates)}"
        )
    # Device types, not devices: the choice is a constant of a compiled graph (`_backend.select`).
    chosen = _backend.select("attention", candidates, torch.device(q.device.type), backend=backend)
    engine = _backend.attention_engine(chosen, q.device.type, torch.compiler.is_compiling())
    if engine == "flash_attn":
        return _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, scale)
    if engine == "torch_cpu" and not _needs_grad(q, k, v) and not torch.compiler.is_compiling():
        # Nothing to differentiate (decoding, evaluation): the engine itself, without the registered op's
        # dispatch and second argument check (~30 us a call: at batch 1 a decode step's attention is ~25 us).
        return cpu_forward(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale, with_lse=False)[0]
    if engine == "torch_autograd":
        return varlen_attention_ref(
            q, k, v, cu_seqlens, causal=causal, softmax_scale=scale, cu_seqlens_k=cu_seqlens_k
        )
    out, _ = _varlen_attention_fwd_op(
        q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, scale, engine
    )
    return out
