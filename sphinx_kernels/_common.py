"""Helpers shared by the kernel families: matmul precision, launching on the inputs' device, and small caches
keyed by a tensor's identity and in-place version."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of `dtype`: fp32 stays IEEE (TF32 would silently cost
    ~3 decimal digits against the fp32 contract); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def common_device(**tensors: torch.Tensor | None) -> torch.device:
    """The one device of the named tensors (None entries ignored); a clear error naming them if they differ."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    if not named:
        raise ValueError("common_device needs at least one tensor")
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}: every input must be on one device"
            )
    return first.device


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one: Triton and our CUDA launches use the current device,
    so a tensor on ``cuda:1`` with the current device ``cuda:0`` would otherwise run on the wrong GPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def version_of(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which have none (asked
    first: a caught RuntimeError costs ~11 us per call, paid in every layer of a decode step)."""
    return None if t.is_inference() else t._version


class IdentityCache:
    """Values derived from a tensor, remembered for the last `size` tensors by identity and in-place version.

    Every layer of a model step receives the same boundary tensors (``cu_seqlens``, expert offsets), so
    work derived from them (value checks with a host sync, schedule tables) is done once per step, not
    once per layer. Weak references: the cache never keeps a tensor alive. Inference-mode tensors (no
    version counter) are never cached.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: list[tuple[weakref.ref, int, dict]] = []

    def get(self, t: torch.Tensor, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its remembered result for this very tensor (same version) and `key`."""
        version = version_of(t)
        if version is None:
            return compute()
        table = next((tab for ref, seen, tab in self._entries if ref() is t and seen == version), None)
        if table is None:
            table = {}
            self._entries = (
                [e for e in self._entries if e[0]() is not t][-(self.size - 1) :] if self.size > 1 else []
            )
            self._entries.append((weakref.ref(t), version, table))
        if key not in table:
            table[key] = compute()
        return table[key]
