"""PyTorch's own distributed engine, reduced to what training needs.

`torchrun --nproc-per-node N -m captioner train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them every
helper here is a no-op, so the single-process path has no distributed code in its way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedEnv()


def init_distributed(device: str | None) -> tuple[DistributedEnv, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE_PROCESS, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = DistributedEnv(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return env, torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")


def barrier(env: DistributedEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    """Sum of a tensor over all ranks (the tensor itself when not distributed)."""
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(obj: Any, env: DistributedEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP and/or torch.compile wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def shutdown(env: DistributedEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
