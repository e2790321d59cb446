"""sphinx_x.vision: the mixture of visual experts against timm's own towers on separately normalised views."""

import copy
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference
from safetensors.torch import save_file

import sphinx_kernels as sk
from sphinx_x.config import get_config
from sphinx_x.vision import VisionEncoder

TINY = get_config("tiny")
TILE = TINY.tile


def _randomise(module: torch.nn.Module) -> None:
    # timm's init leaves DINOv2's LayerScale at 1e-5 (each block ~ identity): give every tensor O(1) weight so
    # the towers' blocks really act on the views.
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.9 / p[0].numel() ** 0.5)  # ~unit-gain per layer
            else:
                p.uniform_(0.5, 1.5)


def _images(gen: torch.Generator) -> list[torch.Tensor]:
    # odd sizes, a wide and a tall one (skipped tiles), a square one
    sizes = [(37, 91), (120, 53), (64, 64), (23, 201)]
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen) for h, w in sizes]


def _reference(enc: VisionEncoder, images: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The same pipeline from independent parts: two gathers (ImageNet for DINOv2, CLIP for the ConvNeXt),
    timm's forward of each tower, the ConvNeXt map's mean as cls and its bilinear resampling, concat, then
    Linear + LayerNorm; all in `dtype`."""
    dino = copy.deepcopy(enc.dino).to(dtype)
    convnext = copy.deepcopy(enc.convnext).to(dtype)
    in_views = sk.tile_gather_ref(
        images, TINY.canvas, TINY.grid, mean=sk.IMAGENET_MEAN, std=sk.IMAGENET_STD, dtype=dtype
    )
    # Padding is the CLIP mean colour for both towers (as the original pads once, in pixels): under ImageNet
    # statistics that colour is (m_clip - m_in) / s_in, not 0.
    pad = torch.tensor(sk.CLIP_MEAN, dtype=torch.float64) - torch.tensor(
        sk.IMAGENET_MEAN, dtype=torch.float64
    )
    pad = (pad / torch.tensor(sk.IMAGENET_STD, dtype=torch.float64)).to(dtype).view(3, 1, 1)
    plan = sk.plan_tiles([im.shape[:2] for im in images], TINY.canvas, TINY.grid)
    for v, (image, (r, c)) in enumerate(zip(plan.image_index.tolist(), plan.view_tile.tolist(), strict=True)):
        if r < 0:  # global view: the image resized to long side `tile`, top-left
            h, w = plan.global_sizes[image]
        else:  # tile (r, c) of the canvas holding the image resized to long side `canvas`
            h, w = plan.resized_sizes[image]
            h, w = h - r * TILE, w - c * TILE
        content = torch.zeros(TILE, TILE, dtype=torch.bool)
        content[: max(h, 0), : max(w, 0)] = True
        in_views[v] = torch.where(content, in_views[v], pad)
    clip_views = sk.tile_gather_ref(images, TINY.canvas, TINY.grid, dtype=dtype)
    with torch.no_grad():
        tokens = dino.forward_features(in_views)
        d = torch.cat([tokens[:, :1], tokens[:, dino.num_prefix_tokens :]], dim=1)
        fmap = convnext.forward_head(convnext.forward_features(clip_views), pre_logits=True)
        grid = TILE // 14
        patches = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
        c = torch.cat([fmap.mean(dim=(2, 3))[:, None], patches.flatten(2).transpose(1, 2)], dim=1)
        x = torch.cat([d, c], dim=2)
        x = F.linear(x, enc.proj.weight.to(dtype), enc.proj.bias.to(dtype))
        return F.layer_norm(x, x.shape[-1:], enc.norm.weight.to(dtype), enc.norm.bias.to(dtype), enc.norm.eps)


def test_matches_timm_towers_on_separate_normalisations(seed):
    gen = torch.Generator().manual_seed(seed)
    enc = VisionEncoder(TINY.vision, TILE, out_dim=40)
    _randomise(enc)
    images = _images(gen)
    views, plan = sk.tile_gather(images, TINY.canvas, TINY.grid)
    out = enc(views)
    assert enc.tokens_per_view == 1 + (TILE // 14) ** 2
    assert out.shape == (plan.num_views, enc.tokens_per_view, 40)
    # the ConvNeXt's map (3 x 3 at 112) really is resampled to the ViT's 8 x 8 grid here
    assert enc.convnext.forward_features(views[:1]).shape[-1] != TILE // 14
    ref64 = _reference(enc, images, torch.float64)
    ref32 = _reference(enc, images, torch.float32)
    assert_close_to_reference(out.detach(), ref64, ref32, name="vision tokens")


def test_frozen_towers_trainable_projection():
    enc = VisionEncoder(TINY.vision, TILE, out_dim=32)
    enc.train()
    assert not enc.dino.training and not enc.convnext.training and enc.proj.training
    views = torch.randn(2, 3, TILE, TILE)
    enc(views).square().sum().backward()
    for tower in enc.towers():
        assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    assert enc.proj.weight.grad is not None and enc.norm.weight.grad is not None
    with pytest.raises(ValueError, match=r"views must be \(V, 3, 112, 112\)"):
        enc(torch.randn(2, 3, 224, 224))


def test_tile_must_fit_the_patch():
    with pytest.raises(ValueError, match="multiple of the ViT patch"):
        VisionEncoder(TINY.vision, 100, out_dim=32)


def _tower_files(tmp_path):
    vc = TINY.vision
    dino = timm.create_model(vc.dino, img_size=TILE, **vc.dino_kwargs)
    convnext = timm.create_model(vc.convnext, **vc.convnext_kwargs)  # with timm's 1000-class head
    _randomise(dino)
    _randomise(convnext)
    return dino, convnext


def test_weights_from_timm_files(tmp_path):
    dino, convnext = _tower_files(tmp_path)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(tmp_path / "dino.safetensors"))
    torch.save(convnext.state_dict(), tmp_path / "convnext.pth")
    cfg = dataclasses.replace(
        TINY.vision,
        dino_weights=str(tmp_path / "dino.safetensors"),
        convnext_weights=str(tmp_path / "convnext.pth"),
    )
    enc = VisionEncoder(cfg, TILE, out_dim=32)
    for ours, theirs in ((enc.dino, dino), (enc.convnext, convnext)):
        own = ours.state_dict()
        expected = {k: v for k, v in theirs.state_dict().items() if not k.startswith("head.fc.")}
        assert set(own) == set(expected)
        for k, v in expected.items():
            assert torch.equal(own[k], v), k


def test_weights_from_open_clip_checkpoint(tmp_path):
    _, convnext = _tower_files(tmp_path)
    trunk = {k: v for k, v in convnext.state_dict().items() if not k.startswith("head.fc.")}
    # open_clip's file: the timm trunk under visual.trunk, the CLIP projection, and the text tower
    state = {f"visual.trunk.{k}": v for k, v in trunk.items()}
    state["visual.head.proj.weight"] = torch.randn(8, convnext.num_features)
    state["text.token_embedding.weight"] = torch.randn(10, 8)
    state["logit_scale"] = torch.tensor(4.6)
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    cfg = dataclasses.replace(TINY.vision, convnext_weights=str(tmp_path / "open_clip_pytorch_model.bin"))
    enc = VisionEncoder(cfg, TILE, out_dim=32)
    own = enc.convnext.state_dict()
    assert set(own) == set(trunk)
    for k, v in trunk.items():
        assert torch.equal(own[k], v), k

    del state["visual.trunk.stages.2.blocks.0.conv_dw.weight"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"missing \['stages.2.blocks.0.conv_dw.weight'\]"):
        VisionEncoder(dataclasses.replace(cfg, convnext_weights=str(tmp_path / "broken.bin")), TILE, 32)


def test_weights_missing_or_wrong(tmp_path):
    dino, _ = _tower_files(tmp_path)
    state = {k: v.contiguous() for k, v in dino.state_dict().items() if k != "blocks.1.attn.qkv.weight"}
    save_file(state, str(tmp_path / "dino.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight"):
        VisionEncoder(
            dataclasses.replace(TINY.vision, dino_weights=str(tmp_path / "dino.safetensors")), TILE, 32
        )
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        VisionEncoder(
            dataclasses.replace(TINY.vision, dino_weights=str(tmp_path / "nowhere.safetensors")), TILE, 32
        )
