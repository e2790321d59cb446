"""sphinx_x.model: template and labels, the skip-token layout, packed loss == per-sample losses, MoE expert
counts, training step, generation (cache == recompute), checkpoints and bad input."""

import json
import random
import sys

import pytest
import torch
from conftest import assert_close_to_reference
from safetensors import safe_open
from safetensors.torch import save_file

import sphinx_kernels as sk
from sphinx_x.config import get_config
from sphinx_x.llm import LLM
from sphinx_x.model import BUNDLED_TOKENIZER, BundledTokenizer, SphinxX, load_tokenizer
from sphinx_x.template import SEPARATOR, SYSTEM, format_conversation, tokenize_conversation
from sphinx_x.tokenizer import BUNDLED_MARK

WORDS = "the a dog cat red blue sky image shows two on in sits near what is where how many".split()


def _text(rng: random.Random, lo: int = 1, hi: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _conversation(rng: random.Random, turns: int, generation: bool = False) -> list[dict]:
    conv = []
    for _ in range(turns):
        conv += [{"from": "human", "value": _text(rng) + "?"}, {"from": "gpt", "value": _text(rng) + "."}]
    return conv[:-1] if generation else conv


def _image(gen: torch.Generator, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)


def _samples(seed: int, generation: bool = False) -> list[dict]:
    """Images of odd sizes (wide and tall ones skip tiles), a text-only sample, multi-turn conversations."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    sizes = [(rng.randint(20, 60), rng.randint(150, 260)), None, (rng.randint(150, 260), rng.randint(20, 70))]
    return [
        {
            "image": None if s is None else _image(gen, *s),
            "conversations": _conversation(rng, 1 + i % 2, generation),
        }
        for i, s in enumerate(sizes)
    ]


def _model(name: str, seed: int, **overrides) -> SphinxX:
    torch.manual_seed(seed)
    return SphinxX(get_config(name, **overrides))


# ----------------------------------------------------------------------------------------------- template
def test_template_text_and_labels():
    conv = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Red."},
    ]
    pieces = format_conversation(conv)
    expected = f"{SYSTEM}\n\n### Human: What is it?\n### Assistant: A dog.\n### Human: Color?\n### Assistant: Red.\n###"
    assert "".join(text for text, _ in pieces) == expected
    assert [text for text, sup in pieces if sup] == [" A dog.\n###", " Red.\n###"]
    prompt = format_conversation(conv[:3], add_generation_prompt=True)
    assert "".join(t for t, _ in prompt).endswith("\n### Human: Color?\n### Assistant:")

    tok = load_tokenizer()
    ids, labels = tokenize_conversation(tok, conv)
    assert tok.decode(ids) == expected
    supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert supervised == [lab for lab in labels if lab != -100]
    assert tok.decode(supervised) == " A dog.\n### Red.\n###"


@pytest.mark.parametrize(
    "conv, match",
    [
        ([{"from": "human", "value": "hi"}], "no assistant"),
        ([{"from": "gpt", "value": "hi"}], "must alternate"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "must alternate"),
        ([{"from": "system", "value": "a"}], "'human' or 'gpt'"),
        ([], "empty"),
    ],
)
def test_template_rejects(conv, match):
    with pytest.raises(ValueError, match=match):
        format_conversation(conv)


def test_bundled_tokenizer_matches_transformers(seed):
    from transformers import AutoTokenizer

    ours = load_tokenizer()
    theirs = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    rng = random.Random(seed)
    text = f"{SYSTEM}\n\n### Human: {_text(rng, 5, 30)} \u00fcn\u00efcode \u6f22\u5b57?{SEPARATOR} Assistant: {_text(rng)}"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert (len(ours), ours.bos_token_id, ours.eos_token_id) == (
        len(theirs),
        theirs.bos_token_id,
        theirs.eos_token_id,
    )


# ----------------------------------------------------------------------------------------------- layout
def test_skip_token_layout_follows_plan_tiles(seed):
    model = _model("tiny", seed)
    samples = _samples(seed)
    batch = model.prepare(samples)
    N = model.tokens_per_view
    images = [s["image"] for s in samples if s["image"] is not None]
    plan = sk.plan_tiles([im.shape[:2] for im in images], model.config.canvas, model.config.grid)
    assert batch.views.shape[0] == plan.num_views == sum(1 + int(k.sum()) for k in plan.kept)
    assert plan.num_skipped > 0  # the wide and tall images skip tiles

    with torch.no_grad():
        embeds = model.embed(batch)
        view_tokens = model.vision(batch.views)
    bounds = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert lengths == [model.sample_length(s) for s in samples]
    assert lengths == [
        model.sample_length(s, None if s["image"] is None else tuple(s["image"].shape[:2])) for s in samples
    ]
    assert batch.position_ids.tolist() == [p for n in lengths for p in range(n)]

    image_of = []
    k = 0
    for s in samples:
        image_of.append(None if s["image"] is None else k)
        k += s["image"] is not None
    view = 0
    for i, start in enumerate(bounds[:-1]):
        e = embeds[start : bounds[i + 1]]
        assert batch.input_ids[start].item() == model.tokenizer.bos_token_id
        img = image_of[i]
        if img is None:
            assert not batch.image_mask[start : bounds[i + 1]].any()
            continue
        # expected layout, read off the plan: global view, then each grid cell row-major
        kept = plan.kept[img]
        pos, skips = 1, 0
        cells = [None] + [(r, c) for r in range(plan.grid) for c in range(plan.grid)]
        for cell in cells:
            if cell is None or kept[cell]:
                assert torch.equal(e[pos], model.img_start.detach())
                assert torch.equal(e[pos + 1 : pos + 1 + N], view_tokens[view])
                assert torch.equal(e[pos + 1 + N], model.img_end.detach())
                pos, view = pos + N + 2, view + 1
            else:
                assert torch.equal(e[pos], model.skip_token.detach())
                pos, skips = pos + 1, skips + 1
        assert skips == plan.skipped_per_image[img]
        assert pos - 1 == plan.visual_tokens(N)[img]
        assert (
            batch.image_mask[start + 1 : start + pos].all()
            and not batch.image_mask[start + pos : bounds[i + 1]].any()
        )
    assert view == plan.num_views


def test_labels_only_on_replies(seed):
    model = _model("tiny", seed)
    samples = _samples(seed)
    batch = model.prepare(samples)
    bounds = batch.cu_seqlens.tolist()
    for i, s in enumerate(samples):
        labels = batch.labels[bounds[i] : bounds[i + 1]]
        ids = batch.input_ids[bounds[i] : bounds[i + 1]]
        sup = labels != -100
        assert torch.equal(labels[sup], ids[sup])
        replies = "".join(f" {t['value']}{SEPARATOR}" for t in s["conversations"] if t["from"] == "gpt")
        assert model.tokenizer.decode(ids[sup].tolist()) == replies
        assert not sup[batch.image_mask[bounds[i] : bounds[i + 1]]].any()
        # targets: the next token's label inside the sample, nothing past its end
        targets = batch.targets[bounds[i] : bounds[i + 1]]
        assert torch.equal(targets[:-1], labels[1:]) and targets[-1] == -100
    assert batch.num_supervised == int((batch.targets != -100).sum())


# ----------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_packed_loss_equals_per_sample_losses(name, seed):
    model = _model(name, seed)
    samples = _samples(seed)
    packed = model.loss(samples, reduction="sum")
    per32 = torch.stack([model.loss([s], reduction="sum") for s in samples]).sum()
    model64 = SphinxX(model.config, dtype=torch.float64, tokenizer=model.tokenizer)
    model64.load_state_dict(model.state_dict())
    per64 = torch.stack([model64.loss([s], reduction="sum") for s in samples]).sum()
    assert packed.dtype == torch.float32
    assert_close_to_reference(packed.detach(), per64.detach(), per32.detach(), name="packed loss (sum)")
    assert abs(packed.item() - per32.item()) <= 1e-5 * abs(per32.item())
    batch = model.prepare(samples)
    mean = model(batch).loss
    assert_close_to_reference(mean.detach(), per64.detach() / batch.num_supervised, name="mean loss")


def test_train_step_moe_counts_and_controls(seed):
    model = _model("tiny-moe", seed)
    samples = _samples(seed)
    batch = model.prepare(samples)
    towers = {
        k: v.clone() for k, v in model.vision.state_dict().items() if k.startswith(("dino", "convnext"))
    }
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    out = model(batch)
    # The image/text split of the expert counts, independently: image positions read off the tile plan (right
    # after each image sample's BOS, plan.visual_tokens of them), each token's experts the top-k of its
    # router logits.
    cfg = model.config.llm
    with torch.no_grad():
        routed = model.llm(
            inputs_embeds=model.embed(batch),
            cu_seqlens=batch.cu_seqlens,
            position_ids=batch.position_ids,
            compute_logits=False,
        )
    visual = batch.plan.visual_tokens(model.tokens_per_view)
    is_image = torch.zeros(batch.num_tokens, dtype=torch.bool)
    k = 0
    for start, sample in zip(batch.cu_seqlens[:-1].tolist(), samples, strict=True):
        if sample["image"] is not None:
            is_image[start + 1 : start + 1 + visual[k]] = True
            k += 1
    for layer, logits in enumerate(routed.router_logits):
        chosen = logits.float().topk(cfg.top_k, dim=-1).indices
        for counts, rows in ((out.expert_counts_image, is_image), (out.expert_counts_text, ~is_image)):
            assert torch.equal(counts[layer], torch.bincount(chosen[rows].flatten(), minlength=cfg.n_experts))
    (out.loss + model.config.aux_loss_weight * out.aux_loss).backward()
    opt.step()
    after = model(batch)
    assert after.loss.item() < out.loss.item()
    for k, v in model.vision.state_dict().items():
        if k in towers:
            assert torch.equal(v, towers[k]), f"frozen {k} changed"

    n_image = int(batch.image_mask.sum())
    n_text = batch.num_tokens - n_image
    assert out.expert_counts_image.shape == (cfg.n_layers, cfg.n_experts)
    assert out.expert_counts_image.sum(1).tolist() == [n_image * cfg.top_k] * cfg.n_layers
    assert out.expert_counts_text.sum(1).tolist() == [n_text * cfg.top_k] * cfg.n_layers
    with torch.no_grad():
        model.set_active_experts(1)
        one = model(batch)
        assert one.expert_counts_image.sum(1).tolist() == [n_image] * cfg.n_layers
        keep = [[0, 2], [1, 3]]
        model.prune_experts(keep)
        pruned = model(batch)
        for layer, kept in enumerate(keep):
            dropped = [e for e in range(cfg.n_experts) if e not in kept]
            counts = pruned.expert_counts_image[layer] + pruned.expert_counts_text[layer]
            assert counts[dropped].sum() == 0 and counts.sum() == batch.num_tokens


def test_dense_model_trains_a_step(seed):
    model = _model("tiny", seed)
    batch = model.prepare(_samples(seed))
    out = model(batch)
    assert out.expert_counts_image is None and out.aux_loss.item() == 0.0
    out.loss.backward()
    # activation checkpointing per block (the LLM's switch): the same gradients, recomputed in backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing = True
    assert model.llm.activation_checkpointing
    model(batch).loss.backward()
    model.activation_checkpointing = False
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
    assert all(p.grad is None for t in model.vision.towers() for p in t.parameters())
    assert model.skip_token.grad is not None and model.skip_token.grad.abs().sum() > 0
    torch.optim.SGD(model.trainable_parameters(), lr=0.5).step()
    assert model(batch).loss.item() < out.loss.item()


# ----------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_generate_cache_equals_recompute(name, seed):
    model = _model(name, seed)
    samples = _samples(seed, generation=True)
    cached = model.generate(samples, max_new_tokens=6)
    recomputed = model.generate(samples, max_new_tokens=6, use_cache=False)
    assert cached == recomputed
    assert "".join(model.stream(samples[0], max_new_tokens=6)) == cached[0]
    sampled = model.generate(samples, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=seed)
    assert sampled == model.generate(samples, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=seed)


def _bigram(model: SphinxX, chain: list[int]) -> None:
    """Make the LLM a bigram machine: with the blocks' output projections zeroed the residual stream is the
    current token's embedding, and the head maps chain[i]'s embedding to chain[i + 1]."""
    with torch.no_grad():
        for layer in model.llm.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        emb = model.llm.tok_embeddings.weight
        head = model.llm.output.weight
        head.zero_()
        for cur, nxt in zip(chain, chain[1:], strict=False):
            head[nxt] += 20 * emb[cur] / emb[cur].norm()


def test_generate_stops_at_separator(seed):
    model = _model("tiny", seed)
    tok = model.tokenizer
    question = {"image": None, "conversations": [{"from": "human", "value": "Hi?"}]}
    last = tok.encode(format_conversation(question["conversations"], True)[-1][0], add_special_tokens=False)[
        -1
    ]
    h, dot = tok.encode(" H", add_special_tokens=False)[0], tok.encode(".", add_special_tokens=False)[0]
    sep = tok.encode(" H" + SEPARATOR, add_special_tokens=False)[1:]
    # prompt end -> " H" -> "." -> "\n###" -> " H" ...: without the stop it would go on for max_new_tokens
    _bigram(model, [last, h, dot, *sep, h])
    model.train()
    assert model.generate([question], max_new_tokens=20) == ["H."]
    assert model.training  # generation ran in eval mode and restored the caller's mode
    steps = list(model._stream_tokens([question], 20, 0.0, 1.0, None, True))
    assert [s[0] for s in steps] == [h, dot, *sep]
    assert model.chat(None, "Hi?", max_new_tokens=20) == "H."
    assert list(model.stream(question, max_new_tokens=20)) == [" H"[1:], "."]
    # cut by max_new_tokens before the separator: the reply so far
    assert model.generate([question], max_new_tokens=2) == ["H."]


def test_chat_history_and_image_paths(tmp_path, seed, monkeypatch):
    from PIL import Image

    model = _model("tiny", seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    image = _image(gen, rng.randint(20, 60), rng.randint(150, 260))  # a wide one: skipped tiles
    path = tmp_path / "image.png"
    Image.fromarray(image.numpy()).save(path)  # lossless: the file decodes to the tensor's pixels
    conv = _conversation(rng, 3, generation=True)  # human, gpt, human, gpt, human
    by_path = model.prepare([{"image": str(path), "conversations": conv}], generation=True)
    by_tensor = model.prepare([{"image": image, "conversations": conv}], generation=True)
    assert by_path.plan.num_skipped > 0
    for field in ("views", "input_ids", "image_positions", "image_sources", "cu_seqlens"):
        assert torch.equal(getattr(by_path, field), getattr(by_tensor, field)), field

    # chat(image, question, history) is generate on the conversation of the history's turns then the question
    expected = model.generate([{"image": image, "conversations": conv}], max_new_tokens=3)
    calls = []
    generate = model.generate

    def spy(samples, **kwargs):
        calls.append(samples)
        return generate(samples, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    history = [(conv[0]["value"], conv[1]["value"]), (conv[2]["value"], conv[3]["value"])]
    assert model.chat(path, conv[4]["value"], history, max_new_tokens=3) == expected[0]
    assert calls == [[{"image": path, "conversations": conv}]]


# ----------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path, seed, monkeypatch):
    # transformers is not a runtime dependency: the tiny presets build, save and load without it
    monkeypatch.setitem(sys.modules, "transformers", None)
    model = _model("tiny-moe", seed)
    assert isinstance(model.tokenizer, BundledTokenizer)
    samples = _samples(seed)[:2]
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SphinxX.from_pretrained(tmp_path / "ckpt")
    own, back = model.state_dict(), loaded.state_dict()
    assert set(own) == set(back)
    for k in own:
        assert torch.equal(own[k], back[k]), k
    with torch.no_grad():
        assert torch.equal(model.loss(samples), loaded.loss(samples))
    # trainable: everything but the frozen towers (the LLM, the projection, img_start/end, the skip token)
    frozen = {id(p) for t in loaded.vision.towers() for p in t.parameters()}
    trainable = {id(p) for p in loaded.trainable_parameters()}
    assert frozen and trainable == {id(p) for p in loaded.parameters()} - frozen
    assert all(p.requires_grad for p in loaded.trainable_parameters())
    assert all(not p.requires_grad for t in loaded.vision.towers() for p in t.parameters())
    assert isinstance(loaded.tokenizer, BundledTokenizer)
    loaded.set_active_experts(1)  # MoE inference controls on a loaded model

    # a checkpoint of another architecture: the config says dim 128, the tensors are dim 256
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["llm"].update(dim=128, head_dim=None)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="another architecture"):
        SphinxX.from_pretrained(tmp_path / "ckpt")
    config["llm"].update(dim=256, head_dim=None)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != "skip_token"}
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['skip_token'\]"):
        SphinxX.from_pretrained(tmp_path / "ckpt")


def test_llm_weights_folder_with_its_tokenizer(tmp_path, seed):
    """A real preset's layout: `llm_weights` is a Hugging Face folder with the decoder and its tokenizer; the
    model loads both (the tokenizer through transformers) and saves and reloads them; a decoder of another
    architecture is refused, naming the fields that differ."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    overrides = {"llm": {"n_layers": 1}}
    src = LLM(get_config("tiny", **overrides).llm)
    src.save_hf(tmp_path / "llm")
    transformers.AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)).save_pretrained(tmp_path / "llm")
    tok_config = tmp_path / "llm" / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    del data[BUNDLED_MARK]  # an ordinary Hugging Face tokenizer folder now
    tok_config.write_text(json.dumps(data))

    model = SphinxX(get_config("tiny", llm_weights=str(tmp_path / "llm"), **overrides))
    assert not isinstance(model.tokenizer, BundledTokenizer)
    own = model.llm.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(own[k], v), k
    # the same weights on the bundled tokenizer (the same vocabulary) prepare and generate the same
    bundled = SphinxX(get_config("tiny", **overrides))
    assert isinstance(bundled.tokenizer, BundledTokenizer)
    bundled.load_state_dict(model.state_dict())
    samples = _samples(seed, generation=True)
    a, b = model.prepare(samples, generation=True), bundled.prepare(samples, generation=True)
    assert torch.equal(a.input_ids, b.input_ids)
    assert model.generate(samples, max_new_tokens=3) == bundled.generate(samples, max_new_tokens=3)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SphinxX.from_pretrained(tmp_path / "ckpt")
    assert not isinstance(loaded.tokenizer, BundledTokenizer)
    text = _text(random.Random(seed), 5, 20)
    assert loaded.tokenizer.encode(text, add_special_tokens=False) == bundled.tokenizer.encode(text)

    # the two kinds of folder are told apart
    with pytest.raises(ValueError, match="is a Hugging Face checkpoint.*LLM.from_hf"):
        SphinxX.from_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="SphinxX folder.*SphinxX.from_pretrained"):
        LLM.from_hf(tmp_path / "ckpt")

    LLM(get_config("tiny-moe", **overrides).llm).save_hf(tmp_path / "moe")
    with pytest.raises(
        ValueError,
        match=r"llm_weights .*moe is a checkpoint of another architecture \(arch: checkpoint 'mixtral'",
    ):
        SphinxX(
            get_config(
                "tiny", llm_weights=str(tmp_path / "moe"), tokenizer=str(BUNDLED_TOKENIZER), **overrides
            )
        )


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(seed, tmp_path):
    model = _model("tiny", seed, llm={"max_seq_len": 200})
    good = _conversation(random.Random(seed), 1)
    img = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"samples\[1\]\['conversations'\].*no assistant"):
        model.prepare([{"image": None, "conversations": good}, {"image": None, "conversations": good[:1]}])
    with pytest.raises(TypeError, match=r"samples\[0\]\['image'\] must be a uint8.*float32"):
        model.prepare([{"image": img.float(), "conversations": good}])
    with pytest.raises(
        ValueError, match=r"samples\[0\]\['image'\] must have shape \(H, W, 3\).*channels first"
    ):
        model.prepare([{"image": img.permute(2, 0, 1), "conversations": good}])
    with pytest.raises(ValueError, match=r"samples\[0\] takes \d+ positions.*max_seq_len=200"):
        model.prepare(
            [{"image": torch.randint(0, 256, (200, 200, 3), dtype=torch.uint8), "conversations": good}]
        )
    with pytest.raises(FileNotFoundError, match=r"samples\[1\]\['image'\]: no image file .*nowhere.png"):
        model.prepare(
            [{"image": None, "conversations": good}, {"image": "nowhere.png", "conversations": good}]
        )
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(ValueError, match=r"samples\[0\]\['image'\]: .*notes.png' is not a readable image"):
        model.prepare([{"image": not_an_image, "conversations": good}])
    with pytest.raises(ValueError, match=r"sample\['image'\]: .*notes.png' is not a readable image"):
        model.sample_length({"image": str(not_an_image), "conversations": good})
    with pytest.raises(ValueError, match=r"samples\[0\] has no 'conversations'"):
        model.prepare([{"image": None}])
    with pytest.raises(TypeError, match="samples must be a non-empty list"):
        model.prepare({"image": None, "conversations": good})
    with pytest.raises(ValueError, match="reduction must be"):
        model.loss([{"image": None, "conversations": good}], reduction="none")
    with pytest.raises(ValueError, match="end with a human turn"):
        model.generate([{"image": None, "conversations": good}], max_new_tokens=2)
    # stream checks at the call, not at the first next()
    with pytest.raises(TypeError, match="sample must be one .* dict"):
        model.stream([{"image": None, "conversations": good[:1]}])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.stream({"image": None, "conversations": good[:1]}, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.stream({"image": None, "conversations": good[:1]}, top_p=1.5)
    with pytest.raises(TypeError, match="question must be a str"):
        model.chat(None, ["What is it?"])
    with pytest.raises(TypeError, match=r"history\[1\] must be a \(question, answer\) pair"):
        model.chat(None, "What is it?", history=[("q?", "a."), ("q?",)])
    with pytest.raises(TypeError, match="history must be a list"):
        model.chat(None, "What is it?", history="q? a.")
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but llm.vocab_size is 100"):
        SphinxX(get_config("tiny", llm={"vocab_size": 100}))


def test_real_preset_shapes_on_meta():
    # ViT-g/14 (1536) + ConvNeXt-XXL (3072, 7 x 7 map at 224 resampled to 16 x 16): 257 tokens of 4608
    # channels per view (REFERENCE.md), built on the meta device: nothing materialised, no file read.
    model = SphinxX(get_config("sphinx-moe"), device="meta")
    assert model.dtype == torch.bfloat16
    assert all(p.is_meta for p in model.parameters())
    assert model.tokens_per_view == 257
    assert tuple(model.vision.proj.weight.shape) == (4096, 4608)
    views = torch.empty(2, 3, 224, 224, device="meta", dtype=torch.bfloat16)
    assert tuple(model.vision.convnext.forward_features(views).shape) == (2, 3072, 7, 7)
    assert tuple(model.vision(views).shape) == (2, 257, 4096)
