"""The SPHINX-X language model: a Llama-family decoder on sphinx_kernels (torchtitan / gpt-fast style).

One flat module: RMSNorm, RoPE (`sk.apply_rotary`), grouped-query attention on packed sequences
(`sk.varlen_attention`), a SwiGLU MLP or a sparse MoE block (`sk.moe_mlp`), an LM head tied or not. Inputs are
packed (``(T,)`` tokens + ``cu_seqlens``) or ``(B, L)`` without padding; no attention mask exists anywhere.

`LLM.from_hf` loads a local Hugging Face folder (config.json + safetensors, sharded or not) of Llama /
TinyLlama, Mistral, Qwen2, Mixtral or InternLM2 straight into a model built on the meta device (each tensor
is read once, memory-mapped, and copied into its parameter in the target dtype and device: no fp32 copy of a
bf16 checkpoint is ever made); `LLM.save_hf` writes the same format back. The HF name mapping behind them
lives in `sphinx_x.hf_checkpoint`; the methods here only call into it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sphinx_kernels as sk

if TYPE_CHECKING:
    from sphinx_x.generate import PackedKVCache

log = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "qwen2", "mixtral", "internlm2")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class LLMConfig:
    """Decoder hyper-parameters (names as torchtitan's; `from_hf_config` maps a Hugging Face config.json).

    `ffn_dim` is the dense SwiGLU width, `moe_ffn_dim` each expert's (Mixtral: both 14336); `n_experts` 0 is a
    dense model, else every layer is a top-`top_k`-of-`n_experts` MoE block (arch "mixtral").
    `attention_bias`: q/k/v projections carry a bias (Qwen2, which always has one). `max_seq_len`: the
    longest sequence `LLM.forward` accepts (a longer one is a ValueError).
    """

    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    n_experts: int = 0
    top_k: int = 2
    moe_ffn_dim: int | None = None  # None: ffn_dim

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"LLMConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ValueError(
                    f"LLMConfig.head_dim: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                    "give head_dim explicitly"
                )
            self.head_dim = self.dim // max(self.n_heads, 1)
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LLMConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LLMConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"LLMConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ValueError(f"LLMConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"LLMConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.arch == "qwen2" and not self.attention_bias:
            raise ValueError(
                "LLMConfig.attention_bias must be True for arch 'qwen2' (its q/k/v carry biases)"
            )
        if self.arch != "qwen2" and self.attention_bias:
            raise ValueError(
                f"LLMConfig.attention_bias (q/k/v bias only) is Qwen2's layout; arch {self.arch!r} has none"
            )
        if self.arch == "mixtral":
            if self.n_experts < 1:
                raise ValueError("LLMConfig.n_experts must be >= 1 for arch 'mixtral'")
            if not 1 <= self.top_k <= self.n_experts:
                raise ValueError(
                    f"LLMConfig.top_k must be in 1..n_experts={self.n_experts}, got {self.top_k}"
                )
            if self.moe_ffn_dim < 1:
                raise ValueError(f"LLMConfig.moe_ffn_dim must be >= 1, got {self.moe_ffn_dim}")
        else:
            if self.n_experts != 0:
                raise ValueError(
                    f"LLMConfig.n_experts={self.n_experts}: MoE layers need arch 'mixtral' (got {self.arch!r})"
                )
            if self.ffn_dim < 1:
                raise ValueError(f"LLMConfig.ffn_dim must be >= 1, got {self.ffn_dim}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> LLMConfig:
        """Map a Hugging Face ``config.json`` dict of a supported architecture; anything we would compute
        differently (RoPE scaling, attention or MLP biases we do not model) is a ValueError, never ignored."""
        from sphinx_x.hf_checkpoint import config_from_hf  # lazy: hf_checkpoint imports this module

        return config_from_hf(cls, hf)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this config (inverse of `from_hf_config`)."""
        from sphinx_x.hf_checkpoint import config_to_hf

        return config_to_hf(self)


# ----------------------------------------------------------------------------------------------- modules
@dataclass
class LLMOutput:
    """What `LLM.forward` returns.

    logits: ``(T, V)`` packed, ``(B, L, V)`` for ``(B, L)`` input, ``(R, V)`` with `logits_rows`; the model's
        dtype (None with ``compute_logits=False``).
    aux_loss: float32 scalar: the mean over MoE layers of the Switch load-balancing loss (1 = balanced;
        0 for a dense model).
    expert_counts: per MoE layer an int64 ``(E,)``: (token, slot) pairs routed to each expert; None if dense.
    router_logits: per MoE layer ``(T, E)`` gate logits (model dtype, differentiable); None if dense.
    expert_ids: per MoE layer int64 ``(T, top_k)``: the experts each token went to; None if dense.
    hidden: ``(T, dim)`` / ``(B, L, dim)`` final normed hidden states with ``return_hidden=True``.
    """

    logits: torch.Tensor | None
    aux_loss: torch.Tensor
    expert_counts: list[torch.Tensor] | None = None
    router_logits: list[torch.Tensor] | None = None
    expert_ids: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32 and cast back before the weight (as HF's Llama,
    so bf16 results match it bit for bit)."""

    def __init__(self, dim: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class _Packing:
    """Attention boundaries of one forward: queries' cu_seqlens and, against a KV cache, the keys' own."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int | None = None


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, **factory: Any) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias, **factory)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias, **factory)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias, **factory)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False, **factory)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        packing: _Packing,
        layer_idx: int,
        cache: PackedKVCache | None,
    ) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.n_heads, self.head_dim)
        k = self.wk(x).view(T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
        # One rotary call for q and k: half the per-call overhead, which dominates at decode sizes (~60 us of a
        # ~1 ms batch-1 step per layer on a CPU); the copy into one tensor is a small part of the rotation's own.
        q, k = sk.apply_rotary(torch.cat((q, k), dim=1), position_ids, self.rope_theta).split(
            (self.n_heads, self.n_kv_heads), dim=1
        )
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = sk.varlen_attention(
            q,
            k,
            v,
            packing.cu_seqlens,
            packing.max_seqlen,
            causal=True,
            cu_seqlens_k=packing.cu_seqlens_k,
            max_seqlen_k=packing.max_seqlen_k,
        )
        return self.wo(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (HF names: gate_proj = w1, up_proj = w3, down_proj = w2)."""

    def __init__(self, dim: int, hidden: int, **factory: Any) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False, **factory)
        self.w3 = nn.Linear(dim, hidden, bias=False, **factory)
        self.w2 = nn.Linear(hidden, dim, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Sparse SwiGLU MoE through `sk.moe_mlp` (Mixtral: bias-free gate, fp32 softmax, top-k renormalised).

    Expert weights are stored in the kernel's layout: ``w1, w3 (E, dim, f)``, ``w2 (E, f, dim)`` (HF's per-expert
    ``(f, dim)`` / ``(dim, f)`` Linear weights are transposed at load and save). `top_k` and `expert_mask`
    (bool ``(E,)``, False = pruned) may change at inference (`LLM.set_active_experts`, `LLM.prune_experts`).
    """

    def __init__(self, cfg: LLMConfig, **factory: Any) -> None:
        super().__init__()
        E, d, f = cfg.n_experts, cfg.dim, cfg.moe_ffn_dim
        self.n_experts, self.top_k = E, cfg.top_k
        self.gate = nn.Linear(d, E, bias=False, **factory)
        self.w1 = nn.Parameter(torch.empty(E, d, f, **factory))
        self.w3 = nn.Parameter(torch.empty(E, d, f, **factory))
        self.w2 = nn.Parameter(torch.empty(E, f, d, **factory))
        self.expert_mask: torch.Tensor | None = None  # plain attribute: never saved, moved on use

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, sk.MoEAux, torch.Tensor]:
        mask = self.expert_mask
        if mask is not None and mask.device != x.device:
            mask = self.expert_mask = mask.to(x.device)
        out, aux = sk.moe_mlp(
            x, self.gate.weight, self.w1, self.w3, self.w2, top_k=self.top_k, expert_mask=mask
        )
        # The logits are not among moe_mlp's outputs; the gate GEMM is E/(3*f*top_k) of the experts' work
        # (9e-5 for Mixtral: E 8, f 14336, top 2), so recomputing them for the caller costs nothing measurable.
        return out, aux, self.gate(x)


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int, **factory: Any) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, **factory)
        self.attention = Attention(cfg, **factory)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, **factory)
        self.feed_forward: FeedForward | MoE = (
            MoE(cfg, **factory) if cfg.is_moe else FeedForward(cfg.dim, cfg.ffn_dim, **factory)
        )

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        packing: _Packing,
        cache: PackedKVCache | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        h = h + self.attention(self.attention_norm(h), position_ids, packing, self.layer_idx, cache)
        x = self.ffn_norm(h)
        if isinstance(self.feed_forward, MoE):
            out, aux, logits = self.feed_forward(x)
            return h + out, (aux.load_balancing_loss, aux.tokens_per_expert, logits, aux.expert_ids)
        return h + self.feed_forward(x), None


# ----------------------------------------------------------------------------------------------- model
class LLM(nn.Module):
    """Llama-family decoder. ``LLM(cfg, dtype=None, device=None)`` builds it (``device="meta"`` for a shell to
    load into); `from_hf` loads a checkpoint. ``activation_checkpointing = True`` recomputes each block in
    backward (torch.utils.checkpoint, non-reentrant) while training."""

    def __init__(
        self, cfg: LLMConfig, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False
        self.hf_config: dict[str, Any] | None = None  # the loaded config.json, written back by save_hf
        factory = {"dtype": dtype, "device": device}
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, **factory)
        self.layers = nn.ModuleList(Block(cfg, i, **factory) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, **factory)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False, **factory)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init as HF's Llama (normal(0, std) weights, zero biases, unit norms); no-op cost on meta."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, MoE):
                for w in (module.w1, module.w3, module.w2):
                    w.normal_(0.0, std)

    # -- MoE inference controls ---------------------------------------------------------------------
    def _moe_layers(self) -> list[MoE]:
        if not self.cfg.is_moe:
            raise ValueError("this LLM is dense (cfg.n_experts == 0): it has no experts")
        return [layer.feed_forward for layer in self.layers]  # type: ignore[misc]

    def set_active_experts(self, k: int) -> None:
        """Route every token to its top `k` experts from now on (the paper evaluates 1..8 at inference)."""
        for moe in self._moe_layers():
            unpruned = moe.n_experts if moe.expert_mask is None else int(moe.expert_mask.sum())
            if not isinstance(k, int) or not 1 <= k <= unpruned:
                raise ValueError(f"k must be an int in 1..{unpruned} (unpruned experts), got {k!r}")
        for moe in self._moe_layers():
            moe.top_k = k

    def prune_experts(
        self,
        keep: torch.Tensor | Sequence[Iterable[int]] | None = None,
        *,
        drop_random: int = 0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Prune experts per layer (never routed to). `keep`: bool ``(n_layers, E)`` or, per layer, the expert
        ids kept; or `drop_random` experts dropped uniformly at random per layer (the paper's random
        pruning; `seed` makes it reproducible). With neither, every expert is restored.
        Returns the bool ``(n_layers, E)`` mask now in force."""
        moes = self._moe_layers()
        E, n = self.cfg.n_experts, len(moes)
        if keep is not None and drop_random:
            raise ValueError("give either keep or drop_random, not both")
        if keep is not None:
            if isinstance(keep, torch.Tensor):
                mask = keep.to(torch.bool).cpu()
                if mask.shape != (n, E):
                    raise ValueError(
                        f"keep must be a bool tensor of shape ({n}, {E}), got {tuple(keep.shape)}"
                    )
            else:
                if len(keep) != n:
                    raise ValueError(
                        f"keep must give the kept experts of each of the {n} layers, got {len(keep)}"
                    )
                mask = torch.zeros(n, E, dtype=torch.bool)
                for i, ids in enumerate(keep):
                    ids = list(ids)
                    if any(not 0 <= e < E for e in ids):
                        raise ValueError(f"keep[{i}] has expert ids outside 0..{E - 1}: {ids}")
                    mask[i, ids] = True
        elif drop_random:
            if not 0 <= drop_random < E:
                raise ValueError(f"drop_random must be in 0..{E - 1}, got {drop_random}")
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            mask = torch.ones(n, E, dtype=torch.bool)
            for i in range(n):
                mask[i, torch.randperm(E, generator=gen)[:drop_random]] = False
        else:
            mask = torch.ones(n, E, dtype=torch.bool)
        kept = mask.sum(1)
        worst = int(kept.min())
        if worst < moes[0].top_k:
            raise ValueError(
                f"pruning leaves {worst} experts in layer {int(kept.argmin())}, fewer than top_k={moes[0].top_k} "
                "(lower it first with set_active_experts)"
            )
        for moe, m in zip(moes, mask, strict=True):
            moe.expert_mask = None if bool(m.all()) else m.clone()
        return mask

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        cache: PackedKVCache | None = None,
        return_hidden: bool = False,
        logits_rows: torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> LLMOutput:
        """Run the decoder.

        Args:
            input_ids: int ``(T,)`` packed (with `cu_seqlens`; without, one sequence) or ``(B, L)`` (no padding).
            inputs_embeds: float ``(T, dim)`` / ``(B, L, dim)`` instead of `input_ids` (e.g. with image tokens).
            cu_seqlens: int32 ``(B+1,)`` boundaries of the packed sequences (``0, ..., T``). With `cache`: the
                boundaries of each cached stream's NEW tokens (0 for a stream that gets none this step).
            max_seqlen: longest sequence in the pack (read from `cu_seqlens` if None: one host sync). A sequence
                (or, with a cache, a stream's total length) beyond ``cfg.max_seq_len`` is a ValueError.
            position_ids: int ``(T,)`` / ``(B, L)``; default: positions restarting at 0 per sequence (after the
                cached tokens, with `cache`).
            cache: a `sphinx_x.generate.PackedKVCache`: the new keys/values are appended to it and attention
                runs against every cached token (inference only).
            return_hidden: also return the final normed hidden states.
            logits_rows: int64 ``(R,)`` packed rows to compute logits for (e.g. the last of each sequence when
                generating); default all rows.
            compute_logits: False skips the LM head (e.g. a chunked loss on `hidden`).

        Returns:
            `LLMOutput` (see there for every field's shape and dtype).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        batched = (input_ids is not None and input_ids.dim() == 2) or (
            inputs_embeds is not None and inputs_embeds.dim() == 3
        )
        if input_ids is not None:
            if (
                input_ids.dtype.is_floating_point
                or input_ids.dtype == torch.bool
                or input_ids.dim() not in (1, 2)
            ):
                raise TypeError(
                    f"input_ids must be an integer (T,) or (B, L) tensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
                )
            shape = tuple(input_ids.shape)
            h = self.tok_embeddings(input_ids.reshape(-1))
        else:
            if not inputs_embeds.dtype.is_floating_point or inputs_embeds.dim() not in (2, 3):
                raise TypeError(
                    f"inputs_embeds must be a float (T, dim) or (B, L, dim) tensor, got {inputs_embeds.dtype} "
                    f"{tuple(inputs_embeds.shape)}"
                )
            if inputs_embeds.shape[-1] != self.cfg.dim:
                raise ValueError(
                    f"inputs_embeds' last dim must be dim={self.cfg.dim}, got {inputs_embeds.shape[-1]}"
                )
            shape = tuple(inputs_embeds.shape[:-1])
            h = inputs_embeds.reshape(-1, self.cfg.dim).to(self.tok_embeddings.weight.dtype)
        T = h.shape[0]
        device = h.device

        if batched:
            if cu_seqlens is not None or cache is not None:
                raise ValueError("(B, L) input takes no cu_seqlens or cache: pack it as (T,) with cu_seqlens")
            B, L = shape
            if L > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {L} exceeds max_seq_len={self.cfg.max_seq_len}")
            cu_seqlens = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
            max_seqlen = L
        elif cu_seqlens is None:
            if cache is not None:
                raise ValueError("with a cache, cu_seqlens must say how many new tokens each stream gets")
            cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=device)
            max_seqlen = T
        else:
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
                raise TypeError(
                    f"cu_seqlens must be an int32 (B+1,) tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
                )
            cu_seqlens = cu_seqlens.to(device)

        if cache is not None:
            step = cache.prepare(cu_seqlens, T, max_seq_len=self.cfg.max_seq_len)
            packing = _Packing(step.cu_seqlens_q, step.max_seqlen_q, step.cu_seqlens_k, step.max_seqlen_k)
            if position_ids is None:
                position_ids = step.position_ids
        else:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if T else 0
            if max_seqlen > self.cfg.max_seq_len:
                raise ValueError(
                    f"a sequence of {max_seqlen} tokens exceeds max_seq_len={self.cfg.max_seq_len}"
                )
            packing = _Packing(cu_seqlens, max_seqlen)
            if position_ids is None:
                position_ids = sk.position_ids_from_cu_seqlens(cu_seqlens, T)
        position_ids = position_ids.reshape(-1)
        if position_ids.shape[0] != T:
            raise ValueError(
                f"position_ids must hold one position per token ({T}), got {position_ids.shape[0]}"
            )

        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        moe_side: list[tuple[torch.Tensor, ...]] = []
        for layer in self.layers:
            if checkpointing:
                if cache is not None:
                    raise ValueError("activation checkpointing is for training: it takes no KV cache")
                h, side = checkpoint(layer, h, position_ids, packing, use_reentrant=False)
            else:
                h, side = layer(h, position_ids, packing, cache)
            if side is not None:
                moe_side.append(side)
        h = self.norm(h)

        logits = None
        if compute_logits:
            rows = h if logits_rows is None else h.index_select(0, logits_rows.to(device))
            logits = self.output(rows)
            if logits_rows is None:
                logits = logits.view(*shape, -1)
        if moe_side:
            aux_loss = torch.stack([s[0].float() for s in moe_side]).mean()
            counts = [s[1].long() for s in moe_side]
            router_logits = [s[2] for s in moe_side]
            expert_ids = [s[3] for s in moe_side]
        else:
            aux_loss = torch.zeros((), dtype=torch.float32, device=device)
            counts = router_logits = expert_ids = None
        hidden = h.view(*shape, -1) if return_hidden else None
        return LLMOutput(logits, aux_loss, counts, router_logits, expert_ids, hidden)

    # -- Hugging Face checkpoints -------------------------------------------------------------------
    # Thin: the key mapping is in sphinx_x.hf_checkpoint, imported lazily as it imports this module.
    @classmethod
    def from_hf(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LLM:
        """Load a local Hugging Face folder: ``config.json`` + ``model.safetensors`` or shards listed in
        ``model.safetensors.index.json``. `dtype`: default the checkpoint's (config ``torch_dtype``), else fp32;
        `device`: default CPU. The model is built on the meta device and each tensor copied once into its
        parameter. A missing or unexpected tensor, a wrong shape, or an unsupported architecture is a
        ValueError naming it."""
        from sphinx_x.hf_checkpoint import load_hf

        return load_hf(cls, path, dtype, device)

    def save_hf(self, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write this model as a Hugging Face folder of its arch (config.json + safetensors, sharded above
        `max_shard_bytes` with ``model.safetensors.index.json``); `from_hf` reads it back bit-exact."""
        from sphinx_x.hf_checkpoint import save_hf

        save_hf(self, path, max_shard_bytes=max_shard_bytes)

    def num_parameters(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())


def config_dict(cfg: LLMConfig) -> dict[str, Any]:
    """`cfg` as a plain dict (JSON-serialisable); ``LLMConfig(**config_dict(cfg)) == cfg``."""
    return asdict(cfg)


__all__ = [
    "ARCHS",
    "LLM",
    "LLMConfig",
    "LLMOutput",
    "RMSNorm",
    "config_dict",
]
