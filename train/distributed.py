"""This process's place in a torchrun job and the few collectives training needs (torchvision's ``utils.py``).

Without torchrun a process is rank 0 of 1 and every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ich import inference

__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "is_distributed",
    "world_size",
    "sum_across",
    "concat_across",
    "wrap",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (torchrun) job; one process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """:func:`ich.inference.resolve_device` (``auto``: CUDA when present), CUDA processes on GPU ``local_rank``."""
    try:
        device = inference.resolve_device(name)
    except RuntimeError as exc:  # no GPU: a command-line error, not a traceback
        raise SystemExit(str(exc)) from None
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, else gloo)."""
    env = os.environ
    info = DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name, info.local_rank)
    if info.distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size)
    return info, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def sum_across(*values: torch.Tensor) -> list[torch.Tensor]:
    """All-reduce sums in a DDP job (one collective); a no-op in a single process."""
    if not is_distributed():
        return list(values)
    flat = torch.stack([v.float() for v in values])
    dist.all_reduce(flat)
    return list(flat.unbind())


def concat_across(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each of ``parts`` concatenated over the ranks, in rank order; a no-op in a single process."""
    if not is_distributed():
        return parts
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, parts)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(parts))]


def wrap(net: nn.Module, dist_info: DistInfo, device: torch.device, compile_model: bool) -> nn.Module:
    """DDP (+ compile) around ``net``; rebuilt per phase because DDP fixes its trainable set."""
    model: nn.Module = net
    if dist_info.distributed:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return cast(nn.Module, torch.compile(model)) if compile_model else model
