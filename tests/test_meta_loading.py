"""Loading on the meta device: towers, LLM and SphinxX checkpoints built as meta shells and loaded straight into
the target dtype and device equal the eagerly built models loaded from the same files (bit for bit in fp32),
leave nothing on the meta device, recompute the buffers no checkpoint holds, own their memory (no alias of the
mapped file), and in bf16 never allocate an fp32 copy of a weight."""

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sphinx_x.config import get_config
from sphinx_x.llm import LLM
from sphinx_x.model import BUNDLED_TOKENIZER, SphinxX
from sphinx_x.vision import VisionEncoder

TINY = get_config("tiny")
TILE = TINY.tile
# A DINO-like tower WITH non-persistent buffers (EVA-02: RoPE bands and table, zero k-bias), which the meta
# path must recompute; the tiny preset's DINOv2 and ConvNeXt have none.
EVA = {
    "dino": "eva02_tiny_patch14_224.mim_in22k",
    "dino_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2},
}


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    # O(1) weights everywhere (timm's init leaves LayerScale at 1e-5 and norms at 1: a wrong load could hide).
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.9 / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def _tower_files(tmp_path, gen: torch.Generator, vision, open_clip: bool, dino_size: int = TILE):
    """Random towers saved as a timm DINO safetensors file (made at `dino_size`: another patch grid than the
    tile's makes the loader resample pos_embed, as for the real 518-pixel DINOv2) and a ConvNeXt .pth (timm's
    1000-class head) or an open_clip .bin (trunk, CLIP projection, text tower); returns the config using them."""
    dino = timm.create_model(vision.dino, img_size=dino_size, **vision.dino_kwargs)
    convnext = timm.create_model(vision.convnext, **vision.convnext_kwargs)
    _randomise(dino, gen)
    _randomise(convnext, gen)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(tmp_path / "dino.safetensors"))
    if open_clip:
        state = {
            f"visual.trunk.{k}": v for k, v in convnext.state_dict().items() if not k.startswith("head.fc")
        }
        state["visual.head.proj.weight"] = torch.randn(8, convnext.num_features, generator=gen)
        state["text.token_embedding.weight"] = torch.randn(10, 8, generator=gen)
        convnext_file = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, convnext_file)
    else:
        convnext_file = tmp_path / "convnext.pth"
        torch.save(convnext.state_dict(), convnext_file)
    return dataclasses.replace(
        vision, dino_weights=str(tmp_path / "dino.safetensors"), convnext_weights=str(convnext_file)
    )


def _timm_loaded(vision, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The eager reference: timm's own pretrained loader (random init, then a copying load) of the same files."""
    towers = []
    for name, kwargs, path, reset in (
        (vision.dino, {"img_size": TILE, **vision.dino_kwargs}, vision.dino_weights, {}),
        (vision.convnext, vision.convnext_kwargs, vision.convnext_weights, {"global_pool": ""}),
    ):
        if path.endswith(".bin"):  # open_clip: timm maps visual.head.proj onto an 8-class head.fc
            kwargs = {**kwargs, "num_classes": 8}
        tower = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
        tower.reset_classifier(0, **reset)
        towers.append(tower.to(dtype).eval().requires_grad_(False))
    return towers[0], towers[1]


def _zero_in_place(path) -> None:
    """Zero every tensor of a safetensors file in place (the same inode, as `cp` over it would write): a model
    aliasing the memory-mapped file would change. Layout: 8-byte header length, JSON header, tensor bytes."""
    with open(path, "r+b") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        size = f.seek(0, 2)
        f.seek(start)
        f.write(bytes(size - start))


def _assert_nothing_on_meta(module: torch.nn.Module) -> None:
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert on_meta == [], f"left on the meta device: {on_meta}"


def _assert_same_tensors(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Every parameter and buffer, the non-persistent ones included, equal in value and dtype."""
    a = dict([*ours.named_parameters(), *ours.named_buffers()])
    b = dict([*ref.named_parameters(), *ref.named_buffers()])
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "eva, open_clip", [(False, False), (True, True)], ids=["dinov2-timm", "eva-openclip"]
)
def test_towers_on_meta_equal_timm_loader(tmp_path, seed, eva, open_clip):
    gen = torch.Generator().manual_seed(seed)
    vision = dataclasses.replace(TINY.vision, **EVA) if eva else TINY.vision
    cfg = _tower_files(tmp_path, gen, vision, open_clip, dino_size=TILE if eva else 11 * 14)
    enc = VisionEncoder(cfg, TILE, out_dim=40)
    _assert_nothing_on_meta(enc)
    dino, convnext = _timm_loaded(cfg)
    _zero_in_place(cfg.dino_weights)  # the encoder owns its memory
    _assert_same_tensors(enc.dino, dino)
    _assert_same_tensors(enc.convnext, convnext)
    if eva:  # the RoPE table really is a recomputed buffer here, not an empty one that happens to match
        assert "rope.pos_embed" in dict(enc.dino.named_buffers()) and enc.dino.rope.pos_embed.abs().sum() > 0
    assert all(not p.requires_grad for t in enc.towers() for p in t.parameters())
    assert not enc.dino.training and not enc.convnext.training

    ref = VisionEncoder(dataclasses.replace(cfg, dino_weights=None, convnext_weights=None), TILE, out_dim=40)
    ref.dino, ref.convnext = dino, convnext
    ref.proj.load_state_dict(enc.proj.state_dict())
    ref.norm.load_state_dict(enc.norm.state_dict())
    views = torch.randn(3, 3, TILE, TILE, generator=gen)
    with torch.no_grad():
        assert torch.equal(enc(views), ref(views))


def test_tower_checkpoint_errors_name_the_tensor(tmp_path, seed):
    cfg = _tower_files(tmp_path, torch.Generator().manual_seed(seed), TINY.vision, open_clip=False)
    state = load_file(cfg.dino_weights)
    for bad, match in (
        ({**state, "blocks.0.extra.weight": torch.zeros(3)}, r"unexpected \['blocks.0.extra.weight'\]"),
        ({k: v for k, v in state.items() if k != "norm.bias"}, r"missing \['norm.bias'\]"),
        ({**state, "norm.bias": torch.zeros(7)}, r"'norm.bias' has shape \(7,\)"),
    ):
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=match):
            VisionEncoder(dataclasses.replace(cfg, dino_weights=str(tmp_path / "bad.safetensors")), TILE, 32)


def _llm_folder(tmp_path, gen: torch.Generator, llm_cfg) -> LLM:
    llm = LLM(llm_cfg)
    _randomise(llm, gen)
    llm.save_hf(tmp_path / "llm")
    return llm


def _sphinx_config(tmp_path, seed: int, dtype: str = "float32", eva: bool = True):
    """The tiny preset (`eva`: with the EVA tower, buffers to recompute), every weight from files."""
    gen = torch.Generator().manual_seed(seed)
    vision = dataclasses.replace(TINY.vision, **EVA) if eva else TINY.vision
    vision = _tower_files(tmp_path, gen, vision, open_clip=True)
    llm = _llm_folder(tmp_path, gen, dataclasses.replace(TINY.llm, n_layers=1))
    config = dataclasses.replace(
        TINY, llm=llm.cfg, vision=vision, llm_weights=str(tmp_path / "llm"), tokenizer=str(BUNDLED_TOKENIZER),
        dtype=dtype,
    )  # fmt: skip
    return config, llm


def _samples(gen: torch.Generator) -> list[dict]:
    conv = [{"from": "human", "value": "what is red?"}, {"from": "gpt", "value": "a dog sits."}]
    image = torch.randint(0, 256, (61, 203, 3), dtype=torch.uint8, generator=gen)  # a skipped tile
    return [{"image": image, "conversations": conv}, {"image": None, "conversations": conv}]


def test_sphinx_on_meta_equals_eager_and_owns_its_memory(tmp_path, seed):
    config, src_llm = _sphinx_config(tmp_path, seed)
    model = SphinxX(config)  # LLM and towers: meta shells loaded from the files
    _assert_nothing_on_meta(model)
    eager = SphinxX(dataclasses.replace(config, llm_weights=None, vision=dataclasses.replace(
        config.vision, dino_weights=None, convnext_weights=None)))  # fmt: skip
    eager.llm.load_state_dict(src_llm.state_dict())
    eager.vision.dino, eager.vision.convnext = _timm_loaded(config.vision)
    for name in ("img_start", "img_end", "skip_token"):  # random in both: the checkpoint files lack them
        getattr(eager, name).data.copy_(getattr(model, name))
    eager.vision.proj.load_state_dict(model.vision.proj.state_dict())
    eager.vision.norm.load_state_dict(model.vision.norm.state_dict())
    _assert_same_tensors(model, eager)
    batch = model.prepare(_samples(torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits
        assert torch.equal(logits, eager(batch, return_logits=True).logits)

    model.save_pretrained(tmp_path / "ckpt")
    loaded = SphinxX.from_pretrained(tmp_path / "ckpt")
    _assert_nothing_on_meta(loaded)
    _assert_same_tensors(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(batch, return_logits=True).logits, logits)
    _zero_in_place(tmp_path / "ckpt" / "model.safetensors")  # the loaded model owns its memory
    _assert_same_tensors(loaded, model)


class _Fp32Allocations(TorchDispatchMode):
    """Records every op that returns a NEW fp32 tensor (storage shared with no input: not a view, not an
    in-place result, not a tensor set onto a mapped file's storage) of at least `numel` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for x in pytree.tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor) and not x.is_meta:
                inputs.add(x.untyped_storage().data_ptr())
            elif isinstance(x, torch.UntypedStorage):
                inputs.add(x.data_ptr())
        for t in pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and not t.is_meta
                and t.numel() >= self.numel
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.seen.append(f"{func}: {tuple(t.shape)}")
        return out


def test_bf16_load_never_copies_a_weight_in_fp32(tmp_path, seed):
    # Every file holds fp32 tensors; the model is bf16. No fp32 tensor as large as the smallest parameter (16
    # elements, a ConvNeXt bias) may be allocated: the only fp32 tensors the load creates are the 3-element
    # normalisation buffers. (The DINOv2 tower: EVA's RoPE table is computed in fp32 by timm's own init, as
    # eagerly; its recomputation after a meta load is checked bit for bit above.)
    config, _ = _sphinx_config(tmp_path, seed, dtype="bfloat16", eva=False)
    threshold = min(p.numel() for p in SphinxX(config, device="meta").parameters())
    with _Fp32Allocations(threshold) as seen:
        model = SphinxX(config)
    assert seen.seen == [], seen.seen
    _assert_nothing_on_meta(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    fp32 = SphinxX(dataclasses.replace(config, dtype="float32"))
    fp32.save_pretrained(tmp_path / "ckpt")
    with _Fp32Allocations(threshold) as seen:
        loaded = SphinxX.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert seen.seen == [], seen.seen
    _assert_nothing_on_meta(loaded)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for name, p in fp32.named_parameters():  # each weight is the fp32 one rounded once to bf16
        assert torch.equal(dict(loaded.named_parameters())[name], p.to(torch.bfloat16)), name


@pytest.mark.parametrize("arch", ["llama", "internlm2", "mixtral"])
def test_llm_bf16_from_fp32_files_never_copies_a_weight_in_fp32(tmp_path, seed, arch):
    extra = {"n_experts": 3, "top_k": 2, "moe_ffn_dim": 40} if arch == "mixtral" else {}
    cfg = dataclasses.replace(TINY.llm, arch=arch, n_layers=1, dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2,
                              head_dim=16, **extra)  # fmt: skip
    src = _llm_folder(tmp_path, torch.Generator().manual_seed(seed), cfg)
    with _Fp32Allocations(min(p.numel() for p in src.parameters())) as seen:
        llm = LLM.from_hf(tmp_path / "llm", dtype=torch.bfloat16)
    assert seen.seen == [], seen.seen
    _assert_nothing_on_meta(llm)
    ours, theirs = llm.state_dict(), src.state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], v.to(torch.bfloat16)), k
