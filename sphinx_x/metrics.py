"""What a training run records per step: the metrics log, the experts' load balance and the LLM positions
that skip tokens save."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

import sphinx_kernels as sk
from sphinx_x.distributed import Dist


class Metrics:
    """JSONL log (rank 0), TensorBoard when installed."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        # A resumed run rewrites the log from its checkpoint: rows of steps after it were never kept.
        rows = []
        if self.path.exists() and resume_step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row.get("step", 0) <= resume_step:
                    rows.append(line + "\n")
        self.path.write_text("".join(rows), encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def skip_saving(model, sample: dict) -> int:
    """LLM positions a sample's skip tokens save: a skipped tile takes one position instead of a view's
    ``[s] tokens [e]``."""
    size = sample.get("image_size")
    if size is None:
        return 0
    plan = sk.plan_tiles([tuple(size)], model.config.canvas, model.config.grid)
    return plan.skipped_per_image[0] * (model.tokens_per_view + 1)


def expert_balance(counts_image: torch.Tensor, counts_text: torch.Tensor, dd: Dist) -> dict:
    """Per step: the most loaded expert's share over the mean share (1 = balanced), worst layer, for image
    and text tokens (the paper's expert analysis)."""
    both = torch.stack([counts_image, counts_text]).double()  # (2, layers, E)
    if dd.enabled:
        both = both.to("cuda" if dd.device.type == "cuda" else "cpu")
        dist.all_reduce(both)
        both = both.cpu()
    out = {}
    for name, c in (("image", both[0]), ("text", both[1])):
        mean = c.sum(-1, keepdim=True) / c.shape[-1]
        out[f"expert_max_load_{name}"] = float((c / mean.clamp(min=1)).max(-1).values.max())
    return out
