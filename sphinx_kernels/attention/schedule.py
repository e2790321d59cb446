"""The Triton kernels' work schedule and block sizes.

FA2 launches a ``(max_seqlen / BLOCK_M, B, H)`` grid, so with one long and many short documents most programs
exit at once and the long document's causal tail runs last on a few SMs. Here the (sequence, block) work items
are built on the device (no host sync), sorted by their cost, heaviest first, and the grid has only
``cdiv(T, BLOCK) + B`` items per head, so the expensive blocks start first and the cheap ones fill the tail.
"""

from __future__ import annotations

import torch

from sphinx_kernels import _backend
from sphinx_kernels._common import IdentityCache
from sphinx_kernels._triton import triton

# Work tables of the last two boundary tensors seen (the queries' and the keys'): every layer of a step shares
# them, so the ~10 small torch ops building a table run once per step, not three times per layer.
_TABLES = IdentityCache(size=2)


def work_items(
    cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int, block: int, causal: bool, keys: bool
) -> torch.Tensor:
    """int32 ``(n, 2)`` (sequence, block) work items, heaviest first, built on the device (no host sync).

    Cost of a query block m (forward, dQ): ``m + 1`` key blocks if causal, else the sequence's block count;
    of a key block n (dK/dV): ``blocks - n`` query blocks if causal, else the block count. Unused slots
    (``sequence = -1``) sort last; ``n = min(B * max_blocks, cdiv(T, block) + B)`` bounds the used ones.
    """
    batch = cu_seqlens.numel() - 1
    max_blocks = max(1, triton.cdiv(min(max_seqlen, num_tokens), block))  # a loose bound costs nothing
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    blocks = (lengths + block - 1) // block
    index = torch.arange(max_blocks, device=cu_seqlens.device, dtype=torch.int64)
    valid = index[None, :] < blocks[:, None]
    if not causal:
        cost = blocks[:, None].expand(batch, max_blocks)
    elif keys:
        cost = blocks[:, None] - index[None, :]
    else:
        cost = (index + 1)[None, :].expand(batch, max_blocks)
    cost = torch.where(valid, cost, -1).reshape(-1)
    used = min(batch * max_blocks, triton.cdiv(num_tokens, block) + batch)
    order = torch.argsort(cost, descending=True, stable=True)[:used]
    seq = torch.where(cost[order] >= 0, order // max_blocks, -1)
    return torch.stack([seq, order % max_blocks], dim=1).to(torch.int32).contiguous()


def cached_work_items(
    cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int, block: int, causal: bool, keys: bool
) -> torch.Tensor:
    """`work_items`, remembered per boundary tensor (and its in-place version)."""
    key = (max_seqlen, num_tokens, block, causal, keys)
    return _TABLES.get(
        cu_seqlens, key, lambda: work_items(cu_seqlens, max_seqlen, num_tokens, block, causal, keys)
    )


def head_block(head_dim: int) -> int:
    """tl.dot needs every dimension >= 16; other head dims are padded to a power of 2 and masked."""
    return max(16, triton.next_power_of_2(head_dim))


def blocks(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Outer and inner block sizes of the forward (``fwd_m`` x ``fwd_n``), dK/dV and dQ kernels."""
    if _backend.triton_interpreting():
        # The interpreter's cost is per block operation, not per element: 32-row blocks keep the tests'
        # sequences (up to ~100 tokens) at a few blocks each; unequal inner blocks test the edge logic.
        return {"fwd_m": 32, "fwd_n": 16, "dkdv_n": 32, "dkdv_m": 16, "dq_m": 32, "dq_n": 16}
    if head_block(head_dim) > 128 or dtype == torch.float32:
        return {"fwd_m": 64, "fwd_n": 32, "dkdv_n": 64, "dkdv_m": 32, "dq_m": 64, "dq_n": 32}
    return {"fwd_m": 128, "fwd_n": 64, "dkdv_n": 128, "dkdv_m": 32, "dq_m": 128, "dq_n": 32}
