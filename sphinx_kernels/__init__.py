"""sphinx-kernels: fused kernels for training and serving SPHINX-X multimodal LLMs.

Importing needs no GPU, no compiler and no built extension; ``backends()`` says what can run here.
"""

from sphinx_kernels._backend import BackendStatus, backends
from sphinx_kernels.attention import varlen_attention, varlen_attention_ref
from sphinx_kernels.moe import (
    MoEAux,
    grouped_mm,
    load_balancing_loss,
    moe_experts,
    moe_experts_ref,
    moe_mlp,
    moe_mlp_ref,
    permute,
    route,
    unpermute,
)
from sphinx_kernels.packing import PackedBatch, pack_bins, pack_sequences, unpack
from sphinx_kernels.rope import apply_rotary, apply_rotary_ref, position_ids_from_cu_seqlens
from sphinx_kernels.tiles import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatch,
    TilePlan,
    plan_tiles,
    resized_size,
    tile_gather,
    tile_gather_ref,
)

__version__ = "0.1.0"

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackendStatus",
    "ImageBatch",
    "PackedBatch",
    "MoEAux",
    "TilePlan",
    "apply_rotary",
    "apply_rotary_ref",
    "backends",
    "pack_bins",
    "pack_sequences",
    "grouped_mm",
    "load_balancing_loss",
    "moe_experts",
    "moe_experts_ref",
    "moe_mlp",
    "moe_mlp_ref",
    "permute",
    "plan_tiles",
    "position_ids_from_cu_seqlens",
    "resized_size",
    "route",
    "tile_gather",
    "tile_gather_ref",
    "unpack",
    "varlen_attention",
    "varlen_attention_ref",
    "unpermute",
]
