"""Grouped mixture-of-experts: routing, permutation, grouped GEMM, fused SwiGLU expert MLP, load balancing.

One MoE layer (Mixtral, SPHINX-MoE) runs as::

    weights, expert_ids = route(x @ router_weight.T, top_k)       # fp32 softmax, top-k, renormalised
    x_sorted, row_map, offsets = permute(x, expert_ids, E)        # (token, slot) rows grouped by expert
    y_sorted = (silu(x_sorted @ w1[e]) * (x_sorted @ w3[e])) @ w2[e]   per expert group (grouped GEMMs)
    out = unpermute(y_sorted, row_map, weights)                   # weighted sum of each token's k rows

``offsets`` are int32 cumulative ends of the expert groups (``offsets[-1] == T*k``), computed on the device:
no host sync on the GPU path. The expert GEMMs are the whole cost of the layer; the Triton backend runs them
as grouped GEMMs whose tiles never straddle two experts (the tile -> (expert, first row) schedule is derived
inside the kernel from the offsets), on a persistent grid on the GPU, with the SiLU-gate product fused into
the first GEMM's epilogue (x@w1 and x@w3 in one kernel) and its derivative into the backward's.

Backends (``_backend.select("moe", ...)``): ``cuda``/``cpu`` (compiled permutation kernels; on CUDA with the
Triton GEMMs; on the CPU one ``at::mm`` per expert into its rows of preallocated outputs, with the SwiGLU
elementwise forward and backward fused into one compiled pass each, per expert while its rows are in cache),
``megablocks`` (its grouped GEMM, when importable), ``triton``, ``grouped_mm`` (``torch._grouped_mm``),
``torch`` (reference: a loop over experts).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sphinx_kernels import _backend
from sphinx_kernels._triton import HAS_TRITON, tl, triton

__all__ = [
    "MoEAux",
    "grouped_mm",
    "grouped_mm_ref",
    "load_balancing_loss",
    "moe_mlp",
    "moe_mlp_ref",
    "permute",
    "permute_ref",
    "route",
    "route_ref",
    "unpermute",
    "unpermute_ref",
]

# Automatic order: "cpu" (compiled permutation, per-expert GEMMs, fused SwiGLU) before the plain "grouped_mm"
# peer; on CUDA tensors "cuda" is the compiled permutation + the Triton grouped GEMMs.
BACKENDS = ("cuda", "megablocks", "triton", "cpu", "grouped_mm", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The cpu engine's compiled kernels (SwiGLU passes, unpermute backward; csrc/moe.cpp): an extension built
# before they existed has the permutation only, and its cpu backend then runs the loop engine.
_CPU_ENGINE_KERNELS = _backend.extension_has_kernel("swiglu_out", "CPU")
# torch._grouped_mm needs every non-unit stride to be a multiple of 16 bytes; odd K/N are zero-padded.
_ALIGN_BYTES = 16


class MoEAux(NamedTuple):
    """Side outputs of `moe_mlp`.

    Attributes:
        router_probs: float32 ``(T, E)``: softmax of the router logits (pruned experts have probability 0).
        expert_ids: int64 ``(T, top_k)``: the chosen experts per token.
        tokens_per_expert: int32 ``(E,)``: (token, slot) pairs routed to each expert.
        load_balancing_loss: float32 scalar: ``E'/(T*k) * sum_e tokens_e * mean_prob_e`` (Switch-style;
            ``E'`` the unpruned experts, so perfectly balanced routing gives 1).
    """

    router_probs: torch.Tensor
    expert_ids: torch.Tensor
    tokens_per_expert: torch.Tensor
    load_balancing_loss: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# 1. References: plain PyTorch, obviously correct (and the `torch` backend).
# ----------------------------------------------------------------------------------------------------


def route_ref(
    router_logits: torch.Tensor, top_k: int, *, expert_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 softmax over experts (pruned ones masked to -inf first), top-k, weights renormalised to sum 1.

    Returns ``(weights float32 (T, k), expert_ids int64 (T, k), probs float32 (T, E))``.
    """
    logits = router_logits.float()
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask.to(logits.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top, ids = torch.topk(probs, top_k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), ids, probs


def permute_ref(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of the ``T*k`` (token, slot) pairs by expert; returns ``(x_sorted, row_map, offsets)``."""
    tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return x[order // k], row_map.view(tokens, k), counts.cumsum(0).to(torch.int32)


def unpermute_ref(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]]``, accumulated in float32 (float64 for it)."""
    acc = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    gathered = y_sorted[row_map].to(acc)  # (T, k, d)
    return (weights.to(acc).unsqueeze(-1) * gathered).sum(dim=1).to(y_sorted.dtype)


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()  # host sync: the reference loop needs Python slice bounds
    return list(zip([0] + ends[:-1], ends, strict=True))


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Loop over experts: ``y[s:e] = x[s:e] @ w[i]`` for group ``i`` spanning rows ``[s, e)``."""
    parts = [x[s:e] @ w[i] for i, (s, e) in enumerate(_bounds(offsets))]
    tail = x.shape[0] - int(offsets[-1]) if offsets.numel() else x.shape[0]
    if tail:
        parts.append(x.new_zeros(tail, w.shape[-1]))
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def load_balancing_loss(
    router_probs: torch.Tensor, expert_ids: torch.Tensor, *, expert_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style loss ``E'/(T*k) * sum_e tokens_e * mean_prob_e``; 1 for perfectly balanced routing.

    Args:
        router_probs: float ``(T, E)`` softmax of the router logits (differentiable).
        expert_ids: int64 ``(T, k)`` chosen experts (counts are not differentiable).
        expert_mask: optional bool ``(E,)``; ``E'`` is the number of unpruned experts (``E`` without a mask).
    """
    tokens, k = expert_ids.shape
    num_experts = router_probs.shape[-1]
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=flat.device).scatter_add_(
        0, flat, torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    )
    active = num_experts if expert_mask is None else expert_mask.sum().to(torch.float32)
    mean_prob = router_probs.float().mean(dim=0)
    return active / max(tokens * k, 1) * (counts * mean_prob).sum()


def _split_gate_up(w1: torch.Tensor, w3: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1, w3)`` as given, or, when `w3` is None, the two halves of the fused gate|up weight `w1`
    ``(E, d, 2f)``: ``w1[..., :f]`` (gate) and ``w1[..., f:]`` (up), as views."""
    if w3 is not None:
        return w1, w3
    f = w1.shape[-1] // 2
    return w1[..., :f], w1[..., f:]


def moe_experts_ref(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Plain PyTorch `moe_experts`: a loop over experts (index, SwiGLU MLP, weighted index_add)."""
    w1, w3 = _split_gate_up(w1, w3)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = (expert_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        xe = x[token]
        ye = (F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e]
        out = out.index_add(0, token, ye.to(acc) * weights[token, slot].to(acc).unsqueeze(-1))
    return out.to(x.dtype)


def moe_mlp_ref(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    *,
    top_k: int = 2,
    expert_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """Plain PyTorch `moe_mlp`: route, then a loop over experts (index, SwiGLU MLP, weighted index_add)."""
    weights, ids, probs = route_ref(x @ router_weight.T, top_k, expert_mask=expert_mask)
    out = moe_experts_ref(x, ids, weights, w1, w3, w2)
    counts = torch.zeros(w1.shape[0], dtype=torch.int64, device=x.device).scatter_add_(
        0, ids.reshape(-1), torch.ones_like(ids.reshape(-1))
    )
    aux = MoEAux(probs, ids, counts.to(torch.int32), load_balancing_loss(probs, ids, expert_mask=expert_mask))
    return out, aux


# ----------------------------------------------------------------------------------------------------
# 2. Triton kernels.
# ----------------------------------------------------------------------------------------------------

# Modes of the grouped GEMM kernel (one kernel, four epilogues, so the tile schedule exists once).
_PLAIN, _SWIGLU_FWD, _SWIGLU_BWD, _DUAL = 0, 1, 2, 3


@triton.jit
def _tile_of(offsets_ptr, m_tile, E, BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr):
    """Expert, first row and end row of global M-tile `m_tile` (expert >= E: past the last tile).

    Each expert's rows are cut into ceil(n_e / BLOCK_M) tiles of their own, so no tile straddles two experts;
    the schedule is a prefix sum over the E offsets, recomputed per tile from the device-side offsets.
    """
    ar = tl.arange(0, E_BLOCK)
    valid = ar < E
    ends = tl.load(offsets_ptr + ar, mask=valid, other=0)
    starts = tl.load(offsets_ptr + ar - 1, mask=valid & (ar > 0), other=0)
    tiles = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(tiles, 0)
    expert = tl.sum((cum <= m_tile).to(tl.int32), 0)
    pick = ar == expert
    first_tile = tl.sum(tl.where(pick, cum - tiles, 0), 0)
    row_start = tl.sum(tl.where(pick, starts, 0), 0) + (m_tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(pick, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    a2_ptr,
    b_ptr,
    b2_ptr,
    out_ptr,
    out2_ptr,
    aux1_ptr,
    aux2_ptr,
    offsets_ptr,
    M,
    N,
    K,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_b2e,
    stride_b2k,
    stride_b2n,
    MODE: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    E_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grouped GEMM over expert groups of rows, persistent: program p takes work items p, p + P, ...

    MODE _PLAIN:      out = a @ b[e]
    MODE _SWIGLU_FWD: a1 = a @ b[e], a3 = a @ b2[e]; out = silu(a1) * a3; aux1, aux2 = a1, a3 if SAVE_PRE
    MODE _SWIGLU_BWD: g = a @ b[e] (dh); with aux1, aux2 = a1, a3: out = d a1, out2 = d a3
    MODE _DUAL:       out = a @ b[e] + a2 @ b2[e]   (a2 strided like a)
    Outputs and aux are contiguous (M, N). Accumulation in fp32 (tl.dot), one rounding at the store.
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    m_tiles = (
        tl.cdiv(M, BLOCK_M) + E
    )  # upper bound on the per-expert tiles: sum ceil(n_e/BM) <= ceil(M/BM) + E
    total = m_tiles * n_tiles
    for work in range(pid, total, num_programs):
        # Grouped order (GROUP_M M-tiles share each N sweep): neighbours in time reuse A and B tiles in L2.
        per_group = GROUP_M * n_tiles
        first_m = (work // per_group) * GROUP_M
        group_size = tl.minimum(m_tiles - first_m, GROUP_M)
        m_tile = first_m + (work % per_group) % group_size
        n_tile = (work % per_group) // group_size
        expert, row_start, row_end = _tile_of(offsets_ptr, m_tile, E, BLOCK_M, E_BLOCK)
        if expert < E:
            rows = row_start + tl.arange(0, BLOCK_M)
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < row_end
            col_ok = cols < N
            rows64 = rows.to(tl.int64)
            e64 = expert.to(tl.int64)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a_off = rows64[:, None] * stride_am + ks[None, :] * stride_ak
                a_mask = row_ok[:, None] & k_ok[None, :]
                a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
                b_mask = k_ok[:, None] & col_ok[None, :]
                b = tl.load(
                    b_ptr + e64 * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=b_mask,
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if MODE == 1 or MODE == 3:
                    b2 = tl.load(
                        b2_ptr + e64 * stride_b2e + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n,
                        mask=b_mask,
                        other=0.0,
                    )
                    if MODE == 3:
                        a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
                        acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
                    else:
                        acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
            c_off = rows64[:, None] * N + cols[None, :]
            c_mask = row_ok[:, None] & col_ok[None, :]
            dtype = out_ptr.dtype.element_ty
            if MODE == 1:
                # SwiGLU epilogue: h = silu(a1) * a3 straight from the fp32 accumulators.
                h = acc * tl.sigmoid(acc) * acc2
                tl.store(out_ptr + c_off, h.to(dtype), mask=c_mask)
                if SAVE_PRE:
                    tl.store(aux1_ptr + c_off, acc.to(dtype), mask=c_mask)
                    tl.store(aux2_ptr + c_off, acc2.to(dtype), mask=c_mask)
            elif MODE == 2:
                # d/da1 [silu(a1) a3] = a3 * sig * (1 + a1 (1 - sig));  d/da3 = silu(a1).
                a1 = tl.load(aux1_ptr + c_off, mask=c_mask, other=0.0).to(tl.float32)
                a3 = tl.load(aux2_ptr + c_off, mask=c_mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(a1)
                tl.store(out_ptr + c_off, (acc * a3 * sig * (1.0 + a1 * (1.0 - sig))).to(dtype), mask=c_mask)
                tl.store(out2_ptr + c_off, (acc * a1 * sig).to(dtype), mask=c_mask)
            else:
                tl.store(out_ptr + c_off, acc.to(dtype), mask=c_mask)


@triton.jit
def _grouped_dw_kernel(
    a_ptr,
    b_ptr,
    b2_ptr,
    out_ptr,
    out2_ptr,
    offsets_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_oe,
    stride_ok,
    stride_on,
    DUAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW as a grouped GEMM over a variable reduction: out[e] = a[rows of e].T @ b[rows of e] (E, K, N).

    Program (e, k-tile, n-tile) reduces over its expert's rows only; an expert with no rows writes zeros.
    DUAL: also out2[e] = a[rows].T @ b2[rows] (dW1 and dW3 share their loads of x). out and out2 share their
    strides (any: e.g. the two halves of a fused gate|up weight's gradient).
    """
    expert = tl.program_id(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_tile = tl.program_id(1) % k_tiles
    n_tile = tl.program_id(1) // k_tiles
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < end
        a_t = tl.load(
            a_ptr + rows[None, :] * stride_am + ks[:, None] * stride_ak,
            mask=k_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        b_off = rows[:, None] * stride_bm + cols[None, :] * stride_bn
        b_mask = row_ok[:, None] & col_ok[None, :]
        acc = tl.dot(a_t, tl.load(b_ptr + b_off, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
        if DUAL:
            acc2 = tl.dot(
                a_t, tl.load(b2_ptr + b_off, mask=b_mask, other=0.0), acc2, input_precision=PRECISION
            )
    o_off = expert.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + cols[None, :] * stride_on
    o_mask = k_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    if DUAL:
        tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, dst_ptr, D, K_SLOTS, BLOCK_D: tl.constexpr):
    """dst[index[s]] = src[s // K_SLOTS]: the permutation's row copy (bit-exact)."""
    s = tl.program_id(0)
    dest = tl.load(index_ptr + s)
    src = src_ptr + (s // K_SLOTS).to(tl.int64) * D
    dst = dst_ptr + dest.to(tl.int64) * D
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        tl.store(dst + cols, tl.load(src + cols, mask=cols < D), mask=cols < D)


@triton.jit
def _unpermute_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, D, K_SLOTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[row_map[t, j]] in fp32, slots in order (as every backend)."""
    t = tl.program_id(0).to(tl.int64)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(K_SLOTS):
            row = tl.load(row_map_ptr + t * K_SLOTS + j)
            w = tl.load(w_ptr + t * K_SLOTS + j)
            acc += w * tl.load(y_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _gemm_configs():
    # H100/H200 bf16: 128x128/128x256 tiles with 64-deep K steps and 3-4 stages are the usual cuBLAS-class
    # shapes; 64-row tiles help skewed routing (many short expert groups). Few configs: each mode
    # (6 GEMM shapes in a training step) autotunes once, and compiling a config takes seconds. Configs that
    # do not fit in shared memory for a mode/dtype are skipped by the autotuner (OutOfResources).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4),
            # Last: the one that fits every mode and dtype in shared memory (fp32 _DUAL streams four tiles per
            # stage: 64 KB here, 384 KB with the configs above; sm_90 has 227 KB), checked by the tests.
            (64, 64, 32, 4, 2),
        ]
    ]


def _dw_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (64, 128, 128, 8, 3),
            (64, 128, 64, 4, 4),
            (32, 64, 64, 4, 2),
        ]  # last fits all
    ]


if HAS_TRITON:
    _grouped_mm_tuned = triton.autotune(configs=_gemm_configs(), key=["N", "K", "E", "MODE"])(
        _grouped_mm_kernel
    )
    _grouped_dw_tuned = triton.autotune(configs=_dw_configs(), key=["K", "N", "DUAL"])(_grouped_dw_kernel)


# ----------------------------------------------------------------------------------------------------
# 3. Launchers (and the GEMM engines behind every backend).
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays IEEE: TF32 would silently cost ~3 decimal digits against the fp32 contract.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_grouped_mm(
    mode, a, b, offsets, out, *, a2=None, b2=None, out2=None, aux1=None, aux2=None, save_pre=False
):
    M, K = a.shape
    E, _, N = b.shape
    if M == 0 or N == 0:
        return
    b2 = b if b2 is None else b2
    args = (
        a,
        a if a2 is None else a2,
        b,
        b2,
        out,
        out if out2 is None else out2,
        out if aux1 is None else aux1,
        out if aux2 is None else aux2,
        offsets,
        M,
        N,
        K,
        E,
        a.stride(0),
        a.stride(1),
        *b.stride(),
        *b2.stride(),
    )
    meta = dict(
        MODE=mode,
        SAVE_PRE=save_pre,
        PRECISION=_precision(a.dtype),
        E_BLOCK=max(16, triton.next_power_of_2(E)),
    )
    if _backend.triton_interpreting() or a.device.type != "cuda":
        # The interpreter runs programs one after another: few, large-ish tiles and one work item each.
        bm, bn, bk = 16, 32, 32
        total = (triton.cdiv(M, bm) + E) * triton.cdiv(N, bn)
        _grouped_mm_kernel[(total,)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
        return
    sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())

    def grid(m):
        return (min(sms, (triton.cdiv(M, m["BLOCK_M"]) + E) * triton.cdiv(N, m["BLOCK_N"])),)

    _grouped_mm_tuned[grid](*args, **meta)


def _launch_grouped_dw(a, b, offsets, out, *, b2=None, out2=None):
    M, K = a.shape
    N = b.shape[1]
    E = out.shape[0]
    if K == 0 or N == 0 or E == 0:
        return
    dual = b2 is not None
    if dual and out2.stride() != out.stride():
        raise ValueError(f"out2's strides {out2.stride()} must be out's {out.stride()}")
    args = (
        a,
        b,
        b if b2 is None else b2,
        out,
        out if out2 is None else out2,
        offsets,
        K,
        N,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        *out.stride(),
    )
    meta = dict(DUAL=dual, PRECISION=_precision(a.dtype))
    if _backend.triton_interpreting() or a.device.type != "cuda":
        bm, bn, bk = 16, 32, 32
        grid = (E, triton.cdiv(K, bk) * triton.cdiv(N, bn))
        _grouped_dw_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return

    def grid(m):
        return (E, triton.cdiv(K, m["BLOCK_K"]) * triton.cdiv(N, m["BLOCK_N"]))

    _grouped_dw_tuned[grid](*args, **meta)


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def _torch_gmm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm with K and N zero-padded to 16-byte strides (exact: zeros add nothing)."""
    if a.dtype not in TRITON_DTYPES:  # _grouped_mm has no float64: the loop
        return grouped_mm_ref(a, b, offsets)
    align = _ALIGN_BYTES // a.element_size()
    N = b.shape[-1]
    a_p = _pad_to(a.contiguous(), 1, align)
    b_p = _pad_to(_pad_to(b, 1, align), 2, align)
    if b_p.stride(-1) != 1 and b_p.stride(-2) != 1:
        b_p = b_p.contiguous()  # _grouped_mm takes row- or column-major weights (w.transpose(1, 2) as is)
    if b_p.data_ptr() % _ALIGN_BYTES:  # the up half of a fused gate|up weight starts f*d elements in
        b_p = b_p.clone()
    out = torch._grouped_mm(a_p, b_p, offsets)
    return out if out.shape[1] == N else out[:, :N].contiguous()


def _torch_gmm_dw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """out[e] = a[rows of e].T @ b[rows of e] with torch._grouped_mm's variable-K (2-D x 2-D) form."""
    if a.dtype not in TRITON_DTYPES:
        return torch.stack([a[s:e].T @ b[s:e] for s, e in _bounds(offsets)])
    align = _ALIGN_BYTES // a.element_size()
    K, N = a.shape[1], b.shape[1]
    a_p = _pad_to(a.contiguous(), 1, align)
    b_p = _pad_to(b.contiguous(), 1, align)
    return torch._grouped_mm(a_p.T, b_p, offsets)[:, :K, :N].contiguous()


def _megablocks_gmm(a, b, offsets, *, trans_a=False):
    from megablocks import grouped_gemm_util as gg  # optional peer

    counts = torch.diff(
        offsets.to(torch.int64), prepend=offsets.new_zeros(1)
    ).cpu()  # its API wants host sizes
    return gg.ops.gmm(a.contiguous(), b.contiguous(), counts, trans_a=trans_a)


def _mm_loop(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The CPU engine's grouped GEMM: one ``torch.mm`` per expert straight into its rows of the output (no
    padding, no concatenation; measured up to 1.4x ``torch._grouped_mm`` for ``x @ w1`` on this CPU)."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    end = 0
    for i, (start, end) in enumerate(_bounds(offsets)):
        if end > start:
            torch.mm(a[start:end], b[i], out=out[start:end])
    out[end:].zero_()  # rows past the last expert (none when offsets end at M, as the public API checks)
    return out


def _mm_loop_dw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``out[e] = a[rows of e].T @ b[rows of e]``, one ``torch.mm`` per expert; zeros for an expert without rows."""
    out = a.new_empty(num_experts, a.shape[1], b.shape[1])
    for i, (start, end) in enumerate(_bounds(offsets)):
        if end > start:
            torch.mm(a[start:end].T, b[start:end], out=out[i])
        else:
            out[i].zero_()
    return out


def _gemm(engine: str, a, b, offsets):
    """(M, K) x (E, K, N) grouped by offsets -> (M, N), with engine triton | cpu | grouped_mm | megablocks | loop."""
    if engine == "triton":
        out = torch.empty(a.shape[0], b.shape[-1], dtype=a.dtype, device=a.device)
        _launch_grouped_mm(_PLAIN, a, b, offsets, out)
        return out
    if engine == "cpu":
        return _mm_loop(a, b, offsets)
    if engine == "grouped_mm":
        return _torch_gmm(a, b, offsets)
    if engine == "megablocks":
        return _megablocks_gmm(a, b, offsets)
    return grouped_mm_ref(a, b, offsets)


def _gemm_dw(engine: str, a, b, offsets, num_experts):
    if engine == "triton":
        out = torch.empty(num_experts, a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
        _launch_grouped_dw(a, b, offsets, out)
        return out
    if engine == "cpu":
        return _mm_loop_dw(a, b, offsets, num_experts)
    if engine == "grouped_mm":
        return _torch_gmm_dw(a, b, offsets, num_experts)
    if engine == "megablocks":
        return _megablocks_gmm(a, b, offsets, trans_a=True)
    return torch.stack([a[s:e].T @ b[s:e] for s, e in _bounds(offsets)])


def _engine(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The GEMM engine behind a backend name (the cuda/cpu backends own the permutation kernels only)."""
    if backend == "cuda":
        return "triton" if HAS_TRITON and dtype in TRITON_DTYPES else "grouped_mm"
    if backend == "cpu":
        return "cpu" if _CPU_ENGINE_KERNELS else "loop"
    if backend == "torch":
        return "loop"
    return backend  # triton, grouped_mm, megablocks


def _permute_impl(x, expert_ids, num_experts, backend):
    if backend in ("cpu", "cuda"):
        return torch.ops.sphinx_kernels.moe_permute(x, expert_ids, num_experts)
    if backend != "triton":
        return permute_ref(x, expert_ids, num_experts)
    tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # device-side sort: no host sync
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    offsets = counts.cumsum(0).to(torch.int32)
    x_sorted = torch.empty(tokens * k, x.shape[1], dtype=x.dtype, device=x.device)
    if x_sorted.numel():
        _gather_rows_kernel[(tokens * k,)](x, row_map, x_sorted, x.shape[1], k, BLOCK_D=_block_d(x.shape[1]))
    return x_sorted, row_map.view(tokens, k), offsets


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 16)), 1024)


def _unpermute_impl(y_sorted, row_map, weights, backend):
    if backend in ("cpu", "cuda"):
        return torch.ops.sphinx_kernels.moe_unpermute(y_sorted, row_map, weights)
    if backend != "triton":
        return unpermute_ref(y_sorted, row_map, weights)
    tokens, k = row_map.shape
    out = torch.empty(tokens, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    if out.numel():
        _unpermute_kernel[(tokens,)](
            y_sorted, row_map, weights, out, y_sorted.shape[1], K_SLOTS=k, BLOCK_D=_block_d(y_sorted.shape[1])
        )
    return out


# ----------------------------------------------------------------------------------------------------
# 4. Registered ops (compiled kernels, Triton and peers behind one schema each, traceable by torch.compile).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("sphinx_kernels::permute", mutates_args=())
def _permute_op(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _permute_impl(x, expert_ids, num_experts, backend)


@_permute_op.register_fake
def _(x, expert_ids, num_experts, backend):
    tokens, k = expert_ids.shape
    return (
        x.new_empty(tokens * k, x.shape[1]),
        expert_ids.new_empty(tokens, k),
        expert_ids.new_empty(num_experts, dtype=torch.int32),
    )


def _permute_setup(ctx, inputs, output):
    x, _, _, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(output[1])


def _permute_backward(ctx, grad_sorted, _grad_map, _grad_offsets):
    (row_map,) = ctx.saved_tensors
    ones = torch.ones(row_map.shape, dtype=torch.float32, device=row_map.device)
    # d x[t] = sum_j d x_sorted[row_map[t, j]]: the un-permutation with unit weights.
    return _unpermute_op(grad_sorted.contiguous(), row_map, ones, ctx.backend), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("sphinx_kernels::unpermute", mutates_args=())
def _unpermute_op(
    y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, backend: str
) -> torch.Tensor:
    return _unpermute_impl(y_sorted, row_map, weights, backend)


@_unpermute_op.register_fake
def _(y_sorted, row_map, weights, backend):
    return y_sorted.new_empty(row_map.shape[0], y_sorted.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y_sorted, row_map, weights, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(y_sorted, row_map, weights)


def _unpermute_backward(ctx, grad):
    y_sorted, row_map, weights = ctx.saved_tensors
    if ctx.backend == "cpu" and _CPU_ENGINE_KERNELS:
        grad_y, grad_w = torch.ops.sphinx_kernels.moe_unpermute_backward(
            grad.contiguous(), y_sorted, row_map, weights
        )
        return grad_y, None, grad_w.to(weights.dtype), None
    grad_y = grad_w = None
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if ctx.needs_input_grad[0]:
        # Each sorted row belongs to exactly one (token, slot): a scatter, never a sum.
        rows = (weights.to(acc).unsqueeze(-1) * grad.to(acc).unsqueeze(1)).to(y_sorted.dtype)
        grad_y = torch.empty_like(y_sorted).index_copy_(
            0, row_map.reshape(-1), rows.reshape(-1, grad.shape[1])
        )
    if ctx.needs_input_grad[2]:
        grad_w = (grad.to(acc).unsqueeze(1) * y_sorted[row_map].to(acc)).sum(-1).to(weights.dtype)
    return grad_y, None, grad_w, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


@torch.library.custom_op("sphinx_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    return _gemm(_engine(backend, x.device, x.dtype), x, w, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets, backend):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("sphinx_kernels::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    return _gemm_dw(_engine(backend, x.device, x.dtype), x, dy, offsets, offsets.shape[0])


@_grouped_mm_dw_op.register_fake
def _(x, dy, offsets, backend):
    return x.new_empty(offsets.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = (
        _grouped_mm_op(grad, w.transpose(1, 2), offsets, ctx.backend) if ctx.needs_input_grad[0] else None
    )
    grad_w = _grouped_mm_dw_op(x, grad, offsets, ctx.backend) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _cpu_experts_forward(x, w1, w3, w2, offsets, save_pre):
    """Per expert: a1 = x@w1, a3 = x@w3, h = silu(a1)*a3 (one compiled pass while a1, a3 are in cache),
    y = h@w2; every GEMM writes straight into its rows of the outputs. h lives in a scratch buffer the size of
    the largest expert group (the backward recomputes it in its fused pass), and so do a1/a3 without
    `save_pre`: the layer keeps 2 (M, f) activations for backward, not 3. Returns ``(y, h[:0], a1, a3)``."""
    M, f = x.shape[0], w1.shape[-1]
    bounds = _bounds(offsets)
    largest = max((end - start for start, end in bounds), default=0)
    y, h = x.new_empty(M, w2.shape[-1]), x.new_empty(largest, f)
    rows = M if save_pre else largest
    a1, a3 = x.new_empty(rows, f), x.new_empty(rows, f)
    end = 0
    for i, (start, end) in enumerate(bounds):
        if end == start:
            continue
        pre = slice(start, end) if save_pre else slice(0, end - start)
        torch.mm(x[start:end], w1[i], out=a1[pre])
        torch.mm(x[start:end], w3[i], out=a3[pre])
        torch.ops.sphinx_kernels.swiglu_out(a1[pre], a3[pre], h[: end - start])
        torch.mm(h[: end - start], w2[i], out=y[start:end])
    y[end:].zero_()  # rows past the last expert (none when offsets end at M, as the public API checks)
    if not save_pre:
        a1, a3 = a1.new_empty(0, f), a3.new_empty(0, f)
    elif end < M:
        a1[end:].zero_()
        a3[end:].zero_()
    return y, h[:0], a1, a3


def _cpu_experts_backward(grad, x, w1, w3, w2, offsets, a1, a3, grad_w1, grad_w3):
    """Per expert: dh = dy@w2.T, then one compiled pass gives (da1 in place of dh, da3, h), then dW2 = h.T@dy,
    dx = da1@w1.T + da3@w3.T (the second GEMM accumulates in place), dW1 = x.T@da1, dW3 = x.T@da3, written into
    the given `grad_w1`, `grad_w3` (any strides). The (rows, f) temporaries are three scratch buffers the size
    of the largest expert group, reused by every expert."""
    bounds = _bounds(offsets)
    largest = max((end - start for start, end in bounds), default=0)
    dh, da3, h = (x.new_empty(largest, w1.shape[-1]) for _ in range(3))
    grad_x = torch.empty_like(x)
    grad_w2 = w2.new_empty(w2.shape)
    end = 0
    for i, (start, end) in enumerate(bounds):
        if end == start:
            for g in (grad_w1, grad_w3, grad_w2):
                g[i].zero_()
            continue
        rows, n = slice(start, end), end - start
        dy_e, x_e, d1, d3, h_e = grad[rows], x[rows], dh[:n], da3[:n], h[:n]
        torch.mm(dy_e, w2[i].T, out=d1)
        torch.ops.sphinx_kernels.swiglu_backward_(d1, a1[rows], a3[rows], d3, h_e)  # d1: dh -> da1
        torch.mm(h_e.T, dy_e, out=grad_w2[i])
        torch.mm(d1, w1[i].T, out=grad_x[rows])
        grad_x[rows].addmm_(d3, w3[i].T)
        torch.mm(x_e.T, d1, out=grad_w1[i])
        torch.mm(x_e.T, d3, out=grad_w3[i])
    grad_x[end:].zero_()
    return grad_x, grad_w2


def _weight_grads(
    w1: torch.Tensor, w3: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad for w1 as given, its gate half, its up half)``: with a fused gate|up `w1` (`w3` None) one buffer
    in w1's own layout, so autograd hands it to the parameter as is (no zero-filled slice gradients, no
    transposing copy); otherwise a contiguous buffer per weight (w1's gradient is then its own gate half)."""
    if w3 is None:
        fused = torch.empty_like(w1)  # keeps w1's strides when w1 is dense (e.g. a transposed (E, 2f, d))
        return (fused, *_split_gate_up(fused, None))
    g1 = w1.new_empty(w1.shape)
    return g1, g1, w3.new_empty(w3.shape)


def _experts_forward(x, w1, w3, w2, offsets, engine, save_pre):
    M, f = x.shape[0], w1.shape[-1]
    if engine == "cpu":
        return _cpu_experts_forward(x, w1, w3, w2, offsets, save_pre)
    if engine == "triton":
        h = torch.empty(M, f, dtype=x.dtype, device=x.device)
        a1 = torch.empty(M if save_pre else 0, f, dtype=x.dtype, device=x.device)
        a3 = torch.empty_like(a1)
        _launch_grouped_mm(_SWIGLU_FWD, x, w1, offsets, h, b2=w3, aux1=a1, aux2=a3, save_pre=save_pre)
        return _gemm("triton", h, w2, offsets), h, a1, a3
    a1 = _gemm(engine, x, w1, offsets)
    a3 = _gemm(engine, x, w3, offsets)
    h = F.silu(a1) * a3
    if not save_pre:
        a1, a3 = a1.new_empty(0, f), a3.new_empty(0, f)
    return _gemm(engine, h, w2, offsets), h, a1, a3


@torch.library.custom_op("sphinx_kernels::moe_experts", mutates_args=())
def _moe_experts_op(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    backend: str,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w3 None: w1 is the fused gate|up weight ``(E, d, 2f)``."""
    gate, up = _split_gate_up(w1, w3)
    return _experts_forward(
        x_sorted, gate, up, w2, offsets, _engine(backend, x_sorted.device, x_sorted.dtype), save_pre
    )


@_moe_experts_op.register_fake
def _(x_sorted, w1, w3, w2, offsets, backend, save_pre):
    M, f = x_sorted.shape[0], w2.shape[1]
    pre = M if save_pre else 0
    keeps_h = _engine(backend, x_sorted.device, x_sorted.dtype) != "cpu"  # the cpu engine recomputes h
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w1, grad_w3, grad_w2)``; with a fused gate|up `w1` (w3 None) grad_w1 is the fused
    gradient and grad_w3 is empty."""
    engine = _engine(backend, x_sorted.device, x_sorted.dtype)
    grad_w1, grad_gate, grad_up = _weight_grads(w1, w3)
    grad_w3 = grad_up if w3 is not None else grad_up.new_empty(0)
    w1, w3 = _split_gate_up(w1, w3)
    if engine == "cpu":
        grad_x, grad_w2 = _cpu_experts_backward(
            grad, x_sorted, w1, w3, w2, offsets, a1, a3, grad_gate, grad_up
        )
        return grad_x, grad_w1, grad_w3, grad_w2
    E = w1.shape[0]
    grad_w2 = _gemm_dw(engine, h, grad, offsets, E)
    if engine == "triton":
        da1, da3 = torch.empty_like(a1), torch.empty_like(a3)
        # dh = grad @ w2[e].T with the SwiGLU derivative in the epilogue: dh never reaches memory.
        _launch_grouped_mm(_SWIGLU_BWD, grad, w2.transpose(1, 2), offsets, da1, out2=da3, aux1=a1, aux2=a3)
        grad_x = torch.empty_like(x_sorted)
        _launch_grouped_mm(_DUAL, da1, w1.transpose(1, 2), offsets, grad_x, a2=da3, b2=w3.transpose(1, 2))
        _launch_grouped_dw(x_sorted, da1, offsets, grad_gate, b2=da3, out2=grad_up)
        return grad_x, grad_w1, grad_w3, grad_w2
    dh = _gemm(engine, grad, w2.transpose(1, 2), offsets)
    # Elementwise SwiGLU backward: silu_backward is one fused pass. Each (M, f) temporary is dropped as soon
    # as it is consumed: on the CPU fresh large buffers cost page faults (~7% of the layer at d 512, f 1792).
    da3 = dh * F.silu(a1)
    da1 = torch.ops.aten.silu_backward(dh.mul_(a3), a1)
    del dh
    grad_x = _gemm(engine, da1, w1.transpose(1, 2), offsets)
    grad_gate.copy_(_gemm_dw(engine, x_sorted, da1, offsets, E))
    del da1
    grad_x.add_(_gemm(engine, da3, w3.transpose(1, 2), offsets))
    grad_up.copy_(_gemm_dw(engine, x_sorted, da3, offsets, E))
    return grad_x, grad_w1, grad_w3, grad_w2


@_moe_experts_bwd_op.register_fake
def _(grad, x_sorted, w1, w3, w2, offsets, h, a1, a3, backend):
    grad_w1 = _weight_grads(w1, w3)[0]
    grad_w3 = w3.new_empty(w3.shape) if w3 is not None else w1.new_empty(0)
    return torch.empty_like(x_sorted), grad_w1, grad_w3, w2.new_empty(w2.shape)


def _moe_experts_setup(ctx, inputs, output):
    x_sorted, w1, w3, w2, offsets, backend, save_pre = inputs
    _, h, a1, a3 = output
    ctx.backend = backend
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
        grad.contiguous(), x_sorted, w1, w3, w2, offsets, h, a1, a3, ctx.backend
    )
    return grad_x, grad_w1, None if w3 is None else grad_w3, grad_w2, None, None, None


_moe_experts_op.register_autograd(_moe_experts_backward, setup_context=_moe_experts_setup)


if _backend.extension_has_kernel("moe_permute", "CPU") or _backend.extension_has_kernel(
    "moe_permute", "CUDA"
):

    @torch.library.register_fake("sphinx_kernels::moe_permute")
    def _(x, expert_ids, num_experts):
        tokens, k = expert_ids.shape
        return (
            x.new_empty(tokens * k, x.shape[1]),
            expert_ids.new_empty(tokens, k),
            expert_ids.new_empty(num_experts, dtype=torch.int32),
        )

    @torch.library.register_fake("sphinx_kernels::moe_unpermute")
    def _(y_sorted, row_map, weights):
        return y_sorted.new_empty(row_map.shape[0], y_sorted.shape[1])


if _CPU_ENGINE_KERNELS:

    @torch.library.register_fake("sphinx_kernels::swiglu_out")
    def _(a1, a3, h):
        return None

    @torch.library.register_fake("sphinx_kernels::swiglu_backward_")
    def _(dh, a1, a3, da3, h):
        return None

    @torch.library.register_fake("sphinx_kernels::moe_unpermute_backward")
    def _(grad, y_sorted, row_map, weights):
        return torch.empty_like(y_sorted), torch.empty_like(weights)


# ----------------------------------------------------------------------------------------------------
# 5. Public functions.
# ----------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: object, dim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_like_x(name: str, t: object, dim: int, x: torch.Tensor) -> None:
    _check_tensor(name, t, dim, FLOAT_DTYPES)
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_expert_weights(x: torch.Tensor, w1: object, w3: object, w2: object, num_experts: int) -> None:
    """w1, w3 ``(E, d, f)`` (or w3 None and w1 the fused gate|up ``(E, d, 2f)``) and w2 ``(E, f, d)``, all of
    x's dtype and device."""
    for name, t in (("w1", w1), ("w3", w3), ("w2", w2)):
        if not (name == "w3" and t is None):
            _check_like_x(name, t, 3, x)
    E, d = num_experts, x.shape[1]
    if w3 is None:
        if w1.shape[0] != E or w1.shape[1] != d or w1.shape[2] % 2:
            raise ValueError(
                f"w1 with w3=None is the fused gate|up weight: shape (E={E}, d={d}, 2f), got {tuple(w1.shape)}"
            )
        f = w1.shape[2] // 2
    elif w1.shape[0] != E or w1.shape[1] != d:
        raise ValueError(f"w1 must have shape (E={E}, d={d}, f), got {tuple(w1.shape)}")
    else:
        f = w1.shape[2]
    if w3 is not None and tuple(w3.shape) != (E, d, f):
        raise ValueError(f"w3 must have w1's shape {(E, d, f)}, got {tuple(w3.shape)}")
    if tuple(w2.shape) != (E, f, d):
        raise ValueError(f"w2 must have shape (E={E}, f={f}, d={d}), got {tuple(w2.shape)}")


def _check_expert_ids(expert_ids: torch.Tensor, tokens: int, num_experts: int) -> None:
    _check_tensor("expert_ids", expert_ids, 2, (torch.int64, torch.int32))
    if expert_ids.shape[0] != tokens:
        raise ValueError(f"expert_ids has {expert_ids.shape[0]} rows but x has {tokens} tokens")
    # Range check only where it costs no device sync (CPU tensors, eager).
    if expert_ids.device.type == "cpu" and expert_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")


def _check_offsets(offsets: object, rows: int, num_experts: int, device: torch.device) -> None:
    _check_tensor("offsets", offsets, 1, (torch.int32,))
    if offsets.shape[0] != num_experts:
        raise ValueError(f"offsets must have one entry per expert ({num_experts}), got {offsets.shape[0]}")
    if offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device} but x is on {device}")
    # Contents only where that costs no device sync (CPU tensors, eager); permute() always produces valid ones.
    if offsets.device.type == "cpu" and num_experts and not torch.compiler.is_compiling():
        if bool((offsets.diff() < 0).any()) or int(offsets[0]) < 0:
            raise ValueError(f"offsets must be non-decreasing and >= 0, got {offsets.tolist()}")
        if int(offsets[-1]) != rows:
            raise ValueError(f"offsets must end at the number of rows of x ({rows}), got {int(offsets[-1])}")


def _check_top_k(top_k: object, num_experts: int, expert_mask: torch.Tensor | None) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    active = num_experts
    if expert_mask is not None:
        _check_tensor("expert_mask", expert_mask, 1, (torch.bool,))
        if expert_mask.shape[0] != num_experts:
            raise ValueError(f"expert_mask must have shape ({num_experts},), got {tuple(expert_mask.shape)}")
        if not torch.compiler.is_compiling():
            active = int(expert_mask.sum())  # one host read of E booleans, only when a mask is given
    if not 1 <= top_k <= active:
        raise ValueError(f"top_k must be in 1..{active} (the unpruned experts), got {top_k}")


def route(
    router_logits: torch.Tensor, top_k: int, *, expert_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: fp32 softmax over experts, top-k, weights renormalised to sum 1 (Mixtral).

    Args:
        router_logits: float ``(T, E)``.
        top_k: experts per token, 1..(unpruned experts); may differ from training.
        expert_mask: optional bool ``(E,)``; False prunes an expert (never chosen).

    Returns:
        ``(weights, expert_ids)``: float32 ``(T, top_k)`` summing to 1 per token, int64 ``(T, top_k)``.
    """
    _check_tensor("router_logits", router_logits, 2, FLOAT_DTYPES)
    _check_top_k(top_k, router_logits.shape[1], expert_mask)
    weights, ids, _ = route_ref(router_logits, top_k, expert_mask=expert_mask)
    return weights, ids


def _select(device: torch.device, backend: str | None) -> str:
    return _backend.select("moe", BACKENDS, device, op="moe_permute", backend=backend)


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``T*k`` (token, slot) rows by expert, stable within an expert. Differentiable in `x`.

    Args:
        x: ``(T, d)`` float. expert_ids: int64/int32 ``(T, k)`` in ``[0, num_experts)``.

    Returns:
        ``(x_sorted, row_map, offsets)``: `x_sorted` ``(T*k, d)`` (``x_sorted[row_map[t, j]] == x[t]``
        bit-exactly), `row_map` int64 ``(T, k)``, `offsets` int32 ``(E,)`` cumulative ends, on x's device.
    """
    _check_tensor("x", x, 2, FLOAT_DTYPES)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    _check_expert_ids(expert_ids, x.shape[0], num_experts)
    if expert_ids.device != x.device:
        raise ValueError(f"expert_ids is on {expert_ids.device} but x is on {x.device}")
    chosen = _select(x.device, backend)
    expert_ids = expert_ids.to(torch.int64).contiguous()
    if chosen == "torch":
        return permute_ref(x, expert_ids, num_experts)
    return _permute_op(x.contiguous(), expert_ids, num_experts, _permute_backend(chosen))


def _permute_backend(chosen: str) -> str:
    # Peers own GEMMs, not the permutation: megablocks/grouped_mm permute with the PyTorch sort.
    return chosen if chosen in ("cpu", "cuda", "triton") else "torch"


def unpermute(
    y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Weighted sum of each token's k expert rows: ``out[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]]``.

    Args:
        y_sorted: ``(T*k, d)`` float. row_map: int64 ``(T, k)`` from `permute`. weights: float ``(T, k)``
            (used in float32). Differentiable in `y_sorted` and `weights`.

    Returns:
        ``(T, d)`` of y_sorted's dtype, accumulated in float32.
    """
    _check_tensor("y_sorted", y_sorted, 2, FLOAT_DTYPES)
    _check_tensor("row_map", row_map, 2, (torch.int64,))
    _check_tensor("weights", weights, 2, FLOAT_DTYPES)
    if weights.shape != row_map.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have row_map's shape {tuple(row_map.shape)}")
    if row_map.numel() != y_sorted.shape[0]:
        raise ValueError(f"y_sorted must have T*k = {row_map.numel()} rows, got {y_sorted.shape[0]}")
    chosen = _select(y_sorted.device, backend)
    if chosen == "torch":
        return unpermute_ref(y_sorted, row_map, weights)
    w = weights.to(torch.float32).contiguous()
    return _unpermute_op(y_sorted.contiguous(), row_map.contiguous(), w, _permute_backend(chosen))


def _check_gemm_dtype(chosen: str, dtype: torch.dtype) -> None:
    if chosen == "triton" and dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton backend runs float32/float16/bfloat16, got {dtype}")


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Grouped GEMM: ``y[rows of group e] = x[rows of group e] @ w[e]``. Differentiable in `x` and `w`.

    Args:
        x: ``(M, K)`` float, rows grouped by expert. w: ``(E, K, N)`` of x's dtype.
        offsets: int32 ``(E,)`` cumulative group ends (non-decreasing, ``offsets[-1] == M``).
        backend: ``"triton" | "grouped_mm" | "megablocks" | "cuda" | "cpu" | "torch"``; default: automatic.

    Returns:
        ``(M, N)`` of x's dtype (fp32 accumulation).
    """
    _check_tensor("x", x, 2, FLOAT_DTYPES)
    _check_tensor("w", w, 3, FLOAT_DTYPES)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must have shape (E, K={x.shape[1]}, N), got {tuple(w.shape)}")
    if w.device != x.device:
        raise ValueError(f"w is on {w.device} but x is on {x.device}")
    _check_offsets(offsets, x.shape[0], w.shape[0], x.device)
    chosen = _select(x.device, backend)
    _check_gemm_dtype(chosen, x.dtype)
    if chosen == "torch":
        return grouped_mm_ref(x, w, offsets)
    return _grouped_mm_op(x.contiguous(), w, offsets.contiguous(), chosen)


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
        x: ``(T, d)`` float32/float16/bfloat16 (float64 on the torch/cpu/grouped_mm backends).
        router_weight: ``(E, d)`` (bias-free gate, logits ``x @ router_weight.T``, fp32 softmax).
        w1, w3: ``(E, d, f)``, or w3 None and w1 the fused gate|up weight ``(E, d, 2f)`` (gate ``w1[..., :f]``,
            up ``w1[..., f:]``; its gradient comes as one tensor); w2: ``(E, f, d)``; all of x's dtype and device.
        top_k: experts per token, 1..(unpruned experts). expert_mask: optional bool ``(E,)``, False = pruned.
        backend: ``"cuda" | "megablocks" | "triton" | "grouped_mm" | "cpu" | "torch"``; default: automatic.

    Returns:
        ``(out, aux)``: `out` ``(T, d)`` of x's dtype; `aux` a `MoEAux` (router probs, expert ids, tokens per
        expert, load-balancing loss). Differentiable in x, router_weight, w1, w3, w2 (and through the loss).
    """
    _check_tensor("x", x, 2, FLOAT_DTYPES)
    _check_like_x("router_weight", router_weight, 2, x)
    E = router_weight.shape[0]
    if router_weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"router_weight must have shape (E, d={x.shape[1]}), got {tuple(router_weight.shape)}"
        )
    _check_expert_weights(x, w1, w3, w2, E)
    _check_top_k(top_k, E, expert_mask)
    chosen = _select(x.device, backend)
    _check_gemm_dtype(chosen, x.dtype)
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
            comes as one tensor in w1's layout, no slice gradients); w2: ``(E, f, d)``; x's dtype and device;
            any strides (e.g. transposed views of ``(E, f, d)`` checkpoints).

    Returns:
        ``(T, d)`` of x's dtype. Differentiable in x, weights, w1, w3, w2.
    """
    _check_tensor("x", x, 2, FLOAT_DTYPES)
    _check_tensor("w1", w1, 3, FLOAT_DTYPES)  # its shape gives E; the full check follows
    E, tokens = w1.shape[0], x.shape[0]
    _check_expert_weights(x, w1, w3, w2, E)
    _check_expert_ids(expert_ids, tokens, E)
    _check_tensor("weights", weights, 2, FLOAT_DTYPES)
    if weights.shape != expert_ids.shape:
        raise ValueError(
            f"weights {tuple(weights.shape)} must have expert_ids' shape {tuple(expert_ids.shape)}"
        )
    chosen = _select(x.device, backend)
    _check_gemm_dtype(chosen, x.dtype)
    ids = expert_ids.to(torch.int64).contiguous()
    if chosen == "torch":
        return moe_experts_ref(x, ids, weights, w1, w3, w2)
    return _routed_experts(x, ids, weights.to(torch.float32).contiguous(), w1, w3, w2, chosen)[0]


def _routed_experts(x, ids, weights, w1, w3, w2, chosen) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute, SwiGLU experts, weighted unpermute on a kernel backend; returns ``(out, offsets)``."""
    x_sorted, row_map, offsets = _permute_op(x.contiguous(), ids, w1.shape[0], _permute_backend(chosen))
    leaves = (x, w1, w2) if w3 is None else (x, w1, w3, w2)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    y_sorted, _, _, _ = _moe_experts_op(x_sorted, w1, w3, w2, offsets, chosen, save_pre)
    return _unpermute_op(y_sorted, row_map, weights, _permute_backend(chosen)), offsets
