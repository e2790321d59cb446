"""Packing of variable-length sequences into one token stream (flash-attn's varlen layout), and back.

``pack_sequences`` concatenates sequences and records the boundaries (``cu_seqlens``), the per-token positions
that restart at 0 in every sequence (for rotary embeddings) and the longest length; ``unpack`` is its inverse;
``pack_bins`` chooses which sequences share a pack: first-fit decreasing into bins of at most ``budget``
tokens (multipack-style; at most 11/9 OPT + 6/9 bins, in practice 98-99% full on a multimodal length mix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedBatch", "pack_bins", "pack_sequences", "unpack"]


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into one stream.

    Attributes:
        tokens: ``(T, ...)`` the sequences concatenated along dim 0 (their dtype and device).
        cu_seqlens: int32 ``(B+1,)`` boundaries ``0, len_0, len_0 + len_1, ..., T`` (tokens' device).
        position_ids: int64 ``(T,)`` each token's position within its own sequence (tokens' device).
        max_seqlen: the longest sequence's length (a Python int: no device read-back needed later).
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int

    @property
    def lengths(self) -> list[int]:
        """Length of every sequence, in order."""
        bounds = self.cu_seqlens.tolist()
        return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1


def pack_sequences(sequences: Sequence[torch.Tensor]) -> PackedBatch:
    """Concatenate `sequences` (each ``(L_i, ...)``, one dtype, device and trailing shape; ``L_i = 0``
    allowed) into a `PackedBatch`."""
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, Sequence):
        raise TypeError("sequences must be a list of tensors (each (L_i, ...))")
    if len(sequences) == 0:
        raise ValueError("sequences is empty: pack at least one sequence")
    first = sequences[0]
    for i, s in enumerate(sequences):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"sequences[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.dim() < 1:
            raise ValueError(f"sequences[{i}] must have at least one dimension (its length), got a scalar")
        if s.dtype != first.dtype:
            raise TypeError(f"sequences[{i}] has dtype {s.dtype} but sequences[0] has {first.dtype}")
        if s.device != first.device:
            raise ValueError(f"sequences[{i}] is on {s.device} but sequences[0] is on {first.device}")
        if s.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"sequences[{i}] has trailing shape {tuple(s.shape[1:])} but sequences[0] has "
                f"{tuple(first.shape[1:])}"
            )
    lengths = [s.shape[0] for s in sequences]
    total = sum(lengths)
    if total >= 2**31:
        raise ValueError(f"{total} tokens do not fit int32 cu_seqlens")
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    device = first.device
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(device)
    position_ids = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]).to(device)
    return PackedBatch(torch.cat(list(sequences)), cu_seqlens, position_ids, max(lengths))


def unpack(packed: torch.Tensor | PackedBatch, cu_seqlens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Split a packed ``(T, ...)`` tensor back into its sequences (views, in order).

    Args:
        packed: a `PackedBatch` (its tokens are split), or any ``(T, ...)`` tensor in the same layout (e.g.
            the attention output), together with `cu_seqlens`.
        cu_seqlens: integer ``(B+1,)`` boundaries; taken from `packed` when it is a `PackedBatch`.
    """
    if isinstance(packed, PackedBatch):
        if cu_seqlens is None:
            cu_seqlens = packed.cu_seqlens
        packed = packed.tokens
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor or a PackedBatch, got {type(packed).__name__}")
    if cu_seqlens is None:
        raise TypeError("cu_seqlens is required when packed is a tensor")
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if len(bounds) < 2:
        raise ValueError(f"cu_seqlens must have B+1 >= 2 entries, got {len(bounds)}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing: cu_seqlens[{i}] = {bounds[i]} < {bounds[i - 1]}"
            )
    if packed.dim() < 1 or bounds[-1] != packed.shape[0]:
        raise ValueError(
            f"cu_seqlens ends at {bounds[-1]} but packed has {packed.shape[0] if packed.dim() else 0} rows"
        )
    return list(torch.split(packed, [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))


def pack_bins(lengths: Sequence[int] | torch.Tensor, budget: int) -> list[list[int]]:
    """First-fit decreasing: group sequence indices into bins of at most `budget` tokens.

    Sequences are taken longest first (ties by index) and put in the first bin with room, a new bin when none
    has. Returns the bins in creation order, each a list of indices into `lengths` in placement order.
    A sequence longer than `budget` is an error naming its index.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (tokens per bin), got {budget!r}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    lengths = list(lengths)
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"lengths[{i}] must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"lengths[{i}] = {n} is negative")
        if n > budget:
            raise ValueError(f"sequence {i} has {n} tokens, more than the budget of {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(budget - n)
    return bins
