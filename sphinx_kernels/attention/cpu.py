"""Engine ``torch_cpu``: the ``torch`` backend on CPU tensors. PyTorch's CPU flash-attention kernels (what SDPA
runs there) on each sequence, inside one registered op whose forward writes one packed output and keeps each
sequence's log-sum-exp, and whose backward writes the packed gradients directly (eager autograd through
per-sequence SDPA would instead pay, per sequence, zero-filled full-size gradients of the q/k/v slices: ~17%
of a training step on the benchmark's mix).

Precision (flash-attn's bar: error at most 2x that of the same attention in plain ops in the low dtype).
PyTorch's CPU flash backward accumulates dQ/dK/dV in the inputs' dtype across query blocks (``beta = 1``
GEMMs into bf16/fp16 buffers); in float16/bfloat16 its dK/dV are 3-4x that error (flash-attn's own varlen
tests, causal, batch 5 x 6 heads: bf16 seqlen 384 d 32 dV 0.0625 against 0.0156). So:

- float16: forward and backward run in float32, each result rounded to float16 once. The CPU has no fast fp16
  kernel (2-core AMD EPYC with AVX-512 BF16, causal fwd+bwd 8 heads x 2048 x 64: native fp16 3046 ms,
  through float32 474 ms).
- bfloat16: the forward runs the native bf16 kernel (fp32 scores and statistics, P rounded to bf16 as in
  flash-attn; within the bar). The backward (`_bf16_backward`) runs plain ops on 64 query rows at a time: S, dP
  and dQ as bf16 GEMMs, softmax and dS in float32, dV and dK as float32 GEMMs summed in float32 and rounded once.
- float32: native. float64: the native forward, and the backward in plain float64 ops (`cpu_backward`).

Measured with flash-attn's qkvpacked inputs (causal, batch 5 x 6 heads, random padding), max error over the
same-dtype plain-ops error (the bar is 2): this engine dQ/dK/dV <= 1.0 in every case (seqlen 200 d 32 fp16,
384 d 32 bf16, 512 d 128 fp16, 2048 d 64 bf16); native low-precision SDPA dK 2.0, dV up to 4.0 (512 d 128
fp16). At batch 2 x 2 heads (tests/test_attention_flash_matrix.py's `FLASH_SIZED`), seqlen 1024 and 2048,
d 64, bf16: this engine's dK reached 2.0 (the bar itself, errors being whole bf16 steps) in 2 of 14 seeds,
never more; native SDPA at 2048 went past 2 in 5 of 15 (dK/dV up to 4.0).

The bf16 backward, chosen by measurement (the benchmark's mix: T 13908, Hq 4, Hkv 1, D 64, causal, 1 thread,
medians of 7-11 interleaved rounds; accuracy on flash-attn's varlen qkvpacked (causal, seqlen 384 d 32 and
1024 d 64) and output (512 x 256 d 128 MHA, 256 x 512 d 64 GQA) tests at batch 5, as a fraction of the bar):
- the float32 backward (the previous path): fwd+bwd 0.90-0.94 s, 0.79-0.88x per-sequence bf16 SDPA; <= 0.5.
- the native bf16 kernel: backward 0.51 s against 0.63 s in float32, but dV at 1.33 of the bar (it sums dK/dV in
  bf16 across its query blocks); called on 32..256-row chunks with the chunks' dK/dV summed in float32 it stays
  at 1.0-2.0 (the rounding is inside each call) and is slower (0.84-1.39 s).
- this path with dV and dK as bf16 GEMMs too: each block's partial rounded to bf16 before the float32 sum put
  dV at 1.0 of the bar in 3 of 6 seeds (384 d 32) and dK in 1 of 3; with them in float32: <= 0.5 in 20 runs.
- this path: fwd+bwd 0.81-0.82 s against 0.90-0.94 s for the float32 backward (1.09-1.17x; 0.92-0.96x
  per-sequence bf16 SDPA, which misses the bar); 128-row blocks 0.84 s, 256-row 1.00 s.
Cost of the other dtypes on the same mix (earlier runs): fp32 1.09x per-sequence SDPA, fp16 6.9x per-sequence
fp16 SDPA.
"""

from __future__ import annotations

import torch

from sphinx_kernels.attention.reference import blind_rows, causal_visible, formula_backward, sequence_pairs

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def forward_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward kernel runs in (module docstring)."""
    return torch.float32 if dtype == torch.float16 else dtype


def backward_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PyTorch's CPU backward kernel runs in (module docstring; bfloat16 takes `_bf16_backward` unless
    `BF16_BACKWARD_ROWS` is 0)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; x itself when it already is (``Tensor.to`` costs a dispatch even then: ~1.5 us, a
    noticeable part of a batch-1 decode step)."""
    return x if x.dtype == dtype else x.to(dtype)


def _heads_first(x: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[start, end)`` of a packed ``(T, H, D)`` tensor as ``(1, H, L, D)`` in `dtype` (a view if it is
    x's dtype)."""
    return _as(x[start:end].transpose(0, 1).unsqueeze(0), dtype)


def _query_group_rows(x: torch.Tensor, row: int, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Row `row` of a packed ``(T, Hq, D)`` tensor as ``(1, Hkv, Hq/Hkv, D)``: one query's heads that share a k/v
    head become that head's query rows. For a single query (decoding) this is the same attention, and the CPU
    kernel reads each k/v head once instead of once per q head (2.2x faster at Hq 32, Hkv 8, D 128)."""
    return _as(x[row].reshape(kv_heads, -1, x.shape[-1]).unsqueeze(0), dtype)


def _sequences(cu_seqlens, cu_seqlens_k, causal, dtype, device):
    """Per sequence: ``(first row that sees a key, q_end, blind, k_start, k_end, is_causal, mask)``: the kernels
    take the rows from ``q_start + blind`` on (the others see no key); `mask` an additive bottom-right causal
    mask in `dtype` where queries and keys differ in number (the kernel's is_causal is top-left)."""
    for qs, qe, ks, ke in sequence_pairs(cu_seqlens, cu_seqlens_k):
        blind = blind_rows(qe - qs, ke - ks, causal)
        rows = qe - qs - blind
        mask = None
        if causal and 1 < rows < ke - ks:  # (a single query sees every key)
            hidden = ~causal_visible(rows, ke - ks, device)
            mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))
        yield qs + blind, qe, blind, ks, ke, causal and rows == ke - ks, mask


def cpu_forward(
    q, k, v, cu_seqlens, cu_seqlens_k, causal, scale, with_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out (T, Hq, D) q.dtype, lse (Hq, T))``: lse float32 (float64 for float64), natural log, +inf where a
    query sees no key; None unless `with_lse` (no backward to come)."""
    compute = forward_dtype(q.dtype)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    sequences = list(_sequences(cu_seqlens, cu_seqlens_k, causal, compute, q.device))
    if len(sequences) == 1 and sequences[0][:3] == (0, 1, 0) and group > 1:
        # One stream decoding one token: the kernel's result is the answer (no packed buffers to fill; at
        # batch 1 the copies cost about as much as the kernel).
        _, _, _, ks, ke, _, _ = sequences[0]
        kh, vh = _heads_first(k, ks, ke, compute), _heads_first(v, ks, ke, compute)
        o, seq_lse = _flash(_query_group_rows(q, 0, kv_heads, compute), kh, vh, 0.0, False, scale=scale)
        lse = _as(seq_lse.reshape(-1, 1), lse_dtype) if with_lse else None
        return _as(o.reshape(q.shape), q.dtype), lse
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype) if with_lse else None
    for a, qe, blind, ks, ke, is_causal, mask in sequences:
        if blind:  # rows that see no key (an empty fill still costs two dispatches per sequence and layer)
            out[a - blind : a] = 0
            if with_lse:
                lse[:, a - blind : a] = float("inf")
        if a == qe:
            continue
        kh, vh = _heads_first(k, ks, ke, compute), _heads_first(v, ks, ke, compute)
        if qe - a == 1 and group > 1:  # one query, which sees every key
            o, seq_lse = _flash(_query_group_rows(q, a, kv_heads, compute), kh, vh, 0.0, False, scale=scale)
            out[a] = o[0].reshape(out.shape[1:])
            if with_lse:
                lse[:, a] = seq_lse[0].reshape(-1)
            continue
        o, seq_lse = _flash(
            _heads_first(q, a, qe, compute), kh, vh, 0.0, is_causal, attn_mask=mask, scale=scale
        )
        out[a:qe] = o[0].transpose(0, 1)
        if with_lse:
            lse[:, a:qe] = seq_lse[0]
    return out, lse


def cpu_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, causal, scale):
    """Gradients of `cpu_forward`, per sequence, straight into packed dq, dk, dv (q's dtype; zero-filled only
    where no query sees a key)."""
    if q.dtype == torch.float64:
        # PyTorch's CPU flash backward in float64 is several ulps off (dV 11.2 eps of max|dV| from a long-double
        # reference where plain float64 ops land at 1.4; 2 of 600 random cases of tests/test_attention.py beyond
        # the 2x rule, up to 1.65x). float64 is for checks, not speed: the softmax-backward formula in plain ops.
        return formula_backward(dout, q, k, v, out, cu_seqlens, cu_seqlens_k, causal, scale)
    if q.dtype == torch.bfloat16 and BF16_BACKWARD_ROWS:
        return _bf16_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, causal, scale)
    compute = backward_dtype(q.dtype)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    for a, qe, blind, ks, ke, is_causal, mask in _sequences(
        cu_seqlens, cu_seqlens_k, causal, compute, q.device
    ):
        dq[a - blind : a] = 0
        if a == qe:
            dk[ks:ke] = 0
            dv[ks:ke] = 0
            continue
        kh, vh = _heads_first(k, ks, ke, compute), _heads_first(v, ks, ke, compute)
        if qe - a == 1 and group > 1:  # one query: its heads as rows of their k/v head, as in the forward
            rows = (_query_group_rows(t, a, kv_heads, compute) for t in (dout, q))
            gq, gk, gv = _flash_backward(
                *rows,
                kh,
                vh,
                _query_group_rows(out, a, kv_heads, compute),
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
        gq, gk, gv = _flash_backward(
            _heads_first(dout, a, qe, compute),
            _heads_first(q, a, qe, compute),
            kh,
            vh,
            _heads_first(out, a, qe, compute),
            lse[:, a:qe].unsqueeze(0),
            0.0,
            is_causal,
            attn_mask=mask,
            scale=scale,
        )
        if group > 1:  # summed in the compute dtype, rounded to q's dtype once on assignment
            gk, gv = (g.unflatten(1, (kv_heads, group)).sum(2) for g in (gk, gv))
        dq[a:qe] = gq[0].transpose(0, 1)
        dk[ks:ke] = gk[0].transpose(0, 1)
        dv[ks:ke] = gv[0].transpose(0, 1)
    return dq, dk, dv


# Query rows per block of the bfloat16 backward (64 was the fastest of 64/128/256: module docstring); 0 runs the
# float32 backward instead (for comparison).
BF16_BACKWARD_ROWS = 64


def _bf16_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, causal, scale):
    """`cpu_backward` for bfloat16 in plain ops, `BF16_BACKWARD_ROWS` query rows at a time against the keys they
    see (module docstring): S, dP and dQ as bf16 GEMMs (float32 products, bf16 outputs, as the same-dtype
    reference), the softmax of S in float32 from S itself (so the row term rowsum(P * dP) is consistent with P;
    `out` and `lse` are not needed), dS rounded to bf16 for dQ's GEMM as flash-attn does, dV and dK as float32
    GEMMs summed in float32 and rounded once. Returns ``(dq, dk, dv)`` bf16, contiguous."""
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
    kv_heads, group, d = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
    for qs, qe, ks, ke in sequence_pairs(cu_seqlens, cu_seqlens_k):
        a = qs + blind_rows(qe - qs, ke - ks, causal)
        dq[qs:a] = 0
        rows, k_len = qe - a, ke - ks
        kh, vh, dkh, dvh = (t[ks:ke].transpose(0, 1) for t in (k, v, dk, dv))
        for b0 in range(a, qe, BF16_BACKWARD_ROWS):
            b1 = min(b0 + BF16_BACKWARD_ROWS, qe)
            # Bottom-right causal: row r (from a) sees keys j <= r - a + k_len - rows; the block sees [0, end).
            m, end = b1 - b0, (b1 - a + k_len - rows if causal else k_len)
            # (Hkv, group * m, D): the q heads sharing a k/v head stacked as its rows.
            qg, dog = (t[b0:b1].transpose(0, 1).reshape(kv_heads, group * m, d) for t in (q, dout))
            s = torch.bmm(qg, kh[:, :end].transpose(1, 2)).float().mul_(scale)
            if causal and m > 1:  # only the last m keys are hidden from some rows of the block
                hidden = torch.ones(m, m, dtype=torch.bool, device=q.device).triu_(1)
                s.view(kv_heads, group, m, end)[..., end - m :].masked_fill_(hidden, float("-inf"))
            p = torch.softmax(s, dim=-1)
            dp = torch.bmm(dog, vh[:, :end].transpose(1, 2)).float()
            ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p).mul_(scale)
            # dV and dK as float32 GEMMs: their per-block partials rounded to bf16 (bf16 GEMMs) before the float32
            # sum reached 2x the reference's error (module docstring).
            dvh[:, :end] += torch.bmm(p.transpose(1, 2), dog.float())
            dkh[:, :end] += torch.bmm(ds.transpose(1, 2), qg.float())
            dq[b0:b1] = torch.bmm(ds.to(q.dtype), kh[:, :end]).view(q.shape[1], m, d).transpose(0, 1)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
