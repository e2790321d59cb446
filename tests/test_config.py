"""sphinx_x.config: presets with the real shapes, overrides, validation, JSON round trip."""

import json

import pytest
import torch

from sphinx_x.config import SphinxXConfig, VisionConfig, get_config, list_configs
from sphinx_x.llm import LLM

# Parameter counts published with the checkpoints (model cards / safetensors index totals): an independent
# check that each preset's decoder has the real shapes.
PUBLISHED_LLM_PARAMS = {
    "sphinx-tiny": 1_100_048_384,  # TinyLlama-1.1B
    "sphinx-intern2": 7_737_708_544,  # InternLM2-7B
    "sphinx-plus": 13_015_864_320,  # LLaMA2-13B
    "sphinx-plus-2k": 13_015_864_320,
    "sphinx-moe": 46_702_792_704,  # Mixtral-8x7B
}


def test_presets_listed():
    assert list_configs() == [
        "tiny",
        "tiny-moe",
        "sphinx-tiny",
        "sphinx-intern2",
        "sphinx-plus",
        "sphinx-moe",
        "sphinx-plus-2k",
    ]


@pytest.mark.parametrize("name", sorted(PUBLISHED_LLM_PARAMS))
def test_real_presets_have_published_sizes(name):
    cfg = get_config(name)
    llm = LLM(cfg.llm, device="meta")  # shapes only, nothing materialised
    assert llm.num_parameters() == PUBLISHED_LLM_PARAMS[name]
    assert cfg.dtype == "bfloat16" and cfg.tile == 224
    assert cfg.vision.dino.startswith("vit_giant_patch14_dinov2")
    assert cfg.vision.convnext.startswith("convnext_xxlarge")


def test_geometry_and_moe_presets():
    assert (get_config("sphinx-plus-2k").canvas, get_config("sphinx-plus-2k").grid) == (672, 3)
    assert (get_config("sphinx-plus").canvas, get_config("sphinx-plus").grid) == (448, 2)
    moe = get_config("sphinx-moe").llm
    assert (moe.n_experts, moe.top_k, moe.rope_theta, moe.n_kv_heads) == (8, 2, 1e6, 8)
    tiny_moe = get_config("tiny-moe").llm
    assert (tiny_moe.arch, tiny_moe.n_experts, tiny_moe.top_k) == ("mixtral", 4, 2)


def test_tiny_is_small():
    for name in ("tiny", "tiny-moe"):
        cfg = get_config(name)
        assert LLM(cfg.llm, device="meta").num_parameters() < 5_000_000
        assert cfg.dtype == "float32" and cfg.llm_weights is None and cfg.vision.dino_weights is None


def test_overrides_nested_and_dotted():
    cfg = get_config("tiny", canvas=448, llm={"n_layers": 3}, **{"vision.dino_weights": "d.safetensors"})
    assert (cfg.canvas, cfg.tile, cfg.llm.n_layers, cfg.vision.dino_weights) == (448, 224, 3, "d.safetensors")
    assert get_config("tiny").llm.n_layers == 2  # presets are not mutated
    # head_dim follows a new dim unless given; moe_ffn_dim likewise follows ffn_dim where it was derived
    assert get_config("tiny", llm={"dim": 512}).llm.head_dim == 128
    assert get_config("tiny", llm={"dim": 512, "head_dim": 64}).llm.head_dim == 64
    assert get_config("sphinx-moe", llm={"ffn_dim": 1024}).llm.moe_ffn_dim == 1024


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid: tiny, tiny-moe"):
        get_config("sphinx-huge")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['canvass'\].*canvas"):
        get_config("tiny", canvass=448)
    with pytest.raises(ValueError, match=r"unknown llm field\(s\) \['layers'\].*n_layers"):
        get_config("tiny", llm={"layers": 3})
    with pytest.raises(ValueError, match=r"unknown vision field\(s\) \['dinov2'\].*dino"):
        get_config("tiny", **{"vision.dinov2": "x"})


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"canvas": 449}, "divisible by grid"),
        ({"grid": 0}, "grid must be a positive int"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"llm": {"n_kv_heads": 3}}, "n_kv_heads"),
    ],
)
def test_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny", **overrides)


def test_vision_config_validation():
    with pytest.raises(TypeError, match="dino_kwargs must be a dict"):
        VisionConfig(dino_kwargs=[("depth", 2)])
    with pytest.raises(ValueError, match="VisionConfig.dino"):
        VisionConfig(dino="")


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "sphinx-plus-2k"])
def test_json_round_trip(name):
    cfg = get_config(name)
    back = SphinxXConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.torch_dtype == getattr(torch, cfg.dtype)
    with pytest.raises(ValueError, match="unknown config field"):
        SphinxXConfig.from_dict({**cfg.to_dict(), "bogus": 1})
