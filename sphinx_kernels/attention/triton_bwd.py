"""Triton backward (FlashAttention-2 style): a row-term pass (delta = rowsum(out * dout)), dK/dV per key block
summed over the grouped q heads in registers (no atomics), and dQ per query block in a separate pass."""

from __future__ import annotations

import functools

import torch

from sphinx_kernels import _backend
from sphinx_kernels._common import dot_precision
from sphinx_kernels._triton import tl, triton
from sphinx_kernels.attention.schedule import blocks, cached_work_items, head_block
from sphinx_kernels.attention.triton_fwd import LOG2E, _item_bounds, _key_range, _load_rows, _visible
from sphinx_kernels.attention.validation import check_attention_args, check_backward_args


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
def _dkdv_inner(
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
        q = _load_rows(q_base + offs_m * stride_qt, offs_d, rows_ok, cols_ok, MASKED, EVEN_D)
        do = _load_rows(do_base + offs_m * stride_dot, offs_d, rows_ok, cols_ok, MASKED, EVEN_D)
        if MASKED:
            lse2 = tl.load(lse_base + offs_m, mask=rows_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=rows_ok, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed scores (keys x queries): P^T feeds dV = P^T dO and dK = dS^T Q without a transpose.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            pt = tl.where(
                _visible(offs_m[None, :], offs_n[:, None], rows_ok[None, :], shift, CAUSAL), pt, 0.0
            )
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
    kv_rows = k_start + offs_n
    k = _load_rows(K + kv_rows * stride_kt + kv_head * stride_kh, offs_d, keys_ok, cols_ok, True, EVEN_D)
    v = _load_rows(V + kv_rows * stride_vt + kv_head * stride_vh, offs_d, keys_ok, cols_ok, True, EVEN_D)
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
        for phase in tl.static_range(3):
            dk, dv = _dkdv_inner(
                dk,
                dv,
                k,
                v,
                Q + start * stride_qt + head * stride_qh,
                DO + start * stride_dot + head * stride_doh,
                LSE + head * stride_lh + start,
                DELTA + head * stride_lh + start,
                stride_qt,
                stride_dot,
                offs_n,
                offs_d,
                seq_len,
                shift,
                lo if phase == 0 else (f0 if phase == 1 else f1),
                tl.minimum(f0, end) if phase == 0 else (f1 if phase == 1 else end),
                qk_scale,
                HEAD_DIM,
                BLOCK_M,
                EVEN_D,
                CAUSAL,
                phase != 1,
                DOT_PRECISION,
            )
    dk = dk * sm_scale
    mask = keys_ok[:, None] & cols_ok[None, :]
    tl.store(
        DK + kv_rows[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + kv_rows[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _dq_inner(
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
        k = _load_rows(k_base + offs_n * stride_kt, offs_d, keys_ok, cols_ok, MASKED, EVEN_D)
        v = _load_rows(v_base + offs_n * stride_vt, offs_d, keys_ok, cols_ok, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], keys_ok[None, :], shift, CAUSAL), p, 0.0)
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
    rows = start + offs_m
    q = _load_rows(Q + rows * stride_qt + head * stride_qh, offs_d, rows_ok, cols_ok, True, EVEN_D)
    do = _load_rows(DO + rows * stride_dot + head * stride_doh, offs_d, rows_ok, cols_ok, True, EVEN_D)
    lse2 = tl.load(LSE + head * stride_lh + start + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + start + offs_m, mask=rows_ok, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi, full_end = _key_range(m0, k_len, shift, BLOCK_M, BLOCK_N, CAUSAL)
    for masked in tl.static_range(2):  # keys [0, full_end) unmasked, then [full_end, hi) masked
        dq = _dq_inner(
            dq,
            q,
            do,
            lse2,
            delta,
            K + k_start * stride_kt + kv_head * stride_kh,
            V + k_start * stride_vt + kv_head * stride_vh,
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
    dq = dq * sm_scale
    tl.store(
        DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=rows_ok[:, None] & cols_ok[None, :],
    )


@functools.cache
def _autotuned_bwd_kernels() -> dict[str, object]:
    """dK/dV and dQ kernels autotuned for the GPU over warps and stages (the work table fixes both blocks).
    From ptxas resource usage for sm_90 (bf16, head_dim 128, causal): dQ 128 x 32, 8 warps: 182 registers;
    dK/dV 128 x 32, 8 warps, 2 stages: 255 registers and 48 bytes of spill. Not yet timed on a GPU."""
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 2), (8, 3), (4, 2), (4, 1))]
    keys = ["HEAD_DIM", "CAUSAL", "DOT_PRECISION"]
    return {
        "dkdv": triton.autotune(configs, key=keys)(_varlen_attention_bwd_dkdv_kernel),
        "dq": triton.autotune(configs, key=keys)(_varlen_attention_bwd_dq_kernel),
    }


def varlen_attention_bwd_triton(
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
    """``(dq, dk, dv)`` in the inputs' dtypes and shapes (contiguous)."""
    check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    check_backward_args(dout, q, out, lse)
    q, k, v, out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out, dout))
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if num_tokens == 0:  # no query: keys (if any) get no gradient
        return dq, dk.zero_(), dv.zero_()
    sizes = blocks(head_dim, q.dtype)
    block_d = head_block(head_dim)
    interpreting = _backend.triton_interpreting()

    delta = torch.empty_like(lse)
    block_t = 16 if interpreting else 64
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(num_tokens, block_t), num_heads)](
        out,
        dout,
        delta,
        num_tokens,
        *out.stride()[:2],
        *dout.stride()[:2],
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
        DOT_PRECISION=dot_precision(q.dtype),
    )
    inputs = (q, k, v, dout, lse, delta)
    scales = (softmax_scale * LOG2E, softmax_scale)
    input_strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *dout.stride()[:2])
    kernels = _autotuned_bwd_kernels() if not interpreting else {}

    items = cached_work_items(cu_seqlens_k, max_seqlen_k, k.shape[0], sizes["dkdv_n"], causal, keys=True)
    kernel = kernels.get("dkdv", _varlen_attention_bwd_dkdv_kernel)
    kernel[(items.shape[0] * num_kv_heads,)](
        *inputs,
        dk,
        dv,
        cu_seqlens,
        cu_seqlens_k,
        items,
        *scales,
        *input_strides,
        *dk.stride()[:2],
        *dv.stride()[:2],
        lse.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        **common,
        BLOCK_M=sizes["dkdv_m"],
        BLOCK_N=sizes["dkdv_n"],
    )

    items = cached_work_items(cu_seqlens, max_seqlen, num_tokens, sizes["dq_m"], causal, keys=False)
    kernel = kernels.get("dq", _varlen_attention_bwd_dq_kernel)
    kernel[(items.shape[0] * num_heads,)](
        *inputs,
        dq,
        cu_seqlens,
        cu_seqlens_k,
        items,
        *scales,
        *input_strides,
        *dq.stride()[:2],
        lse.stride(0),
        NUM_HEADS=num_heads,
        **common,
        BLOCK_M=sizes["dq_m"],
        BLOCK_N=sizes["dq_n"],
    )
    return dq, dk, dv
