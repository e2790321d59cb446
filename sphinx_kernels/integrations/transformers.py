"""sphinx-kernels as an accelerated backend for Hugging Face transformers.

    import sphinx_kernels.integrations.transformers  # registers "sphinx" (idempotent)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sphinx", experts_implementation="sphinx")

or, for a model already built, ``apply_sphinx_kernels(model)`` / ``revert_sphinx_kernels(model)``.

Attention: "sphinx" is registered in transformers' ``AttentionInterface`` with its own mask function in
``AttentionMaskInterface`` (`sphinx_attention_mask`), which hands each call one of two kinds of mask:

* queries and keys are the same tokens (training, a forward without cache, the prefill of a dynamic cache):
  the 2-D padding mask (or None without padding), as for flash-attention. The varlen kernel then runs without
  padding: each row's real tokens are moved to the front of the row and the row splits into three sequences
  (real queries with real keys, no query with the pad keys, the pad queries with no key), so the unpadding
  has fixed shapes (no ``torch.nonzero``, no device read-back, no graph break under ``torch.compile``) and
  any 2-D mask works, left or right padding or holes. A packed batch from ``DataCollatorWithFlattening``
  (batch of 1, position ids restarting per sequence, or its ``cu_seq_lens_q`` kwargs) is split at the
  restarts, as transformers' own flash-attention path does.
* a KV cache with past tokens, a static cache (whose key buffer is longer than the tokens written), or a
  mask pattern beyond plain causal: transformers' own SDPA mask, 4-D boolean, bounded by the cache's
  query offset; attention then runs on PyTorch SDPA over the cache layout, as "sdpa" does. A custom 4-D
  mask passed by the caller takes the same path.

Experts: "sphinx" in ``ExpertsInterface`` runs gated experts (Mixtral, Qwen-MoE, ...) on our permutation
and grouped GEMMs straight on the checkpoint's weight layout: SiLU gates (SwiGLU) on the fused
`sphinx_kernels.moe_experts`, any other gate activation (gelu, gelu_tanh, ...) or custom ``_apply_gate`` on
`permute` / `grouped_mm` / `unpermute` with the module's own gate between the GEMMs. Layouts it does not
cover (biases, interleaved gate/up, post-expert norms, no gate, expert parallelism) run transformers'
``grouped_mm`` experts, said once per reason in the log.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sphinx_kernels import grouped_mm, moe_experts, permute, unpermute, varlen_attention

logger = logging.getLogger(__name__)

NAME = "sphinx"

__all__ = [
    "NAME",
    "SphinxKernelsState",
    "apply_sphinx_kernels",
    "register",
    "revert_sphinx_kernels",
    "sphinx_attention_forward",
    "sphinx_attention_mask",
    "sphinx_experts_forward",
]


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def sphinx_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function for "sphinx" (``AttentionMaskInterface``).

    Queries and keys the same tokens (``q_length == kv_length``, no offset) with a plain causal or
    bidirectional pattern: the 2-D ``(B, kv_length)`` bool padding mask, None when nothing is padded
    (decided only outside ``torch.compile``, where reading the mask would break the graph), for the varlen
    path. Otherwise (past tokens in a cache, a static cache's preallocated keys, sliding caches, a sliding
    window or chunk shorter than the keys, extra or/and mask functions such as bidirectional image tokens):
    transformers' ``sdpa_mask``, a 4-D ``(B, 1, q_length, kv_length)`` bool mask that places the queries at
    the cache's query offset and hides unwritten slots, or None where SDPA's own rule covers it (see
    `_sdpa_attention`); attention then runs on SDPA, exactly as "sdpa" would.
    """
    local_size = kwargs.get("local_size")  # a sliding window or attention chunk
    plain = (
        q_length == kv_length
        and isinstance(kv_offset, int)
        and kv_offset == 0
        and (local_size is None or kv_length <= local_size)
        and not kwargs.get("use_vmap", False)  # create_causal_mask's sign of or/and mask functions
    )
    if plain:
        if attention_mask is None:
            return None
        mask = attention_mask[:, -kv_length:].bool()
        if mask.shape[-1] < kv_length:  # padded on the right as sdpa_mask does (prepare_padding_mask)
            mask = F.pad(mask, (0, kv_length - mask.shape[-1]))
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None
        return mask
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function if mask_function is not None else causal_mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------
# Attention: token layouts for the varlen kernel
# ----------------------------------------------------------------------------------------------------


def _unpadding(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-shape unpadding of a bool ``(B, S)`` mask (True = real token).

    Within each row the real tokens move to the front (in order) and the pads behind them. Row b, with n_b
    real tokens, becomes three sequences of the varlen kernel: ``n_b`` real queries with the ``n_b`` real
    keys (causal as usual), no query with the ``S - n_b`` pad keys, and the pad queries with no key (they
    output 0 and cost nothing). Every shape depends on B and S only.

    Returns ``(src, dest, cu_seqlens_q, cu_seqlens_k)``: int64 ``(B*S,)`` token index for each slot of the
    reordered layout and slot of each token (inverse permutations), int32 ``(3B+1,)`` boundaries each.
    """
    batch, seq = mask.shape
    device = mask.device
    real = mask.to(torch.int32)
    lengths = real.sum(dim=1, dtype=torch.int32)
    rank = torch.where(mask, real.cumsum(1) - 1, lengths[:, None] + (1 - real).cumsum(1) - 1)
    base = torch.arange(batch, device=device, dtype=torch.int32) * seq
    dest = (rank + base[:, None]).reshape(-1).to(torch.int64)
    src = torch.empty_like(dest).scatter_(0, dest, torch.arange(batch * seq, device=device))
    end = torch.full((1,), batch * seq, device=device, dtype=torch.int32)
    cu_q = torch.cat([torch.stack([base, base + lengths, base + lengths], 1).reshape(-1), end])
    cu_k = torch.cat([torch.stack([base, base + lengths, base + seq], 1).reshape(-1), end])
    return src, dest, cu_q, cu_k


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Boundaries of a packed row (one row of position ids restarting at 0 after its first token), else None.

    Exact, with device read-backs: for eager use, once per position-ids tensor (see `_layout`)."""
    flat = position_ids.reshape(-1)
    if flat.numel() < 2 or not bool((flat[1:] == 0).any()):
        return None
    starts = torch.nonzero(flat[1:] == 0).reshape(-1) + 1
    ends = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts.new_zeros(1), starts, ends]).to(torch.int32)


def _packed_cu_seqlens_static(position_ids: torch.Tensor) -> torch.Tensor:
    """`_packed_cu_seqlens` with a fixed shape, for ``torch.compile``: int32 ``(T+1,)`` where entry i is the
    first sequence start at or after token i (T past the last), so each start appears once and every other
    entry repeats one: empty sequences, which the kernels skip. One row that never restarts is one sequence."""
    flat = position_ids.reshape(-1)
    tokens = flat.numel()
    index = torch.arange(tokens, device=flat.device)
    start = (flat == 0) | (index == 0)
    candidates = torch.where(start, index, tokens)
    first_at_or_after = candidates.flip(0).cummin(0).values.flip(0)
    end = torch.full((1,), tokens, device=flat.device, dtype=first_at_or_after.dtype)
    return torch.cat([first_at_or_after, end]).to(torch.int32)


# Every layer of one forward receives the same mask / position-ids tensor: derive the token layout once per
# tensor in eager mode, not once per layer, and hand the kernel the same boundary tensors (whose value checks
# are then also once per tensor). `_version` catches in-place edits. Keyed by identity (tensors compare
# elementwise), dropped when the tensor dies. Under torch.compile the layout is part of the graph.
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


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def _check_window(sliding_window: int | None, keys: int) -> None:
    # A window at least as long as the keys changes nothing (Mistral's 4096 on shorter batches).
    if sliding_window is not None and keys > sliding_window:
        raise NotImplementedError(
            f"attn_implementation='sphinx' runs sliding-window attention (window {sliding_window} < {keys} "
            f"keys) only with the 4-D masks of its own mask function (sphinx_attention_mask); this mask "
            f"came from another one"
        )


def _sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool,
    sliding_window: int | None,
) -> torch.Tensor:
    """PyTorch SDPA over the cache layout ``(B, H, S, D)``, with transformers' "sdpa" semantics for `mask`:
    a 4-D mask (bool: True attends; float: additive) says everything; None means causal aligned top-left (a
    static cache's prefill: the keys past the queries are unwritten and dropped) for several queries, and
    every key for one query (decoding without padding). Returns ``(B, S_q, Hq, D)``."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    causal = False
    if mask is None:
        causal = is_causal and q_len > 1
        if causal and key.shape[2] > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        _check_window(sliding_window, key.shape[2])
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)  # an additive float mask made in another dtype (SDPA wants q's)
    group = heads // kv_heads
    q = query
    if group > 1 and q_len == 1 and (mask is None or mask.shape[1] == 1):
        # One query per row: its heads become query rows of their k/v head, so each cached head is read
        # once, with no repeated copy of the cache (the mask, shared by all heads, broadcasts over rows).
        q = query.reshape(batch, kv_heads, group, head_dim)
    elif group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2)


def _padding_to_4d(mask: torch.Tensor, q_len: int, kv_len: int, is_causal: bool) -> torch.Tensor:
    """A 2-D ``(B, kv_len)`` padding mask with the queries as the last `q_len` keys (a dynamic cache) ->
    the 4-D bool mask of `_sdpa_attention`. Only for masks made by another mask function than ours."""
    full = mask[:, None, None, :].bool()
    if not is_causal:
        return full
    q_pos = torch.arange(kv_len - q_len, kv_len, device=mask.device)
    visible = q_pos[:, None] >= torch.arange(kv_len, device=mask.device)[None, :]
    return full & visible[None, None]


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
    `attention_mask` None, a 2-D ``(B, S_kv)`` padding mask or a 4-D ``(B, 1, S, S_kv)`` mask (bool or
    additive float; see `sphinx_attention_mask`). Returns ``((B, S, Hq, D), None)``."""
    if dropout and module.training:
        raise NotImplementedError("attn_implementation='sphinx' has no attention dropout; set it to 0")
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='sphinx' supports neither logit softcapping nor sinks")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, q_len, head_dim = query.shape

    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"attn_implementation='sphinx' takes masks as tensors (2-D padding or 4-D), got "
            f"{type(attention_mask).__name__}"
        )
    if attention_mask is not None and attention_mask.ndim == 4:
        # A KV cache (our mask function's sdpa_mask) or a caller's custom 4-D mask: the mask says it all.
        return _sdpa_attention(query, key, value, attention_mask, scaling, is_causal, None), None
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be None, 2-D (B, S_kv) or 4-D (B, 1, S, S_kv), got shape "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask is not None:
        attention_mask = attention_mask[:, -key.shape[2] :]
        if attention_mask.shape[-1] < key.shape[2]:
            # A static cache's preallocated keys with a flash-style mask over the tokens written so far: bound
            # the keys by the mask's length, as transformers' flash-attention path does.
            key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    kv_len = key.shape[2]
    if q_len != kv_len:
        if attention_mask is None:
            return _sdpa_attention(query, key, value, None, scaling, is_causal, sliding_window), None
        _check_window(sliding_window, kv_len)
        mask4d = _padding_to_4d(attention_mask, q_len, kv_len, is_causal)
        return _sdpa_attention(query, key, value, mask4d, scaling, is_causal, None), None
    _check_window(sliding_window, kv_len)

    # (B, H, S, D) -> (B, S, H, D): the token-major layout of the varlen kernel.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if attention_mask is not None:
        src, dest, cu_q, cu_k = _layout(attention_mask, None, lambda: _unpadding(attention_mask.bool()))
        rows, cols = src // q_len, src % q_len
        # One gather per tensor from the (B, S, H, D) view straight into the reordered token rows.
        flat = [t[rows, cols] for t in (q, k, v)]
        out = varlen_attention(
            *flat, cu_q, q_len, causal=is_causal, softmax_scale=scaling, cu_seqlens_k=cu_k, max_seqlen_k=q_len
        )
        return out.index_select(0, dest).view(batch, q_len, heads, head_dim), None

    cu_seqlens = None
    max_seqlen = q_len  # an upper bound is allowed: no device read-back, no graph break
    given = kwargs.get("cu_seq_lens_q")  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    position_ids = kwargs.get("position_ids")
    if given is not None and batch == 1:
        cu_seqlens = _layout(given, None, lambda: given.to(device=q.device, dtype=torch.int32))
        if isinstance(kwargs.get("max_length_q"), int):
            max_seqlen = kwargs["max_length_q"]
    elif position_ids is not None and batch == 1 and q_len > 1:
        if torch.compiler.is_compiling():
            cu_seqlens = _packed_cu_seqlens_static(position_ids)
        else:
            cu_seqlens = _layout(position_ids, None, lambda: _packed_cu_seqlens(position_ids))
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (batch + 1) * q_len, q_len, device=q.device, dtype=torch.int32)
    flat = [t.reshape(batch * q_len, *t.shape[2:]) for t in (q, k, v)]
    out = varlen_attention(*flat, cu_seqlens, max_seqlen, causal=is_causal, softmax_scale=scaling)
    return out.view(batch, q_len, heads, head_dim), None


# ----------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------


def _fallback_experts():
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward


def _uncovered(experts: torch.nn.Module) -> str | None:
    """Why the "sphinx" experts cannot run this module's layout (None: they can)."""
    if not getattr(experts, "has_gate", True):
        return "experts without a gate"
    if getattr(experts, "has_bias", False):
        return "expert biases"
    if getattr(experts, "has_post_expert_norm", False):
        return "post-expert norms"
    if not getattr(experts, "is_concatenated", True):
        return "interleaved gate/up weights"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism"
    if getattr(experts, "act_fn", None) is None and not _custom_gate(experts):
        return "experts without act_fn"
    return None


_reported: set[tuple[str, str]] = set()


def _report_fallback(experts: torch.nn.Module, reason: str) -> None:
    key = (type(experts).__name__, reason)
    if key not in _reported:
        _reported.add(key)
        logger.warning(
            "experts_implementation='sphinx': %s of %s run transformers' grouped_mm experts (not covered: %s)",
            type(experts).__name__,
            reason,
            reason,
        )


def _custom_gate(experts: torch.nn.Module) -> bool:
    """The module's class overrides transformers' default ``_apply_gate`` (act_fn(gate) * up)."""
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is None:
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without it: only our own rule is known
        return False
    return gate is not _default_apply_gate


def _is_silu(act: object) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def sphinx_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts function: `hidden_states` ``(T, d)``, `top_k_index`/`top_k_weights` ``(T, k)``.

    SiLU gates run the fused SwiGLU experts; other activations (gelu, gelu_tanh, ...) and custom gates run
    the same permutation and grouped GEMMs with the module's own ``_apply_gate`` (or ``act_fn(gate) * up``)
    between them."""
    reason = _uncovered(self)
    if reason is not None:
        _report_fallback(self, reason)
        return _fallback_experts()(self, hidden_states, top_k_index, top_k_weights)
    gate_up, down = self.gate_up_proj, self.down_proj
    if getattr(self, "is_transposed", False):  # (E, d, 2f) and (E, f, d): our layout already
        w13, w2 = gate_up, down
    else:  # (E, 2f, d) and (E, d, f): nn.Linear layout, used through transposed views (no copy)
        w13, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
    x = hidden_states.to(gate_up.dtype)
    weights = top_k_weights.to(x.dtype)
    if not _custom_gate(self) and _is_silu(self.act_fn):
        # The fused gate|up weight goes in whole (w3=None): its gradient comes back as one tensor in the
        # parameter's layout, not as two slice gradients zero-filled to full size and summed.
        out = moe_experts(x, top_k_index, weights, w13, None, w2)
    else:
        x_sorted, row_map, offsets = permute(x, top_k_index, w13.shape[0])
        gate_up_out = grouped_mm(x_sorted, w13, offsets)
        if _custom_gate(self):
            hidden = self._apply_gate(gate_up_out)
        else:
            gate, up = gate_up_out.chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up
        out = unpermute(grouped_mm(hidden, w2, offsets), row_map, weights)
    return out.to(hidden_states.dtype)


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
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sphinx_attention_forward)
    AttentionMaskInterface.register(NAME, sphinx_attention_mask)
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
