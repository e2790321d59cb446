"""flash-attn's own varlen tests, run against `varlen_attention` as a user would who swaps it in.

Ported from flash-attn's ``tests/test_flash_attn.py`` at commit 0251105a (2.8.4): ``test_flash_attn_varlen_
qkvpacked``, ``test_flash_attn_varlen_output``, ``test_flash_attn_varlen_causal``,
``test_flash_attn_bwd_varlen_overflow`` and ``test_flash_attn_varlen_deterministic``, with their helpers
(``generate_random_padding_mask``, ``generate_qkv``, ``attention_ref``; ``unpad_input``/``pad_input`` from
``flash_attn.bert_padding``) rewritten without einops, their inputs (random padding masks, seqlen_q != seqlen_k,
MHA/MQA/GQA, head dims 32, 59, 64, 111, 128, 256, causal and not) and their pass criteria unchanged: the output's
max error against ``attention_ref`` in float32 (``upcast=True``) at most 2x that of the same attention in plain
ops in the tested dtype (``upcast=False, reorder_ops=True``), the gradients' 2x (qkvpacked, causal: ``+ 1e-5``)
or 3x (output), no NaN gradient when keys are shorter than a block, bit-identical repeated backwards.

What differs, and why: features we do not implement are not parametrized (dropout, alibi, local windows,
softcap, paged KV); sizes are cut for the CPU (flash-attn's seqlen pairs halved, up to 128, for the torch
backend, up to 63 for Triton's interpreter; batch 3, 2 in the interpreter; 3 to 5 repeated backwards instead of 50); the head dims, dtypes,
causal and head layouts are parametrized in full (for the Triton interpreter, at ~2.5 s of CPU a case, every
value of each appears once), and the seqlen pairs and the packed layouts (qkv, kv, q/k/v) rotate through the
cases. float32 is ours (flash-attn has none): its reference is float64 and its same-dtype
yardstick a flash-style attention other than the one under test (``same_dtype_attention`` of
tests/test_attention.py, which gives the numbers): for Triton PyTorch's per-sequence SDPA, for the torch backend
(SDPA's CPU kernel) the same attention in plain float32 ops with the flash-style backward (P from the LSE, the
row term from ``out * dout``); plus the project's rounding floor (tests/conftest.py). The ``gpu`` variant
runs flash-attn's full-size pairs on the Triton kernels in bf16 (head dims 59, 128, 256). Cut-down sizes hide
errors that grow with the sequence, so two qkvpacked cases also run at flash-attn's own lengths on the torch
backend (`FLASH_SIZED`: the one that caught PyTorch's native low-precision CPU backward, and one more).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import HAS_CUDA, rounding_floor
from test_attention import same_dtype_attention

from sphinx_kernels import varlen_attention

# (backend, device, dtypes, seqlen pairs, single seqlens): bf16 is wrong in Triton's interpreter.
CPU_PAIRS = [(1, 73), (56, 101), (64, 108), (57, 105), (54, 128), (128, 64), (63, 64), (64, 63)]
CPU_SEQLENS = [49, 64, 100, 129]
INTERP_PAIRS = [(1, 47), (33, 63), (48, 31), (31, 32)]
INTERP_SEQLENS = [17, 33, 48]
GPU_PAIRS = [(1, 147), (113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024), (2048, 2048)]
GPU_SEQLENS = [97, 128, 200, 257, 384, 512, 768, 1025, 2048]
HEAD_DIMS = [32, 59, 64, 111, 128, 256]
ALL = (torch.float16, torch.bfloat16, torch.float32)
SETUPS = {
    "torch": ("cpu", ALL, CPU_PAIRS, CPU_SEQLENS),
    # Triton's interpreter on CPU tensors; on a GPU machine the same small cases on CUDA tensors, bf16 included.
    "triton": ("cuda", ALL, INTERP_PAIRS, INTERP_SEQLENS)
    if HAS_CUDA
    else ("cpu", (torch.float16, torch.float32), INTERP_PAIRS, INTERP_SEQLENS),
}
# The GPU-size variant: flash-attn's own lengths, bf16 (fp16 runs above), three head dims (each new head dim,
# causal flag and dtype autotunes 13 kernel configs: ~1 s of compiling each).
GPU_SETUP = ("cuda", (torch.bfloat16,), GPU_PAIRS, GPU_SEQLENS)
GPU_HEAD_DIMS = [59, 128, 256]


# ------------------------------------------------------------------------------------------------
# flash-attn's helpers (tests/test_flash_attn.py, flash_attn/bert_padding.py), without einops
# ------------------------------------------------------------------------------------------------


def generate_random_padding_mask(max_seqlen, batch_size, device, mode="random"):
    assert mode in ["full", "random", "third"]
    if mode == "full":
        lengths = torch.full((batch_size, 1), max_seqlen, device=device, dtype=torch.int32)
    elif mode == "random":
        lengths = torch.randint(max(1, max_seqlen - 20), max_seqlen + 1, (batch_size, 1), device=device)
    else:
        lengths = torch.randint(max_seqlen // 3, max_seqlen + 1, (batch_size, 1), device=device)
    return torch.arange(max_seqlen, device=device)[None, :].expand(batch_size, -1) < lengths


def unpad_input(hidden_states, attention_mask):
    seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = seqlens_in_batch.max().item()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    return hidden_states.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen_in_batch


def pad_input(hidden_states, indices, batch, seqlen):
    output = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    output = output.index_put((indices,), hidden_states)
    return output.unflatten(0, (batch, seqlen))


def generate_qkv(q, k, v, query_padding_mask, key_padding_mask, kvpacked=False, qkvpacked=False):
    """As flash-attn's, for the padding masks given (the only use here)."""
    batch_size, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    q_unpad, indices_q, cu_seqlens_q, max_seqlen_q = unpad_input(q, query_padding_mask)
    k_unpad, indices_k, cu_seqlens_k, max_seqlen_k = unpad_input(k, key_padding_mask)
    v_unpad = unpad_input(v, key_padding_mask)[0]
    out_pad = lambda o: pad_input(o, indices_q, batch_size, seqlen_q)  # noqa: E731
    k_pad = lambda o: pad_input(o, indices_k, batch_size, seqlen_k)  # noqa: E731
    if qkvpacked:
        qkv_unpad = torch.stack([q_unpad, k_unpad, v_unpad], dim=1)
        qkv = torch.stack([q, k, v], dim=2)
        return (qkv_unpad.detach().requires_grad_(), cu_seqlens_q, max_seqlen_q, qkv.detach().requires_grad_(),
                out_pad, out_pad)  # fmt: skip
    if kvpacked:
        kv_unpad = torch.stack([k_unpad, v_unpad], dim=1)
        kv = torch.stack([k, v], dim=2)
        return (q_unpad.detach().requires_grad_(), kv_unpad.detach().requires_grad_(), cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.detach().requires_grad_(),
                kv.detach().requires_grad_(), out_pad, out_pad, k_pad)  # fmt: skip
    return (q_unpad.detach().requires_grad_(), k_unpad.detach().requires_grad_(),
            v_unpad.detach().requires_grad_(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(), out_pad,
            out_pad, k_pad)  # fmt: skip


def einsum(equation, a, b):
    """torch.einsum, except float16 on the CPU: a float32 einsum rounded to float16, which is what the fp16 CPU
    GEMM computes (float32 accumulation, one rounding per output; in autograd each gradient is rounded to
    float16 at the same points) at ~500x its speed (this CPU has no fast fp16 kernel: 0.5 GFLOP/s)."""
    if a.dtype == torch.float16 and a.device.type == "cpu":
        return torch.einsum(equation, a.float(), b.float()).half()
    return torch.einsum(equation, a, b)


def attention_ref(q, k, v, query_padding_mask=None, key_padding_mask=None, causal=False, upcast=True,
                  reorder_ops=False):  # fmt: skip
    """flash-attn's reference (no bias, dropout, window or softcap): `upcast` computes in float32 (float64 for
    float32 inputs, ours) and casts the output back; causal masks align bottom-right per the padding masks."""
    dtype_og = q.dtype
    if upcast:
        wide = torch.float64 if q.dtype == torch.float32 else torch.float32
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    d = q.shape[-1]
    if not reorder_ops:
        scores = einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    else:
        scores = einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    if causal:  # construct_local_mask with window (-1, 0)
        row_idx = torch.arange(seqlen_q, device=q.device)[:, None]
        col_idx = torch.arange(seqlen_k, device=q.device)
        sk = seqlen_k if key_padding_mask is None else key_padding_mask.sum(-1)[:, None, None, None]
        sq = seqlen_q if query_padding_mask is None else query_padding_mask.sum(-1)[:, None, None, None]
        local_mask = col_idx > row_idx + sk - sq
        scores.masked_fill_(local_mask, float("-inf"))
    attention = torch.softmax(scores, dim=-1).to(v.dtype)
    if causal:
        attention = attention.masked_fill(torch.all(local_mask, dim=-1, keepdim=True), 0.0)
    if query_padding_mask is not None:
        attention = attention.masked_fill(~query_padding_mask[:, None, :, None], 0.0)
    output = einsum("bhts,bshd->bthd", attention, v)
    if query_padding_mask is not None:
        output.masked_fill_(~query_padding_mask[:, :, None, None], 0.0)
    return output.to(dtype=dtype_og), attention.to(dtype=dtype_og)


def fp32_ref(q, k, v, query_padding_mask, key_padding_mask, causal, backend):
    """float32's same-dtype yardstick for `backend` (module docstring) on each sequence of the padded batch,
    padded rows 0."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        lq, lk = int(query_padding_mask[b].sum()), int(key_padding_mask[b].sum())
        cu_q = torch.tensor([0, lq], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, lk], dtype=torch.int32, device=q.device)
        args = (q[b, :lq], k[b, :lk], v[b, :lk], cu_q, causal, cu_k)
        out[b, :lq] = same_dtype_attention(*args, backend=backend)
    return out


def references(q, k, v, query_padding_mask, key_padding_mask, causal, backend):
    """(out_ref, out_pt) as flash-attn's tests build them; float32: float64 and `fp32_ref` (docstring)."""
    out_ref, _ = attention_ref(q, k, v, query_padding_mask, key_padding_mask, causal=causal)
    if q.dtype == torch.float32:
        return out_ref, fp32_ref(q, k, v, query_padding_mask, key_padding_mask, causal, backend)
    out_pt, _ = attention_ref(
        q, k, v, query_padding_mask, key_padding_mask, causal=causal, upcast=False, reorder_ops=True
    )
    return out_ref, out_pt


def within(ours, ref, pt, factor, extra=0.0):
    """flash-attn's criterion ``|ours - ref| <= factor * |pt - ref| + extra`` (max norms); for float32 (ours)
    plus the rounding floor. Returns the message on failure."""
    err = (ours.double() - ref.double()).abs().max().item()
    pt_err = (pt.double() - ref.double()).abs().max().item()
    bound = factor * pt_err + extra
    if ours.dtype == torch.float32:
        bound += rounding_floor(ref.double(), torch.float32)
    return (
        err <= bound,
        f"max error {err:.3g} > {factor} x PyTorch error {pt_err:.3g} + {bound - factor * pt_err:.3g}",
    )


def check(name, ours, ref, pt, factor, extra=0.0):
    ok, message = within(ours, ref, pt, factor, extra)
    assert ok, f"{name}: {message}"


# ------------------------------------------------------------------------------------------------
# The flash_attn API, on varlen_attention
# ------------------------------------------------------------------------------------------------


class FlashAPI:
    """flash-attn 2.8.4's varlen entry points (signatures and defaults) on `varlen_attention` with `backend`."""

    def __init__(self, backend):
        self.backend = backend

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                               block_table=None):  # fmt: skip
        assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0 and alibi_slopes is None
        assert block_table is None
        out = varlen_attention(
            q, k, v, cu_seqlens_q, int(max_seqlen_q), causal=causal, softmax_scale=softmax_scale,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_k=int(max_seqlen_k), backend=self.backend,
        )  # fmt: skip
        return (out, None, None) if return_attn_probs else out

    def flash_attn_varlen_kvpacked_func(self, q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        dropout_p=0.0, **kwargs):  # fmt: skip
        return self.flash_attn_varlen_func(
            q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, **kwargs
        )

    def flash_attn_varlen_qkvpacked_func(self, qkv, cu_seqlens, max_seqlen, dropout_p=0.0, **kwargs):
        return self.flash_attn_varlen_func(
            qkv[:, 0],
            qkv[:, 1],
            qkv[:, 2],
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p,
            **kwargs,
        )


def rotation(*axes):
    """Combinations in which every value of every axis appears: the i-th takes each axis's value i (mod its
    length), as many as the longest axis has values (the Triton interpreter's sample: ~2.5 s of CPU a case)."""
    return [tuple(values[i % len(values)] for values in axes) for i in range(max(map(len, axes)))]


def cases(dims, setups, *, gpu=False):
    """Parameter sets: every backend x its dtypes x `dims` (a dict of name -> values) in full (Triton's
    interpreter: a `rotation` of them); the seqlen pairs (or single lengths) and packed layouts rotate through
    them (module docstring)."""
    params = []
    for backend, (device, dtypes, pairs, seqlens) in setups.items():
        interpreted = backend == "triton" and device == "cpu"
        combine = rotation if interpreted else itertools.product
        for i, combo in enumerate(combine(dtypes, *dims.values())):
            values = dict(zip(("dtype", *dims), combo, strict=True))
            if interpreted and values["dtype"] == torch.float32 and values.get("d") == 256:
                # The interpreter's tl.dot is numpy's float32 matmul, which sums 256 products less accurately
                # than PyTorch's (2.4e-5 against 1.4e-5 on the same (32, 256) x (256, 16) product): its fp32
                # attention at d=256 is up to 2.8x the yardstick's error from numpy alone, and failed 1 run in
                # 6 (seed 760772116). This head dim runs in fp16 there; real Triton runs fp32 at 256 on a GPU.
                values["dtype"] = torch.float16
            values.update(pair=pairs[i % len(pairs)], seqlen=seqlens[i % len(seqlens)], layout=i % 3)
            marks = [pytest.mark.gpu] if gpu else []
            ident = "-".join([backend, str(values["dtype"]).removeprefix("torch."), *map(str, combo[1:])])
            params.append(pytest.param(backend, device, values, id=ident, marks=marks))
    return params


def matrix(dims):
    """`cases` on this machine's backends, and the GPU-size variant (marked gpu)."""
    gpu_dims = {**dims, "d": GPU_HEAD_DIMS} if "d" in dims else dims
    return cases(dims, SETUPS) + cases(gpu_dims, {"triton": GPU_SETUP}, gpu=True)


def cpu_batch(backend):
    """Batch size on the CPU: 3 sequences (flash-attn: 4 to 8), 2 in Triton's interpreter."""
    return 2 if backend == "triton" else 3


# flash-attn's own sizes, on the torch backend: the cut-down matrix above cannot see the defect issue 14 was
# filed for. PyTorch's native low-precision CPU flash kernel (forward and backward in fp16/bf16) sums dK/dV
# over query blocks in the low dtype, so its error grows with the sequence: with that kernel put back, all 144
# fp16 and bf16 torch cases above still passed, as did flash-attn's seqlen 200 d 32 fp16, 384 d 32 bf16, 512
# d 128 fp16 and (512, 256) d 128 output cases at their own batch sizes (4 seeds each); its seqlen 2048 d 64
# bf16 case failed in 5 of 15 seeds (dK/dV 2.5-4x the plain-ops error; this engine: <= 2x in 14 of 14), so a
# run of the suite catches that defect about one time in three, where the cut-down matrix never did. That
# case runs at batch 2 x 2 heads instead of 5 x 6 (the float32 reference would hold 5 x 6 x 2048^2 scores:
# 500 MB a tensor; ~8 s of CPU as it is); the 512 d 128 fp16 case at flash-attn's batch (5 x 6 heads, ~3 s).
FLASH_SIZED = {
    "qkvpacked": [
        dict(dtype=torch.bfloat16, d=64, causal=True, seqlen=2048, batch=2, nheads=2),
        dict(dtype=torch.float16, d=128, causal=True, seqlen=512),
    ],
}


def flash_sized(test):
    """`FLASH_SIZED` cases of `test` as parameters (torch backend, CPU)."""
    return [
        pytest.param(
            "torch",
            "cpu",
            {**p, "full": True},
            id=f"torch-flash-size-{str(p['dtype'])[6:]}-{p['d']}-{p['seqlen']}",
        )
        for p in FLASH_SIZED[test]
    ]


def batch_of(device, backend, p, flash_attn_batch):
    """flash-attn's batch size on a GPU and in the `FLASH_SIZED` cases (unless one names its own); `cpu_batch`
    otherwise."""
    if device == "cuda" or p.get("full"):
        return p.get("batch", flash_attn_batch)
    return cpu_batch(backend)


def device_of(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return device


# ------------------------------------------------------------------------------------------------
# The five tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, device, p", matrix({"d": HEAD_DIMS, "causal": [False, True]}) + flash_sized("qkvpacked")
)
def test_flash_attn_varlen_qkvpacked(seed, backend, device, p):
    device, dtype, d, causal, seqlen = device_of(device), p["dtype"], p["d"], p["causal"], p["seqlen"]
    api = FlashAPI(backend)
    batch_size = batch_of(device, backend, p, 5)
    nheads = p.get("nheads", 6)
    qkv = torch.randn(batch_size, seqlen, 3, nheads, d, device=device, dtype=dtype, requires_grad=True)
    key_padding_mask = generate_random_padding_mask(seqlen, batch_size, device, mode="random")
    qkv_unpad, cu_seqlens, max_seqlen, qkv, output_pad_fn, dqkv_pad_fn = generate_qkv(
        *qkv.unbind(dim=2), key_padding_mask, key_padding_mask, qkvpacked=True
    )
    out_unpad, sm_lse, S_dmask = api.flash_attn_varlen_qkvpacked_func(
        qkv_unpad, cu_seqlens, max_seqlen, 0.0, causal=causal, return_attn_probs=True
    )
    out = output_pad_fn(out_unpad)
    out_ref, out_pt = references(*qkv.unbind(2), key_padding_mask, key_padding_mask, causal, backend)
    g = torch.randn_like(out)
    (dqkv_unpad,) = torch.autograd.grad(out, qkv_unpad, g)
    dqkv = dqkv_pad_fn(dqkv_unpad)
    (dqkv_ref,) = torch.autograd.grad(out_ref, qkv, g.to(out_ref.dtype))
    (dqkv_pt,) = torch.autograd.grad(out_pt, qkv, g)
    check("out", out, out_ref, out_pt, 2)
    check("dqkv", dqkv, dqkv_ref, dqkv_pt, 2)


@pytest.mark.parametrize(
    "backend, device, p", matrix({"mha_type": ["mha", "mqa", "gqa"], "d": HEAD_DIMS, "causal": [False, True]})
)
def test_flash_attn_varlen_output(seed, backend, device, p):
    device, dtype, d, causal, mha_type = device_of(device), p["dtype"], p["d"], p["causal"], p["mha_type"]
    seqlen_q, seqlen_k = p["pair"]
    kvpacked = p["layout"] == 0
    api = FlashAPI(backend)
    batch_size = batch_of(device, backend, p, 4)
    nheads = 6
    nheads_k = nheads if mha_type == "mha" else (1 if mha_type == "mqa" else 2)
    q = torch.randn(batch_size, seqlen_q, nheads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch_size, seqlen_k, nheads_k, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch_size, seqlen_k, nheads_k, d, device=device, dtype=dtype, requires_grad=True)
    query_padding_mask = generate_random_padding_mask(seqlen_q, batch_size, device, mode="random")
    key_padding_mask = generate_random_padding_mask(seqlen_k, batch_size, device, mode="random")
    if kvpacked:
        (q_unpad, kv_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, kv, output_pad_fn,
         dq_pad_fn, dkv_pad_fn) = generate_qkv(q, k, v, query_padding_mask, key_padding_mask, kvpacked=True)  # fmt: skip
        out_unpad, sm_lse, S_dmask = api.flash_attn_varlen_kvpacked_func(
            q_unpad, kv_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal=causal,
            return_attn_probs=True,
        )  # fmt: skip
        k, v = kv.unbind(2)
    else:
        (q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k, v,
         output_pad_fn, dq_pad_fn, dk_pad_fn) = generate_qkv(q, k, v, query_padding_mask, key_padding_mask)  # fmt: skip
        out_unpad, sm_lse, S_dmask = api.flash_attn_varlen_func(
            q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
            causal=causal, return_attn_probs=True,
        )  # fmt: skip
    out = output_pad_fn(out_unpad)
    out_ref, out_pt = references(q, k, v, query_padding_mask, key_padding_mask, causal, backend)
    g = torch.randn_like(out)
    leaves = (q, kv) if kvpacked else (q, k, v)
    if kvpacked:
        dq_unpad, dkv_unpad = torch.autograd.grad(out, (q_unpad, kv_unpad), g)
        dk, dv = dkv_pad_fn(dkv_unpad).unbind(2)
    else:
        dq_unpad, dk_unpad, dv_unpad = torch.autograd.grad(out, (q_unpad, k_unpad, v_unpad), g)
        dk, dv = dk_pad_fn(dk_unpad), dk_pad_fn(dv_unpad)
    dq = dq_pad_fn(dq_unpad)
    ref_grads = torch.autograd.grad(out_ref, leaves, g.to(out_ref.dtype))
    pt_grads = torch.autograd.grad(out_pt, leaves, g)
    if kvpacked:
        ref_grads, pt_grads = ((a, *b.unbind(2)) for a, b in (ref_grads, pt_grads))
    check("out", out, out_ref, out_pt, 2)
    for name, ours, ref, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, pt_grads, strict=True):
        check(name, ours, ref, pt, 3)


@pytest.mark.parametrize("backend, device, p", matrix({"d": HEAD_DIMS, "swap_sq_sk": [False, True]}))
def test_flash_attn_varlen_causal(seed, backend, device, p):
    device, dtype, d = device_of(device), p["dtype"], p["d"]
    seqlen_q, seqlen_k = p["pair"][::-1] if p["swap_sq_sk"] else p["pair"]
    api = FlashAPI(backend)
    batch_size = 8 if device == "cuda" else cpu_batch(backend)
    nheads = 9
    q = torch.randn(batch_size, seqlen_q, nheads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch_size, seqlen_k, nheads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch_size, seqlen_k, nheads, d, device=device, dtype=dtype, requires_grad=True)
    query_padding_mask = generate_random_padding_mask(seqlen_q, batch_size, device, mode="random")
    key_padding_mask = generate_random_padding_mask(seqlen_k, batch_size, device, mode="random")
    (q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k, v, output_pad_fn,
     dq_pad_fn, dk_pad_fn) = generate_qkv(q, k, v, query_padding_mask, key_padding_mask)  # fmt: skip
    out_unpad = api.flash_attn_varlen_func(
        q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal=True
    )
    out = output_pad_fn(out_unpad)
    out_ref, out_pt = references(q, k, v, query_padding_mask, key_padding_mask, True, backend)
    g = torch.randn_like(out)
    dq_unpad, dk_unpad, dv_unpad = torch.autograd.grad(out, (q_unpad, k_unpad, v_unpad), g)
    dq, dk, dv = dq_pad_fn(dq_unpad), dk_pad_fn(dk_unpad), dk_pad_fn(dv_unpad)
    ref_grads = torch.autograd.grad(out_ref, (q, k, v), g.to(out_ref.dtype))
    pt_grads = torch.autograd.grad(out_pt, (q, k, v), g)
    check("out", out, out_ref, out_pt, 2, 1e-5)
    for name, ours, ref, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, pt_grads, strict=True):
        check(name, ours, ref, pt, 2, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 32, 64])
def test_flash_attn_bwd_varlen_overflow(seed, backend, d, causal):
    """Keys shorter than a block per sequence (3 keys for 256 queries): no NaN in any gradient."""
    device, dtype = ("cuda" if HAS_CUDA else "cpu"), torch.float16
    api = FlashAPI(backend)
    nheads = 5
    q_cuseqlen = torch.tensor([0, 76, 110, 256], device=device, dtype=torch.int32)
    k_cuseqlen = torch.tensor([0, 1, 2, 3], device=device, dtype=torch.int32)
    Mq = 256
    Mk = 3
    q = torch.randn([Mq, nheads, d], dtype=dtype, device=device) * 3
    k, v = (torch.randn([Mk, nheads, d], dtype=dtype, device=device) * 3 for _ in range(2))
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = api.flash_attn_varlen_func(q, k, v, q_cuseqlen, k_cuseqlen, Mq, Mk, causal=causal)
    g = torch.randn_like(out)
    out.backward(g)
    assert not q.grad.isnan().any()
    assert not k.grad.isnan().any()
    assert not v.grad.isnan().any()


@pytest.mark.parametrize("backend, device, p", matrix({"d": HEAD_DIMS, "causal": [False, True]}))
def test_flash_attn_varlen_deterministic(seed, backend, device, p):
    device, dtype, d, causal = device_of(device), p["dtype"], p["d"], p["causal"]
    seqlen_q, seqlen_k = p["pair"][::-1] if p["layout"] else p["pair"]  # swap_sq_sk rotates
    api = FlashAPI(backend)
    batch_size = 2
    nheads = 9
    q = torch.randn(batch_size, seqlen_q, nheads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch_size, seqlen_k, nheads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch_size, seqlen_k, nheads, d, device=device, dtype=dtype, requires_grad=True)
    query_padding_mask = generate_random_padding_mask(seqlen_q, batch_size, device, mode="random")
    key_padding_mask = generate_random_padding_mask(seqlen_k, batch_size, device, mode="random")
    q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *_ = generate_qkv(
        q, k, v, query_padding_mask, key_padding_mask
    )
    out = api.flash_attn_varlen_func(
        q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal=causal,
        deterministic=True,
    )  # fmt: skip
    g = torch.randn_like(out)
    dq0, dk0, dv0 = torch.autograd.grad(out, (q_unpad, k_unpad, v_unpad), g, retain_graph=True)
    for _ in range(50 if device == "cuda" else 3 if backend == "triton" else 5):
        dq, dk, dv = torch.autograd.grad(out, (q_unpad, k_unpad, v_unpad), g, retain_graph=True)
        assert torch.equal(dv, dv0)
        assert torch.equal(dk, dk0)
        assert torch.equal(dq, dq0)
