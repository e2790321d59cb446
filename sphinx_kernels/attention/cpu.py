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
  flash-attn; within the bar), the backward runs in float32 (q, k, v, out, dout converted per sequence),
  dK/dV summed over grouped-query heads in float32 and rounded once. Same machine: native bf16 forward 80 ms
  vs 88 ms fp32; the bf16 backward (175 ms vs 223 ms fp32) misses the bar, so its speed cannot be kept.
- float32: native. float64: the native forward, and the backward in plain float64 ops (`cpu_backward`).

Measured with flash-attn's qkvpacked inputs (causal, batch 5 x 6 heads, random padding), max error over the
same-dtype plain-ops error (the bar is 2): this engine dQ/dK/dV <= 1.0 in every case (seqlen 200 d 32 fp16,
384 d 32 bf16, 512 d 128 fp16, 2048 d 64 bf16); native low-precision SDPA dK 2.0, dV up to 4.0 (512 d 128
fp16). Cost on the benchmark's mix (T 13908, causal fwd+bwd, 1 thread): fp32 1.09x per-sequence SDPA, bf16
0.69x per-sequence bf16 SDPA (which misses the bar), fp16 6.9x per-sequence fp16 SDPA.
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
    """The dtype the backward kernel runs in (module docstring)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _heads_first(x: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[start, end)`` of a packed ``(T, H, D)`` tensor as ``(1, H, L, D)`` in `dtype` (a view if it is
    x's dtype)."""
    return x[start:end].transpose(0, 1).unsqueeze(0).to(dtype)


def _query_group_rows(x: torch.Tensor, row: int, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Row `row` of a packed ``(T, Hq, D)`` tensor as ``(1, Hkv, Hq/Hkv, D)``: one query's heads that share a k/v
    head become that head's query rows. For a single query (decoding) this is the same attention, and the CPU
    kernel reads each k/v head once instead of once per q head (2.2x faster at Hq 32, Hkv 8, D 128)."""
    return x[row].reshape(kv_heads, -1, x.shape[-1]).unsqueeze(0).to(dtype)


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


def cpu_forward(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (T, Hq, D) q.dtype, lse (Hq, T))``: lse float32 (float64 for float64), natural log, +inf where a
    query sees no key."""
    compute = forward_dtype(q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32
    )
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    for a, qe, blind, ks, ke, is_causal, mask in _sequences(
        cu_seqlens, cu_seqlens_k, causal, compute, q.device
    ):
        out[a - blind : a] = 0
        lse[:, a - blind : a] = float("inf")
        if a == qe:
            continue
        kh, vh = _heads_first(k, ks, ke, compute), _heads_first(v, ks, ke, compute)
        if qe - a == 1 and group > 1:  # one query, which sees every key
            o, seq_lse = _flash(_query_group_rows(q, a, kv_heads, compute), kh, vh, 0.0, False, scale=scale)
            out[a] = o[0].reshape(out.shape[1:])
            lse[:, a] = seq_lse[0].reshape(-1)
            continue
        o, seq_lse = _flash(
            _heads_first(q, a, qe, compute), kh, vh, 0.0, is_causal, attn_mask=mask, scale=scale
        )
        out[a:qe] = o[0].transpose(0, 1)
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
