"""SPHINX-X: the LLM fed with skip-token image tiles through the mixture of visual experts.

Sequence of one sample (all image positions right after BOS, as the original)::

    BOS  [s] global-view tokens [e]  then per tile (r, c) row-major: [s] tile tokens [e] | [skip]  text ...

``[s]``/``[e]`` (`img_start`/`img_end`) are two learnable vectors shared by all views; a tile that holds no
image pixel (`sphinx_kernels.plan_tiles`) costs no encoder work and takes ONE learnable `skip_token` at its
grid position. A text-only sample is BOS + text. The text is the chat template of `sphinx_x.template`, with
labels only on the assistant replies and their closing ``\\n###``.

`SphinxX.prepare` packs a list of samples into one `SphinxBatch` (no padding: ``cu_seqlens`` boundaries,
positions restarting per sample) and gathers every image's views with ONE `sphinx_kernels.tile_gather` call
(only kept views); `SphinxX.forward` encodes the views, scatters the visual embeddings into the token
embeddings and runs the LLM on the packed stream; the loss is computed on the supervised rows only (their
logits alone are materialised: image positions are ~80% of a typical multimodal sequence).

The batch types and their host-side layout live in `sphinx_x.batch`, the tokenizer in `sphinx_x.tokenizer`;
both are re-exported here, so ``from sphinx_x.model import SphinxBatch, load_tokenizer`` keeps working.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sphinx_kernels as sk
from sphinx_x.batch import (
    SphinxBatch,
    SphinxOutput,
    _check_sample,
    _image_size,
    _load_image,
    _split_expert_counts,
    pack,
)
from sphinx_x.config import SphinxXConfig
from sphinx_x.llm import LLM, LLMConfig
from sphinx_x.template import SEPARATOR, strip_reply, tokenize_conversation
from sphinx_x.tokenizer import BUNDLED_TOKENIZER, BundledTokenizer, load_tokenizer
from sphinx_x.vision import VisionEncoder, default_dtype

__all__ = [
    "BUNDLED_TOKENIZER",
    "BundledTokenizer",
    "SphinxBatch",
    "SphinxOutput",
    "SphinxX",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

# The files of a `save_pretrained` folder.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# Fields that decide the LLM's tensor shapes: a checkpoint that differs in one is another architecture.
_SHAPE_FIELDS = ("arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                 "n_experts", "moe_ffn_dim", "tie_embeddings", "attention_bias")  # fmt: skip


# ----------------------------------------------------------------------------------------------- model
class SphinxX(nn.Module):
    """The SPHINX-X model.

    ``SphinxX(config, dtype=None, device=None)``: builds the LLM (from ``config.llm_weights`` if given: a
    Hugging Face folder) and the vision towers (from their weight files if given), in ``config.dtype`` unless
    `dtype` says otherwise; a part with weights is built on the meta device and each checkpoint tensor copied
    once, memory-mapped, into `dtype` on `device` (peak memory: the model once, never an fp32 copy); the
    projection, ``img_start``, ``img_end`` and ``skip_token`` start random. ``device="meta"`` builds a shell
    (`from_pretrained` uses it)."""

    def __init__(
        self,
        config: SphinxXConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, SphinxXConfig):
            raise TypeError(
                f"config must be a SphinxXConfig (see sphinx_x.get_config), got {type(config).__name__}"
            )
        self.config = config
        dtype = dtype or config.torch_dtype
        device = torch.device(device) if device is not None else torch.get_default_device()
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer or config.llm_weights)
        self.tokenizer = tokenizer
        if len(tokenizer) > config.llm.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but llm.vocab_size is {config.llm.vocab_size}: "
                "config.tokenizer does not belong to this LLM"
            )
        if isinstance(tokenizer, BundledTokenizer) and len(tokenizer) * 2 < config.llm.vocab_size:
            logger.warning(
                "%s uses the bundled %d-token test tokenizer with a %d-token LLM: set config.tokenizer (or "
                "llm_weights) to the LLM's Hugging Face folder for real use",
                config.name,
                len(tokenizer),
                config.llm.vocab_size,
            )
        self.bos_id: int | None = tokenizer.bos_token_id

        if config.llm_weights is not None and device.type != "meta":
            llm = LLM.from_hf(config.llm_weights, dtype=dtype, device=device)
            _check_same_arch(llm.cfg, config.llm, config.llm_weights)
            llm.cfg.max_seq_len = config.llm.max_seq_len
        else:
            llm = LLM(config.llm, dtype=dtype, device=device)
        self.llm = llm
        with torch.device(device), default_dtype(dtype):
            self.vision = VisionEncoder(config.vision, config.tile, config.llm.dim)
        self.tokens_per_view = self.vision.tokens_per_view
        dim = config.llm.dim
        self.img_start = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))
        self.img_end = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))
        self.skip_token = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))
        if device.type != "meta":
            with torch.no_grad():
                for p in (self.img_start, self.img_end, self.skip_token):
                    p.normal_(0.0, 0.02)

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.tok_embeddings.weight.dtype

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each LLM block in backward while training (`LLM.activation_checkpointing`)."""
        return self.llm.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.llm.activation_checkpointing = bool(value)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the frozen vision towers' (LLM, projection, img_start/end, skip token)."""
        frozen = {id(p) for tower in self.vision.towers() for p in tower.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def set_active_experts(self, k: int) -> None:
        """MoE: route each token to its top `k` experts from now on (`LLM.set_active_experts`)."""
        self.llm.set_active_experts(k)

    def prune_experts(
        self, keep: Any = None, *, drop_random: int = 0, seed: int | None = None
    ) -> torch.Tensor:
        """MoE: prune experts per layer (`LLM.prune_experts`); returns the bool ``(n_layers, E)`` mask."""
        return self.llm.prune_experts(keep, drop_random=drop_random, seed=seed)

    # -- samples -> token layout ---------------------------------------------------------------------
    def _image_tokens(self, size: tuple[int, int]) -> int:
        plan = sk.plan_tiles([size], self.config.canvas, self.config.grid)
        return plan.visual_tokens(self.tokens_per_view)[0]

    def sample_length(self, sample: dict, image_size: tuple[int, int] | None = None) -> int:
        """LLM positions of a training sample: BOS + image part (from the tile plan) + text. No pixel is
        decoded: `image_size` ``(H, W)``, else read from the image file's header or the tensor's shape."""
        _check_sample(sample, 0, "sample")
        ids, _ = tokenize_conversation(self.tokenizer, sample["conversations"])
        n = (self.bos_id is not None) + len(ids)
        image = sample.get("image")
        if image is not None:
            if image_size is None:
                image_size = _named_image_error(_image_size, image, "sample['image']")
            n += self._image_tokens(tuple(image_size))
        return n

    def prepare(
        self, samples: Sequence[dict], *, device: torch.device | str | None = None, generation: bool = False
    ) -> SphinxBatch:
        """Pack `samples` (LLaVA schema: ``{"image": path | uint8 (H, W, 3) tensor | None, "conversations":
        [...]}``) into one `SphinxBatch` on `device` (default the model's).

        `generation`: conversations end with a human turn to answer (no labels); else each needs an
        assistant turn. Every image of the batch goes through one `tile_gather` on `device`.
        """
        if isinstance(samples, dict) or not isinstance(samples, Sequence) or len(samples) == 0:
            raise TypeError(
                "samples must be a non-empty list of {'image': ..., 'conversations': [...]} dicts"
            )
        device = torch.device(device) if device is not None else self.device
        images: list[torch.Tensor] = []
        sample_images: list[int | None] = []
        texts: list[tuple[list[int], list[int]]] = []
        for i, sample in enumerate(samples):
            name = f"samples[{i}]"
            _check_sample(sample, i, name)
            try:
                ids, labels = tokenize_conversation(
                    self.tokenizer, sample["conversations"], add_generation_prompt=generation
                )
            except ValueError as exc:
                raise ValueError(f"{name}['conversations']: {exc}") from exc
            texts.append((ids, labels))
            image = sample.get("image")
            if image is None:
                sample_images.append(None)
            else:
                sample_images.append(len(images))
                images.append(_named_image_error(_load_image, image, f"{name}['image']"))

        views = plan = None
        visual: list[int] = []
        if images:
            plan = sk.plan_tiles([tuple(im.shape[:2]) for im in images], self.config.canvas, self.config.grid)
            visual = plan.visual_tokens(self.tokens_per_view)
        limit = self.config.llm.max_seq_len
        lengths = []
        for i, ((ids, _), img) in enumerate(zip(texts, sample_images, strict=True)):
            n_img = 0 if img is None else visual[img]
            n = (self.bos_id is not None) + n_img + len(ids)
            if n > limit:
                raise ValueError(
                    f"samples[{i}] takes {n} positions ({n_img} image + {len(ids)} text + BOS), beyond "
                    f"llm.max_seq_len={limit}: shorten it or use a smaller canvas/grid"
                )
            lengths.append(n)
        if images:
            with torch.no_grad():
                views, _ = sk.tile_gather(
                    [im.to(device) for im in images],
                    self.config.canvas,
                    self.config.grid,
                    dtype=_view_dtype(self.vision, device),
                )
        return pack(
            texts,
            sample_images,
            plan,
            views,
            lengths,
            tokens_per_view=self.tokens_per_view,
            bos_id=self.bos_id,
            device=device,
        )

    # -- forward ---------------------------------------------------------------------------------------
    def embed(self, batch: SphinxBatch) -> torch.Tensor:
        """Input embeddings ``(T, dim)`` (the LLM's dtype): token embeddings with the visual table scattered
        into the image positions."""
        h = self.llm.tok_embeddings(batch.input_ids)
        if batch.image_positions.numel() == 0:
            return h
        if batch.views is None:
            raise ValueError("batch has image positions but no views")
        feats = self.vision(batch.views).to(h.dtype).flatten(0, 1)  # (V*N, dim)
        table = torch.cat([feats, self.img_start[None], self.img_end[None], self.skip_token[None]])
        # index_select, not table[...]: advanced indexing's backward (index_put_ with accumulate) sums the
        # rows that share a source (img_start/img_end/skip_token) in a varying order on the CPU, so two
        # identical steps differed by an ulp; index_select's (index_add_) sums in index order.
        return h.index_put((batch.image_positions,), table.index_select(0, batch.image_sources))

    def forward(
        self, batch: SphinxBatch, *, reduction: str = "mean", return_logits: bool = False
    ) -> SphinxOutput:
        """Loss of a prepared batch (see `SphinxOutput`); `reduction` ``"mean"`` over the batch's supervised
        tokens or ``"sum"``."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if not isinstance(batch, SphinxBatch):
            raise TypeError(f"batch must be a SphinxBatch (from model.prepare), got {type(batch).__name__}")
        out = self.llm(
            inputs_embeds=self.embed(batch),
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            position_ids=batch.position_ids,
            logits_rows=None if return_logits else batch.loss_rows,
        )
        if return_logits:
            logits = out.logits
            rows = logits.index_select(0, batch.loss_rows)
        else:
            logits, rows = None, out.logits
        targets = batch.targets.index_select(0, batch.loss_rows)
        # fp32 log-softmax: bf16 logits lose ~3 digits in the normaliser over a 32k vocabulary.
        rows = rows if rows.dtype == torch.float64 else rows.float()
        loss = F.cross_entropy(rows, targets, reduction="sum")
        if reduction == "mean":
            loss = loss / max(batch.num_supervised, 1)
        counts_image = counts_text = None
        if out.expert_ids is not None:
            counts_image, counts_text = _split_expert_counts(
                out.expert_ids, batch.image_mask, self.config.llm
            )
        return SphinxOutput(
            loss=loss,
            aux_loss=out.aux_loss,
            num_tokens=batch.num_tokens,
            num_supervised=batch.num_supervised,
            expert_counts_image=counts_image,
            expert_counts_text=counts_text,
            logits=logits,
        )

    def loss(self, samples: Sequence[dict], reduction: str = "mean") -> torch.Tensor:
        """`prepare` + `forward`: the LM loss of `samples` (mean over their supervised tokens, or sum)."""
        return self.forward(self.prepare(samples), reduction=reduction).loss

    # -- generation -----------------------------------------------------------------------------------
    def _prompts(self, samples: Sequence[dict]) -> list[torch.Tensor]:
        batch = self.prepare(samples, generation=True)
        with torch.no_grad():
            embeds = self.embed(batch)
        bounds = batch.cu_seqlens.tolist()
        return [embeds[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _stop_ids(self) -> list[int]:
        # The separator's ids as they follow a reply (a BPE may tokenise "\n###" differently on its own).
        with_sep = self.tokenizer.encode(f" a{SEPARATOR}", add_special_tokens=False)
        without = self.tokenizer.encode(" a", add_special_tokens=False)
        if with_sep[: len(without)] == without and len(with_sep) > len(without):
            return with_sep[len(without) :]
        return self.tokenizer.encode(SEPARATOR, add_special_tokens=False)

    def _stream_tokens(
        self,
        samples: Sequence[dict],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        use_cache: bool,
    ) -> Iterator[list[int | None]]:
        """`generate_stream` on the samples' prompt embeddings. Checked at the call, not at the first
        ``next()``: the arguments, the samples (`prepare`) and the prompts' lengths."""
        from sphinx_x.generate import generate_stream

        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        steps = generate_stream(
            self.llm,
            self._prompts(samples),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_sequences=[self._stop_ids()],
            eos_id=self.tokenizer.eos_token_id,
            use_cache=use_cache,
        )
        return self._in_eval_mode(steps)

    def _in_eval_mode(self, steps: Iterator[list[int | None]]) -> Iterator[list[int | None]]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield from steps
        finally:
            self.train(was_training)

    def generate(
        self,
        samples: Sequence[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> list[str]:
        """The assistant's reply to each sample (whose conversation ends with a human turn), batched on one
        packed KV cache; greedy at ``temperature=0``, else sampled (top-p, `seed`). Stops at the template's
        ``\\n###``, the EOS token or `max_new_tokens`."""
        tokens: list[list[int]] = [[] for _ in samples]
        done = [False] * len(samples)
        for step in self._stream_tokens(samples, max_new_tokens, temperature, top_p, seed, use_cache):
            for i, t in enumerate(step):
                if t is None or done[i]:
                    continue
                tokens[i].append(t)
                # "\n###" is 4 bytes: it ends within the last few tokens when it first appears.
                if SEPARATOR in self.tokenizer.decode(tokens[i][-8:]):
                    done[i] = True
            if all(done):
                break
        eos = self.tokenizer.eos_token_id
        return [strip_reply(self.tokenizer.decode([t for t in ts if t != eos])) for ts in tokens]

    def stream(
        self,
        sample: dict,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[str]:
        """Yield the reply to one sample piece by piece as it is generated (the concatenation equals
        ``generate([sample], ...)[0]``). The sample and arguments are checked at the call."""
        if not isinstance(sample, dict):
            raise TypeError(
                f"sample must be one {{'image': ..., 'conversations': [...]}} dict (generate takes a list), "
                f"got {type(sample).__name__}"
            )
        steps = self._stream_tokens([sample], max_new_tokens, temperature, top_p, seed, use_cache)
        return self._text_pieces(steps)

    def _text_pieces(self, steps: Iterator[list[int | None]]) -> Iterator[str]:
        tokens: list[int] = []
        emitted = 0
        eos = self.tokenizer.eos_token_id
        for step in steps:
            t = step[0]
            if t is None:
                break
            if t != eos:
                tokens.append(t)
            text = self.tokenizer.decode(tokens)
            cut = text.find(SEPARATOR)
            final = cut >= 0
            if final:
                text = text[:cut]
            else:
                text = text.rstrip("\ufffd")  # an unfinished multi-byte character
                for k in range(len(SEPARATOR) - 1, 0, -1):  # hold back what may start the separator
                    if text.endswith(SEPARATOR[:k]):
                        text = text[:-k]
                        break
            visible = text[1:] if text.startswith(" ") else text
            if len(visible) > emitted:
                yield visible[emitted:]
                emitted = len(visible)
            if final:
                return
        # Stopped by length or EOS: what was held back is part of the reply.
        text = strip_reply(self.tokenizer.decode(tokens))
        if len(text) > emitted:
            yield text[emitted:]

    def chat(
        self,
        image: str | Path | torch.Tensor | None,
        question: str,
        history: Sequence[tuple[str, str]] = (),
        **generate_kwargs: Any,
    ) -> str:
        """Answer `question` about `image` (a path, a uint8 ``(H, W, 3)`` tensor or None) after the earlier
        ``(question, answer)`` turns of `history`; `generate_kwargs` as `generate`'s."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise TypeError(
                f"history must be a list of (question, answer) str pairs, got {type(history).__name__}"
            )
        for i, turn in enumerate(history):
            if (
                not isinstance(turn, Sequence)
                or isinstance(turn, str)
                or len(turn) != 2
                or not all(isinstance(t, str) for t in turn)
            ):
                raise TypeError(f"history[{i}] must be a (question, answer) pair of str, got {turn!r:.80}")
        conversations = []
        for q, a in history:
            conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        conversations.append({"from": "human", "value": question})
        return self.generate([{"image": image, "conversations": conversations}], **generate_kwargs)[0]

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (every tensor, towers included, in its dtype) and the
        tokenizer folder to `path`; `from_pretrained` reads it back exactly."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        # The weights are all in model.safetensors now; the folder is self-contained.
        config.update(tokenizer=TOKENIZER_DIR, llm_weights=None)
        config["vision"].update(dino_weights=None, convnext_weights=None)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        self.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        state = {k: v.detach().contiguous().cpu() for k, v in self._own_state().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "sphinx_x": "1"})

    def _own_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        if self.config.llm.tie_embeddings:
            state.pop(
                "llm.output.weight", None
            )  # the same tensor as the embedding (safetensors forbids aliases)
        return state

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> SphinxX:
        """Load a folder written by `save_pretrained` (safetensors: no code runs) into `dtype` (default the
        saved config's) on `device` (default CPU). A missing, unexpected or differently shaped tensor (a
        checkpoint of another architecture) is a ValueError naming it."""
        from safetensors import safe_open

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{path} needs {CONFIG_FILE} and {WEIGHTS_FILE} (written by save_pretrained)"
            )
        data = json.loads((path / CONFIG_FILE).read_text())
        if "llm" not in data and ("architectures" in data or "model_type" in data):
            raise ValueError(
                f"{path} is a Hugging Face checkpoint ({data.get('architectures') or data.get('model_type')}), "
                "not a SphinxX folder: load a decoder with LLM.from_hf, or build a model on it with "
                "get_config(..., llm_weights=path)"
            )
        config = SphinxXConfig.from_dict(data)
        if config.tokenizer is not None and not Path(config.tokenizer).is_absolute():
            config.tokenizer = str(path / config.tokenizer)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or config.torch_dtype
        model = cls(config, dtype=dtype, device="meta")
        expected = model._own_state()
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise ValueError(
                    f"{path / WEIGHTS_FILE} does not match a {config.name} model: missing tensors "
                    f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected tensors "
                    f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
                )
            state = {}
            for name in sorted(names):
                t = f.get_slice(name)
                shape = tuple(t.get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(
                        f"tensor {name!r} has shape {shape} in the checkpoint but {tuple(expected[name].shape)} "
                        f"in a {config.name} model: a checkpoint of another architecture"
                    )
                value = f.get_tensor(name)  # a view of the memory-mapped file: nothing read yet
                target = expected[name].dtype if not expected[name].is_floating_point() else dtype
                # One copy per tensor, straight into the target dtype and device (peak: the model once), and
                # always a copy: a parameter aliasing the mapped file would change (or fault, truncated) when
                # a checkpoint is saved over it.
                state[name] = value.to(device=device, dtype=target, copy=True)
        model.load_state_dict(state, strict=False, assign=True)
        if config.llm.tie_embeddings:
            model.llm.output.weight = model.llm.tok_embeddings.weight
        model.vision.reset_buffers(device)  # the buffers no checkpoint holds, the towers' own included
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta:
                raise RuntimeError(f"{name} was not loaded (still on the meta device)")
        model.vision.requires_grad_(True)
        for tower in model.vision.towers():
            tower.requires_grad_(False)
        return model


# ----------------------------------------------------------------------------------------------- helpers
def _check_same_arch(loaded: LLMConfig, wanted: LLMConfig, path: str) -> None:
    diff = [f"{k}: checkpoint {getattr(loaded, k)!r}, config {getattr(wanted, k)!r}"
            for k in _SHAPE_FIELDS if getattr(loaded, k) != getattr(wanted, k)]  # fmt: skip
    if diff:
        raise ValueError(f"llm_weights {path} is a checkpoint of another architecture ({'; '.join(diff)})")


def _named_image_error(read: Any, image: Any, name: str) -> Any:
    """``read(image, name)`` (decode, or read the size from the header), with a missing or unreadable file
    named by the sample it belongs to (a batch may hold hundreds of paths)."""
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise FileNotFoundError(f"{name}: no image file {str(image)!r}")
    try:
        return read(image, name)
    except OSError as exc:  # PIL's UnidentifiedImageError, a truncated file, ...
        raise ValueError(f"{name}: {str(image)!r} is not a readable image ({exc})") from exc


def _view_dtype(vision: VisionEncoder, device: torch.device) -> torch.dtype:
    dtype = vision.proj.weight.dtype
    # tile_gather writes fp32/fp16/bf16/fp64; views are cast to the towers' dtype in VisionEncoder anyway.
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
