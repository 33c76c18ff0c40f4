"""The training loop, top to bottom: per epoch a seeded order and augmentation, the Distiller's loss, one
optimizer step per batch, the LR schedule, optional val selection, a checkpoint.

Reproducibility: every epoch reseeds torch and the loader from (SEED, epoch), and each image's augmentation
from (SEED, epoch, index), so a run resumed from the checkpoint written at the end of an epoch continues
exactly as the uninterrupted run would (bit-identical on CPU), and torchrun with W processes trains on the
batches one process would. Model selection never looks at the test split.

The same purity makes the teacher's output for a step a function of (teacher, data, seed, epoch, index):
``train_epochs`` takes it once per batch for any number of students (a fused sweep) and can read it from a
teacher cache filled by an earlier run (:mod:`clipkd.engine.teacher_cache`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from yacs.config import CfgNode

from clipkd.data.loaders import ImageListDataset, build_loader
from clipkd.engine import runtime
from clipkd.engine.runtime import autocast_for, epoch_seed
from clipkd.engine.checkpoint import save_checkpoint
from clipkd.methods.distiller import Distiller
from clipkd.rundir import BEST_CKPT, LAST_CKPT, RunDir
from clipkd.engine.runlog import RunLog
from clipkd.engine.teacher_cache import TeacherFeatures
from clipkd.errors import TrainingError


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


@dataclass
class Trainee:
    """One student in training: its state, config, folder and log. :func:`train_epochs` trains a list of them
    on one data stream (a fused sweep: one loader and one teacher forward per batch feed them all); a run
    alone is a list of one."""

    state: TrainState
    cfg: CfgNode
    rundir: RunDir
    log: RunLog
    validate: Callable[[], float] | None = None  # picks the best epoch (TEST.FINAL_MODEL val / best_base_test)
    select_metric: str = "val_accuracy"  # how ``validate()`` is logged
    error: Exception | None = None  # why it stopped early (e.g. a non-finite loss): the others go on


def train_epochs(trainees: Sequence[Trainee], dataset: ImageListDataset, device: torch.device,
                 teacher_features: TeacherFeatures | None = None) -> None:
    """Train each trainee from its ``state.epoch`` to its OPTIM.MAX_EPOCH. Per batch the teacher's image
    features are taken once (``teacher_features``: computed, or read from the teacher cache) and every
    trainee then takes its own step on the same images.

    The stream (SEED, batch size, workers, precision) is the first trainee's config: a fused sweep groups only
    cells that agree on it. A trainee joins at its own epoch (cells resumed from different checkpoints) and
    one whose step fails keeps the error in ``error`` and drops out; the caller raises it."""
    from tqdm import tqdm

    cfg = trainees[0].cfg
    autocast, _ = autocast_for(cfg.OPTIM.PRECISION, device)
    world, batch_size = runtime.world_size(), cfg.DATALOADER.TRAIN_X.BATCH_SIZE  # the global batch
    full_batches = len(dataset) >= batch_size
    steps_per_epoch = len(dataset) // batch_size if full_batches else 1
    for epoch in range(min(t.state.epoch for t in trainees), max(t.cfg.OPTIM.MAX_EPOCH for t in trainees)):
        active = [t for t in trainees if t.error is None and t.state.epoch == epoch < t.cfg.OPTIM.MAX_EPOCH]
        if not active:
            continue
        seed = epoch_seed(cfg.SEED, epoch)
        torch.manual_seed(seed)
        # One permutation per epoch, the same in every process; process r takes items r, r+W, ...: the union
        # of the processes' k-th batches is the single-process k-th batch.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=runtime.rank(), shuffle=True, seed=seed,
                                     drop_last=True)
        dataset.aug_seed = seed
        loader = build_loader(dataset, max(batch_size // world, 1), shuffle=False, sampler=sampler,
                              num_workers=cfg.DATALOADER.NUM_WORKERS, drop_last=full_batches)
        teacher = teacher_features if any(t.state.distiller.objective.needs_teacher for t in active) else None
        if teacher is not None:
            teacher.begin_epoch(epoch)
        for t in active:
            t.state.model.train()
        lrs = [t.state.optimizer.param_groups[0]["lr"] for t in active]
        totals, started, step = [0.0] * len(active), time.time(), -1
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.OPTIM.MAX_EPOCH}", leave=False, disable=None)
        for step, (images, labels, indices) in enumerate(bar):
            if all(t.error is not None for t in active):
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            features = None
            if teacher is not None:
                with autocast():
                    features = teacher(indices, images)  # once per batch, whatever the number of students
            global_step = epoch * steps_per_epoch + step + 1
            for k, t in enumerate(active):
                if t.error is not None:
                    continue
                try:
                    step_loss = _step(t, images, labels, features, autocast, epoch, step, global_step, lrs[k])
                except Exception as exc:  # noqa: BLE001 - this trainee stops; the caller raises it
                    t.error = exc
                    continue
                totals[k] += step_loss
                if len(active) == 1:
                    bar.set_postfix(loss=f"{step_loss:.4f}")
        if teacher is not None:
            teacher.end_epoch()  # stores what this epoch computed in the teacher cache
        for k, t in enumerate(active):
            if t.error is None:
                _end_epoch(t, epoch, lrs[k], totals[k] / max(step + 1, 1), started)
        runtime.barrier()


def _step(t: Trainee, images: torch.Tensor, labels: torch.Tensor, teacher_features: torch.Tensor | None,
          autocast: Callable[[], Any], epoch: int, step: int, global_step: int, lr: float) -> float:
    """One optimizer step of one trainee; returns the global batch's loss."""
    state, cfg = t.state, t.cfg
    with autocast():
        loss = state.model(images, labels, teacher_features=teacher_features).loss
    if runtime.any_rank(not bool(torch.isfinite(loss))):
        kept = f"{t.rundir / LAST_CKPT} (after epoch {epoch})" if epoch > 0 else "none (first epoch)"
        raise TrainingError(
            f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1} (global step "
            f"{global_step}); stopped. Last good checkpoint: {kept}. Lower OPTIM.LR, set "
            "OPTIM.GRAD_CLIP, or check DISTILL.* values")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.OPTIM.GRAD_CLIP > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.distiller.student.trainable_parameters(), cfg.OPTIM.GRAD_CLIP)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    step_loss = runtime.mean(loss.item())  # the global batch's loss
    t.log.metrics("step", epoch=epoch + 1, step=step + 1, global_step=global_step, loss=step_loss, lr=lr)
    return step_loss


def _end_epoch(t: Trainee, epoch: int, lr: float, loss: float, started: float) -> None:
    """The LR schedule, the objective's epoch state, validation, the epoch's log lines and ``last.pt``."""
    state, cfg, student = t.state, t.cfg, t.state.distiller.student
    state.scheduler.step()
    state.distiller.objective.end_epoch(epoch + 1, student)
    state.epoch = epoch + 1
    epoch_metrics: dict[str, Any] = {"loss": loss}
    if t.validate is not None:
        epoch_metrics[t.select_metric] = accuracy = t.validate()
        if accuracy > state.best["accuracy"]:
            state.best = {"accuracy": accuracy, "epoch": epoch + 1}
            if runtime.is_main():
                save_checkpoint(t.rundir / BEST_CKPT, student.trainable_state_dict(), epoch=epoch + 1)
    t.log.metrics("epoch", epoch=epoch + 1, lr=lr, time=round(time.time() - started, 3), **epoch_metrics)
    t.log.info(f"epoch [{epoch + 1}/{cfg.OPTIM.MAX_EPOCH}] loss {epoch_metrics['loss']:.4f} lr {lr:.3e}"
               + (f" {t.select_metric.replace('_', ' ')} {epoch_metrics[t.select_metric]:.2f}%"
                  if t.validate is not None else "")
               + f" ({time.time() - started:.1f}s)")
    if runtime.is_main():
        save_checkpoint(t.rundir / LAST_CKPT, student.trainable_state_dict(), **state.checkpoint())
