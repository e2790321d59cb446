"""Variable-length packed attention (FlashAttention-2 style, GQA) and rotary embeddings on packed positions.

Packed layout (flash-attn's varlen layout): the tokens of ``B`` sequences are concatenated into one stream of
``T`` tokens; ``cu_seqlens`` (int32, ``(B+1,)``, ``0 = cu[0] <= cu[1] <= ... <= cu[B] = T``) gives the
boundaries. Attention never crosses a boundary, and rotary positions restart at 0 in every sequence. Keys may
have boundaries of their own (``cu_seqlens_k``: a KV cache longer than the new queries, cross-attention);
causal masking then aligns bottom-right, as flash-attn's (>= 2.1), so each sequence's last query sees all
its keys.

Backends (``_backend.select("attention", ...)``): ``flash_attn`` (``flash_attn_varlen_func``, fp16/bf16, when
importable), ``triton`` (the kernels below), ``torch`` (the reference: per-sequence
``scaled_dot_product_attention``, never a ``T x T`` mask; the CPU path, where it calls PyTorch's CPU flash
kernels per sequence with a backward that writes packed gradients directly). Rotary (family ``rope`` in
``SPHINX_KERNELS_BACKEND``, e.g. ``attention:triton,rope:triton``): ``triton`` and ``torch``. The Triton
paths sit behind registered ops (``sphinx_kernels::varlen_attention_fwd`` / ``_bwd``,
``sphinx_kernels::apply_rotary``), so ``torch.compile(fullgraph=True)`` traces through them; under compile the
torch backend runs inside the op too.

The Triton schedule fixes FA2's varlen weakness: FA2 launches a ``(max_seqlen / BLOCK_M, B, H)`` grid, so
with one long and many short documents most programs exit at once and the long document's causal tail runs
last on a few SMs. Here the (sequence, block) work items are built on the device (no host sync), sorted by
their cost, heaviest first, and the grid has only ``cdiv(T, BLOCK) + B`` items per head, so the expensive
blocks start first and the cheap ones fill the tail.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref

import torch
import torch.nn.functional as F

from sphinx_kernels import _backend
from sphinx_kernels._triton import tl, triton

__all__ = [
    "apply_rotary",
    "apply_rotary_ref",
    "position_ids_from_cu_seqlens",
    "varlen_attention",
    "varlen_attention_ref",
]

BACKENDS = ("flash_attn", "triton", "torch")
ROPE_BACKENDS = ("triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*TRITON_DTYPES, torch.float64)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# Validation shared by every backend.
# ----------------------------------------------------------------------------------------------------


def _check_boundaries(name: str, cu: torch.Tensor, max_len, max_name: str, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (flash-attn's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (B+1,) with B >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"{max_name} must be an int, got {type(max_len).__name__}")


def _check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k=None, max_seqlen_k=None) -> None:
    """Shapes, dtypes and devices (no device sync). `cu_seqlens_k` None: keys share the queries' boundaries."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (T, heads, head_dim), got {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; q, k and v must share a device"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} must have q's head_dim (q is {tuple(q.shape)}): (T, Hkv, D)")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(
            f"k {tuple(k.shape)} must have q's token count (q is {tuple(q.shape)}), or pass the keys' own "
            f"boundaries as cu_seqlens_k"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv}) (grouped-query attention)"
        )
    if q.shape[2] == 0:
        raise ValueError("head_dim must be at least 1")
    _check_boundaries("cu_seqlens", cu_seqlens, max_seqlen, "max_seqlen", q.device)
    if (cu_seqlens_k is None) != (max_seqlen_k is None):
        raise ValueError("cu_seqlens_k and max_seqlen_k go together: pass both or neither")
    if cu_seqlens_k is not None:
        _check_boundaries("cu_seqlens_k", cu_seqlens_k, max_seqlen_k, "max_seqlen_k", q.device)
        if cu_seqlens_k.numel() != cu_seqlens.numel():
            raise ValueError(
                f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens has {cu_seqlens.numel()}: "
                f"one key sequence per query sequence"
            )


def _version_of(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


# The last two boundary tensors whose values passed (queries' and keys'): every layer of a model gets the same
# tensors, so a training or decoding step pays one device-to-host sync per tensor for the checks, not one per
# layer (weak references: never keeps them alive).
_last_checked: list[tuple[weakref.ref, int | None, int, int]] = []


def _check_cu_seqlens_values(
    cu_seqlens: torch.Tensor,
    num_tokens: int,
    max_seqlen: int,
    names: tuple[str, str, str] = ("cu_seqlens", "max_seqlen", "q"),
) -> None:
    """Value checks (one device-to-host copy of four scalars, skipped for a tensor checked last). `names`:
    the boundaries', the bound's and the tensor whose token count they must end at, for the messages."""
    for ref, version, tokens, longest_ok in _last_checked:
        if ref() is cu_seqlens and version == _version_of(cu_seqlens) and tokens == num_tokens:
            if max_seqlen >= longest_ok:
                return
    cu_name, max_name, tensor_name = names
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]
    ).tolist()
    if first != 0:
        raise ValueError(f"{cu_name} must start at 0, got {cu_name}[0] = {first}")
    if shortest < 0:
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(
            f"{cu_name} must be non-decreasing, but {cu_name}[{i + 1}] = {int(cu_seqlens[i + 1])} < "
            f"{cu_name}[{i}] = {int(cu_seqlens[i])}"
        )
    if last != num_tokens:
        raise ValueError(
            f"{cu_name} must end at T = {num_tokens} ({tensor_name}.shape[0]), got {cu_name}[-1] = {last}"
        )
    if max_seqlen < longest:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence ({longest})")
    version = _version_of(cu_seqlens)
    if version is not None:
        _last_checked[:] = [e for e in _last_checked if e[0]() is not cu_seqlens][-1:]
        _last_checked.append((weakref.ref(cu_seqlens), version, num_tokens, longest))


# ----------------------------------------------------------------------------------------------------
# 1. References: per-sequence SDPA (attention) and Hugging Face Llama's rotate-half rotary embedding.
# ----------------------------------------------------------------------------------------------------


def _sequence_pairs(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None) -> list[tuple[int, ...]]:
    """``(q_start, q_end, k_start, k_end)`` per sequence, on the host (keys share the queries' bounds if None)."""
    bq = cu_seqlens.tolist()
    bk = bq if cu_seqlens_k is None or cu_seqlens_k is cu_seqlens else cu_seqlens_k.tolist()
    return [(bq[i], bq[i + 1], bk[i], bk[i + 1]) for i in range(len(bq) - 1)]


def _blind_rows(q_len: int, k_len: int, causal: bool) -> int:
    """How many leading queries of a sequence see no key: all of them without keys, and with causal masking
    aligned bottom-right the first ``q_len - k_len`` when there are more queries than keys."""
    if k_len == 0:
        return q_len
    return max(q_len - k_len, 0) if causal else 0


def _causal_visible(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """bool ``(q_len, k_len)``: query i sees key j iff ``j <= i + k_len - q_len`` (bottom-right alignment:
    the last query sees every key, as when decoding with a KV cache)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch varlen attention: ``scaled_dot_product_attention`` on each sequence alone, in q's dtype.

    Shapes and semantics as `varlen_attention`; differentiable through PyTorch's autograd. `max_seqlen` and
    `max_seqlen_k` are not needed.
    """
    group = q.shape[1] // k.shape[1]
    outs = []
    for qs, qe, ks, ke in _sequence_pairs(cu_seqlens, cu_seqlens_k):
        q_len, k_len = qe - qs, ke - ks
        blind = _blind_rows(q_len, k_len, causal)
        if blind:
            outs.append(q[qs : qs + blind] * 0)  # sees no key: 0, as flash-attn (and still in the graph)
        if blind == q_len:
            continue
        rows = q_len - blind
        # SDPA's is_causal aligns top-left; with fewer queries than keys the bottom-right mask differs (a
        # single query sees every key: no mask).
        mask = _causal_visible(rows, k_len, q.device) if causal and 1 < rows < k_len else None
        o = F.scaled_dot_product_attention(
            q[qs + blind : qe].transpose(0, 1),
            k[ks:ke].transpose(0, 1),
            v[ks:ke].transpose(0, 1),
            attn_mask=mask,
            is_causal=causal and rows == k_len,
            scale=softmax_scale,
            enable_gqa=group > 1,
        )
        outs.append(o.transpose(0, 1))
    if not outs:
        return q * 0
    return torch.cat(outs)


def _varlen_attention_ref_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's gradients by the softmax-backward formula, one sequence at a time (an ``Lq x Lk`` score
    matrix per sequence and head, float32 or float64). Used by the registered op's torch backend off the CPU,
    whose kernel runs where autograd is off (under torch.compile); eager use there differentiates the reference
    itself, and the CPU has `_cpu_flash_backward`."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.zeros(t.shape, dtype=compute, device=t.device) for t in (q, k, v))
    for qs, qe, ks, ke in _sequence_pairs(cu_seqlens, cu_seqlens_k):
        if qe == qs or ke == ks:
            continue  # no query sees a key: every gradient of the sequence is 0
        qh, oh, doh = (t[qs:qe].transpose(0, 1).to(compute) for t in (q, out, dout))
        kh, vh = (t[ks:ke].transpose(0, 1).to(compute).repeat_interleave(group, dim=0) for t in (k, v))
        scores = qh @ kh.transpose(1, 2) * softmax_scale
        if causal:
            hidden = ~_causal_visible(qe - qs, ke - ks, q.device)
            scores = scores.masked_fill(hidden, float("-inf"))
        p = scores.softmax(dim=-1)
        if causal:
            p = p.masked_fill(hidden, 0.0)  # a query that sees no key: softmax of -inf only is NaN; it is 0
        dp = doh @ vh.transpose(1, 2)
        ds = p * (dp - (doh * oh).sum(dim=-1, keepdim=True))
        dq[qs:qe] = (ds @ kh * softmax_scale).transpose(0, 1)
        heads = k.shape[1]
        dk_full = (ds.transpose(1, 2) @ qh * softmax_scale).view(heads, group, ke - ks, -1)
        dv_full = (p.transpose(1, 2) @ doh).view(heads, group, ke - ks, -1)
        dk[ks:ke] = dk_full.sum(1).transpose(0, 1)
        dv[ks:ke] = dv_full.sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _heads_first(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of a packed ``(T, H, D)`` tensor as a ``(1, H, L, D)`` view (no copy)."""
    return x[start:end].transpose(0, 1).unsqueeze(0)


def _query_group_rows(x: torch.Tensor, row: int, kv_heads: int) -> torch.Tensor:
    """Row `row` of a packed ``(T, Hq, D)`` tensor as ``(1, Hkv, Hq/Hkv, D)``: one query's heads that share a k/v
    head become that head's query rows. For a single query (decoding) this is the same attention, and the CPU
    kernel reads each k/v head once instead of once per q head (2.2x faster at Hq 32, Hkv 8, D 128)."""
    return x[row].reshape(kv_heads, -1, x.shape[-1]).unsqueeze(0)


def _cpu_sequences(cu_seqlens, cu_seqlens_k, causal, dtype, device):
    """Per sequence: ``(q_start, q_end, blind, k_start, k_end, is_causal, mask)`` for PyTorch's CPU flash
    kernels, which take the rows from ``q_start + blind`` on (the others see no key); `mask` an additive
    bottom-right causal mask where queries and keys differ in number (the kernel's is_causal is top-left)."""
    for qs, qe, ks, ke in _sequence_pairs(cu_seqlens, cu_seqlens_k):
        blind = _blind_rows(qe - qs, ke - ks, causal)
        rows = qe - qs - blind
        mask = None
        if causal and 1 < rows < ke - ks:  # (a single query sees every key)
            hidden = ~_causal_visible(rows, ke - ks, device)
            mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))
        yield qs, qe, blind, ks, ke, causal and rows == ke - ks, mask


def _cpu_flash_forward(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend on the CPU: PyTorch's CPU flash attention (what SDPA runs there) on each sequence,
    written into one packed output, keeping each sequence's log-sum-exp (``(Hq, T)``; +inf where a query sees
    no key) for the backward. Eager autograd through per-sequence SDPA would instead pay, per sequence,
    zero-filled full-size gradients of the q/k/v slices (~17% of a training step on the benchmark's mix)."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32
    )
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    for qs, qe, blind, ks, ke, is_causal, mask in _cpu_sequences(
        cu_seqlens, cu_seqlens_k, causal, q.dtype, q.device
    ):
        out[qs : qs + blind] = 0
        lse[:, qs : qs + blind] = float("inf")
        if qs + blind == qe:
            continue
        if qe - qs - blind == 1 and group > 1:  # one query, which sees every key
            a = qs + blind
            o, seq_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _query_group_rows(q, a, kv_heads),
                _heads_first(k, ks, ke),
                _heads_first(v, ks, ke),
                0.0,
                False,
                scale=scale,
            )
            out[a] = o[0].reshape(out.shape[1:])
            lse[:, a] = seq_lse[0].reshape(-1)
            continue
        o, seq_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q, qs + blind, qe),
            _heads_first(k, ks, ke),
            _heads_first(v, ks, ke),
            0.0,
            is_causal,
            attn_mask=mask,
            scale=scale,
        )
        out[qs + blind : qe] = o[0].transpose(0, 1)
        lse[:, qs + blind : qe] = seq_lse[0]
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, causal, scale):
    """Gradients of `_cpu_flash_forward`, per sequence with PyTorch's CPU flash backward, straight into
    packed dq, dk, dv (zero-filled only where no query sees a key)."""
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    for qs, qe, blind, ks, ke, is_causal, mask in _cpu_sequences(
        cu_seqlens, cu_seqlens_k, causal, q.dtype, q.device
    ):
        dq[qs : qs + blind] = 0
        if qs + blind == qe:
            dk[ks:ke] = 0
            dv[ks:ke] = 0
            continue
        a = qs + blind
        kh, vh = _heads_first(k, ks, ke), _heads_first(v, ks, ke)
        if qe - a == 1 and group > 1:  # one query: its heads as rows of their k/v head, as in the forward
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _query_group_rows(dout, a, kv_heads),
                _query_group_rows(q, a, kv_heads),
                kh,
                vh,
                _query_group_rows(out, a, kv_heads),
                lse[:, a].reshape(1, kv_heads, group),
                0.0,
                False,
                scale=scale,
            )
            dq[a] = gq[0].reshape(dq.shape[1:])
            dk[ks:ke] = gk[0].transpose(0, 1)
            dv[ks:ke] = gv[0].transpose(0, 1)
            continue
        if group > 1:
            # The CPU kernel's own grouped-query backward runs one thread per k/v head (1.4x slower on 2
            # threads with one k/v head); with k/v repeated per q head it spreads over all q heads.
            kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(dout, a, qe),
            _heads_first(q, a, qe),
            kh,
            vh,
            _heads_first(out, a, qe),
            lse[:, a:qe].unsqueeze(0),
            0.0,
            is_causal,
            attn_mask=mask,
            scale=scale,
        )
        if group > 1:
            gk, gv = (g.unflatten(1, (kv_heads, group)).sum(2) for g in (gk, gv))
        dq[a:qe] = gq[0].transpose(0, 1)
        dk[ks:ke] = gk[0].transpose(0, 1)
        dv[ks:ke] = gv[0].transpose(0, 1)
    return dq, dk, dv


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``(head_dim // 2,)`` inverse frequencies, computed exactly as Hugging Face Llama does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return 1.0 / (theta**exponent)


def apply_rotary_ref(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama rotary embedding (rotate-half convention), plain PyTorch. Shapes as `apply_rotary`.

    Angles in float32 (``position * inv_freq``), cos/sin cast to x's dtype, then
    ``x*cos + rotate_half(x)*sin`` in x's dtype: the Hugging Face computation.
    """
    inv_freq = rotary_inv_freq(x.shape[-1], theta, x.device)
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().to(x.dtype)[:, None, :]
    sin = emb.sin().to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------------
# 2. Triton kernels.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a 2-D tile, masking only what can be out of range (no mask at all on the hot path)."""
    if ROW_MASK and COL_MASK:
        x = tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=rows_ok, other=0.0)
    elif COL_MASK:
        x = tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _item_bounds(ITEMS, CU_SEQLENS, CU_SEQLENS_K, item):
    """(queries' token offset and count, keys' token offset and count, block index) of work item `item`;
    counts 0 if the slot is unused."""
    seq = tl.load(ITEMS + 2 * item)
    block = tl.load(ITEMS + 2 * item + 1)
    valid = seq >= 0
    seq = tl.maximum(seq, 0)
    q_start = tl.load(CU_SEQLENS + seq)
    q_len = tl.where(valid, tl.load(CU_SEQLENS + seq + 1) - q_start, 0)
    k_start = tl.load(CU_SEQLENS_K + seq)
    k_len = tl.where(valid, tl.load(CU_SEQLENS_K + seq + 1) - k_start, 0)
    return q_start.to(tl.int64), q_len, k_start.to(tl.int64), k_len, block


@triton.jit
def _key_range(m0, k_len, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys a query block ``[m0, m0 + BLOCK_M)`` visits: ``[0, full_end)`` need no mask (in range, and for
    causal seen by every row of the block), ``[full_end, hi)`` are the diagonal / ragged-end blocks."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, m0 + BLOCK_M + shift), 0)
        full_end = tl.maximum(tl.minimum(k_len, m0 + 1 + shift), 0) // BLOCK_N * BLOCK_N
    else:
        hi = k_len
        full_end = k_len // BLOCK_N * BLOCK_N
    return hi, full_end


@triton.jit
def _varlen_attention_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    k_len,
    shift,
    lo,
    hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cols_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys_ok = offs_n < k_len
        kt = _load_tile(
            k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
            keys_ok[None, :],
            cols_ok[:, None],
            MASKED,
            not EVEN_D,
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = keys_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + shift >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASKED:
            # A row that has seen no key yet keeps m = -inf (with causal masking aligned bottom-right, a query
            # before every key sees none at all); subtracting 0 instead keeps its p and alpha 0, not NaN.
            # Unmasked blocks are visited only by rows that see every key in them.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(
            v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
            keys_ok[:, None],
            cols_ok[None, :],
            MASKED,
            not EVEN_D,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CU_SEQLENS,
    CU_SEQLENS_K,
    ITEMS,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Heads vary fastest: the GROUP q heads sharing a K/V head run side by side (K/V reuse in L2), and the
    # work items, sorted heaviest first, are started in that order.
    pid = tl.program_id(0)
    item = pid // NUM_HEADS
    head = pid % NUM_HEADS
    start, seq_len, k_start, k_len, block = _item_bounds(ITEMS, CU_SEQLENS, CU_SEQLENS_K, item)
    kv_head = head // GROUP
    shift = k_len - seq_len  # causal: query row m sees keys n <= m + shift (bottom-right alignment)

    m0 = block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < seq_len
    cols_ok = offs_d < HEAD_DIM
    q = _load_tile(
        Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        rows_ok[:, None],
        cols_ok[None, :],
        True,
        not EVEN_D,
    )
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi, full_end = _key_range(m0, k_len, shift, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _varlen_attention_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        k_len,
        shift,
        0,
        full_end,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        EVEN_D,
        CAUSAL,
        False,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _varlen_attention_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        k_len,
        shift,
        full_end,
        hi,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        EVEN_D,
        CAUSAL,
        True,
        DOT_PRECISION,
    )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the sequence end are never stored
    acc = acc / l_safe[:, None]
    o_ptrs = O + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])
    # Natural-log LSE (flash-attn's convention); m_i and log2(l_i) are in the base-2 domain. A row that sees
    # no key (output 0) gets +inf, so the backward's exp(s - lse) is 0 for it, as flash-attn does.
    lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + head * stride_lh + start + offs_m, lse, mask=rows_ok)


@triton.jit
def _varlen_attention_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    num_tokens,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d out[t, h, d] * dout[t, h, d] (fp32), the softmax-backward row term."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < num_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs_t64 = offs_t.to(tl.int64)
    o = tl.load(O + offs_t64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + offs_t64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_dh + offs_t, delta, mask=offs_t < num_tokens)


@triton.jit
def _varlen_attention_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_dot,
    offs_n,
    offs_d,
    seq_len,
    shift,
    lo,
    hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cols_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < seq_len
        q = _load_tile(
            q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
            rows_ok[:, None],
            cols_ok[None, :],
            MASKED,
            not EVEN_D,
        )
        do = _load_tile(
            do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
            rows_ok[:, None],
            cols_ok[None, :],
            MASKED,
            not EVEN_D,
        )
        if MASKED:
            lse2 = tl.load(lse_base + offs_m, mask=rows_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m, mask=rows_ok, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m)
        # Transposed scores (keys x queries): P^T feeds dV = P^T dO and dK = dS^T Q without a transpose.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            keep = rows_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] + shift >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _varlen_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU_SEQLENS,
    CU_SEQLENS_K,
    ITEMS,
    qk_scale,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (key block, K/V head): dK and dV summed over the GROUP q heads in registers (no
    atomics), looping over the query blocks that see this key block."""
    pid = tl.program_id(0)
    item = pid // NUM_KV_HEADS
    kv_head = pid % NUM_KV_HEADS
    start, seq_len, k_start, k_len, block = _item_bounds(ITEMS, CU_SEQLENS, CU_SEQLENS_K, item)
    shift = k_len - seq_len  # causal: query row m sees key n iff m >= n - shift

    n0 = block * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keys_ok = offs_n < k_len
    cols_ok = offs_d < HEAD_DIM
    k = _load_tile(
        K + (k_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
        keys_ok[:, None],
        cols_ok[None, :],
        True,
        not EVEN_D,
    )
    v = _load_tile(
        V + (k_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
        keys_ok[:, None],
        cols_ok[None, :],
        True,
        not EVEN_D,
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    # Query blocks: [lo, f0) diagonal (masked), [f0, f1) full (unmasked), [f1, end) ragged end (masked).
    end = tl.cdiv(seq_len, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M  # the first row that sees key n0
        f0 = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M  # rows that see the block
    else:
        lo = 0
        f0 = 0
    f1 = tl.maximum(seq_len // BLOCK_M * BLOCK_M, f0)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + start * stride_qt + head * stride_qh
        do_base = DO + start * stride_dot + head * stride_doh
        lse_base = LSE + head * stride_lh + start
        delta_base = DELTA + head * stride_lh + start
        dk, dv = _varlen_attention_bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_dot,
            offs_n,
            offs_d,
            seq_len,
            shift,
            lo,
            tl.minimum(f0, end),
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            EVEN_D,
            CAUSAL,
            True,
            DOT_PRECISION,
        )
        dk, dv = _varlen_attention_bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_dot,
            offs_n,
            offs_d,
            seq_len,
            shift,
            f0,
            f1,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            EVEN_D,
            CAUSAL,
            False,
            DOT_PRECISION,
        )
        dk, dv = _varlen_attention_bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_dot,
            offs_n,
            offs_d,
            seq_len,
            shift,
            f1,
            end,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            EVEN_D,
            CAUSAL,
            True,
            DOT_PRECISION,
        )
    dk = dk * sm_scale
    mask = keys_ok[:, None] & cols_ok[None, :]
    tl.store(
        DK + (k_start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + (k_start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _varlen_attention_bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    k_len,
    shift,
    lo,
    hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cols_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys_ok = offs_n < k_len
        k = _load_tile(
            k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
            keys_ok[:, None],
            cols_ok[None, :],
            MASKED,
            not EVEN_D,
        )
        v = _load_tile(
            v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
            keys_ok[:, None],
            cols_ok[None, :],
            MASKED,
            not EVEN_D,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = keys_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + shift >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_SEQLENS,
    CU_SEQLENS_K,
    ITEMS,
    qk_scale,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (query block, q head): dQ over the key blocks it sees (a separate pass, as in
    FlashAttention-2's Triton port, so dQ needs no atomics)."""
    pid = tl.program_id(0)
    item = pid // NUM_HEADS
    head = pid % NUM_HEADS
    start, seq_len, k_start, k_len, block = _item_bounds(ITEMS, CU_SEQLENS, CU_SEQLENS_K, item)
    kv_head = head // GROUP
    shift = k_len - seq_len

    m0 = block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < seq_len
    cols_ok = offs_d < HEAD_DIM
    q = _load_tile(
        Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        rows_ok[:, None],
        cols_ok[None, :],
        True,
        not EVEN_D,
    )
    do = _load_tile(
        DO + (start + offs_m)[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
        rows_ok[:, None],
        cols_ok[None, :],
        True,
        not EVEN_D,
    )
    lse2 = tl.load(LSE + head * stride_lh + start + offs_m, mask=rows_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * stride_lh + start + offs_m, mask=rows_ok, other=0.0)
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi, full_end = _key_range(m0, k_len, shift, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _varlen_attention_bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        k_len,
        shift,
        0,
        full_end,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        EVEN_D,
        CAUSAL,
        False,
        DOT_PRECISION,
    )
    dq = _varlen_attention_bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        k_len,
        shift,
        full_end,
        hi,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        EVEN_D,
        CAUSAL,
        True,
        DOT_PRECISION,
    )
    dq = dq * sm_scale
    tl.store(
        DQ + (start + offs_m)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=rows_ok[:, None] & cols_ok[None, :],
    )


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
# 3. Launchers.
# ----------------------------------------------------------------------------------------------------


# Work tables of the last two boundary tensors seen (the queries' and the keys'; weakly referenced): every
# layer of a step shares them, so the ~10 small torch ops building a table run once per step, not three times
# per layer.
_tables: list[tuple[weakref.ref, int, dict]] = []


def _cached_work_items(
    cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int, block: int, causal: bool, keys: bool
) -> torch.Tensor:
    version = _version_of(cu_seqlens)
    if version is None:
        return _work_items(cu_seqlens, max_seqlen, num_tokens, block, causal, keys)
    tables = next((t for ref, seen, t in _tables if ref() is cu_seqlens and seen == version), None)
    if tables is None:
        tables = {}
        _tables[:] = [e for e in _tables if e[0]() is not cu_seqlens][-1:]
        _tables.append((weakref.ref(cu_seqlens), version, tables))
    key = (max_seqlen, num_tokens, block, causal, keys)
    if key not in tables:
        tables[key] = _work_items(cu_seqlens, max_seqlen, num_tokens, block, causal, keys)
    return tables[key]


def _work_items(
    cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int, block: int, causal: bool, keys: bool
) -> torch.Tensor:
    """int32 ``(n, 2)`` (sequence, block) work items, heaviest first, built on the device (no host sync).

    Cost of a query block m (forward, dQ): ``m + 1`` key blocks if causal, else the sequence's block count;
    of a key block n (dK/dV): ``blocks - n`` query blocks if causal, else the block count. Unused slots
    (``sequence = -1``) sort last; ``n = min(B * max_blocks, cdiv(T, block) + B)`` bounds the used ones.
    """
    batch = cu_seqlens.numel() - 1
    max_blocks = max(1, triton.cdiv(min(max_seqlen, num_tokens), block))  # a loose bound costs nothing
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    blocks = (lengths + block - 1) // block
    index = torch.arange(max_blocks, device=cu_seqlens.device, dtype=torch.int64)
    valid = index[None, :] < blocks[:, None]
    if not causal:
        cost = blocks[:, None].expand(batch, max_blocks)
    elif keys:
        cost = blocks[:, None] - index[None, :]
    else:
        cost = (index + 1)[None, :].expand(batch, max_blocks)
    cost = torch.where(valid, cost, -1).reshape(-1)
    used = min(batch * max_blocks, triton.cdiv(num_tokens, block) + batch)
    order = torch.argsort(cost, descending=True, stable=True)[:used]
    seq = torch.where(cost[order] >= 0, order // max_blocks, -1)
    return torch.stack([seq, order % max_blocks], dim=1).to(torch.int32).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 in the matmuls (tf32 would cost ~1e-3 relative error); fp16/bf16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _head_block(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; other head dims are padded to a power of 2 and masked.
    return max(16, triton.next_power_of_2(head_dim))


@functools.cache
def _gpu_kernels() -> dict[str, object]:
    """Autotuned launchers for the GPU (never in the interpreter, whose autotuner has no benchmark clock).

    The work-item table fixes the outer block (BLOCK_M forward/dQ, BLOCK_N dK/dV), so only the inner block,
    warps and stages are tuned, over few configs (each costs a compile on first use per key). Chosen from
    ptxas resource usage for sm_90 (bf16, head_dim 128, causal, 16-byte aligned pointers and strides as the
    JIT specialises them; K/V loads software-pipelined with cp.async, wgmma): forward 128 x 64, 8 warps, 3
    stages: 254 registers, no spill, 128 KB shared; dQ 128 x 32, 8 warps: 182 registers; dK/dV 128 x 32, 8
    warps, 2 stages: 255 registers and 48 bytes of spill. Not yet timed on a GPU: tune there first. The last
    config of each list fits shared memory for every supported dtype and head_dim (fp32 at 256); configs
    that do not fit are skipped by the autotuner.
    """
    fwd = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((64, 8, 3), (128, 8, 3), (64, 8, 4), (64, 4, 2), (32, 4, 1))
    ]
    bwd = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 2), (8, 3), (4, 2), (4, 1))]
    # Not GROUP: the GQA ratio does not change the best tile, and each new key re-tunes.
    keys = ["HEAD_DIM", "CAUSAL", "DOT_PRECISION"]
    return {
        "fwd": triton.autotune(fwd, key=keys)(_varlen_attention_fwd_kernel),
        "dkdv": triton.autotune(bwd, key=keys)(_varlen_attention_bwd_dkdv_kernel),
        "dq": triton.autotune(bwd, key=keys)(_varlen_attention_bwd_dq_kernel),
    }


def _blocks(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    block_d = _head_block(head_dim)
    if _backend.triton_interpreting():
        # The interpreter's cost is per block operation, not per element: 32-row blocks keep the tests'
        # sequences (up to ~100 tokens) at a few blocks each; unequal inner blocks test the edge logic.
        return {"fwd_m": 32, "fwd_n": 16, "dkdv_n": 32, "dkdv_m": 16, "dq_m": 32, "dq_n": 16}
    if block_d > 128 or dtype == torch.float32:
        return {"fwd_m": 64, "fwd_n": 32, "dkdv_n": 64, "dkdv_m": 32, "dq_m": 64, "dq_n": 32}
    return {"fwd_m": 128, "fwd_n": 64, "dkdv_n": 128, "dkdv_m": 32, "dq_m": 128, "dq_n": 32}


def _varlen_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Shapes, dtypes and devices (no device sync): the op can be called directly, bypassing varlen_attention.
    _check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if q.dtype not in TRITON_DTYPES or q.shape[2] > 256:
        raise TypeError(
            f"the Triton kernels run float16/bfloat16/float32 with head_dim <= 256, got {q.dtype}, "
            f"head_dim {q.shape[2]}"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return out, lse
    blocks = _blocks(head_dim, q.dtype)
    block_d = _head_block(head_dim)
    items = _cached_work_items(cu_seqlens, max_seqlen, num_tokens, blocks["fwd_m"], causal, keys=False)
    grid = (items.shape[0] * num_heads,)
    args = (
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        cu_seqlens_k,
        items,
        softmax_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
    )
    meta = dict(
        NUM_HEADS=num_heads,
        GROUP=num_heads // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        CAUSAL=causal,
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=blocks["fwd_m"],
    )
    if _backend.triton_interpreting():
        _varlen_attention_fwd_kernel[grid](*args, **meta, BLOCK_N=blocks["fwd_n"])
    else:
        _gpu_kernels()["fwd"][grid](*args, **meta)
    return out, lse


def _varlen_attention_bwd_triton(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}, "
            f"lse {tuple(lse.shape)} must be (Hq, T)"
        )
    q, k, v, out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out, dout))
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if num_tokens == 0:  # no query: keys (if any) get no gradient
        return dq, dk.zero_(), dv.zero_()
    blocks = _blocks(head_dim, q.dtype)
    block_d = _head_block(head_dim)
    interpreting = _backend.triton_interpreting()

    delta = torch.empty_like(lse)
    block_t = 16 if interpreting else 64
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(num_tokens, block_t), num_heads)](
        out,
        dout,
        delta,
        num_tokens,
        out.stride(0),
        out.stride(1),
        dout.stride(0),
        dout.stride(1),
        delta.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_T=block_t,
    )
    common = dict(
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        CAUSAL=causal,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    scales = (softmax_scale * LOG2E, softmax_scale)

    items = _cached_work_items(cu_seqlens_k, max_seqlen_k, k.shape[0], blocks["dkdv_n"], causal, keys=True)
    grid = (items.shape[0] * num_kv_heads,)
    args = (
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens,
        cu_seqlens_k,
        items,
        *scales,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse.stride(0),
    )
    meta = dict(NUM_KV_HEADS=num_kv_heads, **common, BLOCK_M=blocks["dkdv_m"], BLOCK_N=blocks["dkdv_n"])
    kernel = _varlen_attention_bwd_dkdv_kernel if interpreting else _gpu_kernels()["dkdv"]
    kernel[grid](*args, **meta)

    items = _cached_work_items(cu_seqlens, max_seqlen, num_tokens, blocks["dq_m"], causal, keys=False)
    grid = (items.shape[0] * num_heads,)
    args = (
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        cu_seqlens,
        cu_seqlens_k,
        items,
        *scales,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        dq.stride(0),
        dq.stride(1),
        lse.stride(0),
    )
    meta = dict(NUM_HEADS=num_heads, **common, BLOCK_M=blocks["dq_m"], BLOCK_N=blocks["dq_n"])
    kernel = _varlen_attention_bwd_dq_kernel if interpreting else _gpu_kernels()["dq"]
    kernel[grid](*args, **meta)
    return dq, dk, dv


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
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        SIGN=sign,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_T=block_t,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# 4. Registered ops: the Triton kernels behind schemas torch.compile treats as opaque, with autograd.
# ----------------------------------------------------------------------------------------------------


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out (T, Hq, D) q.dtype, lse)``: triton, and torch on the CPU: lse float32 ``(Hq, T)`` (float64
    for float64 on the CPU), the natural-log softmax normaliser kept for backward (+inf where a query sees no
    key); torch elsewhere (the reference, used here only under torch.compile): lse float32 ``(Hq, 0)``, its
    backward recomputes the forward. Keys sharing the queries' boundaries pass cu_seqlens twice."""
    if backend == "triton":
        with _on_device(q):
            return _varlen_attention_fwd_triton(
                q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale
            )
    if backend == "torch" and q.device.type == "cpu":
        return _cpu_flash_forward(q, k, v, cu_seqlens, cu_seqlens_k, causal, softmax_scale)
    if backend == "torch":
        out = varlen_attention_ref(
            q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale, cu_seqlens_k=cu_seqlens_k
        )
        return out, q.new_empty((q.shape[1], 0), dtype=torch.float32)
    raise ValueError(f"sphinx_kernels::varlen_attention_fwd runs backends triton and torch, got {backend!r}")


@_varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale, backend):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    cpu_flash = backend == "torch" and q.device.type == "cpu"
    lse_tokens = 0 if backend == "torch" and not cpu_flash else q.shape[0]
    lse_dtype = torch.float64 if cpu_flash and q.dtype == torch.float64 else torch.float32
    return out, q.new_empty((q.shape[1], lse_tokens), dtype=lse_dtype)


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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        with _on_device(q):
            return _varlen_attention_bwd_triton(
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
    if backend == "torch" and q.device.type == "cpu":
        return _cpu_flash_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, causal, softmax_scale)
    if backend == "torch":
        dq, dk, dv = _varlen_attention_ref_backward(
            dout, q, k, v, out, cu_seqlens, cu_seqlens_k, causal, softmax_scale
        )
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    raise ValueError(f"sphinx_kernels::varlen_attention_bwd runs backends triton and torch, got {backend!r}")


@_varlen_attention_bwd_op.register_fake
def _(
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
    backend,
):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _varlen_attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k)
    ctx.max_seqlen, ctx.max_seqlen_k = max_seqlen, max_seqlen_k
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
    ctx.mark_non_differentiable(lse)


def _varlen_attention_backward(ctx, dout, dlse):
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
        ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_attention_fwd_op.register_autograd(
    _varlen_attention_backward, setup_context=_varlen_attention_setup_context
)


@torch.library.custom_op("sphinx_kernels::apply_rotary", mutates_args=())
def _apply_rotary_op(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, sign: int
) -> torch.Tensor:
    """Rotate ``x`` (T, H, D) by ``sign * position * inv_freq`` (rotate-half convention)."""
    with _on_device(x):
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


def _select_attention(device_type: str, candidates: tuple[str, ...], backend: str | None) -> str:
    return _backend.select("attention", candidates, torch.device(device_type), backend=backend)


def _select_rope(device_type: str, backend: str | None) -> str:
    return _backend.select("rope", ROPE_BACKENDS, torch.device(device_type), backend=backend)


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, softmax_scale):
    from flash_attn import flash_attn_varlen_func  # >= 2.1: causal masks align bottom-right, as ours

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens_k,
        max_seqlen,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=causal,
    )


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
        backend: ``"flash_attn" | "triton" | "torch"``; default: the fastest available (`_backend`).

    Returns:
        ``(T, Hq, D)`` in q's dtype. Differentiable in q, k and v.

    The values of `cu_seqlens` (and `cu_seqlens_k`) are checked against T (Tk) and `max_seqlen`
    (`max_seqlen_k`), one small device-to-host copy each, except under ``torch.compile``, where data-dependent
    checks cannot run.
    """
    _check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if not torch.compiler.is_compiling():
        _check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
        if cu_seqlens_k is not None:
            _check_cu_seqlens_values(
                cu_seqlens_k, k.shape[0], max_seqlen_k, ("cu_seqlens_k", "max_seqlen_k", "k")
            )
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    # flash-attn runs fp16/bf16 with head_dim <= 256; our Triton kernels fp16/bf16/fp32 with head_dim <= 256
    # (padded to a power of 2: a 512-wide tile would not fit in registers); the reference runs anything.
    if q.shape[2] > 256:
        candidates: tuple[str, ...] = ("torch",)
    elif q.dtype == torch.float64:
        candidates = ("torch",)
    elif q.dtype == torch.float32:
        candidates = ("triton", "torch")
    else:
        candidates = BACKENDS
    if backend is not None and backend in BACKENDS and backend not in candidates:
        raise TypeError(
            f"backend={backend!r} cannot run q of dtype {q.dtype} with head_dim {q.shape[2]} (Triton: "
            f"float16/bfloat16/float32, head_dim <= 256; flash_attn: float16/bfloat16); "
            f"choose from {', '.join(candidates)}"
        )
    chosen = _select_attention(q.device.type, candidates, backend)
    if chosen == "flash_attn":
        return _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, scale)
    if chosen == "torch" and q.device.type != "cpu" and not torch.compiler.is_compiling():
        # Eager off the CPU: plain autograd through per-sequence SDPA (no recompute in backward). Under
        # torch.compile the reference's per-sequence loop needs cu_seqlens on the host, so it runs inside the
        # opaque op; on the CPU the op always runs (PyTorch's CPU flash kernels, forward and backward).
        return varlen_attention_ref(
            q, k, v, cu_seqlens, causal=causal, softmax_scale=scale, cu_seqlens_k=cu_seqlens_k
        )
    out, _ = _varlen_attention_fwd_op(
        q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, causal, scale, chosen
    )
    return out


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
    if position_ids.device != x.device:
        raise ValueError(f"position_ids is on {position_ids.device} but x is on {x.device}")
    if x.dtype == torch.float64:
        if backend not in (None, "torch"):
            raise TypeError(f"backend={backend!r} cannot run float64; use backend='torch'")
        chosen = "torch"
    else:
        chosen = _select_rope(x.device.type, backend)
    if chosen == "torch":
        return apply_rotary_ref(x, position_ids, theta)
    inv_freq = rotary_inv_freq(x.shape[2], float(theta), x.device)
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
