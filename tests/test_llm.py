"""sphinx_x.llm against transformers: tiny random Llama, Mistral, Qwen2 and Mixtral built and saved by
transformers, loaded with LLM.from_hf, logits compared packed and (B, L); InternLM2 through its fused wqkv
layout written by hand; save_hf round trips; MoE controls; bad checkpoints and inputs."""

import copy
import json
import random

import pytest
import torch
from conftest import assert_close_to_reference
from safetensors import safe_open
from safetensors.torch import save_file

from sphinx_x.llm import LLM, LLMConfig

transformers = pytest.importorskip("transformers")

# The issue's yardstick: our fp32 logits equal transformers' fp32 logits within 1e-5 (absolute). Logits here
# are O(1) (init std 0.1): fp32 rounding of two different summation orders is ~1e-6 at that size.
TOL = 1e-5


def _hf_model(arch: str, *, vocab: int, tie: bool = False, n_heads: int = 4, n_kv: int = 2):
    common = dict(
        vocab_size=vocab,
        hidden_size=16 * n_heads,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        initializer_range=0.1,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None, rope_theta=1e6)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, num_local_experts=5, num_experts_per_tok=2, rope_theta=1e6)
        cls = transformers.MixtralForCausalLM
    return cls(cfg).eval()


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _packed(vocab: int, lengths: list[int]):
    seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize(
    "arch,tie", [("llama", False), ("mistral", False), ("qwen2", True), ("qwen2", False), ("mixtral", False)]
)
def test_logits_match_transformers(arch, tie, seed, tmp_path):
    vocab = random.randrange(61, 140) | 1  # odd
    hf = _hf_model(arch, vocab=vocab, tie=tie)
    hf.save_pretrained(tmp_path)
    llm = LLM.from_hf(tmp_path)
    assert llm.cfg.arch == arch and llm.cfg.tie_embeddings == tie
    assert all(p.dtype == torch.float32 for p in llm.parameters())

    lengths = [random.randint(1, 23) for _ in range(4)] + [1]
    seqs, ids, cu = _packed(vocab, lengths)
    with torch.no_grad():
        ref = [hf(s[None], output_router_logits=arch == "mixtral") for s in seqs]
        out = llm(ids, cu_seqlens=cu)
    ref_logits = torch.cat([r.logits[0] for r in ref])
    assert out.logits.shape == (ids.numel(), vocab)
    assert _max_err(out.logits, ref_logits) <= TOL, f"packed logits (seed {seed})"

    if arch == "mixtral":
        assert out.aux_loss.ndim == 0 and len(out.expert_counts) == 2 and len(out.router_logits) == 2
        for layer in range(2):
            ref_router = torch.cat([r.router_logits[layer] for r in ref])
            assert _max_err(out.router_logits[layer], ref_router) <= TOL
            ids_layer = out.expert_ids[layer]
            counts = torch.bincount(ids_layer.reshape(-1), minlength=5)
            assert torch.equal(out.expert_counts[layer], counts) and int(counts.sum()) == 2 * ids.numel()
        # the aux loss is the mean over layers of E/(T*k) * sum_e count_e * mean_prob_e, here in float64
        per_layer = []
        for logits, chosen in zip(out.router_logits, out.expert_ids, strict=True):
            probs = torch.softmax(logits.double(), -1)
            count = torch.bincount(chosen.reshape(-1), minlength=5).double()
            per_layer.append(5 / (ids.numel() * 2) * (count * probs.mean(0)).sum())
        assert abs(out.aux_loss.item() - torch.stack(per_layer).mean().item()) <= 1e-6
    else:
        assert out.aux_loss.item() == 0 and out.expert_counts is None and out.router_logits is None

    # (B, L) without padding
    batch = torch.randint(0, vocab, (3, random.randint(2, 19)))
    with torch.no_grad():
        ref_b = hf(batch).logits
        out_b = llm(batch)
    assert out_b.logits.shape == ref_b.shape
    assert _max_err(out_b.logits, ref_b) <= TOL, f"(B, L) logits (seed {seed})"


def test_embeddings_rows_hidden_and_positions(seed, tmp_path):
    hf = _hf_model("llama", vocab=97)
    hf.save_pretrained(tmp_path)
    llm = LLM.from_hf(tmp_path)
    lengths = [7, 3, 12]
    seqs, ids, cu = _packed(97, lengths)
    with torch.no_grad():
        out = llm(ids, cu_seqlens=cu, return_hidden=True)
        by_embeds = llm(inputs_embeds=llm.tok_embeddings(ids), cu_seqlens=cu)
        last = cu[1:].long() - 1
        rows = llm(ids, cu_seqlens=cu, logits_rows=last)
        # explicit positions equal the default restart-per-sequence ones
        pos = torch.cat([torch.arange(n) for n in lengths])
        explicit = llm(ids, cu_seqlens=cu, position_ids=pos)
    assert torch.equal(by_embeds.logits, out.logits)
    batch = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        by_ids, by_batch_embeds = llm(batch, return_hidden=True), llm(inputs_embeds=llm.tok_embeddings(batch))
    assert by_ids.hidden.shape == (2, 5, 64)
    assert torch.equal(by_batch_embeds.logits, by_ids.logits)
    # the head on the chosen rows only: a GEMM of another shape, judged against float64
    head64 = out.hidden[last].double() @ llm.output.weight.double().T
    assert_close_to_reference(rows.logits, head64, out.logits[last], name="logits_rows")
    assert torch.equal(explicit.logits, out.logits)
    assert out.hidden.shape == (ids.numel(), 64)
    assert torch.equal(llm.output(out.hidden), out.logits)


def _internlm2_from_llama(hf_llama, folder):
    """An InternLM2 checkpoint of the same weights, written independently of sphinx_x.llm: wqkv rows grouped
    per kv head as [q heads of the group..., k, v] (InternLM2's modeling code: rearrange "(h gs d)")."""
    cfg = hf_llama.config
    sd = {k: v.detach().clone() for k, v in hf_llama.state_dict().items()}
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // Hq
    G = Hq // Hkv
    out = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        rows = []
        for h in range(Hkv):
            for g in range(G):
                rows.append(q[(h * G + g) * D : (h * G + g + 1) * D])
            rows.append(k[h * D : (h + 1) * D])
            rows.append(v[h * D : (h + 1) * D])
        out[p + "attention.wqkv.weight"] = torch.cat(rows).contiguous()
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    folder.mkdir()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": Hq,
        "num_key_value_heads": Hkv,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return out


def test_internlm2_fused_wqkv_layout(seed, tmp_path):
    hf = _hf_model("llama", vocab=89, n_heads=6, n_kv=2)  # 3 query heads per kv head
    written = _internlm2_from_llama(hf, tmp_path / "internlm2")
    llm = LLM.from_hf(tmp_path / "internlm2")
    assert llm.cfg.arch == "internlm2" and llm.cfg.n_kv_heads == 2
    seqs, ids, cu = _packed(89, [9, 4, 15])
    with torch.no_grad():
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
        out = llm(ids, cu_seqlens=cu)
    assert _max_err(out.logits, ref) <= TOL
    # and back: the same fused layout, bit for bit, plus the config fields it came with
    llm.save_hf(tmp_path / "again")
    again = _tensors(tmp_path / "again")
    assert again.keys() == written.keys()
    for k, t in written.items():
        assert torch.equal(again[k], t), k
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForCausalLM"] and config["auto_map"]


@pytest.mark.parametrize(
    "arch,tie", [("llama", False), ("mistral", False), ("qwen2", True), ("qwen2", False), ("mixtral", False)]
)
def test_save_hf_round_trip_bit_exact(arch, tie, seed, tmp_path):
    hf = _hf_model(arch, vocab=71, tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    original = _tensors(tmp_path / "hf")
    llm = LLM.from_hf(tmp_path / "hf")
    llm.save_hf(tmp_path / "ours")
    assert _tensors(tmp_path / "ours").keys() == original.keys()
    for k, t in _tensors(tmp_path / "ours").items():
        assert torch.equal(t, original[k]), k
    # sharded: several files and an index, read back to the same parameters
    llm.save_hf(tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    back = LLM.from_hf(tmp_path / "sharded")
    for (name, a), (_, b) in zip(llm.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert back.cfg == llm.cfg
    # and a checkpoint transformers itself sharded
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "hf_sharded").glob("*.safetensors"))) > 2
    sharded = LLM.from_hf(tmp_path / "hf_sharded")
    for (name, a), (_, b) in zip(llm.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # transformers reads our files too
    reloaded = type(hf).from_pretrained(tmp_path / "sharded").eval()
    x = torch.randint(0, 71, (2, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, hf(x).logits)


def test_bf16_load_on_meta(seed, tmp_path):
    hf = _hf_model("mixtral", vocab=67)
    hf.save_pretrained(tmp_path)
    llm = LLM.from_hf(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in llm.parameters())
    original = _tensors(tmp_path)
    w1 = llm.layers[1].feed_forward.w1
    assert torch.equal(w1[3], original["model.layers.1.block_sparse_moe.experts.3.w1.weight"].bfloat16().T)
    assert torch.equal(llm.tok_embeddings.weight, original["model.embed_tokens.weight"].bfloat16())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_within_transformers_bf16_error(arch, seed, tmp_path):
    """bf16 weights and activations: our error against transformers in float64 is at most twice transformers'
    own bf16 error (the project's rule). Dense only: bf16 can flip a near-tied MoE routing against float64."""
    hf = _hf_model(arch, vocab=97)
    hf.save_pretrained(tmp_path)
    llm = LLM.from_hf(tmp_path, dtype=torch.bfloat16)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    hf64 = copy.deepcopy(hf).to(torch.float64)
    lengths = [random.randint(1, 20) for _ in range(3)]
    seqs, ids, cu = _packed(97, lengths)
    with torch.no_grad():
        out = llm(ids, cu_seqlens=cu).logits
        ref16 = torch.cat([hf16(s[None]).logits[0] for s in seqs])
        ref64 = torch.cat([hf64(s[None]).logits[0] for s in seqs])
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, ref64, ref16, name=f"{arch} bf16 logits")


def test_active_experts_and_pruning_match_transformers(seed, tmp_path):
    hf = _hf_model("mixtral", vocab=79)
    hf.save_pretrained(tmp_path)
    llm = LLM.from_hf(tmp_path)
    seqs, ids, cu = _packed(79, [11, 6])

    # top-1 routing: transformers' router reads its own top_k
    llm.set_active_experts(1)
    for layer in hf.model.layers:
        layer.mlp.gate.top_k = 1
    with torch.no_grad():
        out = llm(ids, cu_seqlens=cu)
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    assert out.expert_ids[0].shape == (ids.numel(), 1)
    assert _max_err(out.logits, ref) <= TOL

    # prune experts {1, 3} in layer 0 and {0} in layer 1, top-2 again; transformers' router gets -inf logits
    llm.set_active_experts(2)
    mask = llm.prune_experts([[0, 2, 4], [1, 2, 3, 4]])
    assert mask.tolist() == [[True, False, True, False, True], [False, True, True, True, True]]
    pruned = [[1, 3], [0]]
    for layer, drop in zip(hf.model.layers, pruned, strict=True):
        router = layer.mlp.gate
        router.top_k = 2

        def masked(hidden, router=router, drop=drop):
            logits = torch.nn.functional.linear(hidden, router.weight)
            masked_logits = logits.clone()
            masked_logits[:, drop] = float("-inf")
            probs = torch.softmax(masked_logits.float(), -1)
            top, idx = torch.topk(probs, 2, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx

        router.forward = masked
    with torch.no_grad():
        out = llm(ids, cu_seqlens=cu)
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    assert _max_err(out.logits, ref) <= TOL
    for layer, drop in enumerate(pruned):
        assert not torch.isin(out.expert_ids[layer], torch.tensor(drop)).any()
        assert out.expert_counts[layer][drop].sum() == 0

    random_mask = llm.prune_experts(drop_random=2, seed=seed)
    assert random_mask.sum(1).tolist() == [3, 3]
    assert torch.equal(random_mask, llm.prune_experts(drop_random=2, seed=seed))
    assert llm.prune_experts().all()
    with pytest.raises(ValueError, match="top_k"):
        llm.prune_experts([[0], [1, 2]])
    with pytest.raises(ValueError, match="k must be"):
        llm.set_active_experts(6)


def test_activation_checkpointing_same_gradients(seed):
    cfg = LLMConfig(
        arch="mixtral", vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, n_experts=3
    )
    llm = LLM(cfg).train()
    ids = torch.randint(0, 53, (21,))
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    grads = []
    for flag in (False, True):
        llm.zero_grad()
        llm.activation_checkpointing = flag
        out = llm(ids, cu_seqlens=cu)
        (out.logits.float().logsumexp(-1).mean() + 0.01 * out.aux_loss).backward()
        grads.append([p.grad.clone() for p in llm.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_bad_checkpoints(seed, tmp_path):
    hf = _hf_model("llama", vocab=61)
    hf.save_pretrained(tmp_path / "ok")
    tensors = _tensors(tmp_path / "ok")
    config = (tmp_path / "ok" / "config.json").read_text()

    def write(name, tensors, config=config):
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(config)
        return folder

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        LLM.from_hf(write("missing", missing))
    extra = {**tensors, "model.layers.0.mlp.bias": torch.ones(8)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.mlp.bias'\]"):
        LLM.from_hf(write("extra", extra))
    # RoPE buffers of older conversions are checked against rope_theta, then skipped
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    buffers = {**tensors, "model.layers.1.self_attn.rotary_emb.inv_freq": inv_freq.float()}
    assert torch.equal(LLM.from_hf(write("buffers", buffers)).norm.weight, tensors["model.norm.weight"])
    bad = {**tensors, "model.layers.1.self_attn.rotary_emb.inv_freq": (inv_freq / 4).float()}
    with pytest.raises(ValueError, match="rotary_emb.inv_freq: RoPE frequencies"):
        LLM.from_hf(write("bad_buffers", bad))
    wrong = {**tensors, "model.norm.weight": torch.ones(65)}
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(65,\)"):
        LLM.from_hf(write("wrong", wrong))
    gpt2 = json.dumps({**json.loads(config), "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        LLM.from_hf(write("gpt2", tensors, gpt2))
    scaled = json.dumps({**json.loads(config), "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope scaling"):
        LLM.from_hf(write("scaled", tensors, scaled))
    with pytest.raises(ValueError, match="no config.json"):
        LLM.from_hf(tmp_path / "nowhere")


def test_bad_config_and_inputs(seed):
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLMConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        LLMConfig(arch="gpt2")
    with pytest.raises(ValueError, match="n_experts"):
        LLMConfig(arch="llama", n_experts=4)
    with pytest.raises(ValueError, match="top_k"):
        LLMConfig(arch="mixtral", n_experts=2, top_k=3)
    cfg = LLMConfig(vocab_size=31, dim=32, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=16)
    llm = LLM(cfg)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        llm(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="17 tokens exceeds max_seq_len=16"):
        llm(torch.zeros(20, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 20], dtype=torch.int32))
    with pytest.raises(TypeError, match="input_ids"):
        llm(torch.zeros(4))
    with pytest.raises(TypeError, match="cu_seqlens"):
        llm(torch.zeros(4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="exactly one"):
        llm()
    with pytest.raises(ValueError, match="dense"):
        llm.set_active_experts(1)
