"""transformers backend: "sphinx" attention and experts against "eager" on tiny random models."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from sphinx_kernels.integrations import transformers as sk_hf  # noqa: E402

VOCAB = 97


def tiny(kind: str, seed: int, **overrides):
    """A 2-layer random "llama", "mistral" or "mixtral" (4 experts, top 2); `overrides` go to its config."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **overrides,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    for p in model.parameters():  # HF inits small weights: widen them so differences would show
        torch.nn.init.normal_(p, std=0.2)
    return model.float().eval()


def with_impl(model, attn: str, experts: str | None):
    model.set_attn_implementation(attn)
    if experts is not None and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    return model


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    mask = batch.get("attention_mask")
    logits = out.logits if mask is None else out.logits * mask[..., None]
    (logits.square().mean() + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def padded_batch(seed: int, side: str):
    gen = torch.Generator().manual_seed(seed)
    lengths = [11, 6, 1, 9]
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, width - n :] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture
def seed():
    return int(torch.randint(0, 2**31 - 1, ()))


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_eager(seed, kind, side):
    batch = padded_batch(seed, side)
    model = tiny(kind, seed)
    ref_logits, ref_grads = logits_and_grads(with_impl(model, "eager", "eager"), batch)
    sk_hf.register()
    logits, grads = logits_and_grads(with_impl(model, "sphinx", "sphinx"), batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_packed_batch_matches_unpacked(seed, kind):
    """DataCollatorWithFlattening packs sequences into one row with restarting position ids: the per-token
    loss must equal the one of each sequence run alone (eager, unpadded)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (7, 3, 12, 2)]
    model = with_impl(tiny(kind, seed), "eager", "eager")
    expected = []
    for s in seqs:
        ids = torch.tensor([s])
        logits = model(input_ids=ids).logits[0, :-1]
        expected.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    sk_hf.register()
    with_impl(model, "sphinx", "sphinx")
    for flash_kwargs in (False, True):
        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
        batch = collator([{"input_ids": s} for s in seqs])
        batch.pop("labels")
        logits = model(**batch).logits[0]
        ids = batch["input_ids"][0]
        start = 0
        for s, exp in zip(seqs, expected, strict=True):
            seg = slice(start, start + len(s) - 1)
            got = torch.nn.functional.cross_entropy(
                logits[seg], ids[start + 1 : start + len(s)], reduction="none"
            )
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
            start += len(s)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_generate_matches_eager(seed, kind):
    batch = padded_batch(seed, "left")
    model = tiny(kind, seed)
    model.generation_config.pad_token_id = 0
    ref = with_impl(model, "eager", "eager").generate(**batch, max_new_tokens=6, do_sample=False)
    sk_hf.register()
    got = with_impl(model, "sphinx", "sphinx").generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, ref)


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
    torch.testing.assert_close(other(input_ids=ids).logits, loaded(input_ids=ids).logits)
    sk_hf.revert_sphinx_kernels(other, state)
    assert other.config._attn_implementation == "eager" and other.get_experts_implementation()[""] == "eager"


def test_torch_compile(seed):
    """torch.compile over the whole model (graph breaks allowed: unpadding has data-dependent shapes)."""
    sk_hf.register()
    model = with_impl(tiny("llama", seed), "sphinx", "sphinx")
    batch = padded_batch(seed, "left")
    expected = model(**batch).logits * batch["attention_mask"][..., None]
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager")(**batch).logits * batch["attention_mask"][..., None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mistral_window_longer_than_the_batch(seed):
    """Mistral passes its sliding window to every attention call: one longer than the keys is a no-op, a
    shorter one is refused (not silently ignored)."""
    model = tiny("mistral", seed, sliding_window=16)
    batch = padded_batch(seed, "right")  # 11 tokens per row at most
    expected = with_impl(model, "eager", None)(**batch).logits * batch["attention_mask"][..., None]
    sk_hf.register()
    got = with_impl(model, "sphinx", None)(**batch).logits * batch["attention_mask"][..., None]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        model(input_ids=torch.randint(1, VOCAB, (1, 20)))


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
    parameters after "sphinx" training equal those after "eager" training from the same start."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(seed)
    data = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=gen).tolist()} for n in (9, 4, 13, 6, 2, 8)]
    trained = {}
    for impl in ("eager", "sphinx"):
        model = with_impl(tiny("mixtral", seed), impl, impl).train()
        args = TrainingArguments(
            output_dir=str(tmp_path / impl),
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
        trained[impl] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, ref in trained["eager"].items():
        torch.testing.assert_close(
            trained["sphinx"][name], ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_register_is_idempotent():
    assert sk_hf.register() is True
    assert sk_hf.register() is True
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping["sphinx"] is sk_hf.sphinx_attention_forward


def test_triton_backend_through_the_interpreter(seed, monkeypatch):
    """The same model on the Triton kernels (the interpreter on CPU): logits and gradients match eager."""
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "triton")
    batch = padded_batch(seed, "right")
    model = tiny("mixtral", seed)
    ref_logits, ref_grads = logits_and_grads(with_impl(model, "eager", "eager"), batch)
    sk_hf.register()
    logits, grads = logits_and_grads(with_impl(model, "sphinx", "sphinx"), batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4, msg=name)
