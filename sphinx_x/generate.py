"""Batched KV-cache generation on one packed cache: prompts of different lengths, no padding anywhere.

Cache layout: every layer keeps ONE packed key stream and one value stream, ``(capacity_total, Hkv, D)``,
in which prompt i owns the slot ``[offset_i, offset_i + capacity_i)`` (its prompt plus the tokens it may still
generate), reserved once, so a step never moves or copies cached tokens: a decode step writes B new keys in
place and runs one varlen call with one query per live stream (causal masks align bottom-right, so the query
sees all of its stream's keys). The keys between two live streams (an unfilled slot tail, a finished stream)
are described to `sk.varlen_attention` as one sequence with no queries, and the keys after the last live
stream are left out of the call (the buffers are passed sliced), so ``cu_seqlens_k`` just advances: for one
stream it is ``(0, len_0)``. Prefill is the same call with every prompt's tokens as queries. The token-level
engine is here; `sphinx_x.model` wraps it with the tokenizer and images.

Per-step host work is O(B), not O(layers) or O(cache): `PackedKVCache.prepare` builds the step's boundaries
and positions once per forward from host ints (two small tensors; on the CPU no device sync at all), and
makes them ordinary (not inference-mode) tensors so that the attention op's value checks, cached per tensor
identity and version, run once per step instead of once per layer (inference tensors have no version: every
layer re-checked, a host sync each). Tiny preset, fp32, 1 thread, batch 1, 400-token prompt: a decode step
went from 2.2 to 1.7 ms with this and the layout above (the padded way: 1.3 ms; the rest is per-layer
overhead in the attention op and RoPE).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sphinx_x.llm import LLM

log = logging.getLogger(__name__)


@dataclass
class CacheStep:
    """Where one forward's new tokens go and what they attend to (built by `PackedKVCache.prepare`).

    position_ids: int64 ``(T,)``; write_index: int64 ``(T,)`` rows of the cache buffers;
    cu_seqlens_q / cu_seqlens_k: int32 ``(S+1,)``: one sequence per stream that gets new tokens (its new
    tokens / all its keys), with one no-query sequence for the keys between two such streams where there are
    any (S <= 2B); num_keys: ``cu_seqlens_k[-1]``, the leading rows of the buffers that `update` returns;
    max_len: the longest stream after the step.
    """

    position_ids: torch.Tensor
    write_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int
    max_len: int
    num_keys: int


class PackedKVCache:
    """Per-layer packed keys and values of B streams (see the module docstring for the layout).

    Args:
        n_layers, n_kv_heads, head_dim: the model's.
        capacities: tokens each stream may hold (its prompt plus what it may generate).
        dtype, device: of the buffers (the model's).

    Attributes:
        k, v: per layer ``(sum(capacities), n_kv_heads, head_dim)``; lengths: tokens held per stream (host ints);
        offsets: each stream's slot start.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        capacities: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if not capacities or any(not isinstance(c, int) or c < 0 for c in capacities):
            raise ValueError(f"capacities must be a non-empty list of ints >= 0, got {list(capacities)}")
        self.capacities = list(capacities)
        self.offsets = [0]
        for c in self.capacities[:-1]:
            self.offsets.append(self.offsets[-1] + c)
        self.total = sum(self.capacities)
        self.lengths = [0] * len(self.capacities)
        self.device = torch.device(device)
        # zeros, not empty: the unfilled tails are never attended (no queries), but stale NaNs must not be
        # able to reach a kernel that multiplies by zero weights.
        shape = (self.total, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self._step: CacheStep | None = None

    @classmethod
    def for_model(cls, llm: LLM, capacities: Sequence[int]) -> PackedKVCache:
        """A cache shaped for `llm` (its layers, kv heads, head dim, dtype and device)."""
        w = llm.tok_embeddings.weight
        cfg = llm.cfg
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, capacities, dtype=w.dtype, device=w.device)

    @property
    def batch_size(self) -> int:
        return len(self.capacities)

    def prepare(
        self,
        cu_seqlens: torch.Tensor | Sequence[int],
        num_tokens: int | None = None,
        *,
        max_seq_len: int | None = None,
    ) -> CacheStep:
        """Reserve room for one forward's new tokens: ``cu_seqlens`` ``(B+1,)`` gives each stream's count
        (0 for a stream that gets none). Advances `lengths`; the layers then call `update`. A stream passing
        its capacity or `max_seq_len` is a ValueError (and the cache is left as it was)."""
        cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        B = self.batch_size
        if len(cu) != B + 1 or cu[0] != 0:
            raise ValueError(f"cu_seqlens must be (B+1,) = ({B + 1},) starting at 0 for this cache, got {cu}")
        new = [cu[i + 1] - cu[i] for i in range(B)]
        if num_tokens is not None and cu[-1] != num_tokens:
            raise ValueError(f"cu_seqlens ends at {cu[-1]} but {num_tokens} new tokens were given")
        for i, n in enumerate(new):
            if n < 0:
                raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
            if self.lengths[i] + n > self.capacities[i]:
                raise ValueError(
                    f"stream {i}: {self.lengths[i]} cached + {n} new tokens exceed its capacity {self.capacities[i]}"
                )
            if max_seq_len is not None and self.lengths[i] + n > max_seq_len:
                raise ValueError(
                    f"stream {i}: {self.lengths[i]} cached + {n} new tokens exceed max_seq_len={max_seq_len}"
                )
        old = self.lengths
        self.lengths = [length + n for length, n in zip(old, new, strict=True)]
        # Sequences of the attention call: each stream with new tokens (its queries, all its keys), preceded by
        # one no-query sequence for the keys since the previous such stream; keys after the last are left out.
        cu_q, cu_k = [0], [0]
        max_q = max_k = 0
        for i in range(B):
            if new[i] == 0:
                continue
            start, end = self.offsets[i], self.offsets[i] + self.lengths[i]
            if cu_k[-1] < start:
                max_k = max(max_k, start - cu_k[-1])
                cu_q.append(cu_q[-1])
                cu_k.append(start)
            cu_q.append(cu_q[-1] + new[i])
            cu_k.append(end)
            max_q, max_k = max(max_q, new[i]), max(max_k, self.lengths[i])
        if len(cu_q) == 1:  # no new token at all: one empty sequence keeps the boundaries (B+1,)-shaped
            cu_q.append(0)
            cu_k.append(0)
        T = cu[-1]
        live = [i for i in range(B) if new[i]]
        index = None
        if T == len(live):  # decoding, one token per live stream: positions and rows straight from host ints
            index = [old[i] for i in live] + [self.offsets[i] + old[i] for i in live]
        dev = self.device
        # Ordinary tensors even under inference_mode: the attention op caches its value checks by tensor
        # identity and in-place version, which inference tensors lack (it would re-check in every layer).
        with torch.inference_mode(False):
            bounds = torch.tensor(cu_q + cu_k, dtype=torch.int32, device=dev)
            if index is None:
                counts = torch.tensor(new, dtype=torch.int64)
                stream = torch.repeat_interleave(torch.arange(B), counts)
                first = torch.cumsum(counts, 0) - counts
                pos_t = torch.tensor(old, dtype=torch.int64)[stream] + torch.arange(T) - first[stream]
                rows = torch.tensor(self.offsets, dtype=torch.int64)[stream] + pos_t
                meta = torch.cat([pos_t, rows]).to(dev)
            else:
                meta = torch.tensor(index, dtype=torch.int64, device=dev)
        n_seq = len(cu_q)
        self._step = CacheStep(
            position_ids=meta[:T],
            write_index=meta[T:],
            cu_seqlens_q=bounds[:n_seq],
            max_seqlen_q=max_q,
            cu_seqlens_k=bounds[n_seq:],
            max_seqlen_k=max_k,
            max_len=max(self.lengths),
            num_keys=cu_k[-1],
        )
        return self._step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer `layer`'s new keys/values ``(T, Hkv, D)`` (in `prepare`'s order); returns the leading
        ``(step.num_keys, Hkv, D)`` rows of the layer's buffers (views) to attend against with the step's
        ``cu_seqlens_k``."""
        step = self._step
        if step is None:
            raise RuntimeError("PackedKVCache.update before prepare")
        kb, vb = self.k[layer], self.v[layer]
        kb.index_copy_(0, step.write_index, k.to(kb.dtype))
        vb.index_copy_(0, step.write_index, v.to(vb.dtype))
        return kb[: step.num_keys], vb[: step.num_keys]


# ----------------------------------------------------------------------------------------------- sampling
def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of ``(n, V)`` logits: argmax when temperature is 0, else softmax(logits / temperature)
    restricted to the smallest top set whose mass reaches `top_p` (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is < top_p: the first token always stays
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _check_args(llm, prompts, max_new_tokens, temperature, top_p, stop_sequences, eos_id):
    if not isinstance(llm, LLM):
        raise TypeError(f"llm must be a sphinx_x.llm.LLM, got {type(llm).__name__}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id or embedding tensors")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"prompts[{i}] must be a tensor, got {type(p).__name__}")
        if p.dtype.is_floating_point:
            if p.dim() != 2 or p.shape[1] != llm.cfg.dim:
                raise ValueError(
                    f"prompts[{i}]: embeddings must be (L, dim={llm.cfg.dim}), got {tuple(p.shape)}"
                )
        elif p.dim() != 1 or p.dtype == torch.bool:
            raise ValueError(
                f"prompts[{i}]: token ids must be a 1-D integer tensor, got {p.dtype} {tuple(p.shape)}"
            )
        if p.shape[0] == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if p.shape[0] > llm.cfg.max_seq_len:
            raise ValueError(
                f"prompts[{i}] has {p.shape[0]} tokens, beyond max_seq_len={llm.cfg.max_seq_len}"
            )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stops = [list(s) for s in stop_sequences]
    if any(not s or not all(isinstance(t, int) for t in s) for s in stops):
        raise ValueError(f"stop_sequences must be non-empty lists of token ids, got {stop_sequences!r}")
    if eos_id is None:
        eos = set()
    elif isinstance(eos_id, int):
        eos = {eos_id}
    else:
        eos = {int(e) for e in eos_id}
    return stops, eos


def generate_stream(
    llm: LLM,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts, yielding one token per prompt and step.

    Args:
        llm: the decoder.
        prompts: per prompt int ``(L_i,)`` token ids or float ``(L_i, dim)`` embeddings (e.g. with image tokens);
            different lengths, packed without padding.
        max_new_tokens: at most this many tokens per prompt (fewer where ``cfg.max_seq_len`` ends first).
        temperature: 0 = greedy (argmax), else sampling from softmax(logits / temperature).
        top_p: nucleus sampling mass (1 = off). seed: seeds a private generator (reproducible sampling).
        stop_sequences: token-id lists; a prompt finishes once its generated tokens end with one (its tokens
            are yielded). eos_id: token id(s) that finish a prompt (yielded too).
        use_cache: False recomputes the whole sequence every step (no cache; a reference for the cache path).

    Returns:
        An iterator yielding, per step, a list of B entries: the new token id of each prompt, None once it has
        finished. Arguments are checked at the call (a bad one raises before anything runs).
    """
    # validated here, at the call, not at the first next() of a generator
    stops, eos = _check_args(llm, prompts, max_new_tokens, temperature, top_p, stop_sequences, eos_id)
    if max_new_tokens == 0:
        return iter(())
    return _stream(llm, list(prompts), max_new_tokens, temperature, top_p, seed, stops, eos, use_cache)


def _stream(
    llm: LLM,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stops: list[list[int]],
    eos: set[int],
    use_cache: bool,
) -> Iterator[list[int | None]]:
    w = llm.tok_embeddings.weight
    device, dtype = w.device, w.dtype
    embeds = any(p.dtype.is_floating_point for p in prompts)
    B = len(prompts)
    lengths = [int(p.shape[0]) for p in prompts]
    # the k-th new token needs a forward over L + k - 1 tokens
    budget = [min(max_new_tokens, llm.cfg.max_seq_len - n + 1) for n in lengths]
    if any(b < max_new_tokens for b in budget):
        log.warning("max_new_tokens=%d cut short by max_seq_len=%d", max_new_tokens, llm.cfg.max_seq_len)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    def as_input(p: torch.Tensor) -> torch.Tensor:
        p = p.to(device)
        return p.to(dtype) if p.dtype.is_floating_point else (llm.tok_embeddings(p) if embeds else p)

    def forward(parts: list[torch.Tensor], counts: list[int], cache: PackedKVCache | None) -> torch.Tensor:
        # Boundaries and logit rows from host ints (no tensor arithmetic, no device sync); cu is an ordinary
        # tensor so that, without a cache, the attention op checks it once per forward, not once per layer.
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        cu = [0]
        for n in counts:
            cu.append(cu[-1] + n)
        last = [cu[i + 1] - 1 for i in range(B) if counts[i]]  # each live stream's last token
        with torch.inference_mode(False):
            cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        rows = None if len(last) == cu[-1] else torch.tensor(last, device=device)
        kw = {"inputs_embeds": x} if x.dtype.is_floating_point else {"input_ids": x}
        return llm(**kw, cu_seqlens=cu_t, max_seqlen=max(counts), cache=cache, logits_rows=rows).logits

    generated: list[list[int]] = [[] for _ in range(B)]
    active = list(range(B))
    with torch.inference_mode():
        inputs = [as_input(p) for p in prompts]
        cache = None
        if use_cache:
            cache = PackedKVCache.for_model(llm, [n + b - 1 for n, b in zip(lengths, budget, strict=True)])
        logits = forward(inputs, lengths, cache)
        while True:
            tokens = _sample(logits, temperature, top_p, gen).tolist()
            row: list[int | None] = [None] * B
            still = []
            for i, t in zip(active, tokens, strict=True):
                seq = generated[i]
                seq.append(t)
                row[i] = t
                done = t in eos or len(seq) >= budget[i] or any(seq[-len(s) :] == s for s in stops)
                if not done:
                    still.append(i)
            yield row
            active = still
            if not active:
                return
            if use_cache:
                # token ids even for embedding prompts: the decoder embeds them itself (the same lookup)
                ids = torch.tensor([generated[i][-1] for i in active], device=device)
                counts = [0] * B
                for i in active:
                    counts[i] = 1
                logits = forward([ids], counts, cache)
            else:
                parts, counts = [], [0] * B
                for i in active:
                    new = torch.tensor(generated[i], device=device)
                    parts += [inputs[i], llm.tok_embeddings(new) if embeds else new]
                    counts[i] = lengths[i] + len(generated[i])
                logits = forward(parts, counts, None)


def generate(llm: LLM, prompts: Sequence[torch.Tensor], **kwargs) -> list[list[int]]:
    """`generate_stream` collected: per prompt the list of its generated token ids (stop/eos tokens included)."""
    out: list[list[int]] = [[] for _ in prompts]
    for row in generate_stream(llm, prompts, **kwargs):
        for seq, t in zip(out, row, strict=True):
            if t is not None:
                seq.append(t)
    return out


__all__ = ["CacheStep", "PackedKVCache", "generate", "generate_stream"]
