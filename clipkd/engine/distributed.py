"""Multi-process training with torchrun: rank bookkeeping and the few collectives the trainer needs.

Everything here is a no-op in a single process, so the trainer reads the same either way. On CUDA each
process first pins its own GPU (``LOCAL_RANK``) and the group is ``cpu:gloo,cuda:nccl``: NCCL carries only
CUDA tensors, so the scalars below live on the process's device, and the object collectives (which torch
stages on the current CUDA device) land on each process's own GPU, not all on cuda:0.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

_device = torch.device("cpu")


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


def pick_device() -> torch.device:
    """This process's GPU under torchrun (``LOCAL_RANK``), the only GPU otherwise, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> bool:
    """Join the process group torchrun describes; False when single-process."""
    global _device
    _device = device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size() <= 1:
        return False
    if not is_initialized():
        dist.init_process_group(backend_for(device))
    return True


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def mean(value: float) -> float:
    """The mean of a float over ranks."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device)
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
