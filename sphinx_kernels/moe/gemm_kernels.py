"""Triton grouped GEMM kernels of the MoE family and their launchers.

`_grouped_mm_kernel`: rows grouped by expert times per-expert weights, tiles that never straddle two experts
(the tile -> (expert, first row) schedule is derived inside the kernel from the device-side offsets), on a
persistent grid on the GPU, with four epilogues (plain, SwiGLU forward, SwiGLU backward, a sum of two
GEMMs) so the schedule exists once. `_grouped_dw_kernel`: the weight gradients, a grouped GEMM over a
variable reduction (each expert's rows). Launches run on the inputs' GPU (``on_device``).
"""

from __future__ import annotations

import functools

import torch

from sphinx_kernels import _backend
from sphinx_kernels._common import dot_precision, on_device
from sphinx_kernels._triton import HAS_TRITON, tl, triton

PLAIN, SWIGLU_FWD, SWIGLU_BWD, DUAL = 0, 1, 2, 3


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

    MODE PLAIN:      out = a @ b[e]
    MODE SWIGLU_FWD: a1 = a @ b[e], a3 = a @ b2[e]; out = silu(a1) * a3; aux1, aux2 = a1, a3 if SAVE_PRE
    MODE SWIGLU_BWD: g = a @ b[e] (dh); with aux1, aux2 = a1, a3: out = d a1, out2 = d a3
    MODE DUAL:       out = a @ b[e] + a2 @ b2[e]   (a2 strided like a)
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
            # Last: the one that fits every mode and dtype in shared memory (fp32 DUAL streams four tiles per
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
# Launchers: outputs are the caller's (preallocated, contiguous (M, N) / any-strided dW); every launch runs
# on a's GPU, not the current one.
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_grouped_mm(
    mode, a, b, offsets, out, *, a2=None, b2=None, out2=None, aux1=None, aux2=None, save_pre=False
) -> None:
    """`_grouped_mm_kernel` in `mode` (PLAIN, SWIGLU_FWD, SWIGLU_BWD, DUAL) on a ``(M, K)``, b ``(E, K, N)``."""
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
        PRECISION=dot_precision(a.dtype),
        E_BLOCK=max(16, triton.next_power_of_2(E)),
    )
    if _backend.triton_interpreting() or a.device.type != "cuda":
        # The interpreter runs programs one after another: few, large-ish tiles and one work item each.
        bm, bn, bk = 16, 32, 32
        total = (triton.cdiv(M, bm) + E) * triton.cdiv(N, bn)
        with on_device(a):
            _grouped_mm_kernel[(total,)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
        return
    sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())

    def grid(m):
        return (min(sms, (triton.cdiv(M, m["BLOCK_M"]) + E) * triton.cdiv(N, m["BLOCK_N"])),)

    with on_device(a):
        _grouped_mm_tuned[grid](*args, **meta)


def launch_grouped_dw(a, b, offsets, out, *, b2=None, out2=None) -> None:
    """`_grouped_dw_kernel`: ``out[e] = a[rows of e].T @ b[rows of e]`` (and out2 with b2), out ``(E, K, N)``."""
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
    meta = dict(DUAL=dual, PRECISION=dot_precision(a.dtype))
    if _backend.triton_interpreting() or a.device.type != "cuda":
        bm, bn, bk = 16, 32, 32
        grid = (E, triton.cdiv(K, bk) * triton.cdiv(N, bn))
        with on_device(a):
            _grouped_dw_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return

    def grid(m):
        return (E, triton.cdiv(K, m["BLOCK_K"]) * triton.cdiv(N, m["BLOCK_N"]))

    with on_device(a):
        _grouped_dw_tuned[grid](*args, **meta)
