"""One-stage all-in-one training of SPHINX-X on torch.distributed FSDP2, with exact resume.

One stage (as SPHINX-X): every parameter but the frozen visual towers is trained on a mix of multi-turn
conversation datasets. AdamW (betas 0.9 / 0.95, weight decay 0 by default and never on norms and biases),
linear warmup over the first 0.01 epoch then cosine to ``min_lr``, gradient clipping, gradient
accumulation, bf16 autocast on the GPU, optional activation checkpointing, the MoE load-balancing loss.

Distributed (`sphinx_x.distributed`): launched with ``torchrun`` (or under an already initialised process
group), every rank builds the same model from the same seed and FSDP2 shards it per LLM block and at the
root: ZeRO-2 style (``reshard_after_forward=False``: parameters stay gathered from forward to backward) by
default, ZeRO-3 (full sharding) with ``reshard_after_forward: true``. The bins of an epoch are the same on
every rank; rank ``r`` takes bins ``r, r + world, ...`` of each step, so one step sees the same global batch
for any split of ranks x accumulation.

The loss of a step is the mean over the global batch's supervised tokens (not a mean of per-bin means), so
bins of different fill weigh by their tokens and the result does not depend on how the batch is split.

A run writes checkpoints (`sphinx_x.checkpoint`: model, optimizer, schedule position, data position, RNG
states) and a resumed run continues bit for bit (the data order is a pure function of the seed and the step).
The final model is exported with ``save_pretrained`` and, with ``eval_data``, judged before and after
training (`sphinx_x.evaluate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

# `name as name` below: moved out with the split, re-exported so `sphinx_x.train.name` still works.
from sphinx_x import data as sxdata
from sphinx_x.checkpoint import CHECKPOINT_PREFIX as CHECKPOINT_PREFIX
from sphinx_x.checkpoint import checkpoints, export, load_checkpoint, save_checkpoint
from sphinx_x.distributed import Dist as Dist
from sphinx_x.distributed import setup_distributed, shard, touch_root_params
from sphinx_x.evaluate import EvalResult as EvalResult
from sphinx_x.evaluate import answer_matches as answer_matches
from sphinx_x.evaluate import evaluate
from sphinx_x.metrics import Metrics, expert_balance, skip_saving

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ config


@dataclass
class TrainConfig:
    """A training run (YAML keys of ``sphinx-x train --config``; ``key=value`` on the command line).

    Model: ``model`` a preset of `sphinx_x.config.list_configs()`, ``model_overrides`` its
    ``get_config`` overrides (dotted keys allowed: ``llm.n_layers: 4``), ``init_from`` a ``save_pretrained``
    folder to start from instead of the preset's weights.

    Data: ``data`` a YAML mix / a JSON(L) dataset / an inline list of ``{path, root?, ratio?}``;
    ``eval_data`` held-out JSON(L) for answer accuracy and loss before and after training
    (``eval_samples`` of them, 0 = all); ``tokens_per_bin`` the packed length of one micro-batch per rank;
    ``too_long`` "truncate" (cut at a turn boundary) or "drop"; ``on_bad_image`` "skip" or "error".

    Optimisation: ``epochs`` (fractional allowed) or ``max_steps`` (wins when set); ``lr`` peak, cosine to
    ``min_lr``; ``warmup_epochs`` linear warmup; ``grad_clip`` max global norm (0: off); ``grad_accum``
    micro-batches per rank per step; ``aux_loss_weight`` the MoE balance loss weight (None: the model
    config's); ``precision`` "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32" or "fp64" (every
    weight and activation in float64: the reference runs of the tests).
    """

    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    data: Any = None
    eval_data: str | None = None
    eval_samples: int = 0
    eval_max_new_tokens: int = 32
    tokens_per_bin: int = 4096
    pack_window: int = 4096
    too_long: str = "truncate"
    on_bad_image: str = "skip"
    num_workers: int = 2
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup_epochs: float = 0.01
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 8.0
    grad_accum: int = 1
    aux_loss_weight: float | None = None
    precision: str = "auto"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = False
    seed: int = 0
    out: str = "runs/sphinx-x"
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), str(f.type)))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        self.betas = tuple(_coerce("betas", b, "float") for b in self.betas)
        checks = {
            "tokens_per_bin": self.tokens_per_bin >= 1,
            "pack_window": self.pack_window >= 1,
            "grad_accum": self.grad_accum >= 1,
            "epochs": self.epochs > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "lr": self.lr >= 0 and self.min_lr >= 0,
            "warmup_epochs": self.warmup_epochs >= 0,
            "weight_decay": self.weight_decay >= 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "grad_clip": self.grad_clip >= 0,
            "num_workers": self.num_workers >= 0,
            "save_every": self.save_every >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "log_every": self.log_every >= 1,
            "eval_samples": self.eval_samples >= 0,
            "too_long": self.too_long in ("truncate", "drop"),
            "on_bad_image": self.on_bad_image in ("skip", "error"),
            "precision": self.precision in ("auto", "bf16", "fp32", "fp64"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid TrainConfig value(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
            )
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides must be a mapping, got {type(self.model_overrides).__name__}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping; an unknown key is a ValueError naming it, the closest valid key and all
        valid keys."""
        valid = cls.keys()
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown key {key!r} in {source}{hint}; valid keys: {', '.join(valid)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """A YAML config file (or none) with ``key=value`` overrides (values parsed as YAML;
        ``model_overrides.llm.n_layers=4`` sets one model override)."""
        values: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: a training config must be a mapping of keys to values")
            values.update(loaded)
        for item in overrides:
            key, eq, raw = item.partition("=")
            if not eq or not key:
                raise ValueError(f"override {item!r} must look like key=value")
            value = yaml.safe_load(raw) if raw else None
            head, dot, rest = key.partition(".")
            if dot and head == "model_overrides":
                values.setdefault("model_overrides", {})[rest] = value
            elif dot:
                raise ValueError(f"override {item!r}: only model_overrides takes dotted keys")
            else:
                values[key] = value
        return cls.from_dict(values, source=str(path) if path else "overrides")


def _coerce(name: str, value: Any, kind: str) -> Any:
    """`value` as the field's type: YAML reads ``1e-3`` (no dot) as a string, and a typed config should
    say which key has a value of the wrong kind instead of failing later."""
    if value is None and ("None" in kind or kind == "Any"):
        return None
    base = kind.split("|")[0].strip()
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "bool" and isinstance(value, bool):
            return value
        if base == "str" and isinstance(value, (str, Path)):
            return str(value)
        if base not in ("float", "int", "bool", "str"):
            return value
    except (TypeError, ValueError):
        pass
    raise TypeError(f"config key {name!r} must be {kind}, got {value!r}")


# ---------------------------------------------------------------------------------------------- schedule


def learning_rate(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Linear warmup over `warmup` steps (step 0 gets ``peak / warmup``), then cosine from `peak` to `floor`
    at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------- data order


class DataPlan:
    """The data order of a run, a pure function of (samples, lengths, budget, seed, world x accum).

    Epoch ``e`` packs the samples into bins (`sphinx_x.data.plan_epoch`); a step takes ``world * accum``
    consecutive bins (bins that do not fill a last step are left for that epoch, and counted); rank ``r``'s
    micro-batch ``m`` of a step is bin ``m * world + r`` of the step's bins.
    """

    def __init__(self, lengths: list[int], budget: int, *, seed: int, world: int, accum: int, window: int):
        self.lengths, self.budget, self.seed, self.world, self.accum, self.window = (
            lengths, budget, seed, world, accum, window,
        )  # fmt: skip
        self.per_step = world * accum
        self._epochs: dict[int, list[list[int]]] = {}

    def bins(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs[epoch] = sxdata.plan_epoch(
                self.lengths, self.budget, seed=self.seed, epoch=epoch, window=self.window
            )
        return self._epochs[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.bins(epoch)) // self.per_step

    def total_steps(self, epochs: float) -> int:
        whole, part = divmod(epochs, 1.0)
        total = sum(self.steps_in_epoch(e) for e in range(int(whole)))
        return total + int(part * self.steps_in_epoch(int(whole)))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of global step `step`."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def step_bins(self, step: int, rank: int) -> list[list[int]]:
        """Rank `rank`'s micro-batches (bins of sample indices) of global step `step`."""
        epoch, k = self.locate(step)
        bins = self.bins(epoch)[k * self.per_step : (k + 1) * self.per_step]
        return [bins[m * self.world + rank] for m in range(self.accum)]

    def all_step_bins(self, step: int) -> list[list[int]]:
        """Every rank's bins of step `step` (for the global batch's statistics)."""
        epoch, k = self.locate(step)
        return self.bins(epoch)[k * self.per_step : (k + 1) * self.per_step]


class _StepDataset(torch.utils.data.Dataset):
    """Item ``j``: this rank's micro-batches of step ``start + j``, images decoded (in a worker)."""

    def __init__(
        self, samples: list[dict], plan: DataPlan, rank: int, start: int, stop: int, on_bad_image: str
    ):
        self.samples, self.plan, self.rank, self.start, self.stop = samples, plan, rank, start, stop
        self.on_bad_image = on_bad_image
        self.steps = [plan.step_bins(s, rank) for s in range(start, stop)]  # planned here, not in workers

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> list[dict]:
        bins = sxdata.PackedBins(self.samples, self.steps[j], on_bad_image=self.on_bad_image)
        return [bins[m] for m in range(len(bins))]


# --------------------------------------------------------------------------------------------- training


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; with weight decay, none on norms, biases and embeddings-like vectors (ndim < 2)."""
    trainable = {id(p) for p in model.trainable_parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in trainable or not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    if weight_decay == 0:
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainResult:
    """What `train` did: steps run, per-step losses (global means), the export folder, the evaluations."""

    steps: int
    losses: list[float]
    model_dir: Path | None
    eval_before: Any = None
    eval_after: Any = None
    stats: dict = field(default_factory=dict)
    tokens_per_second: float = 0.0
    visual_positions_saved: int = 0


def _build_model(cfg: TrainConfig, device: torch.device):
    from sphinx_x.config import get_config
    from sphinx_x.model import SphinxX

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    if cfg.init_from:
        model = SphinxX.from_pretrained(cfg.init_from)
    else:
        model = SphinxX(get_config(cfg.model, **cfg.model_overrides))
    if cfg.precision == "fp64":  # float64 everywhere: the reference that tests judge fp32 runs against
        return model.double().to(device)
    # Trainable weights are fp32 masters (a bf16 preset trains under autocast); frozen towers keep their dtype.
    for p in model.trainable_parameters():
        p.data = p.data.float()
    return model.to(device)


def train(
    cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None, progress: bool = True
) -> TrainResult:
    """Run (or resume) one-stage training as `cfg` says; see the module docstring.

    Args:
        cfg: the run.
        resume: continue from the newest complete checkpoint in ``cfg.out/checkpoints`` (none: start).
        stop_at: leave after this global step (a checkpoint is written there), as an interrupted run would;
            the schedule still spans the whole run.
        progress: show a tqdm bar on rank 0.
    """
    from tqdm import tqdm

    dd = setup_distributed()
    out = Path(cfg.out)
    if cfg.data is None:
        raise ValueError(
            "TrainConfig.data is required: a YAML mix, a JSON/JSONL dataset or a list of datasets"
        )
    model = _build_model(cfg, dd.device)
    budget = cfg.tokens_per_bin
    samples = sxdata.load_mix(cfg.data, seed=cfg.seed)
    # A sample must fit a bin and the LLM's context (a bin holds several sequences of at most max_seq_len).
    limit = min(budget, model.config.llm.max_seq_len)
    samples, lengths, stats = sxdata.measure(
        samples, model.sample_length, limit, too_long=cfg.too_long, on_bad_image=cfg.on_bad_image
    )
    if not samples:
        raise ValueError(f"no usable sample in {cfg.data}: {stats.as_dict()}")
    plan = DataPlan(
        lengths, budget, seed=cfg.seed, world=dd.world, accum=cfg.grad_accum, window=cfg.pack_window
    )
    steps_per_epoch = plan.steps_in_epoch(0)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(samples)} samples fill {len(plan.bins(0))} bins of {budget} tokens, fewer than one step needs "
            f"({dd.world} ranks x grad_accum {cfg.grad_accum}): lower tokens_per_bin or add data"
        )
    total = cfg.max_steps or plan.total_steps(cfg.epochs)
    warmup = math.ceil(cfg.warmup_epochs * steps_per_epoch)
    aux_weight = model.config.aux_loss_weight if cfg.aux_loss_weight is None else cfg.aux_loss_weight
    fill = sxdata.bin_fill(plan.bins(0), lengths, budget)
    if dd.main:
        logger.info(
            "%d samples (%d images), %d tokens; epoch 0: %d bins of %d tokens, %.1f%% full; %d steps/epoch, "
            "%d steps, warmup %d; %d rank(s) x %d micro-batch(es) per step",
            len(samples), stats.images, sum(lengths), len(plan.bins(0)), budget, 100 * fill, steps_per_epoch,
            total, warmup, dd.world, cfg.grad_accum,
        )  # fmt: skip
        if stats.missing_images or stats.truncated or stats.dropped_too_long:
            logger.warning("data: %s", {k: v for k, v in stats.as_dict().items() if k != "examples"})

    result = TrainResult(0, [], None)
    eval_samples = None
    if cfg.eval_data:
        eval_samples = sxdata.read_samples(cfg.eval_data)
        if cfg.eval_samples:
            eval_samples = eval_samples[: cfg.eval_samples]

    ckpt_dir = out / "checkpoints"
    found = checkpoints(ckpt_dir)
    if found and not resume:
        raise ValueError(
            f"{ckpt_dir} already holds checkpoints (newest {found[-1].name}): resume=True (--resume) continues "
            "that run; to start over remove the folder or choose another out"
        )
    if eval_samples is not None and not found and dd.main:
        result.eval_before = evaluate(model, eval_samples, max_new_tokens=cfg.eval_max_new_tokens)
        logger.info("before training: %s", result.eval_before.summary())
    dd.barrier()

    model.llm.activation_checkpointing = cfg.activation_checkpointing
    if dd.enabled:
        shard(model, dd, cfg.reshard_after_forward)
    model.train()
    params = [p for g in _param_groups(model, cfg.weight_decay) for p in g["params"]]
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0
    )

    start = 0
    if found:
        state = load_checkpoint(found[-1], model, optimizer, dd)
        if state["per_step"] != plan.per_step:
            raise ValueError(
                f"{found[-1]} was written with {state['per_step']} bins per step (ranks x grad_accum), this run "
                f"takes {plan.per_step}: the data position would not carry over"
            )
        start = state["step"]
        result.losses = list(state.get("losses", []))
        for key, value in state.get("stats", {}).items():
            if key in ("bad_images",):
                setattr(stats, key, value)
        if dd.main:
            logger.info("resumed from %s at step %d of %d", found[-1], start, total)
    elif resume and dd.main:
        logger.info("no checkpoint in %s: starting from step 0", ckpt_dir)
    stop = min(total, stop_at) if stop_at is not None else total

    metrics = Metrics(out, dd.main, start)
    loader = torch.utils.data.DataLoader(
        _StepDataset(samples, plan, dd.rank, start, stop, cfg.on_bad_image),
        batch_size=None,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=dd.device.type == "cuda",
        prefetch_factor=2 if cfg.num_workers else None,
        persistent_workers=False,
    )
    bar = tqdm(
        total=total, initial=start, disable=not (progress and dd.main), desc="train", dynamic_ncols=True
    )
    tokens_run, seconds_run, saved_run = 0, 0.0, 0
    step = start
    for step, micro in enumerate(loader, start):
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(step, total, warmup, cfg.lr, cfg.min_lr)
        batches, weights, bad = [], [], 0
        for m in micro:
            bad += len(m["bad"])
            for sample_id, reason in m["bad"]:
                stats.note("bad_images", {"id": sample_id}, reason)
            kept = m["samples"]
            weights.append(1.0 if kept else 0.0)
            # A bin that lost every sample still runs (ranks must meet in every collective) with weight 0.
            # The images are still the workers' uint8 pixels: prepare's one tile_gather on the device
            # resizes, normalises and tiles them (one byte per channel crosses to the device, not 2 or 4).
            batches.append(model.prepare(kept or [_PLACEHOLDER], device=dd.device))
        supervised = [float(b.num_supervised) * w for b, w in zip(batches, weights, strict=True)]
        n_global = max(1.0, dd.all_sum([sum(supervised)])[0])
        loss_sum = torch.zeros((), dtype=torch.float64)
        aux_sum = torch.zeros((), dtype=torch.float64)
        counts_image, counts_text = None, None
        for batch, w in zip(batches, weights, strict=True):
            with _autocast(cfg.precision, dd.device):
                output = model(batch, reduction="sum")
            # FSDP averages gradients over ranks: scale by world so the step's gradient is that of the
            # global mean over supervised tokens (plus the mean aux loss over all micro-batches).
            ce = output.loss * (w * dd.world / n_global)
            if dd.enabled:
                ce = ce + touch_root_params(model)
            aux = output.aux_loss * (w * aux_weight / cfg.grad_accum)
            (ce + aux).backward()
            loss_sum += output.loss.detach().double().cpu() * (w / n_global)
            aux_sum += output.aux_loss.detach().double().cpu() * (w / cfg.grad_accum)
            if output.expert_counts_image is not None:
                ci, ct = output.expert_counts_image.cpu(), output.expert_counts_text.cpu()
                counts_image = ci if counts_image is None else counts_image + ci
                counts_text = ct if counts_text is None else counts_text + ct
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        all_bins = plan.all_step_bins(step)
        step_tokens = sum(lengths[i] for b in all_bins for i in b)
        step_images = sum(samples[i]["image_size"] is not None for b in all_bins for i in b)
        step_saved = sum(skip_saving(model, samples[i]) for b in all_bins for i in b)
        loss, aux_mean, bad_all = dd.all_sum([loss_sum.item(), aux_sum.item() / dd.world, float(bad)])
        seconds = time.perf_counter() - t0
        tokens_run, seconds_run, saved_run = (
            tokens_run + step_tokens,
            seconds_run + seconds,
            saved_run + step_saved,
        )
        result.losses.append(loss)
        row = {
            "step": step + 1,
            "epoch": plan.locate(step)[0],
            "loss": loss,
            "aux_loss": aux_mean,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens": step_tokens,
            "tokens_per_s": step_tokens / seconds,
            "images_per_s": step_images / seconds,
            "fill": step_tokens / (len(all_bins) * budget),
            "visual_positions_saved": step_saved,
            "bad_images": int(bad_all),
            "seconds": seconds,
        }
        if counts_image is not None:
            row.update(expert_balance(counts_image, counts_text, dd))
        metrics.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if dd.main and ((step + 1) % cfg.log_every == 0 or step + 1 == stop):
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  grad norm %.3f  %.0f tokens/s  %.1f images/s  fill %.1f%%",
                step + 1, total, loss, row["lr"], row["grad_norm"], row["tokens_per_s"], row["images_per_s"],
                100 * row["fill"],
            )  # fmt: skip
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == stop:
            trainer_state = {
                "step": done,
                "total_steps": total,
                "per_step": plan.per_step,
                "world_size": dd.world,
                "losses": result.losses,
                "stats": stats.as_dict(),
                "config": dataclasses.asdict(cfg),
            }
            save_checkpoint(ckpt_dir, done, model, optimizer, trainer_state, dd, cfg.keep_checkpoints)
    bar.close()
    metrics.close()
    result.steps = len(result.losses)
    result.stats = stats.as_dict()
    result.tokens_per_second = tokens_run / seconds_run if seconds_run else 0.0
    result.visual_positions_saved = saved_run
    if stop == total:
        result.model_dir = export(model, out / "model", dd)
        if eval_samples is not None and dd.main:
            from sphinx_x.model import SphinxX

            exported = SphinxX.from_pretrained(result.model_dir)
            result.eval_after = evaluate(exported, eval_samples, max_new_tokens=cfg.eval_max_new_tokens)
            logger.info("after training: %s", result.eval_after.summary())
    dd.barrier()
    if dd.owns_group:
        dist.destroy_process_group()
    return result


_PLACEHOLDER = {"id": "placeholder", "image": None, "conversations": [
    {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi"}]}  # fmt: skip
