"""Input validation and backend choice for the whole MoE family: the one place where arguments are checked
(``TypeError`` / ``ValueError`` naming the argument) and where a backend name becomes its engines.

A backend name means one pair of engines, whatever the device or dtype (``ENGINES``); dtypes a backend's
GEMM engine cannot run are refused (forced) or skipped (automatic choice), never routed elsewhere quietly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sphinx_kernels import _backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOW_AND_FP32 = (torch.float32, torch.float16, torch.bfloat16)

# Automatic order: on CUDA tensors "cuda" (compiled permutation + Triton GEMMs), then the peers; on CPU
# tensors "cpu" (compiled permutation, per-expert GEMMs, fused SwiGLU) before the plain "grouped_mm" peer.
BACKENDS = ("cuda", "megablocks", "triton", "cpu", "grouped_mm", "torch")


class Engines(NamedTuple):
    """What runs behind a backend name.

    permute: ``extension`` (compiled moe_permute / moe_unpermute), ``triton`` (Triton row copies after a
        device-side sort) or ``sort`` (the reference's device-side sort and indexing).
    gemm: ``triton`` (grouped GEMMs, fused SwiGLU epilogues), ``mm_loop`` (one ``torch.mm`` per expert into
        preallocated outputs + the compiled SwiGLU passes), ``grouped_mm`` (``torch._grouped_mm``),
        ``megablocks`` (grouped_gemm's CUTLASS/cuBLAS kernels) or ``loop`` (the reference loop).
    dtypes: what the GEMM engine runs.
    """

    permute: str
    gemm: str
    dtypes: tuple[torch.dtype, ...]


ENGINES = {
    "cuda": Engines("extension", "triton", LOW_AND_FP32),
    "megablocks": Engines("sort", "megablocks", (torch.bfloat16,)),  # grouped_gemm is bf16-only
    "triton": Engines("triton", "triton", LOW_AND_FP32),
    "cpu": Engines("extension", "mm_loop", FLOAT_DTYPES),
    "grouped_mm": Engines("sort", "grouped_mm", LOW_AND_FP32),  # torch._grouped_mm has no float64
    "torch": Engines("sort", "loop", FLOAT_DTYPES),
}


def select(device: torch.device, dtype: torch.dtype | None, backend: str | None) -> str:
    """The backend for one call on tensors of `device` and `dtype` (None: data movement only, any dtype).

    The cpu backend needs the compiled SwiGLU kernels too (an extension built before them is stale: skipped
    automatically, an error when forced)."""
    op = "swiglu_out" if device.type == "cpu" else "moe_permute"
    chosen = _backend.select("moe", BACKENDS, device, op=op, backend=backend)
    if dtype is None or dtype in ENGINES[chosen].dtypes:
        return chosen
    if backend is not None or _backend._requested("moe") is not None:
        allowed = " / ".join(str(d).removeprefix("torch.") for d in ENGINES[chosen].dtypes)
        raise TypeError(f"the {chosen} backend runs {allowed}, got {dtype}")
    usable = tuple(b for b in BACKENDS if dtype in ENGINES[b].dtypes)
    return _backend.select("moe", usable, device, op=op)


def check_tensor(name: str, t: object, dim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_like_x(name: str, t: object, dim: int, x: torch.Tensor) -> None:
    check_tensor(name, t, dim, FLOAT_DTYPES)
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def check_num_experts(num_experts: object) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def check_expert_weights(x: torch.Tensor, w1: object, w3: object, w2: object, num_experts: int) -> None:
    """w1, w3 ``(E, d, f)`` (or w3 None and w1 the fused gate|up ``(E, d, 2f)``) and w2 ``(E, f, d)``, all of
    x's dtype (devices: ``common_device``)."""
    for name, t in (("w1", w1), ("w3", w3), ("w2", w2)):
        if not (name == "w3" and t is None):
            check_like_x(name, t, 3, x)
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


def check_expert_ids(expert_ids: object, tokens: int, num_experts: int) -> None:
    check_tensor("expert_ids", expert_ids, 2, (torch.int64, torch.int32))
    if expert_ids.shape[0] != tokens:
        raise ValueError(f"expert_ids has {expert_ids.shape[0]} rows but x has {tokens} tokens")
    # Range check only where it costs no device sync (CPU tensors, eager).
    if expert_ids.device.type == "cpu" and expert_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")


def check_routing_weights(weights: object, expert_ids: torch.Tensor) -> None:
    check_tensor("weights", weights, 2, FLOAT_DTYPES)
    if weights.shape != expert_ids.shape:
        raise ValueError(
            f"weights {tuple(weights.shape)} must have expert_ids' shape {tuple(expert_ids.shape)}"
        )


def check_grouped_mm_args(x: object, w: object, offsets: object) -> None:
    """x ``(M, K)`` float, w ``(E, K, N)`` of x's dtype, offsets a 1-D tensor (contents: `check_offsets`)."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w", w, 3, FLOAT_DTYPES)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must have shape (E, K={x.shape[1]}, N), got {tuple(w.shape)}")
    check_tensor("offsets", offsets, 1)


def check_unpermute_args(y_sorted: object, row_map: object, weights: object) -> None:
    """y_sorted ``(T*k, d)`` float, row_map int64 ``(T, k)``, weights float ``(T, k)``."""
    check_tensor("y_sorted", y_sorted, 2, FLOAT_DTYPES)
    check_tensor("row_map", row_map, 2, (torch.int64,))
    check_tensor("weights", weights, 2, FLOAT_DTYPES)
    if weights.shape != row_map.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have row_map's shape {tuple(row_map.shape)}")
    if row_map.numel() != y_sorted.shape[0]:
        raise ValueError(f"y_sorted must have T*k = {row_map.numel()} rows, got {y_sorted.shape[0]}")


def check_offsets(offsets: object, rows: int, num_experts: int) -> None:
    check_tensor("offsets", offsets, 1, (torch.int32,))
    if offsets.shape[0] != num_experts:
        raise ValueError(f"offsets must have one entry per expert ({num_experts}), got {offsets.shape[0]}")
    # Contents only where that costs no device sync (CPU tensors, eager); permute() always produces valid ones.
    if offsets.device.type == "cpu" and num_experts and not torch.compiler.is_compiling():
        if bool((offsets.diff() < 0).any()) or int(offsets[0]) < 0:
            raise ValueError(f"offsets must be non-decreasing and >= 0, got {offsets.tolist()}")
        if int(offsets[-1]) != rows:
            raise ValueError(f"offsets must end at the number of rows of x ({rows}), got {int(offsets[-1])}")


def check_top_k(top_k: object, num_experts: int, expert_mask: object) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    active = num_experts
    if expert_mask is not None:
        check_tensor("expert_mask", expert_mask, 1, (torch.bool,))
        if expert_mask.shape[0] != num_experts:
            raise ValueError(f"expert_mask must have shape ({num_experts},), got {tuple(expert_mask.shape)}")
        if not torch.compiler.is_compiling():
            active = int(expert_mask.sum())  # one host read of E booleans, only when a mask is given
    if not 1 <= top_k <= active:
        raise ValueError(f"top_k must be in 1..{active} (the unpruned experts), got {top_k}")
