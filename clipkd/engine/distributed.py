"""Multi-process training with torchrun: rank bookkeeping and the few collectives the trainer needs.

Everything here is a no-op in a single process, so the trainer reads the same either way.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); False when single-process."""
    if world_size() <= 1:
        return False
    if not is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def mean(value: float) -> float:
    """The mean of a float over ranks."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
