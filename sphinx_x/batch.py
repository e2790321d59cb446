"""What `SphinxX.prepare` builds and `SphinxX.forward` returns, and the host-side layout between them.

Sequence of one sample (all image positions right after BOS, as the original)::

    BOS  [s] global-view tokens [e]  then per tile (r, c) row-major: [s] tile tokens [e] | [skip]  text ...

`pack` lays tokenized samples out as one `SphinxBatch` (no padding: ``cu_seqlens`` boundaries, positions
restarting per sample); the checks and image readers here give the errors `prepare` raises on bad samples.
None of this touches a model's parameters, so it lives apart from `sphinx_x.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import sphinx_kernels as sk
from sphinx_x.template import IGNORE_INDEX

if TYPE_CHECKING:
    from sphinx_x.llm import LLMConfig

__all__ = ["SphinxBatch", "SphinxOutput", "pack"]


# ----------------------------------------------------------------------------------------------- types
@dataclass
class SphinxBatch:
    """Samples packed into one stream of ``T`` positions (see the module docstring for the layout).

    input_ids: int64 ``(T,)`` token ids (0 at image positions, whose embedding is replaced).
    labels: int64 ``(T,)`` the token itself where supervised, -100 elsewhere (aligned with `input_ids`).
    targets: int64 ``(T,)`` the next token's label within the same sample (-100 at each sample's end): what
        row t's logits are scored against.
    cu_seqlens: int32 ``(B+1,)``; position_ids: int64 ``(T,)`` restarting at 0 per sample; max_seqlen: int.
    views: ``(V, 3, t, t)`` CLIP-normalised kept views of every image (float), None without images.
    plan: the `sphinx_kernels.TilePlan` of those images (None without images).
    image_positions: int64 ``(P,)`` positions that take a visual embedding.
    image_sources: int64 ``(P,)`` their row in the visual table: ``v * N + j`` token j of view v (N tokens per
        view), then ``V*N`` img_start, ``V*N + 1`` img_end, ``V*N + 2`` skip.
    image_mask: bool ``(T,)`` True at image positions (for the MoE expert analysis).
    loss_rows: int64 ``(S,)`` rows whose target is supervised. num_supervised: S (host int).
    sample_images: per sample the index of its image in `plan`, or None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int
    views: torch.Tensor | None
    plan: sk.TilePlan | None
    image_positions: torch.Tensor
    image_sources: torch.Tensor
    image_mask: torch.Tensor
    loss_rows: torch.Tensor
    num_supervised: int
    sample_images: list[int | None]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SphinxBatch:
        """A copy with every tensor on `device`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return SphinxBatch(**moved)


@dataclass
class SphinxOutput:
    """What `SphinxX.forward` returns.

    loss: float32 scalar: cross-entropy of the supervised tokens, their mean (or sum, ``reduction="sum"``).
        The MoE balance term is NOT in it: train on ``loss + config.aux_loss_weight * aux_loss``.
    aux_loss: float32 scalar: the LLM's load-balancing loss (0 for a dense LLM).
    num_tokens, num_supervised: positions in the batch and supervised targets among them.
    expert_counts_image / expert_counts_text: int64 ``(n_layers, E)``: (token, slot) pairs routed to each
        expert, from image positions (delimiters and skip tokens included) / from text positions; None if dense.
    logits: ``(T, V)`` with ``return_logits=True``, else None.
    """

    loss: torch.Tensor
    aux_loss: torch.Tensor
    num_tokens: int
    num_supervised: int
    expert_counts_image: torch.Tensor | None = None
    expert_counts_text: torch.Tensor | None = None
    logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------- layout
def pack(
    texts: list[tuple[list[int], list[int]]],
    sample_images: list[int | None],
    plan: sk.TilePlan | None,
    views: torch.Tensor | None,
    lengths: list[int],
    *,
    tokens_per_view: int,
    bos_id: int | None,
    device: torch.device,
) -> SphinxBatch:
    """Lay out tokenized samples as one `SphinxBatch` on `device` (see the module docstring).

    texts: per sample its ``(ids, labels)`` from the chat template; sample_images: per sample its image's
    index in `plan`, or None; views: the kept views `tile_gather` produced for `plan`; lengths: per sample its
    planned position count (BOS + image part + text), checked against what is built; tokens_per_view: N, the
    visual tokens of one view; bos_id: the BOS token, or None for a tokenizer without one.
    """
    N = tokens_per_view
    num_views = 0 if plan is None else plan.num_views
    start, end, skip = num_views * N, num_views * N + 1, num_views * N + 2
    view_first = [0]
    if plan is not None:
        for n in plan.views_per_image:
            view_first.append(view_first[-1] + n)
    ids_all: list[int] = []
    labels_all: list[int] = []
    positions: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    offset = 0
    for (ids, labels), img, length in zip(texts, sample_images, lengths, strict=True):
        head = [] if bos_id is None else [bos_id]
        ids_all += head
        labels_all += [IGNORE_INDEX] * len(head)
        if img is not None:
            # Image part: per view [s] tokens [e]; skipped tiles one [skip] each, in grid order.
            src: list[torch.Tensor] = []
            kept = set(plan.kept_tiles(img))
            v = view_first[img]
            order = [None] + [(r, c) for r in range(plan.grid) for c in range(plan.grid)]
            for tile in order:
                if tile is None or tile in kept:
                    src += [torch.tensor([start]), torch.arange(v * N, (v + 1) * N), torch.tensor([end])]
                    v += 1
                else:
                    src.append(torch.tensor([skip]))
            src_t = torch.cat(src)
            first = offset + len(head)
            positions.append(torch.arange(first, first + src_t.numel()))
            sources.append(src_t)
            ids_all += [0] * src_t.numel()
            labels_all += [IGNORE_INDEX] * src_t.numel()
        ids_all += ids
        labels_all += labels
        offset += length
        if len(ids_all) != offset:
            raise RuntimeError(f"layout bug: {len(ids_all)} positions built, {offset} planned")

    packed = sk.pack_sequences([torch.empty(n) for n in lengths])
    labels_t = torch.tensor(labels_all, dtype=torch.int64)
    targets = torch.full_like(labels_t, IGNORE_INDEX)
    targets[:-1] = labels_t[1:]
    ends = packed.cu_seqlens[1:].long() - 1
    targets[ends] = IGNORE_INDEX  # a sample's last row predicts nothing (no next token of its own)
    loss_rows = (targets != IGNORE_INDEX).nonzero().flatten()
    image_positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    image_mask = torch.zeros(offset, dtype=torch.bool)
    image_mask[image_positions] = True
    return SphinxBatch(
        input_ids=torch.tensor(ids_all, dtype=torch.int64).to(device),
        labels=labels_t.to(device),
        targets=targets.to(device),
        cu_seqlens=packed.cu_seqlens.to(device),
        position_ids=packed.position_ids.to(device),
        max_seqlen=packed.max_seqlen,
        views=views,
        plan=plan,
        image_positions=image_positions.to(device),
        image_sources=(torch.cat(sources) if sources else torch.zeros(0, dtype=torch.int64)).to(device),
        image_mask=image_mask.to(device),
        loss_rows=loss_rows.to(device),
        num_supervised=int(loss_rows.numel()),
        sample_images=sample_images,
    )


# ----------------------------------------------------------------------------------------------- checks
def _check_sample(sample: Any, i: int, name: str) -> None:
    if not isinstance(sample, dict):
        raise TypeError(
            f"{name} must be a dict with 'conversations' (and optionally 'image'), got {type(sample).__name__}"
        )
    if "conversations" not in sample:
        raise ValueError(f"{name} has no 'conversations' (keys: {sorted(sample)})")


def _check_image_tensor(image: torch.Tensor, name: str) -> None:
    if image.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 (H, W, 3) RGB tensor (raw pixels), got dtype {image.dtype}")
    if image.dim() != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        hint = (
            " (channels first? use image.permute(1, 2, 0))"
            if image.dim() == 3 and image.shape[0] == 3
            else ""
        )
        raise ValueError(f"{name} must have shape (H, W, 3), got {tuple(image.shape)}{hint}")


def _load_image(image: Any, name: str) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        _check_image_tensor(image, name)
        return image
    if isinstance(image, (str, Path)):
        from sphinx_x.data import load_image

        return load_image(image)
    raise TypeError(f"{name} must be a path, a uint8 (H, W, 3) tensor or None, got {type(image).__name__}")


def _image_size(image: Any, name: str) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        _check_image_tensor(image, name)
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, (str, Path)):
        from sphinx_x.data import image_size

        return image_size(image)
    raise TypeError(f"{name} must be a path, a uint8 (H, W, 3) tensor or None, got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------- outputs
@torch.no_grad()
def _split_expert_counts(
    expert_ids: list[torch.Tensor], image_mask: torch.Tensor, cfg: LLMConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, how many (token, slot) pairs went to each expert from image vs text positions."""
    E = cfg.n_experts
    image, text = [], []
    for ids in expert_ids:
        image.append(torch.bincount(ids[image_mask].flatten(), minlength=E))
        text.append(torch.bincount(ids[~image_mask].flatten(), minlength=E))
    return torch.stack(image), torch.stack(text)
