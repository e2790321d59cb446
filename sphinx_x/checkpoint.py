"""Checkpoints of a training run that resume it exactly, and the export of its final model.

A checkpoint (model, optimizer, the trainer's state, every rank's RNG states) goes through
``torch.distributed.checkpoint`` into a temporary folder renamed into place when complete, so a kill
mid-write leaves the previous one loadable; DCP reshards, so a checkpoint loads under another number of
ranks too. The final model is exported with ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sphinx_x.distributed import Dist

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (user code may use it)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (a folder appears only once fully written)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(folder: Path, step: int, model, optimizer, state: dict, dd: Dist, keep: int) -> Path:
    """Write checkpoint `step` atomically: every rank writes its shards into a temporary folder through
    ``torch.distributed.checkpoint``; once all are done rank 0 renames it to ``step_<N>`` (a rename within
    one file system is atomic) and prunes the oldest beyond `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{final.name}"
    if dd.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dd.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), no_dist=not dd.enabled)
    torch.save(_rng_state(), tmp / f"rng_rank{dd.rank}.pt")
    dd.barrier()
    if dd.main:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dd.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, dd: Dist) -> dict:
    """Restore model, optimizer and this rank's RNG states from `path`; returns the trainer state. A
    checkpoint written by another number of ranks loads too (DCP reshards); RNG states then restart."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    both = {"model": model_state, "optim": optim_state}
    dcp.load(both, checkpoint_id=str(path), no_dist=not dd.enabled)
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    rng = path / f"rng_rank{dd.rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        logger.warning("%s has no RNG state for rank %d: RNG streams restart", path, dd.rank)
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def export(model, folder: Path, dd: Dist) -> Path:
    """``save_pretrained`` of the trained weights (rank 0 gathers a sharded model's full state dict)."""
    if not dd.enabled:
        if dd.main:
            model.save_pretrained(folder)
        return folder
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dd.main:
        from sphinx_x.model import SphinxX

        plain = SphinxX(model.config)
        plain.load_state_dict(full)
        plain.save_pretrained(folder)
    dd.barrier()
    return folder
