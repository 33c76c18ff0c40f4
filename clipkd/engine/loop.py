"""The training loop: per epoch a seeded order and augmentation, the teacher's features once per batch, and
each trainer's step on it (:class:`clipkd.engine.trainer.Trainer`: the Distiller's loss, one optimizer step per
batch, then at the epoch's end the LR schedule, optional val selection, a checkpoint).

Reproducibility: every epoch reseeds torch and the loader from (SEED, epoch), and each image's augmentation
from (SEED, epoch, index), so a run resumed from the checkpoint written at the end of an epoch continues
exactly as the uninterrupted run would (bit-identical on CPU), and torchrun with W processes trains on the
batches one process would. Model selection never looks at the test split.

The same purity makes the teacher's output for a step a function of (teacher, data, seed, epoch, index):
``train_epochs`` takes it once per batch for any number of students (a fused sweep) and can read it from a
teacher cache filled by an earlier run (:mod:`clipkd.engine.teacher_features`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from clipkd.data.loaders import ImageListDataset, build_loader
from clipkd.engine import runtime
from clipkd.engine.runtime import autocast_for, epoch_seed
from clipkd.engine.teacher_features import TeacherFeatures
from clipkd.engine.trainer import Trainer


def train_epochs(trainers: Sequence[Trainer], dataset: ImageListDataset, device: torch.device,
                 teacher_features: TeacherFeatures | None = None) -> None:
    """Train each trainer from its ``epoch`` to its OPTIM.MAX_EPOCH. Per batch the teacher's image
    features are taken once (``teacher_features``: computed, or read from the teacher cache) and every
    trainer then takes its own step on the same images.

    The stream (SEED, batch size, workers, precision) is the first trainer's config: a fused sweep groups only
    cells that agree on it. A trainer joins at its own epoch (cells resumed from different checkpoints) and
    one whose step fails keeps the error in ``error`` and drops out; the caller raises it."""
    cfg = trainers[0].cfg
    autocast, _ = autocast_for(cfg.OPTIM.PRECISION, device)
    world, batch_size = runtime.world_size(), cfg.DATALOADER.TRAIN_X.BATCH_SIZE  # the global batch
    n_images = len(dataset)
    full_batches = n_images >= batch_size
    steps_per_epoch = n_images // batch_size if full_batches else 1
    for epoch in range(min(t.epoch for t in trainers), max(t.cfg.OPTIM.MAX_EPOCH for t in trainers)):
        active = [t for t in trainers if t.error is None and t.epoch == epoch < t.cfg.OPTIM.MAX_EPOCH]
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
        teacher = teacher_features if any(t.distiller.objective.needs_teacher for t in active) else None
        if teacher is not None:
            teacher.begin_epoch(epoch)
        for t in active:
            t.model.train()
        lrs = [t.optimizer.param_groups[0]["lr"] for t in active]
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
                    step_loss = t.step(images, labels, features, autocast, epoch, step, global_step, lrs[k])
                except Exception as exc:  # noqa: BLE001 - this trainer stops; the caller raises it
                    t.error = exc
                    continue
                totals[k] += step_loss
                if len(active) == 1:
                    bar.set_postfix(loss=f"{step_loss:.4f}")
        if teacher is not None:
            teacher.end_epoch()  # stores what this epoch computed in the teacher cache
        for k, t in enumerate(active):
            if t.error is None:
                t.end_epoch(epoch, lrs[k], totals[k] / max(step + 1, 1), started)
        runtime.barrier()
