"""Plain PyTorch references of the MoE family: obviously correct, what the tests compare against, and the
``torch`` backend. `load_balancing_loss` lives here too: it is a handful of tensor ops with nothing to fuse,
so its reference is its one implementation."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


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


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stable sort of the ``T*k`` (token, slot) pairs by expert, on the device (no host sync):
    ``(order int64 (T*k,), row_map int64 (T, k), offsets int32 (E,))``; sorted row ``i`` is flat pair
    ``order[i]``, pair (t, j) is sorted row ``row_map[t, j]``."""
    tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return order, row_map.view(tokens, k), counts.cumsum(0).to(torch.int32)


def permute_ref(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of the ``T*k`` (token, slot) pairs by expert; returns ``(x_sorted, row_map, offsets)``."""
    order, row_map, offsets = sort_by_expert(expert_ids, num_experts)
    return x[order // expert_ids.shape[1]], row_map, offsets


def unpermute_ref(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]]``, accumulated in float32 (float64 for it)."""
    acc = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    gathered = y_sorted[row_map].to(acc)  # (T, k, d)
    return (weights.to(acc).unsqueeze(-1) * gathered).sum(dim=1).to(y_sorted.dtype)


def group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end)]`` row range of each expert group (a host sync: Python loops need slice bounds)."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends, strict=True))


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Loop over experts: ``y[s:e] = x[s:e] @ w[i]`` for group ``i`` spanning rows ``[s, e)``."""
    parts = [x[s:e] @ w[i] for i, (s, e) in enumerate(group_bounds(offsets))]
    tail = x.shape[0] - int(offsets[-1]) if offsets.numel() else x.shape[0]
    if tail:
        parts.append(x.new_zeros(tail, w.shape[-1]))
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def grouped_mm_dw_ref(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_mm_ref`: ``dw[i] = x[s:e].T @ dy[s:e]`` ``(E, K, N)``."""
    return torch.stack([x[s:e].T @ dy[s:e] for s, e in group_bounds(offsets)])


def load_balancing_loss(
    router_probs: torch.Tensor, expert_ids: torch.Tensor, *, expert_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style loss ``E'/(T*k) * sum_e tokens_e * mean_prob_e``; 1 for perfectly balanced routing.

    Args:
        router_probs: float ``(T, E)`` softmax of the router logits (differentiable).
        expert_ids: int64 ``(T, k)`` chosen experts (counts are not differentiable).
        expert_mask: optional bool ``(E,)``; ``E'`` is the number of unpruned experts (``E`` without a mask).

    Returns:
        float32 scalar.
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


def split_gate_up(w1: torch.Tensor, w3: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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
    w1, w3 = split_gate_up(w1, w3)
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
