"""The training loop, top to bottom: per epoch a seeded order and augmentation, the Distiller's loss, one
optimizer step per batch, the LR schedule, optional val selection, a checkpoint.

Reproducibility: every epoch reseeds torch and the loader from (SEED, epoch), and each image's augmentation
from (SEED, epoch, index), so a run resumed from the checkpoint written at the end of an epoch continues
exactly as the uninterrupted run would (bit-identical on CPU), and torchrun with W processes trains on the
batches one process would. Model selection never looks at the test split.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from yacs.config import CfgNode

from clipkd.data.loaders import ImageListDataset, build_loader
from clipkd.engine import distributed as dist
from clipkd.engine.checkpoint import save_checkpoint
from clipkd.engine.distiller import Distiller
from clipkd.engine.rundir import BEST_CKPT, LAST_CKPT, RunDir
from clipkd.engine.runlog import RunLog
from clipkd.errors import ConfigError, TrainingError


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def autocast_for(precision: str, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """The autocast context for OPTIM.PRECISION, and whether fp16 loss scaling is needed."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("OPTIM.PRECISION fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype == torch.float16


@dataclass
class TrainState:
    """Everything that changes during training, and what ``checkpoints/last.pt`` holds of it."""

    distiller: Distiller
    model: nn.Module  # the Distiller, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs finished
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "epoch": -1})

    def checkpoint(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "best": self.best,
                "objective": self.distiller.objective.state_dict()}

    def restore(self, ckpt: dict, source: str) -> None:
        self.distiller.student.load_trainable_state_dict(ckpt["state_dict"], source=source)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.distiller.objective.load_state_dict(ckpt.get("objective", {}))
        self.epoch, self.best = ckpt["epoch"], ckpt["best"]


def train_epochs(
    state: TrainState, dataset: ImageListDataset, cfg: CfgNode, device: torch.device, rundir: RunDir,
    log: RunLog, validate: Callable[[], float] | None = None, select_metric: str = "val_accuracy",
) -> None:
    """Train from ``state.epoch`` to OPTIM.MAX_EPOCH; ``validate()`` (logged as ``select_metric``, e.g. the
    few-shot val accuracy) picks the best epoch."""
    from tqdm import tqdm

    autocast, _ = autocast_for(cfg.OPTIM.PRECISION, device)
    student = state.distiller.student
    world, batch_size = dist.world_size(), cfg.DATALOADER.TRAIN_X.BATCH_SIZE  # the global batch
    full_batches = len(dataset) >= batch_size
    steps_per_epoch = len(dataset) // batch_size if full_batches else 1
    for epoch in range(state.epoch, cfg.OPTIM.MAX_EPOCH):
        seed = epoch_seed(cfg.SEED, epoch)
        torch.manual_seed(seed)
        # One permutation per epoch, the same in every process; process r takes items r, r+W, ...: the union
        # of the processes' k-th batches is the single-process k-th batch.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.rank(), shuffle=True, seed=seed,
                                     drop_last=True)
        dataset.aug_seed = seed
        loader = build_loader(dataset, max(batch_size // world, 1), shuffle=False, sampler=sampler,
                              num_workers=cfg.DATALOADER.NUM_WORKERS, drop_last=full_batches)
        state.model.train()
        lr = state.optimizer.param_groups[0]["lr"]
        total, started, step = 0.0, time.time(), -1
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.OPTIM.MAX_EPOCH}", leave=False, disable=None)
        for step, (images, labels, _) in enumerate(bar):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                loss = state.model(images, labels).loss
            global_step = epoch * steps_per_epoch + step + 1
            if dist.any_rank(not bool(torch.isfinite(loss))):
                kept = f"{rundir / LAST_CKPT} (after epoch {epoch})" if epoch > 0 else "none (first epoch)"
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1} (global step "
                    f"{global_step}); stopped. Last good checkpoint: {kept}. Lower OPTIM.LR, set "
                    "OPTIM.GRAD_CLIP, or check DISTILL.* values")
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            if cfg.OPTIM.GRAD_CLIP > 0:
                state.scaler.unscale_(state.optimizer)
                torch.nn.utils.clip_grad_norm_(student.trainable_parameters(), cfg.OPTIM.GRAD_CLIP)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            step_loss = dist.mean(loss.item())  # the global batch's loss
            total += step_loss
            log.metrics("step", epoch=epoch + 1, step=step + 1, global_step=global_step, loss=step_loss, lr=lr)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        state.scheduler.step()
        state.distiller.objective.end_epoch(epoch + 1, student)
        state.epoch = epoch + 1
        epoch_metrics: dict[str, Any] = {"loss": total / max(step + 1, 1)}
        if validate is not None:
            epoch_metrics[select_metric] = accuracy = validate()
            if accuracy > state.best["accuracy"]:
                state.best = {"accuracy": accuracy, "epoch": epoch + 1}
                if dist.is_main():
                    save_checkpoint(rundir / BEST_CKPT, student.trainable_state_dict(), epoch=epoch + 1)
        log.metrics("epoch", epoch=epoch + 1, lr=lr, time=round(time.time() - started, 3), **epoch_metrics)
        log.info(f"epoch [{epoch + 1}/{cfg.OPTIM.MAX_EPOCH}] loss {epoch_metrics['loss']:.4f} lr {lr:.3e}"
                 + (f" {select_metric.replace('_', ' ')} {epoch_metrics[select_metric]:.2f}%"
                    if validate is not None else "")
                 + f" ({time.time() - started:.1f}s)")
        if dist.is_main():
            save_checkpoint(rundir / LAST_CKPT, student.trainable_state_dict(), **state.checkpoint())
        dist.barrier()
