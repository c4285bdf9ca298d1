"""Data-parallel training with PyTorch's own engine (torchrun + DistributedDataParallel).

`torchrun --nproc_per_node N -m compress finetune ...` sets RANK/WORLD_SIZE; `DistContext.from_env()`
joins the process group (gloo on CPU, nccl on GPU). Each rank takes an interleaved share of
every global batch, so N processes with batch B/N see exactly the samples of one process
with batch B, and the averaged gradient is the same. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device_kind: str = "cpu") -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistContext()
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
            owns = True
        return DistContext(
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            owns_group=owns,
        )

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch's sample indices."""
        return idx[self.rank :: self.world] if self.enabled else idx

    def any(self, *flags: bool, device=None) -> list[bool]:
        """Logical OR of each flag over all ranks (Ctrl-C and NaN must stop every rank at the same step)."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
