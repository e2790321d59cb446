"""sphinx-kernels as an accelerated backend for Hugging Face transformers.

    import sphinx_kernels.integrations.transformers  # registers "sphinx" (idempotent)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sphinx", experts_implementation="sphinx")

or, for a model already built, ``apply_sphinx_kernels(model)`` / ``revert_sphinx_kernels(model)``.

Attention: "sphinx" is registered in transformers' ``AttentionInterface`` with the mask convention of
flash-attention (``AttentionMaskInterface``: no mask, or the 2-D padding mask), so every batch reaches our
varlen kernel without padding: a padded batch is unpadded with the mask (left or right padding alike), a
packed batch from ``DataCollatorWithFlattening`` (batch of 1, position ids restarting per sequence, or its
``cu_seq_lens_q`` kwargs) is split at the restarts, as transformers' own flash-attention path does.
Decoding with a KV cache (queries shorter than keys) stays on PyTorch SDPA with the bottom-right causal
mask, one batched call over the padded cache (``varlen_attention`` with ``cu_seqlens_k`` computes the same
on packed caches; this path has not been measured against it on a GPU yet).

Experts: "sphinx" in ``ExpertsInterface`` runs gated experts (Mixtral, Qwen-MoE, ...) on our permutation
and grouped SwiGLU GEMMs (`sphinx_kernels.moe_experts`) straight on the checkpoint's weight layout; layouts
it does not cover (biases, interleaved gate/up, post-expert norms, expert parallelism) run transformers'
``grouped_mm`` experts.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sphinx_kernels.attention import varlen_attention
from sphinx_kernels.moe import moe_experts

logger = logging.getLogger(__name__)

NAME = "sphinx"

__all__ = ["NAME", "SphinxKernelsState", "apply_sphinx_kernels", "register", "revert_sphinx_kernels"]


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def _cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed position ids (one row, restarting at 0 per sequence) -> int32 ``(B+1,)`` boundaries."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = F.pad(starts, (1, 0))  # a row that does not start at 0 still starts a sequence
    ends = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts, ends]).to(torch.int32)


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Boundaries of a packed row (position ids restarting after the first token), else None."""
    if position_ids.shape[-1] < 2 or not bool((position_ids[0, 1:] == 0).any()):
        return None
    return _cu_seqlens_from_position_ids(position_ids)


def _unpadding(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the real tokens and their int32 boundaries, from a boolean ``(B, S)`` mask."""
    index = torch.nonzero(mask.reshape(-1)).reshape(-1)
    return index, _cu_seqlens_from_lengths(mask.sum(dim=1, dtype=torch.int32))


# Every layer of one forward receives the same mask / position-ids tensor: derive the token layout (and
# its device read-backs) once per tensor, not once per layer, and hand the kernel one cu_seqlens tensor
# (whose value checks are also once per tensor). `_version` catches in-place edits.
# Keyed by identity (tensors compare elementwise), dropped when the tensor dies.
_layouts: dict[int, tuple[object, object]] = {}


def _layout(source: torch.Tensor, key: object, build):
    if torch.compiler.is_compiling():
        return build()
    stamp = (key, source._version)
    entry = _layouts.get(id(source))
    if entry is None or entry[0] != stamp:
        if entry is None:
            weakref.finalize(source, _layouts.pop, id(source), None)
        entry = (stamp, build())
        _layouts[id(source)] = entry
    return entry[1]


def _sdpa_with_cache(query, key, value, attention_mask, scaling, is_causal):
    """Queries shorter than keys (KV-cache decoding): the queries are the last q_len positions."""
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if is_causal:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        mask = q_pos[:, None] >= torch.arange(kv_len, device=query.device)[None, :]
    if attention_mask is not None:
        padding = attention_mask[:, None, None, -kv_len:].bool()
        mask = padding if mask is None else mask[None, None] & padding
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    if attention_mask is not None:  # a query at a padded position has nothing to attend to
        out = out.nan_to_num(0.0)
    return out.transpose(1, 2)


def sphinx_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `query` ``(B, Hq, S, D)``, `key`/`value` ``(B, Hkv, S_kv, D)``,
    `attention_mask` None or the 2-D ``(B, S_kv)`` padding mask. Returns ``((B, S, Hq, D), None)``."""
    if dropout and module.training:
        raise NotImplementedError("attn_implementation='sphinx' has no attention dropout; set it to 0")
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='sphinx' supports neither logit softcapping nor sinks")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    # A window at least as long as every sequence changes nothing (Mistral's 4096 on shorter batches).
    if sliding_window is not None and kv_len > sliding_window:
        raise NotImplementedError(
            f"attn_implementation='sphinx' has no sliding-window attention (window {sliding_window} < "
            f"{kv_len} keys)"
        )
    if q_len != kv_len:
        return _sdpa_with_cache(query, key, value, attention_mask, scaling, is_causal), None

    # (B, H, S, D) -> (B, S, H, D): the token-major layout of the varlen kernel.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    given = kwargs.get("cu_seq_lens_q")  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None:
        index, cu_seqlens = _layout(
            attention_mask, kv_len, lambda: _unpadding(attention_mask[:, -kv_len:].bool())
        )
        max_seqlen = q_len  # an upper bound is allowed: no device read-back, no graph break
        flat = [t.reshape(batch * q_len, *t.shape[2:]).index_select(0, index) for t in (q, k, v)]
        out = varlen_attention(*flat, cu_seqlens, max_seqlen, causal=is_causal, softmax_scale=scaling)
        padded = out.new_zeros(batch * q_len, heads, head_dim).index_copy(0, index, out)
        return padded.view(batch, q_len, heads, head_dim), None
    cu_seqlens = None
    if given is not None and batch == 1:
        cu_seqlens = _layout(given, None, lambda: given.to(device=q.device, dtype=torch.int32))
    elif position_ids is not None and batch == 1:
        cu_seqlens = _layout(position_ids, None, lambda: _packed_cu_seqlens(position_ids))
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (batch + 1) * q_len, q_len, device=q.device, dtype=torch.int32)
    max_seqlen = int(kwargs.get("max_length_q") or q_len)
    flat = [t.reshape(batch * q_len, *t.shape[2:]) for t in (q, k, v)]
    out = varlen_attention(*flat, cu_seqlens, max_seqlen, causal=is_causal, softmax_scale=scaling)
    return out.view(batch, q_len, heads, head_dim), None


# ----------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------


def _fallback_experts():
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward


def sphinx_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts function: `hidden_states` ``(T, d)``, `top_k_index`/`top_k_weights` ``(T, k)``."""
    covered = (
        getattr(self, "has_gate", True)
        and not getattr(self, "has_bias", False)
        and not getattr(self, "has_post_expert_norm", False)
        and getattr(self, "is_concatenated", True)
        and not getattr(self, "_is_expert_parallel", False)
        and getattr(self, "act_fn", None) is not None
        and _is_silu(self.act_fn)
    )
    if not covered:
        return _fallback_experts()(self, hidden_states, top_k_index, top_k_weights)
    gate_up, down = self.gate_up_proj, self.down_proj
    if getattr(self, "is_transposed", False):  # (E, d, 2f) and (E, f, d): our layout already
        w13, w2 = gate_up, down
    else:  # (E, 2f, d) and (E, d, f): nn.Linear layout, used through transposed views (no copy)
        w13, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
    x = hidden_states.to(gate_up.dtype)
    # The fused gate|up weight goes in whole (w3=None): its gradient comes back as one tensor in the
    # parameter's layout, not as two slice gradients zero-filled to full size and summed.
    out = moe_experts(x, top_k_index, top_k_weights.to(x.dtype), w13, None, w2)
    return out.to(hidden_states.dtype)


def _is_silu(act: object) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


# ----------------------------------------------------------------------------------------------------
# Registration and application
# ----------------------------------------------------------------------------------------------------

_registered = False


def register() -> bool:
    """Add "sphinx" to transformers' attention, mask and experts interfaces (idempotent).

    Returns True when the experts interface exists (transformers >= 5) and "sphinx" was added to it too.
    """
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, sphinx_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        if not _registered:
            logger.warning("this transformers has no ExpertsInterface: 'sphinx' accelerates attention only")
        _registered = True
        return False
    ExpertsInterface.register(NAME, sphinx_experts_forward)
    _registered = True
    return True


@dataclass
class SphinxKernelsState:
    """What `apply_sphinx_kernels` replaced, for `revert_sphinx_kernels`."""

    attn_implementation: str | dict | None
    experts_implementation: str | dict | None


def apply_sphinx_kernels(
    model: torch.nn.Module, *, attention: bool = True, experts: bool = True
) -> SphinxKernelsState:
    """Switch a built transformers model to the "sphinx" attention and experts; returns what it replaced."""
    has_experts = register()
    state = SphinxKernelsState(
        model.config._attn_implementation,
        model.get_experts_implementation() if hasattr(model, "get_experts_implementation") else None,
    )
    if attention:
        model.set_attn_implementation(NAME)
    if experts and has_experts and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(NAME)
    return state


def revert_sphinx_kernels(model: torch.nn.Module, state: SphinxKernelsState) -> None:
    """Restore the implementations `apply_sphinx_kernels` replaced."""
    if state.attn_implementation is not None:
        model.set_attn_implementation(state.attn_implementation)
    if state.experts_implementation is not None and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(state.experts_implementation)


register()
