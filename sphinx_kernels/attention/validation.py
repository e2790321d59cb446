"""Input checks of the attention family, in one place: every entry point (the public function, the registered
ops called directly, the engines) validates through these."""

from __future__ import annotations

import torch

from sphinx_kernels._common import IdentityCache

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*TRITON_DTYPES, torch.float64)
# flash-attn and our Triton kernels stop at head_dim 256 (a wider tile does not fit in registers).
MAX_KERNEL_HEAD_DIM = 256


def check_boundaries(name: str, cu: torch.Tensor, max_len, max_name: str, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (flash-attn's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (B+1,) with B >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"{max_name} must be an int, got {type(max_len).__name__}")


def check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k=None, max_seqlen_k=None) -> None:
    """Shapes, dtypes and devices (no device sync). `cu_seqlens_k` None: keys share the queries' boundaries."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (T, heads, head_dim), got {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; q, k and v must share a device"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} must have q's head_dim (q is {tuple(q.shape)}): (T, Hkv, D)")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(
            f"k {tuple(k.shape)} must have q's token count (q is {tuple(q.shape)}), or pass the keys' own "
            f"boundaries as cu_seqlens_k"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv}) (grouped-query attention)"
        )
    if q.shape[2] == 0:
        raise ValueError("head_dim must be at least 1")
    check_boundaries("cu_seqlens", cu_seqlens, max_seqlen, "max_seqlen", q.device)
    if (cu_seqlens_k is None) != (max_seqlen_k is None):
        raise ValueError("cu_seqlens_k and max_seqlen_k go together: pass both or neither")
    if cu_seqlens_k is not None:
        check_boundaries("cu_seqlens_k", cu_seqlens_k, max_seqlen_k, "max_seqlen_k", q.device)
        if cu_seqlens_k.numel() != cu_seqlens.numel():
            raise ValueError(
                f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens has {cu_seqlens.numel()}: "
                f"one key sequence per query sequence"
            )


def check_backward_args(dout, q, out, lse) -> None:
    """The extra tensors of a backward call: dout and out shaped like q, lse ``(Hq, T)``."""
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}, "
            f"lse {tuple(lse.shape)} must be (Hq, T)"
        )


# The longest sequence of the last two boundary tensors whose values passed (queries' and keys'): every layer
# of a model gets the same tensors, so a step pays one device-to-host sync per tensor, not one per layer.
_CHECKED = IdentityCache(size=2)


def check_cu_seqlens_values(
    cu_seqlens: torch.Tensor,
    num_tokens: int,
    max_seqlen: int,
    names: tuple[str, str, str] = ("cu_seqlens", "max_seqlen", "q"),
) -> None:
    """Value checks (one device-to-host copy of four scalars, skipped for a tensor checked before). `names`:
    the boundaries', the bound's and the tensor whose token count they must end at, for the messages."""
    longest = _CHECKED.get(
        cu_seqlens, (num_tokens, names), lambda: _longest_sequence(cu_seqlens, num_tokens, names)
    )
    if max_seqlen < longest:
        raise ValueError(f"{names[1]} ({max_seqlen}) is smaller than the longest sequence ({longest})")


def _longest_sequence(cu_seqlens: torch.Tensor, num_tokens: int, names: tuple[str, str, str]) -> int:
    cu_name, _, tensor_name = names
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]
    ).tolist()
    if first != 0:
        raise ValueError(f"{cu_name} must start at 0, got {cu_name}[0] = {first}")
    if shortest < 0:
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(
            f"{cu_name} must be non-decreasing, but {cu_name}[{i + 1}] = {int(cu_seqlens[i + 1])} < "
            f"{cu_name}[{i}] = {int(cu_seqlens[i])}"
        )
    if last != num_tokens:
        raise ValueError(
            f"{cu_name} must end at T = {num_tokens} ({tensor_name}.shape[0]), got {cu_name}[-1] = {last}"
        )
    return longest
