"""Mixture of visual experts: DINOv2 ViT + CLIP-ConvNeXt trunk (both frozen, timm), concatenated per view and
projected into the LLM by ``Linear + LayerNorm`` (trainable).

Per view (``t x t`` pixels, CLIP-normalised by ``sphinx_kernels.tile_gather``):

- DINOv2 sees ImageNet statistics. ``(x/255 - m_in)/s_in`` is an affine map of the CLIP-normalised view
  ``y = (x/255 - m_clip)/s_clip``: ``y * s_clip/s_in + (m_clip - m_in)/s_in`` per channel, so the one gather
  serves both towers (a second gather would read every source pixel again). Its tokens: the final-normed cls
  token and the ``(t/p)^2`` patch tokens (register tokens, if the variant has them, are dropped).
- The ConvNeXt trunk gives its final (head-normed) map at stride 32 (``7 x 7`` at 224); its spatial mean is
  prepended as a cls token and the map is resampled bilinearly to the ViT's patch grid (``16 x 16`` at 224 with
  patch 14), so both towers give ``1 + (t/p)^2`` tokens (257 at 224) that line up position by position.
- The two token sets are concatenated channel-wise (1536 + 3072 = 4608 for ViT-g + ConvNeXt-XXL) and projected.

Weights come from local files only: a timm checkpoint (converted by timm's own ``checkpoint_filter_fn`` of the
model family, as ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` would:
DINOv2's position embedding resampled to the tile's patch grid, original DINOv2 key names), or for the ConvNeXt
the open_clip checkpoint (``open_clip_pytorch_model.bin`` / ``.safetensors`` of ``convnext_xxlarge``), whose
``visual.trunk.*`` tensors are mapped onto the timm trunk. Strict: a missing or unexpected tensor is an error
naming it. A tower with weights is built on the meta device and each checkpoint tensor (memory-mapped) is copied
once into the target dtype and device and assigned: peak memory is one copy of the tower in the target dtype
(ViT-g + ConvNeXt-XXL: 2.0B parameters, 4 GB in bf16; built eagerly they cost a random init in the model dtype
plus the checkpoint). Non-persistent buffers (never in a checkpoint: RoPE tables, EVA's zero k-bias, ...) are
recomputed by timm's ``init_non_persistent_buffers`` (`init_meta_buffers`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sphinx_kernels as sk
from sphinx_x.config import VisionConfig

__all__ = ["VisionEncoder", "default_dtype", "init_meta_buffers", "load_state_dict_file"]

logger = logging.getLogger(__name__)

OPEN_CLIP_TRUNK = "visual.trunk."


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Construct modules directly in `dtype` (a bf16 13B model is never materialised in fp32 first)."""
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a PyTorch pickle loaded with ``weights_only=True`` (no code
    runs), on the CPU and memory-mapped: a tensor's bytes are read when it is used, never copied here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))  # zero-copy views of the mapped file
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # Training checkpoints wrap the weights; timm's own loader prefers the EMA weights, so do we.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel / DDP prefixes


def _open_clip_trunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The timm-named trunk tensors of an open_clip checkpoint, or None if `state` is not one."""
    if not any(k.startswith(OPEN_CLIP_TRUNK) for k in state):
        return None
    # open_clip wraps the timm trunk as `visual.trunk`; `visual.head.*` (the CLIP projection), the text tower
    # and logit_scale are not part of the image trunk.
    return {k[len(OPEN_CLIP_TRUNK) :]: v for k, v in state.items() if k.startswith(OPEN_CLIP_TRUNK)}


def _timm_filter_fn(model: nn.Module) -> Callable | None:
    """timm's checkpoint converter of `model`'s family: the ``checkpoint_filter_fn`` of the module defining its
    class (the one ``timm.create_model(..., pretrained=True)`` applies for every ViT/EVA/ConvNeXt variant
    except FlexiViT's and RADIO's, which pass it other interpolation settings)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _create_tower(
    name: str,
    kwargs: dict,
    weights: str | None,
    *,
    feature_map: bool,
    what: str,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A timm model without classifier (`feature_map`: also without global pooling) in `dtype` on `device`,
    weights from `weights` (a meta-device shell when `device` is meta: no file is read)."""
    import timm

    reset = {"global_pool": ""} if feature_map else {}
    if weights is None or device.type == "meta":  # random init (tiny presets, tests) or a shell to load into
        with torch.device(device), default_dtype(dtype):
            return timm.create_model(name, pretrained=False, num_classes=0, **reset, **kwargs)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights {path} do not exist")
    with torch.device("cpu"):  # the checkpoint stays on the CPU, mapped, whatever device the caller builds on
        state = load_state_dict_file(path)  # memory-mapped: nothing read yet
    trunk = _open_clip_trunk(state)
    if trunk is not None:
        state = {k: v for k, v in trunk.items() if not k.startswith("head.fc.")}
        build, source = {"num_classes": 0, **reset}, f"{what} ({path}, open_clip layout)"
    else:
        # Built with the checkpoint's own classifier size so the load is strict (timm drops a mismatching
        # head and loads non-strictly, hiding missing tensors); the head is removed after loading.
        try:
            num_classes = timm.models.get_pretrained_cfg(name).num_classes
        except (RuntimeError, AttributeError):
            num_classes = None
        build, source = (
            ({} if num_classes is None else {"num_classes": num_classes}),
            f"{what} weights {path}",
        )
    with torch.device("meta"), default_dtype(dtype):  # no random init, no memory
        model = timm.create_model(name, pretrained=False, **build, **kwargs)
    filter_fn = _timm_filter_fn(model) if trunk is None else None
    if filter_fn is not None:
        try:
            with torch.device("cpu"):  # it may create tensors (a resampled pos_embed, a zero bias)
                state = filter_fn(dict(state), model)
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"{source} do not fit timm model {name!r}: {exc}") from exc
    _load_strict(model, state, source, device)
    init_meta_buffers(model, device, dtype)
    if trunk is None:
        model.reset_classifier(0, **reset)
    return model


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str, device: torch.device) -> None:
    """Load `state` into the meta-device shell `model`: every tensor copied once from the (mapped) checkpoint
    into the shell's dtype on `device` and assigned. A missing, unexpected or misshapen tensor is a ValueError
    naming it, raised before anything is copied."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"{what}: tensor {key!r} has shape {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    # copy=True: even where dtype and device already match, the module must own its memory, not alias the
    # mapped file (writing a checkpoint over that file would change or, truncated, fault the frozen towers).
    with torch.no_grad():
        loaded = {k: v.to(device=device, dtype=own[k].dtype, copy=True) for k, v in state.items()}
    model.load_state_dict(loaded, strict=True, assign=True)


def init_meta_buffers(
    module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None
) -> None:
    """Allocate on `device` every buffer of `module` still on the meta device (after a meta-device build and a
    checkpoint load, only the non-persistent ones: checkpoints never hold them) and recompute them with timm's
    ``init_non_persistent_buffers`` (RoPE bands and tables, EVA's zero k-bias, relative-position indices), under
    the default dtype `dtype` the module was built with, as its eager constructor would. A meta buffer whose
    module (or an ancestor) cannot recompute it is a RuntimeError naming it: left alone it would be garbage."""
    device = torch.device(device)
    pending: list[str] = []
    for mod_name, mod in module.named_modules():
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(mod, buf_name, torch.empty_like(buf, device=device))  # keeps it (non-)persistent
                pending.append(f"{mod_name}.{buf_name}" if mod_name else buf_name)
    if not pending:
        return
    owners = [
        n for n, m in module.named_modules() if callable(getattr(m, "init_non_persistent_buffers", None))
    ]
    orphans = [b for b in pending if not any(o == "" or b.startswith(o + ".") for o in owners)]
    if orphans:
        raise RuntimeError(
            f"buffers {orphans} of {type(module).__name__} are not in checkpoints and have no "
            "init_non_persistent_buffers() to recompute them after loading on the meta device"
        )
    with torch.no_grad(), default_dtype(dtype):
        for name in owners:
            module.get_submodule(name).init_non_persistent_buffers()


class VisionEncoder(nn.Module):
    """The two frozen towers and the trainable projection.

    Args:
        cfg: the `VisionConfig` (timm names, constructor overrides, weight files).
        tile: view side in pixels (``canvas // grid``); must be a multiple of the ViT's patch size.
        out_dim: the LLM's hidden size.
        dtype, device: where the towers' weights go (default: the current default dtype and device, so
            ``with torch.device(d), default_dtype(t)`` places the whole encoder). ``device="meta"`` builds a shell
            to load into (`reset_buffers` then recomputes the buffers no checkpoint holds).

    Attributes:
        tokens_per_view: ``1 + (tile / patch)^2``.
        dino, convnext: the timm towers (frozen, kept in eval mode by `train`).
        proj, norm: ``Linear(C_dino + C_convnext, out_dim)`` and ``LayerNorm(out_dim)``.
    """

    def __init__(
        self,
        cfg: VisionConfig,
        tile: int,
        out_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tile = tile
        place = {
            "dtype": dtype or torch.get_default_dtype(),
            "device": torch.device(device) if device is not None else torch.get_default_device(),
        }
        dino_kwargs = {"img_size": tile, **cfg.dino_kwargs}
        self.dino = _create_tower(
            cfg.dino, dino_kwargs, cfg.dino_weights, feature_map=False, what="DINOv2", **place
        )
        self.convnext = _create_tower(
            cfg.convnext,
            dict(cfg.convnext_kwargs),
            cfg.convnext_weights,
            feature_map=True,
            what="ConvNeXt",
            **place,
        )
        patch = self.dino.patch_embed.patch_size
        if tile % patch[0] or tile % patch[1]:
            raise ValueError(
                f"the view side canvas // grid = {tile} must be a multiple of the ViT patch {patch}"
            )
        self.grid_size = (tile // patch[0], tile // patch[1])
        self.tokens_per_view = 1 + self.grid_size[0] * self.grid_size[1]
        for tower in (self.dino, self.convnext):
            tower.requires_grad_(False)
            tower.eval()
        in_dim = self.dino.num_features + self.convnext.num_features
        self.proj = nn.Linear(in_dim, out_dim, **place)
        self.norm = nn.LayerNorm(out_dim, **place)
        f32 = {"dtype": torch.float32, "device": place["device"]}
        self.register_buffer("dino_scale", torch.empty(1, 3, 1, 1, **f32), persistent=False)
        self.register_buffer("dino_shift", torch.empty(1, 3, 1, 1, **f32), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the buffers no checkpoint holds, e.g. after loading into a meta-device shell: the
        CLIP -> ImageNet map ``y * scale + shift`` (module docstring) and the towers' own non-persistent
        buffers still on the meta device (`init_meta_buffers`, in the towers' dtype)."""
        device = device if device is not None else self.proj.weight.device
        if torch.device(device).type == "meta":
            return
        for tower in self.towers():
            init_meta_buffers(tower, device, self.proj.weight.dtype)
        clip_mean, clip_std = (
            torch.tensor(sk.CLIP_MEAN, dtype=torch.float64),
            torch.tensor(sk.CLIP_STD, dtype=torch.float64),
        )
        in_mean, in_std = (
            torch.tensor(sk.IMAGENET_MEAN, dtype=torch.float64),
            torch.tensor(sk.IMAGENET_STD, dtype=torch.float64),
        )
        self.dino_scale = (clip_std / in_std).float().view(1, 3, 1, 1).to(device)
        self.dino_shift = ((clip_mean - in_mean) / in_std).float().view(1, 3, 1, 1).to(device)

    def towers(self) -> list[nn.Module]:
        return [self.dino, self.convnext]

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        for tower in self.towers():  # frozen towers stay in eval mode (no dropout / drop-path)
            tower.eval()
        return self

    @torch.no_grad()
    def features(self, views: torch.Tensor) -> torch.Tensor:
        """Concatenated tower tokens ``(V, tokens_per_view, C_dino + C_convnext)`` (the towers' dtype) of CLIP-
        normalised views ``(V, 3, tile, tile)``."""
        if views.dim() != 4 or views.shape[1:] != (3, self.tile, self.tile):
            raise ValueError(f"views must be (V, 3, {self.tile}, {self.tile}), got {tuple(views.shape)}")
        dtype = self.dino.patch_embed.proj.weight.dtype
        views = views.to(dtype)
        dino_in = views * self.dino_scale.to(dtype) + self.dino_shift.to(dtype)
        tokens = self.dino.forward_features(dino_in)  # (V, prefix + gh*gw, C), final-normed
        prefix = self.dino.num_prefix_tokens  # cls (+ registers, dropped)
        dino = torch.cat([tokens[:, :1], tokens[:, prefix:]], dim=1)
        fmap = self.convnext.forward_head(
            self.convnext.forward_features(views), pre_logits=True
        )  # (V, C, h, w)
        cls = fmap.mean(dim=(2, 3)).unsqueeze(1)
        if tuple(fmap.shape[2:]) != self.grid_size:
            fmap = F.interpolate(fmap, size=self.grid_size, mode="bilinear", align_corners=False)
        conv = torch.cat([cls, fmap.flatten(2).transpose(1, 2)], dim=1)
        return torch.cat([dino, conv.to(dino.dtype)], dim=2)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """``(V, 3, tile, tile)`` CLIP-normalised views -> ``(V, tokens_per_view, out_dim)`` LLM inputs."""
        return self.norm(self.proj(self.features(views)))
