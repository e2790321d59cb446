"""Top-k routing (Mixtral's: fp32 softmax over experts, top-k, weights renormalised) and the Switch-style
load-balancing loss. Both are a few tensor ops with nothing to fuse: the references are the implementations."""

from __future__ import annotations

import torch

from sphinx_kernels._common import common_device
from sphinx_kernels.moe.reference import load_balancing_loss, route_ref
from sphinx_kernels.moe.validation import FLOAT_DTYPES, check_tensor, check_top_k

__all__ = ["load_balancing_loss", "route"]


def route(
    router_logits: torch.Tensor, top_k: int, *, expert_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: fp32 softmax over experts, top-k, weights renormalised to sum 1 (Mixtral).

    Args:
        router_logits: float ``(T, E)``.
        top_k: experts per token, 1..(unpruned experts); may differ from training.
        expert_mask: optional bool ``(E,)`` on the logits' device; False prunes an expert (never chosen).

    Returns:
        ``(weights, expert_ids)``: float32 ``(T, top_k)`` summing to 1 per token, int64 ``(T, top_k)``.
    """
    check_tensor("router_logits", router_logits, 2, FLOAT_DTYPES)
    if expert_mask is not None:
        check_tensor("expert_mask", expert_mask, 1, (torch.bool,))
    common_device(router_logits=router_logits, expert_mask=expert_mask)  # before check_top_k reads the mask
    check_top_k(top_k, router_logits.shape[1], expert_mask)
    weights, ids, _ = route_ref(router_logits, top_k, expert_mask=expert_mask)
    return weights, ids
