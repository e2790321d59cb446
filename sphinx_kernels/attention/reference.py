"""The reference: per-sequence ``scaled_dot_product_attention`` in q's dtype (tests compare against it in
float64; eager off the CPU it is the ``torch`` backend under plain autograd, engine ``torch_autograd``), and
the ``torch_formula`` engine: the same forward with the softmax-backward formula, which the registered op runs
off the CPU under ``torch.compile`` (no autograd inside an op)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_pairs(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None) -> list[tuple[int, ...]]:
    """``(q_start, q_end, k_start, k_end)`` per sequence, on the host (keys share the queries' bounds if None)."""
    bq = cu_seqlens.tolist()
    bk = bq if cu_seqlens_k is None or cu_seqlens_k is cu_seqlens else cu_seqlens_k.tolist()
    return [(bq[i], bq[i + 1], bk[i], bk[i + 1]) for i in range(len(bq) - 1)]


def blind_rows(q_len: int, k_len: int, causal: bool) -> int:
    """How many leading queries of a sequence see no key: all of them without keys, and with causal masking
    aligned bottom-right the first ``q_len - k_len`` when there are more queries than keys."""
    if k_len == 0:
        return q_len
    return max(q_len - k_len, 0) if causal else 0


def causal_visible(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
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
    `max_seqlen_k` are not needed. In float16/bfloat16 on the CPU its backward is PyTorch's CPU flash kernel,
    whose dK/dV are 3-4x flash-attn's error bar (it accumulates them in the low dtype): a reference to run in
    float64, not the CPU training path (that is the ``torch`` backend's ``torch_cpu`` engine).
    """
    group = q.shape[1] // k.shape[1]
    outs = []
    for qs, qe, ks, ke in sequence_pairs(cu_seqlens, cu_seqlens_k):
        q_len, k_len = qe - qs, ke - ks
        blind = blind_rows(q_len, k_len, causal)
        if blind:
            outs.append(q[qs : qs + blind] * 0)  # sees no key: 0, as flash-attn (and still in the graph)
        if blind == q_len:
            continue
        rows = q_len - blind
        # SDPA's is_causal aligns top-left; with fewer queries than keys the bottom-right mask differs (a
        # single query sees every key: no mask).
        mask = causal_visible(rows, k_len, q.device) if causal and 1 < rows < k_len else None
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


def formula_forward(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Engine ``torch_formula``, forward: the reference, and an empty ``(Hq, 0)`` LSE (the backward recomputes
    the probabilities)."""
    out = varlen_attention_ref(
        q, k, v, cu_seqlens, causal=causal, softmax_scale=scale, cu_seqlens_k=cu_seqlens_k
    )
    return out.contiguous(), q.new_empty((q.shape[1], 0), dtype=torch.float32)


def formula_backward(
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
    """Engine ``torch_formula``, backward: the softmax-backward formula one sequence at a time (an ``Lq x Lk``
    score matrix per sequence and head), in float32 for float16/bfloat16/float32 inputs (float64 for float64),
    each gradient rounded to the inputs' dtype once."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.zeros(t.shape, dtype=compute, device=t.device) for t in (q, k, v))
    for qs, qe, ks, ke in sequence_pairs(cu_seqlens, cu_seqlens_k):
        if qe == qs or ke == ks:
            continue  # no query sees a key: every gradient of the sequence is 0
        qh, oh, doh = (t[qs:qe].transpose(0, 1).to(compute) for t in (q, out, dout))
        kh, vh = (t[ks:ke].transpose(0, 1).to(compute).repeat_interleave(group, dim=0) for t in (k, v))
        scores = qh @ kh.transpose(1, 2) * softmax_scale
        if causal:
            hidden = ~causal_visible(qe - qs, ke - ks, q.device)
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
