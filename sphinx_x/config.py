"""SPHINX-X model configurations: dataclass presets, validated on construction.

Presets (`list_configs()`): ``tiny`` and ``tiny-moe`` (tests and demo: a few M parameters, small random timm
towers, the bundled 512-token tokenizer, no file needed), ``sphinx-tiny`` (TinyLlama-1.1B), ``sphinx-intern2``
(InternLM2-7B), ``sphinx-plus`` (LLaMA2-13B), ``sphinx-plus-2k`` (LLaMA2-13B, canvas 672 in a 3 x 3 grid) and
``sphinx-moe`` (Mixtral-8x7B), the last five with the real shapes and DINOv2 ViT-g/14 + CLIP-ConvNeXt-XXL.
Weights are local paths (fields), never downloads: ``llm_weights`` a Hugging Face folder, ``vision.dino_weights``
/ ``vision.convnext_weights`` timm or open_clip checkpoint files.

``get_config(name, **overrides)``: top-level fields by name, nested ones as a dict or dotted key::

    get_config("tiny", canvas=448, llm={"n_layers": 4}, **{"vision.dino_weights": "dino.safetensors"})
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from sphinx_x.llm import LLMConfig

__all__ = ["SphinxXConfig", "VisionConfig", "get_config", "list_configs"]

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class VisionConfig:
    """The two frozen timm towers (`sphinx_x.vision`).

    dino / convnext: timm model names (a ``.tag`` selects timm's pretrained config, e.g. the ConvNeXt's
        ``convnext_xxlarge.clip_laion2b_soup``); dino_kwargs / convnext_kwargs: extra ``timm.create_model``
        arguments (the tiny presets shrink depth and width here).
    dino_weights / convnext_weights: local checkpoint files (None: random init, fine for tests only).
    """

    dino: str = "vit_giant_patch14_dinov2.lvd142m"
    convnext: str = "convnext_xxlarge.clip_laion2b_soup"
    dino_kwargs: dict[str, Any] = field(default_factory=dict)
    convnext_kwargs: dict[str, Any] = field(default_factory=dict)
    dino_weights: str | None = None
    convnext_weights: str | None = None

    def __post_init__(self) -> None:
        for name in ("dino", "convnext"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(
                    f"VisionConfig.{name} must be a timm model name, got {getattr(self, name)!r}"
                )
        for name in ("dino_kwargs", "convnext_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise TypeError(f"VisionConfig.{name} must be a dict, got {type(value).__name__}")
            # JSON round trip (save_pretrained) turns tuples into lists; timm wants tuples for depths/dims.
            setattr(self, name, {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        for name in ("dino_weights", "convnext_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, str(value))


@dataclass
class SphinxXConfig:
    """Everything that defines a SPHINX-X model.

    llm: the decoder (`sphinx_x.llm.LLMConfig`). vision: the towers (`VisionConfig`).
    canvas, grid: skip-token tiling (`sphinx_kernels.plan_tiles`): views of side ``canvas // grid``.
    tokenizer: a Hugging Face tokenizer folder; None: the folder `llm_weights` (HF checkpoints carry one),
        or, without weights, the bundled 512-token byte-level BPE (`sphinx_x/assets/tokenizer`).
    llm_weights: a Hugging Face checkpoint folder for the decoder (None: random init).
    dtype: parameter dtype ("bfloat16" for the real presets: a 13B model is never built in fp32 by default).
    aux_loss_weight: weight of the MoE load-balancing loss in training (the trainer adds
        ``aux_loss_weight * aux_loss`` to the LM loss; 0 in the released SPHINX-X config, 0.01-0.1 in code).
    """

    name: str = "custom"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    canvas: int = 448
    grid: int = 2
    tokenizer: str | None = None
    llm_weights: str | None = None
    dtype: str = "bfloat16"
    aux_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.llm, dict):
            self.llm = LLMConfig(**_known(LLMConfig, self.llm, "llm"))
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**_known(VisionConfig, self.vision, "vision"))
        if not isinstance(self.llm, LLMConfig):
            raise TypeError(f"SphinxXConfig.llm must be an LLMConfig, got {type(self.llm).__name__}")
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"SphinxXConfig.vision must be a VisionConfig, got {type(self.vision).__name__}")
        for name in ("canvas", "grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SphinxXConfig.{name} must be a positive int, got {value!r}")
        if self.canvas % self.grid:
            raise ValueError(f"SphinxXConfig.canvas ({self.canvas}) must be divisible by grid ({self.grid})")
        if self.dtype not in DTYPES:
            raise ValueError(f"SphinxXConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.aux_loss_weight, (int, float)) or self.aux_loss_weight < 0:
            raise ValueError(
                f"SphinxXConfig.aux_loss_weight must be a float >= 0, got {self.aux_loss_weight!r}"
            )
        for name in ("tokenizer", "llm_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, str(value))

    @property
    def tile(self) -> int:
        """View side in pixels."""
        return self.canvas // self.grid

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``SphinxXConfig.from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SphinxXConfig:
        """Inverse of `to_dict`; an unknown field is a ValueError listing the valid ones."""
        return cls(**_known(cls, data, "config"))


def _known(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid: {', '.join(names)}")
    return dict(data)


# ----------------------------------------------------------------------------------------------- presets
# Real towers: DINOv2 ViT-g/14 (1536 ch) + CLIP-ConvNeXt-XXL trunk (3072 ch), 257 tokens per 224 view.
_REAL_VISION = VisionConfig()
# Tiny towers: random timm models of the same families, ~0.4M parameters together. At the tiny tile of 112
# the ViT has an 8 x 8 patch grid (65 tokens per view) and the ConvNeXt a 3 x 3 map, so the resampling to the
# ViT's grid is exercised as in the real model (7 x 7 -> 16 x 16).
_TINY_VISION = VisionConfig(
    dino="vit_small_patch14_dinov2",
    convnext="convnext_atto",
    dino_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2},
    convnext_kwargs={"depths": (1, 1, 1, 1), "dims": (16, 24, 32, 48)},
)
_TINY_LLM = LLMConfig(
    arch="llama", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=688, max_seq_len=2048
)

_PRESETS: dict[str, SphinxXConfig] = {
    "tiny": SphinxXConfig(
        name="tiny", llm=_TINY_LLM, vision=_TINY_VISION, canvas=224, grid=2, dtype="float32"
    ),
    "tiny-moe": SphinxXConfig(
        name="tiny-moe",
        llm=dataclasses.replace(_TINY_LLM, arch="mixtral", n_experts=4, top_k=2, moe_ffn_dim=256),
        vision=_TINY_VISION,
        canvas=224,
        grid=2,
        dtype="float32",
        aux_loss_weight=0.01,
    ),
    # TinyLlama-1.1B (its 2048-token context: a 448 image takes 5 x 259 = 1295 positions).
    "sphinx-tiny": SphinxXConfig(
        name="sphinx-tiny",
        llm=LLMConfig(
            arch="llama", vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048,
        ),
        vision=_REAL_VISION,
    ),
    # InternLM2-7B (fused wqkv layout handled by LLM.from_hf).
    "sphinx-intern2": SphinxXConfig(
        name="sphinx-intern2",
        llm=LLMConfig(
            arch="internlm2", vocab_size=92544, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
            ffn_dim=14336, norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768,
        ),
        vision=_REAL_VISION,
    ),
    # LLaMA2-13B.
    "sphinx-plus": SphinxXConfig(
        name="sphinx-plus",
        llm=LLMConfig(
            arch="llama", vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
        ),
        vision=_REAL_VISION,
    ),
    # Mixtral-8x7B: top-2 of 8 SwiGLU experts of width 14336 in every layer.
    "sphinx-moe": SphinxXConfig(
        name="sphinx-moe",
        llm=LLMConfig(
            arch="mixtral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
            norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768, n_experts=8, top_k=2, moe_ffn_dim=14336,
        ),
        vision=_REAL_VISION,
    ),
}  # fmt: skip
# SPHINX-X 2K: a 672 canvas in a 3 x 3 grid (up to 10 views of 259 positions per image).
_PRESETS["sphinx-plus-2k"] = dataclasses.replace(
    _PRESETS["sphinx-plus"], name="sphinx-plus-2k", canvas=672, grid=3
)


def _rederive(base: LLMConfig, changes: dict[str, Any], merged: dict[str, Any]) -> None:
    """Fields LLMConfig derives (head_dim from dim / n_heads, moe_ffn_dim from ffn_dim) follow an override of
    their source unless given too: ``llm={"dim": 512}`` must not keep the preset's head_dim."""
    if "head_dim" not in changes and base.head_dim == base.dim // base.n_heads:
        merged["head_dim"] = None
    if "moe_ffn_dim" not in changes and base.moe_ffn_dim == base.ffn_dim:
        merged["moe_ffn_dim"] = None


def list_configs() -> list[str]:
    """Names of the presets."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> SphinxXConfig:
    """A fresh copy of preset `name` with `overrides` applied and validated.

    Overrides: any `SphinxXConfig` field; ``llm=`` / ``vision=`` take a dict of nested fields (merged into the
    preset's), or use dotted keys (``**{"llm.n_layers": 4}``). An unknown preset or field is a ValueError
    that lists the valid ones.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(_PRESETS)}")
    base = copy.deepcopy(_PRESETS[name])
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"llm": {}, "vision": {}}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if dot:
            if head not in nested:
                raise ValueError(f"unknown nested config {head!r} in override {key!r}; valid: llm, vision")
            nested[head][rest] = value
        elif key in nested and isinstance(value, dict):
            nested[key].update(value)
        else:
            top[key] = value
    _known(SphinxXConfig, top, "config")
    for part, cls in (("llm", LLMConfig), ("vision", VisionConfig)):
        if nested[part]:
            current = top.get(part, getattr(base, part))
            if not isinstance(current, cls):
                raise TypeError(f"override {part} must be a {cls.__name__} or a dict")
            merged = {**dataclasses.asdict(current), **_known(cls, nested[part], part)}
            if cls is LLMConfig:
                _rederive(current, nested[part], merged)
            top[part] = cls(**merged)
    values = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(SphinxXConfig)}, **top}
    return SphinxXConfig(**values)
