"""transformers backend: "sphinx" attention and experts against "eager" on tiny random models.

Numbers are judged by the project's rule (tests/conftest.py): the "sphinx" float32 model's error against the
float64 model is at most twice the "eager" float32 model's, plus float32 rounding. The float64 model runs
transformers' "sdpa" attention (and eager experts): "eager" attention takes its softmax in float32 even for
float64 inputs, which is no float64 reference and turns fully padded query rows into NaN.
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")

from conftest import assert_close_to_reference  # noqa: E402
from transformers import (  # noqa: E402
    CompileConfig,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sphinx_kernels.integrations import transformers as sk_hf  # noqa: E402

VOCAB = 97
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
}


def tiny(kind: str, seed: int, **overrides):
    """A 2-layer random "llama", "mistral", "qwen2" or "mixtral" (4 experts, top 2); `overrides` go to its
    config."""
    torch.manual_seed(seed)
    config_cls, model_cls = MODELS[kind]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if kind == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2)
    model = model_cls(config_cls(**{**common, **overrides}))
    for p in model.parameters():  # HF inits small weights: widen them so differences would show
        torch.nn.init.normal_(p, std=0.2)
    model.generation_config.pad_token_id = 0
    return model.float().eval()


def with_impl(model, attn: str, experts: str | None = None):
    model.set_attn_implementation(attn)
    if experts is not None and getattr(model.config, "num_local_experts", None):
        model.set_experts_implementation(experts)
    return model


def reference64(model):
    """The float64 reference model (see the module docstring); `.float()` restores the float32 weights
    exactly."""
    return with_impl(model.double(), "sdpa", "eager")


def against_eager(model, run, name: str) -> None:
    """`run(model)` -> tensor or dict of tensors, with "sphinx" (float32) judged against the float64
    reference and "eager" float32 on the same weights (each float32 weight is exact in float64)."""
    ref32 = run(with_impl(model, "eager", "eager"))
    sk_hf.register()
    got = run(with_impl(model, "sphinx", "sphinx"))
    ref64 = run(reference64(model))
    model.float()
    if isinstance(got, torch.Tensor):
        got, ref32, ref64 = {name: got}, {name: ref32}, {name: ref64}
    assert got.keys() == ref64.keys()
    for key in got:
        assert_close_to_reference(got[key], ref64[key], ref32[key], name=f"{name} {key}")


def logits_and_grads(batch):
    """A run for `against_eager`: logits on real tokens and every parameter's gradient."""

    def run(model):
        model.zero_grad()
        out = model(**batch)
        mask = batch.get("attention_mask")
        logits = out.logits
        if mask is not None and mask.ndim == 2:  # pad positions' outputs are arbitrary (NaN in eager float64)
            logits = torch.where(mask[..., None].bool(), logits, 0.0)
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else 0
        (logits.square().mean() + aux).backward()
        params = getattr(model, "_orig_mod", model).named_parameters()  # (the module under torch.compile)
        grads = {n: p.grad.clone() for n, p in params if p.grad is not None}
        return {"logits": logits.detach(), **grads}

    return run


def padded_batch(seed: int, side: str, lengths=(11, 6, 1, 9)):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, width - n :] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def packed_batch(seed: int, lengths=(7, 3, 12, 2), flash_kwargs: bool = False):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    batch = collator([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    batch["use_cache"] = False  # with a cache, transformers' eager/sdpa masks ignore packing
    return seqs, batch


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_eager(seed, kind, side):
    batch = padded_batch(seed, side)
    against_eager(tiny(kind, seed), logits_and_grads(batch), f"{kind} {side}-padded")


def test_mask_with_holes_matches_eager(seed):
    """Any 2-D mask, not only left or right padding: real tokens attend to the real tokens before them."""
    batch = padded_batch(seed, "right", lengths=(10, 10, 7))
    gen = torch.Generator().manual_seed(seed)
    holes = torch.rand(batch["attention_mask"].shape, generator=gen) < 0.3
    batch["attention_mask"] = batch["attention_mask"].masked_fill(holes, 0)
    batch["attention_mask"][:, 0] = 1
    against_eager(tiny("llama", seed), logits_and_grads(batch), "llama mask with holes")


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_packed_batch_matches_unpacked(seed, kind):
    """DataCollatorWithFlattening packs sequences into one row with restarting position ids: the logits of
    each sequence equal those of the sequence run alone (with and without the collator's flash kwargs)."""
    seqs, _ = packed_batch(seed)
    model = tiny(kind, seed)

    def alone(model):
        return torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])

    ref32 = alone(with_impl(model, "eager", "eager"))
    ref64 = alone(reference64(model))
    model.float()
    sk_hf.register()
    with_impl(model, "sphinx", "sphinx")
    for flash_kwargs in (False, True):
        _, batch = packed_batch(seed, flash_kwargs=flash_kwargs)
        got = model(**batch).logits[0]
        assert_close_to_reference(got, ref64, ref32, name=f"{kind} packed (flash kwargs {flash_kwargs})")


def generation_batch(seed: int, padded: bool):
    """A left-padded batch (rows of 11, 6, 1 and 9 tokens) or an unpadded one of the same shape (4, 11): no
    pad token, so generate's mask is all ones."""
    batch = padded_batch(seed, "left")
    if padded:
        return batch
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, batch["input_ids"].shape, generator=gen)}


GENERATE = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "mixtral"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_eager(seed, kind, cache, padded):
    """Greedy generation through transformers' cache paths: dynamic or static KV cache (whose preallocated
    key buffer is longer than the tokens written), a left-padded or an unpadded batch. The tokens equal
    eager's and every step's logits pass the accuracy rule."""
    model = tiny(kind, seed)
    batch = generation_batch(seed, padded)
    runs = {}
    for name in ("eager", "sphinx", "64"):
        sk_hf.register()
        m = reference64(model) if name == "64" else with_impl(model.float(), name, name)
        runs[name] = m.generate(**batch, **GENERATE, cache_implementation=cache)
    model.float()
    assert torch.equal(runs["sphinx"].sequences, runs["eager"].sequences)
    assert_close_to_reference(
        torch.stack(runs["sphinx"].logits),
        torch.stack(runs["64"].logits),
        torch.stack(runs["eager"].logits),
        name=f"{kind} {cache} cache, padded={padded}",
    )


def test_static_cache_forward_without_mask(seed):
    """A StaticCache handed to the model directly, no attention mask: prefill then decode steps read only the
    written slots of the preallocated keys (the bug: queries aligned to the end of the buffer)."""
    from transformers import StaticCache

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 6), generator=gen)
    steps = torch.randint(1, VOCAB, (2, 3), generator=gen)

    def run(model):
        cache = StaticCache(config=model.config, max_cache_len=24)
        logits = [model(input_ids=ids, cache=cache, use_cache=True).logits]
        for i in range(steps.shape[1]):
            logits.append(model(input_ids=steps[:, i : i + 1], cache=cache, use_cache=True).logits)
        return torch.cat(logits, dim=1)

    with torch.no_grad():
        against_eager(tiny("llama", seed), run, "llama StaticCache without mask")


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_custom_4d_mask_matches_eager(seed, dtype):
    """A caller's 4-D mask (transformers' custom-mask use: continuations sharing a prefix in one row, each
    seeing the prefix and itself), bool or additive float, runs as SDPA with that mask."""
    gen = torch.Generator().manual_seed(seed)
    prefix, first, second = 4, 3, 2
    total = prefix + first + second
    ids = torch.randint(1, VOCAB, (1, total), generator=gen)
    position_ids = torch.tensor([list(range(prefix + first)) + list(range(prefix, prefix + second))])
    seen = torch.ones(total, total).tril().bool()
    seen[prefix + first :, prefix : prefix + first] = False  # the second continuation skips the first
    mask = seen[None, None]
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    def run(model):
        m = mask if mask.dtype == torch.bool else mask.to(model.dtype)
        return model(input_ids=ids, attention_mask=m, position_ids=position_ids).logits

    with torch.no_grad():
        against_eager(tiny("llama", seed), run, f"llama custom 4-D {dtype} mask")


def test_mistral_sliding_window_matches_eager(seed):
    """Mistral passes its sliding window to every call: a window longer than the keys changes nothing (the
    varlen path); a shorter one comes as a 4-D mask from our mask function and runs on SDPA."""
    model = tiny("mistral", seed, sliding_window=5)
    batch = padded_batch(seed, "right")  # 11 tokens per row at most
    against_eager(model, logits_and_grads(batch), "mistral window 5")
    model.config.sliding_window = 16
    against_eager(model, logits_and_grads(batch), "mistral window 16")


def test_window_refused_with_a_foreign_mask(seed):
    """A window shorter than the keys with a 2-D mask made elsewhere is refused, never ignored."""
    sk_hf.register()
    q = torch.randn(1, 4, 9, 8)
    k = v = torch.randn(1, 2, 9, 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="sliding-window"):
        sk_hf.sphinx_attention_forward(module, q, k, v, torch.ones(1, 9, dtype=torch.bool), sliding_window=4)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_experts_activations_match_eager(seed, act, monkeypatch):
    """Gate activations other than SiLU run on our permutation and grouped GEMMs (no fallback)."""

    def no_fallback():
        raise AssertionError("fell back to transformers' experts")

    monkeypatch.setattr(sk_hf, "_fallback_experts", no_fallback)
    batch = padded_batch(seed, "left")
    against_eager(tiny("mixtral", seed, hidden_act=act), logits_and_grads(batch), f"mixtral {act}")


def test_uncovered_experts_fall_back_once(seed, caplog):
    """Experts whose layout we do not cover (here a post-expert norm) run transformers' grouped_mm experts
    with one warning, and still match eager."""
    model = tiny("mixtral", seed)
    for layer in model.model.layers:
        layer.mlp.experts.has_post_expert_norm = True
        layer.mlp.experts.post_expert_norm = torch.nn.Identity()
    sk_hf._reported.clear()
    batch = padded_batch(seed, "right")
    with caplog.at_level(logging.WARNING, logger=sk_hf.__name__):
        against_eager(model, logits_and_grads(batch), "mixtral post-norm fallback")
    warnings = [r for r in caplog.records if "post-expert norms" in r.getMessage()]
    assert len(warnings) == 1


def test_torch_compile_no_graph_break(seed):
    """fullgraph torch.compile over a training step: the fixed-shape unpadding (padded batch) and packing
    (one row, position ids restarting) trace without a graph break, a new padding pattern of the same shape
    does not recompile, and logits and gradients pass the rule against eager."""
    model = tiny("llama", seed)
    batches = {
        "padded": padded_batch(seed, "left"),
        "padded again": padded_batch(seed + 1, "left", lengths=(3, 11, 8, 5)),
        "packed": packed_batch(seed)[1],
    }
    refs = {}
    for name, batch in batches.items():
        ref32 = logits_and_grads(batch)(with_impl(model, "eager"))
        refs[name] = (ref32, logits_and_grads(batch)(reference64(model)))
        model.float()
    sk_hf.register()
    with_impl(model, "sphinx")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    for name, batch in batches.items():
        with torch._dynamo.config.patch(error_on_recompile=name == "padded again"):
            got = logits_and_grads(batch)(compiled)
        ref32, ref64 = refs[name]
        for key in got:
            assert_close_to_reference(got[key], ref64[key], ref32[key], name=f"compiled {name} {key}")


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_compiled_static_cache_generation(seed, kind):
    """transformers' compiled decoding (static cache, fullgraph: a graph break is an error) on a left-padded
    and an unpadded batch of the same shape: the decoding steps of both generations run one graph (any
    recompile is an error), and give eager's tokens and logits within the rule."""
    model = tiny(kind, seed)
    batches = {padded: generation_batch(seed, padded) for padded in (True, False)}
    refs = {}
    for padded, batch in batches.items():
        ref32 = with_impl(model, "eager", "eager").generate(
            **batch, **GENERATE, cache_implementation="static"
        )
        refs[padded] = ref32, reference64(model).generate(**batch, **GENERATE, cache_implementation="static")
        model.float()
    sk_hf.register()
    with_impl(model, "sphinx", "sphinx")
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles decoding on accelerators only by default
    torch._dynamo.reset()
    counters.clear()
    for padded, batch in batches.items():
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = model.generate(**batch, **GENERATE, cache_implementation="static", compile_config=config)
        assert model._compiled_call is not None  # the decoding steps did run compiled
        ref32, ref64 = refs[padded]
        assert torch.equal(got.sequences, ref32.sequences)
        assert_close_to_reference(
            torch.stack(got.logits),
            torch.stack(ref64.logits),
            torch.stack(ref32.logits),
            name=f"{kind} compiled static, padded={padded}",
        )
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_from_pretrained_and_apply_revert(tmp_path, seed):
    model = tiny("mixtral", seed)
    model.save_pretrained(tmp_path)
    sk_hf.register()
    loaded = MixtralForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sphinx", experts_implementation="sphinx"
    )
    assert loaded.config._attn_implementation == "sphinx"
    assert loaded.get_experts_implementation()[""] == "sphinx"
    other = MixtralForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager"
    )
    state = sk_hf.apply_sphinx_kernels(other)
    assert (
        other.config._attn_implementation == "sphinx" and other.get_experts_implementation()[""] == "sphinx"
    )
    ids = torch.randint(1, VOCAB, (2, 8))
    torch.testing.assert_close(other(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)
    sk_hf.revert_sphinx_kernels(other, state)
    assert other.config._attn_implementation == "eager" and other.get_experts_implementation()[""] == "eager"


def test_without_experts_interface_attention_only(monkeypatch, caplog):
    """A transformers without ExpertsInterface (before 5.0): attention is registered, experts are not, and
    one warning says so."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers.integrations.moe", None)  # makes that import fail
    monkeypatch.setattr(sk_hf, "_registered", False)
    with caplog.at_level("WARNING", logger=sk_hf.__name__):
        assert sk_hf.register() is False
        assert sk_hf.register() is False
    warnings = [r for r in caplog.records if "attention only" in r.getMessage()]
    assert len(warnings) == 1
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping["sphinx"] is sk_hf.sphinx_attention_forward


def test_trainer_packed_steps_match_eager(seed, tmp_path):
    """Two optimizer steps of transformers' Trainer on packed batches (DataCollatorWithFlattening): the
    parameters after "sphinx" training pass the rule against "eager" training from the same start."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(seed)
    data = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=gen).tolist()} for n in (9, 4, 13, 6, 2, 8)]
    trained = {}
    for impl, dtype in (("eager", torch.float32), ("sphinx", torch.float32), ("sdpa", torch.float64)):
        sk_hf.register()
        model = with_impl(tiny("mixtral", seed).to(dtype), impl, "sphinx" if impl == "sphinx" else "eager")
        model.train()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{impl}{dtype}"),
            per_device_train_batch_size=3,
            max_steps=2,
            optim="sgd",  # Adam would turn rounding noise in near-zero gradients into lr-sized steps
            learning_rate=0.1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=seed,
        )
        collator = DataCollatorWithFlattening(return_tensors="pt")
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
        trained[impl, dtype] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, ref64 in trained["sdpa", torch.float64].items():
        assert_close_to_reference(
            trained["sphinx", torch.float32][name], ref64, trained["eager", torch.float32][name], name=name
        )


def test_register_is_idempotent():
    assert sk_hf.register() is True
    assert sk_hf.register() is True
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["sphinx"] is sk_hf.sphinx_attention_forward
    assert AttentionMaskInterface._global_mapping["sphinx"] is sk_hf.sphinx_attention_mask


def test_triton_backend_through_the_interpreter(seed, monkeypatch):
    """The same model on the Triton kernels (the interpreter on CPU): logits and gradients pass the rule."""
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "triton")
    batch = padded_batch(seed, "right")
    against_eager(tiny("mixtral", seed), logits_and_grads(batch), "mixtral on triton")
