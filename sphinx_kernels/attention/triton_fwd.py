"""Triton forward (FlashAttention-2 style: online softmax, LSE kept for the backward) and the @triton.jit
helpers the backward kernels share: tile loads, work-item bounds, the keys a query block visits, masking."""

from __future__ import annotations

import functools

import torch

from sphinx_kernels import _backend
from sphinx_kernels._common import dot_precision
from sphinx_kernels._triton import tl, triton
from sphinx_kernels.attention.schedule import blocks, cached_work_items, head_block
from sphinx_kernels.attention.validation import MAX_KERNEL_HEAD_DIM, TRITON_DTYPES, check_attention_args

LOG2E = 1.4426950408889634


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
def _load_rows(row_ptrs, offs_d, rows_ok, cols_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """A ``(rows, BLOCK_D)`` tile of head vectors, one pointer per row (every q/k/v/dO load of both passes)."""
    return _load_tile(
        row_ptrs[:, None] + offs_d[None, :], rows_ok[:, None], cols_ok[None, :], ROW_MASK, not EVEN_D
    )


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
def _visible(rows, cols, in_range, shift, CAUSAL: tl.constexpr):
    """Which (query row, key col) pairs attend: `in_range` (bounds), and with causal masking aligned
    bottom-right ``col <= row + shift``. `rows`, `cols`, `in_range` broadcast to the tile's shape."""
    keep = in_range
    if CAUSAL:
        keep = keep & (rows + shift >= cols)
    return keep


@triton.jit
def _fwd_inner(
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
            s = tl.where(
                _visible(offs_m[:, None], offs_n[None, :], keys_ok[None, :], shift, CAUSAL), s, -float("inf")
            )
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
        v = _load_rows(v_base + offs_n * stride_vt, offs_d, keys_ok, cols_ok, MASKED, EVEN_D)
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
    q = _load_rows(
        Q + (start + offs_m) * stride_qt + head * stride_qh, offs_d, rows_ok, cols_ok, True, EVEN_D
    )
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi, full_end = _key_range(m0, k_len, shift, BLOCK_M, BLOCK_N, CAUSAL)
    for masked in tl.static_range(2):  # keys [0, full_end) unmasked, then [full_end, hi) masked
        acc, l_i, m_i = _fwd_inner(
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
            full_end if masked else 0,
            hi if masked else full_end,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            EVEN_D,
            CAUSAL,
            masked == 1,
            DOT_PRECISION,
        )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the sequence end are never stored
    acc = acc / l_safe[:, None]
    o_ptrs = O + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])
    # LSE in the base-2 domain of the scaled scores (m_i and log2(l_i) are): converting to flash-attn's natural
    # log and back in the backward would round twice at |lse| ~ 10-20, a relative error of ~1e-6 in every
    # probability of the row (fp32 dQ ~8 ulps off where plain ops are ~3). A row that sees no key (output 0)
    # gets +inf, so the backward's exp2(s - lse) is 0 for it, as flash-attn does.
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + head * stride_lh + start + offs_m, lse, mask=rows_ok)


@functools.cache
def _autotuned_fwd_kernel():
    """The forward kernel autotuned for the GPU (never in the interpreter, whose autotuner has no clock).

    The work-item table fixes BLOCK_M, so only the inner block, warps and stages are tuned, over few configs
    (each costs a compile on first use per key). Chosen from ptxas resource usage for sm_90 (bf16, head_dim
    128, causal; K/V loads software-pipelined with cp.async, wgmma): 128 x 64, 8 warps, 3 stages: 254
    registers, no spill, 128 KB shared. Not yet timed on a GPU. The last config fits shared memory for every
    supported dtype and head_dim (fp32 at 256); configs that do not fit are skipped by the autotuner.
    """
    configs = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((64, 8, 3), (128, 8, 3), (64, 8, 4), (64, 4, 2), (32, 4, 1))
    ]
    # Not GROUP: the GQA ratio does not change the best tile, and each new key re-tunes.
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "DOT_PRECISION"])(_varlen_attention_fwd_kernel)


def varlen_attention_fwd_triton(
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
    """``(out (T, Hq, D) q.dtype, lse float32 (Hq, T))``, lse the base-2 log-sum-exp of the scaled scores
    (``log2(sum 2^(s * softmax_scale * log2(e)))``, the backward's input); keys sharing the queries' bounds pass
    them twice."""
    # Shapes, dtypes and devices (no device sync): the op can be called directly, bypassing varlen_attention.
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if q.dtype not in TRITON_DTYPES or q.shape[2] > MAX_KERNEL_HEAD_DIM:
        raise TypeError(
            f"the Triton kernels run float16/bfloat16/float32 with head_dim <= {MAX_KERNEL_HEAD_DIM}, got "
            f"{q.dtype}, head_dim {q.shape[2]}"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return out, lse
    sizes = blocks(head_dim, q.dtype)
    block_d = head_block(head_dim)
    items = cached_work_items(cu_seqlens, max_seqlen, num_tokens, sizes["fwd_m"], causal, keys=False)
    grid = (items.shape[0] * num_heads,)
    args = (q, k, v, out, lse, cu_seqlens, cu_seqlens_k, items, softmax_scale * LOG2E)
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], lse.stride(0))
    meta = dict(
        NUM_HEADS=num_heads,
        GROUP=num_heads // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=sizes["fwd_m"],
    )
    if _backend.triton_interpreting():
        _varlen_attention_fwd_kernel[grid](*args, *strides, **meta, BLOCK_N=sizes["fwd_n"])
    else:
        _autotuned_fwd_kernel()[grid](*args, *strides, **meta)
    return out, lse
