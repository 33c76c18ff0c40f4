"""Where and how a process computes: its device, the precision (autocast), seeding and the RNG states, and
multi-process training with torchrun (rank bookkeeping and the few collectives the trainer needs).

The collectives are no-ops in a single process, so the trainer reads the same either way. On CUDA each
process first pins its own GPU (``LOCAL_RANK``) and the group is ``cpu:gloo,cuda:nccl``: NCCL carries only
CUDA tensors, so the scalars below live on the process's device, and the object collectives (which torch
stages on the current CUDA device) land on each process's own GPU, not all on cuda:0.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clipkd.errors import ConfigError

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


def distribute(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` as the processes train it: wrapped in DistributedDataParallel under torchrun (gradients
    averaged over the processes), itself in a single process."""
    if world_size() <= 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_snapshot() -> dict[str, Any]:
    """Every generator a model build draws from (Python, NumPy, torch CPU and CUDA), to rewind to later: a
    fused sweep builds the teacher once and each student from the state right after it, as a run alone does."""
    snap: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore_rng(snap: dict[str, Any]) -> None:
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap:
        torch.cuda.set_rng_state_all(snap["cuda"])


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def resolve_precision(precision: str, device: torch.device) -> str:
    """OPTIM.PRECISION with ``auto`` made concrete: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """The autocast context for OPTIM.PRECISION, and whether fp16 loss scaling is needed."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("OPTIM.PRECISION fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype == torch.float16
