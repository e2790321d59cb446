"""The process group of a training run and FSDP2 sharding of the model.

Launched with ``torchrun`` (or under an already initialised process group), every rank builds the same
model from the same seed and `shard` (FSDP2 ``fully_shard``) shards it per LLM block and at the root:
ZeRO-2 style (``reshard_after_forward=False``: parameters stay gathered from forward to backward) by
default, ZeRO-3 (full sharding) with ``reshard_after_forward=True``; `touch_root_params` keeps the ranks'
gradient reduce-scatters the same size. One process without a group trains unsharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the run: its rank among `world`, its device, and whether it opened the
    process group (and so closes it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum of `values` over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(
            values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1) or the one already initialised: NCCL on
    CUDA, gloo on the CPU. One process without either trains unsharded."""
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend() == "nccl"):
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device, owns)


def shard(model: torch.nn.Module, dd: Dist, reshard_after_forward: bool) -> None:
    """FSDP2: one parameter group per LLM block (gathered just in time, freed or kept after forward per
    `reshard_after_forward`) and the rest at the root (embeddings, towers, projector, image markers, skip
    embedding, final norm, LM head), which stays gathered from forward to backward either way."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dd.device.type, (dd.world,))
    for block in model.llm.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The frozen towers stay in the root group: a rank whose bin is text-only never calls them, and a unit of
    # their own would then all-gather on some ranks only (a collective mismatch). The root stays gathered from
    # forward to backward under full sharding too (FSDP's own default for a root, whose parameters backward
    # needs at once): resharded, touch_root_params would find only sharded parameters after forward, a
    # text-only rank's projector would get no gradient and the ranks' reduce-scatters would differ in size.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)


def touch_root_params(model) -> torch.Tensor:
    """0 x the root group's trainable parameters: a bin without images (or without a skipped tile) leaves the
    projector, image markers or skip embedding without a gradient on that rank, and FSDP reduce-scatters only
    parameters that have one: ranks would disagree on the sizes. Exact zeros change no gradient."""
    total = torch.zeros((), device=model.llm.tok_embeddings.weight.device)
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("llm.layers.") and not hasattr(p, "full_tensor"):
            total = total + p.sum() * 0.0
    return total
