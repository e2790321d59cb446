"""sphinx_x.generate: the packed KV cache against full recomputation (float64 reference for its logits,
token for token for greedy decoding, dense and MoE), seeded sampling, top-p, stop sequences and eos, and greedy
tokens against transformers' generate on a tiny Llama loaded with from_hf."""

import copy
import random

import pytest
import torch
from conftest import assert_close_to_reference

from sphinx_x.generate import PackedKVCache, _sample, generate, generate_stream
from sphinx_x.llm import LLM, LLMConfig


def _tiny(moe: bool, *, vocab: int = 97, max_seq_len: int = 96, dtype=torch.float32) -> LLM:
    cfg = LLMConfig(
        arch="mixtral" if moe else "llama",
        vocab_size=vocab,
        dim=48,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        ffn_dim=40,
        n_experts=5 if moe else 0,
        max_seq_len=max_seq_len,
        rope_theta=500.0,
    )
    llm = LLM(cfg, dtype=dtype).eval()
    # std 0.2 spreads the logits (std ~1.4 at dim 48): greedy argmax gaps are ~1e-2, far above fp32 rounding
    # (~1e-6), so the cached and recomputed paths cannot flip a near tie.
    llm.init_weights(std=0.2)
    return llm


def _prompts(vocab: int, lengths: list[int]) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (n,)) for n in lengths]


def test_cache_logits_match_full_pass(seed):
    """Prefill, one-token decode steps, a chunk of several tokens and streams that skip a step, all through
    the packed cache, against one full causal pass over the whole sequences (float64 reference)."""
    llm = _tiny(moe=False)
    llm64 = copy.deepcopy(llm).to(torch.float64)
    lengths = [random.randint(2, 9), random.randint(10, 17), 1]
    schedule = [lengths, [1, 1, 1], [0, 3, 1], [2, 0, 1], [1, 1, 0]]
    totals = [sum(col) for col in zip(*schedule, strict=True)]
    seqs = _prompts(97, totals)
    cache = PackedKVCache.for_model(llm, [t + random.randint(0, 3) for t in totals])
    got, where = [], []
    done = [0, 0, 0]
    with torch.no_grad():
        for counts in schedule:
            parts = [seqs[i][done[i] : done[i] + n] for i, n in enumerate(counts)]
            cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
            got.append(llm(torch.cat(parts), cu_seqlens=cu, cache=cache).logits)
            where += [(i, done[i] + j) for i, n in enumerate(counts) for j in range(n)]
            done = [d + n for d, n in zip(done, counts, strict=True)]
        assert cache.lengths == totals
        cu_full = torch.tensor([0, *torch.tensor(totals).cumsum(0).tolist()], dtype=torch.int32)
        rows = torch.tensor([int(cu_full[i]) + p for i, p in where])
        full32 = llm(torch.cat(seqs), cu_seqlens=cu_full).logits[rows]
        full64 = llm64(torch.cat(seqs), cu_seqlens=cu_full).logits[rows]
    assert_close_to_reference(torch.cat(got), full64, full32, name="cached logits")


def test_cache_step_layout(seed):
    """A step attends to the keys of its live streams only: one sequence per stream with new tokens, one
    no-query sequence for the keys between two of them, nothing after the last; decoding writes in place
    (write rows = slot offset + length) and its boundaries are ordinary tensors (the attention op caches its
    value checks per tensor version, which inference tensors lack) even under inference_mode."""
    llm = _tiny(moe=False)
    lengths = [random.randint(2, 9), random.randint(2, 9), random.randint(2, 9)]
    caps = [n + random.randint(2, 5) for n in lengths]
    cache = PackedKVCache.for_model(llm, caps)
    off = cache.offsets
    with torch.inference_mode():
        step = cache.prepare([0, *torch.tensor(lengths).cumsum(0).tolist()])
        assert step.cu_seqlens_k.tolist() == [
            0,
            lengths[0],
            off[1],
            off[1] + lengths[1],
            off[2],
            off[2] + lengths[2],
        ]
        assert step.cu_seqlens_q.tolist() == [
            0,
            lengths[0],
            lengths[0],
            sum(lengths[:2]),
            sum(lengths[:2]),
            sum(lengths),
        ]
        # stream 1 finished: streams 0 and 2 decode one token each
        step = cache.prepare([0, 1, 1, 2])
        assert step.position_ids.tolist() == [lengths[0], lengths[2]]
        assert step.write_index.tolist() == [lengths[0], off[2] + lengths[2]]
        assert step.cu_seqlens_q.tolist() == [0, 1, 1, 2]
        assert step.cu_seqlens_k.tolist() == [0, lengths[0] + 1, off[2], off[2] + lengths[2] + 1]
        assert step.num_keys == off[2] + lengths[2] + 1
        assert not any(t.is_inference() for t in (step.cu_seqlens_q, step.cu_seqlens_k, step.position_ids))
        # only stream 0: its keys alone, the rest of the buffers left out
        step = cache.prepare([0, 1, 1, 1])
        assert step.cu_seqlens_k.tolist() == [0, lengths[0] + 2] and step.num_keys == lengths[0] + 2
        k, v = cache.update(0, torch.randn(1, 2, 8), torch.randn(1, 2, 8))
        assert k.shape[0] == v.shape[0] == lengths[0] + 2
    assert cache.lengths == [lengths[0] + 2, lengths[1], lengths[2] + 1]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_cache_equals_recompute(moe, seed):
    llm = _tiny(moe)
    prompts = _prompts(97, [random.randint(1, 12) for _ in range(4)] + [1])
    n = random.randint(5, 9)
    cached = generate(llm, prompts, max_new_tokens=n)
    recomputed = generate(llm, prompts, max_new_tokens=n, use_cache=False)
    assert [len(t) for t in cached] == [n] * len(prompts)
    assert cached == recomputed
    # the same prompts given as embeddings (as the multimodal model passes them) give the same tokens
    with torch.no_grad():
        embeds = [llm.tok_embeddings(p) for p in prompts]
    assert generate(llm, embeds, max_new_tokens=n) == cached
    # each prompt alone gives its tokens of the batch (no cross-talk between packed streams)
    assert generate(llm, prompts[1:2], max_new_tokens=n) == cached[1:2]


def test_sampling_seeded_and_top_p(seed):
    llm = _tiny(moe=True)
    prompts = _prompts(97, [5, 2, 9])
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.9)
    a = generate(llm, prompts, seed=seed, **kw)
    assert a == generate(llm, prompts, seed=seed, **kw)
    assert a != generate(llm, prompts, seed=seed + 1, **kw)  # 30 draws from ~97 tokens: never all equal
    # a nucleus smaller than any single token's mass keeps only the argmax: sampling becomes greedy
    greedy = generate(llm, prompts, max_new_tokens=10)
    assert generate(llm, prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=seed) == greedy


def test_temperature_and_top_p_sample_the_nucleus(seed):
    """Sampling draws from the smallest set of most likely tokens whose mass of softmax(logits / T) (float64
    here) reaches top_p, with their renormalised probabilities; temperature 0 is the argmax."""
    V = random.randrange(9, 30) | 1
    temperature = random.choice([random.uniform(0.5, 0.8), random.uniform(1.3, 1.6)])  # far from 1
    choices: list[float] = []
    while not choices:  # (a draw with one token of > 98% mass has none: draw again)
        logits = torch.randn(V) * 2
        probs = torch.softmax(logits.double() / temperature, -1)
        sorted_p, order = probs.sort(descending=True)
        mass = sorted_p.cumsum(0)
        # top_p at least 1e-3 away from every cumulative mass (float32 rounding cannot move the boundary),
        # leaving >= 2% of the mass outside the nucleus (4000 draws ignoring top_p would land there ~80 times)
        choices = [
            p
            for p in torch.linspace(0.05, 0.95, 91).tolist()
            if (mass - p).abs().min() > 1e-3 and 1 - mass[int((mass < p).sum())] >= 0.02
        ]
    assert torch.equal(_sample(logits[None], 0.0, 1.0, None), logits.argmax()[None])
    top_p = random.choice(choices)
    k = int((mass < top_p).sum()) + 1  # the smallest prefix whose mass reaches top_p
    n = 4000
    draws = _sample(logits.expand(n, V), temperature, top_p, torch.Generator().manual_seed(seed))
    counts = torch.bincount(draws, minlength=V).double()
    assert counts[order[k:]].sum() == 0, f"drawn outside the nucleus of top_p={top_p} (k={k})"
    expected = torch.zeros(V, dtype=torch.float64)
    expected[order[:k]] = sorted_p[:k] / mass[k - 1]
    # each count within 5 binomial standard deviations (+1 draw) of n * p: wrong temperature, nucleus or
    # renormalisation moves some count by far more
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sigma + 1).all(), (counts, n * expected)
    again = _sample(logits.expand(n, V), temperature, top_p, torch.Generator().manual_seed(seed))
    assert torch.equal(draws, again)


def test_stop_sequences_and_eos(seed):
    llm = _tiny(moe=False)
    prompts = _prompts(97, [3, 8, 6, 1])
    full = generate(llm, prompts, max_new_tokens=12)

    def cut(tokens, stops):
        """`tokens` up to and including the first place where they end with one of `stops`."""
        for end in range(1, len(tokens) + 1):
            if any(tokens[:end][-len(s) :] == s for s in stops):
                return tokens[:end]
        return tokens

    stop = full[1][4:6]  # occurs in prompt 1's output, maybe elsewhere
    other = [full[2][7]]
    expected = [cut(t, [stop, other]) for t in full]
    rows = list(generate_stream(llm, prompts, max_new_tokens=12, stop_sequences=[stop, other]))
    got = [[r[i] for r in rows if r[i] is not None] for i in range(4)]
    assert got == expected
    assert len(rows) == max(len(t) for t in expected)
    for i, tokens in enumerate(got):  # None exactly after a prompt finished
        assert all(r[i] is None for r in rows[len(tokens) :])

    eos = full[0][2]
    assert generate(llm, prompts, max_new_tokens=12, eos_id=eos) == [cut(t, [[eos]]) for t in full]
    assert generate(llm, prompts, max_new_tokens=12, eos_id=[eos, eos]) == [cut(t, [[eos]]) for t in full]


def test_max_seq_len_and_bad_arguments(seed):
    llm = _tiny(moe=False, max_seq_len=12)
    prompts = _prompts(97, [10, 4])
    out = generate(llm, prompts, max_new_tokens=8)
    assert [len(t) for t in out] == [3, 8]  # 10 + 3 - 1 = 12 positions fed at most
    assert out == generate(llm, prompts, max_new_tokens=8, use_cache=False)
    assert generate(llm, prompts, max_new_tokens=0) == [[], []]
    with pytest.raises(ValueError, match=r"prompts\[0\] has 13 tokens, beyond max_seq_len=12"):
        generate(llm, _prompts(97, [13]), max_new_tokens=1)
    with pytest.raises(ValueError, match="prompts must be"):
        generate(llm, [], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(llm, [prompts[0], torch.zeros(0, dtype=torch.long)], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompts\[0\]: embeddings"):
        generate(llm, [torch.zeros(3, 7)], max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        generate(llm, prompts, max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(llm, prompts, max_new_tokens=1, temperature=-1.0)
    with pytest.raises(ValueError, match="stop_sequences"):
        generate(llm, prompts, max_new_tokens=1, stop_sequences=[[]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_stream(llm, prompts, max_new_tokens=-1)  # raised at the call, not at the first next()
    cache = PackedKVCache.for_model(llm, [2, 20])
    with pytest.raises(ValueError, match="stream 1: 0 cached \\+ 13 new tokens exceed max_seq_len=12"):
        llm(
            torch.zeros(14, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 1, 14], dtype=torch.int32),
            cache=cache,
        )
    assert cache.lengths == [0, 0]  # untouched by the refused step
    cache = PackedKVCache.for_model(llm, [2, 3])
    with pytest.raises(ValueError, match="stream 1: 0 cached \\+ 4 new tokens exceed its capacity 3"):
        llm(
            torch.zeros(5, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 1, 5], dtype=torch.int32),
            cache=cache,
        )


def test_greedy_matches_transformers(seed, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=83,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    llm = LLM.from_hf(tmp_path)
    prompts = _prompts(83, [random.randint(1, 10) for _ in range(3)])
    ours = generate(llm, prompts, max_new_tokens=10)
    for p, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                p[None],
                attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
                max_new_tokens=10,
                min_new_tokens=10,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert tokens == ref[0, p.numel() :].tolist()
