"""Scale-out over torch.distributed: ranks split the calibration samples (`torchrun --nproc-per-node N`).

Backend gloo on CPU, nccl on CUDA; a single process (no WORLD_SIZE) needs no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, initialised=True)

    def device(self) -> str | None:
        return f"cuda:{self.local_rank}" if self.initialised and torch.cuda.is_available() else None

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, on every rank (a barrier too); a single process gets [obj]."""
        if not self.initialised:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc) -> None:
        if self.initialised and dist.is_initialized():
            if exc[0] is None:
                dist.barrier()
            dist.destroy_process_group()
