"""One distillation run, top to bottom: data -> teacher and student -> epochs -> final model -> Base/New/HM.

Reproducibility: every epoch reseeds torch and the loader from (SEED, epoch), so a run resumed from the
checkpoint written at the end of an epoch continues exactly as the uninterrupted run would (bit-identical
on CPU). Model selection never looks at the test split: ``TEST.FINAL_MODEL val`` picks the epoch with the
best accuracy on the few-shot val split of the base classes.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from yacs.config import CfgNode

from clipkd.config import build_config
from clipkd.data.loaders import ImageListDataset, build_loader
from clipkd.data.specs import DatasetSpec, get_spec
from clipkd.data.splits import ResolvedSplit, resolve_split
from clipkd.data.transforms import build_transform
from clipkd.engine import distributed as dist
from clipkd.engine.checkpoint import load_checkpoint, save_checkpoint
from clipkd.engine.evaluate import classification_metrics, format_dassl_lines, predict, results_payload
from clipkd.engine.optim import build_optimizer, build_scheduler
from clipkd.engine.runlog import RunLog
from clipkd.errors import ConfigError, TrainingError

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"
LAST_CKPT = "checkpoints/last.pt"
BEST_CKPT = "checkpoints/best-val.pt"


# ------------------------------------------------------------------------------------------------ set-up
def pick_device() -> torch.device:
    """CUDA when present (this process's GPU under torchrun), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def autocast_for(cfg: CfgNode, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """The autocast context for OPTIM.PRECISION, and whether fp16 loss scaling is needed."""
    precision = cfg.OPTIM.PRECISION
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("OPTIM.PRECISION fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype == torch.float16


@dataclass
class RunData:
    """The lists one run trains and evaluates on."""

    spec: DatasetSpec
    train: ResolvedSplit  # what the student learns from
    halves: dict[str, ResolvedSplit]  # evaluated halves: base + new (base-to-new) or all (few-shot setting)

    @property
    def select(self) -> ResolvedSplit:
        """Whose few-shot val split picks the epoch for TEST.FINAL_MODEL val (never a test split)."""
        return self.halves.get("base") or self.halves["all"]

    @property
    def base(self) -> ResolvedSplit:
        return self.halves["base"]


def prepare_data(cfg: CfgNode) -> RunData:
    """DATASET.SUBSAMPLE_CLASSES base = the base-to-new setting (train on base, evaluate base and new);
    all = the few-shot setting (train and evaluate on all classes)."""
    if not cfg.DATASET.ROOT:
        raise ConfigError("DATASET.ROOT is empty; pass --root DATA")
    spec = get_spec(cfg.DATASET.NAME)
    shots, seed, sub = cfg.DATASET.NUM_SHOTS, cfg.SEED, cfg.DATASET.SUBSAMPLE_CLASSES
    if sub == "new":
        raise ConfigError("DATASET.SUBSAMPLE_CLASSES new: runs train on base (then evaluate base and new) or "
                          "on all classes; use base or all")
    if sub == "base":
        halves = {h: resolve_split(cfg.DATASET.ROOT, spec, shots, seed, h) for h in ("base", "new")}
    else:
        halves = {"all": resolve_split(cfg.DATASET.ROOT, spec, shots, seed, "all")}
    if cfg.DISTILL.PROTOCOL == "inductive":
        train = halves.get("base") or halves["all"]
    else:  # transductive (PromptKD): train images of all classes, labels unused, logits over all classes
        train = halves.get("all") or resolve_split(cfg.DATASET.ROOT, spec, shots, seed, "all")
    return RunData(spec, train, halves)


def needs_teacher(cfg: CfgNode) -> bool:
    return cfg.MODEL.STUDENT.TYPE == "promptkd" or cfg.DISTILL.WEIGHT > 0


def build_models(cfg: CfgNode, spec: DatasetSpec, device: torch.device) -> tuple[Any, Any]:
    from clipkd.models.student import build_student, build_teacher

    teacher = build_teacher(cfg, spec.template, device=device) if needs_teacher(cfg) else None
    student = build_student(cfg, teacher, device=device)
    return teacher, student


# ------------------------------------------------------------------------------------------------ the loss
def student_logits(student: Any, images: torch.Tensor, classnames: list[str]) -> torch.Tensor:
    return student.logit_scale * student.image_features(images) @ student.text_features(classnames).t()


class _LogitsModule(torch.nn.Module):
    """The student as a module whose forward gives logits, so DistributedDataParallel can wrap it."""

    def __init__(self, student: Any, classnames: list[str]):
        super().__init__()
        self.student = student
        self.classnames = classnames

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return student_logits(self.student, images, self.classnames)


def distill_loss(
    student: Any,
    teacher: Any,
    teacher_text: torch.Tensor | None,
    classnames: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    kd_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    kd_weight: float,
    ce_weight: float,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One batch's loss: KD_WEIGHT * D(teacher || student) + CE_WEIGHT * CE(student, labels).

    ``teacher_text`` is the teacher's class embeddings, computed once per run by the caller: the reference
    code recomputed them for every batch.
    """
    if logits_fn is not None:  # e.g. the DistributedDataParallel wrapper, whose forward syncs gradients
        logits = logits_fn(images)
    else:
        logits = student_logits(student, images, classnames)
    loss = torch.zeros((), device=images.device)
    if kd_loss is not None:
        with torch.no_grad():
            t_logits = teacher.logit_scale * teacher.image_features(images) @ teacher_text.t()
        loss = loss + kd_weight * kd_loss(logits.float(), t_logits.float())
    if ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(logits.float(), labels)
    return loss


# ------------------------------------------------------------------------------------------------ evaluation
def predict_half(
    model: Any, split: ResolvedSplit, cfg: CfgNode, device: torch.device, autocast: Callable[[], Any],
    items: str = "test",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of ``model`` on one half's ``items`` list, among that half's classes only."""
    model.eval()
    with torch.no_grad(), autocast():
        class_features = model.text_features(split.classnames).float()
    dataset = ImageListDataset(getattr(split, items), split.dataset_dir, build_transform(cfg, is_train=False))
    sampler = None
    if dist.is_initialized():  # each rank predicts a share; rank 0 puts them back in order
        sampler = DistributedSampler(dataset, shuffle=False)
    loader = build_loader(dataset, cfg.DATALOADER.TEST.BATCH_SIZE, shuffle=False,
                          num_workers=cfg.DATALOADER.NUM_WORKERS, sampler=sampler)
    pred, true = predict(model.image_features, class_features, loader, device, autocast)
    if sampler is not None:
        order = list(sampler)
        shares = dist.gather_objects((order, pred.tolist(), true.tolist()))
        merged = {}
        for idx, p, t in shares:
            merged.update({i: (a, b) for i, a, b in zip(idx, p, t)})  # padding repeats are dropped here
        pred = torch.tensor([merged[i][0] for i in range(len(dataset))], dtype=torch.long)
        true = torch.tensor([merged[i][1] for i in range(len(dataset))], dtype=torch.long)
    return pred, true


def evaluate_half(
    model: Any, split: ResolvedSplit, cfg: CfgNode, device: torch.device, autocast: Callable[[], Any],
    items: str = "test",
) -> dict:
    """Accuracy / macro-F1 of ``model`` on one half, among that half's classes only."""
    pred, true = predict_half(model, split, cfg, device, autocast, items)
    return classification_metrics(pred, true, len(split.classnames))


def evaluate_run(
    model: Any, data: RunData, cfg: CfgNode, device: torch.device, halves: tuple[str, ...] | None = None,
    log: RunLog | None = None,
) -> dict:
    autocast, _ = autocast_for(cfg, device)
    metrics = {}
    for half in halves or tuple(data.halves):
        if half not in data.halves:
            raise ConfigError(f"this run evaluates {', '.join(data.halves)}, not {half} "
                              "(DATASET.SUBSAMPLE_CLASSES base gives base and new, all gives all)")
        metrics[half] = evaluate_half(model, data.halves[half], cfg, device, autocast)
        if log is not None:
            for line in format_dassl_lines(half, metrics[half]):
                log.info(line)
    results = results_payload(metrics)
    if log is not None and "hm" in results:
        log.info(f"* base: {metrics['base']['accuracy']:.2f}%  new: {metrics['new']['accuracy']:.2f}%  "
                 f"HM: {results['hm']:.2f}%")
    return results


# ------------------------------------------------------------------------------------------------ run folder
def _flat(cfg: CfgNode, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def check_output_dir(out: Path, cfg: CfgNode, resume: bool) -> bool:
    """Refuse a non-empty folder unless resuming the same config; True when there is a checkpoint to resume.

    Writes nothing, so a run that fails while setting up leaves the folder as it was.
    """
    if resume:
        saved = out / CONFIG_FILE
        if not saved.is_file():
            raise TrainingError(f"--resume: {saved} not found; is {out} a clipkd run folder?")
        before, now = _flat(build_config([saved], freeze=False)), _flat(cfg)
        changed = [k for k in now if k != "OUTPUT_DIR" and before.get(k) != now[k]]
        if changed:
            raise TrainingError(
                f"--resume: the config differs from {saved} at {', '.join(changed[:5])}; resume with the same "
                "arguments, or train into a new --output-dir"
            )
        return (out / LAST_CKPT).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainingError(f"output dir {out} is not empty; pick a new --output-dir or pass --resume")
    return False


# ------------------------------------------------------------------------------------------------ training
class _SilentLog:
    """What ranks other than 0 log to: nothing (only rank 0 writes)."""

    def info(self, message: str) -> None:
        pass

    def metrics(self, kind: str, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: CfgNode, output_dir: str | Path, resume: bool = False, echo: bool = True) -> dict:
    """Train the student, write ``model.pt`` and ``results.json`` into ``output_dir``; returns the results."""
    from tqdm import tqdm

    from clipkd.losses import build_distill_loss_from_cfg

    out = Path(output_dir)
    device = pick_device()
    distributed = dist.init(device)
    has_checkpoint = check_output_dir(out, cfg, resume)
    dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    seed_everything(cfg.SEED)
    data = prepare_data(cfg)
    kd_loss = build_distill_loss_from_cfg(cfg) if cfg.DISTILL.WEIGHT > 0 else None
    ce_weight = cfg.DISTILL.CE_WEIGHT
    if ce_weight > 0 and cfg.DISTILL.PROTOCOL != "inductive":
        raise ConfigError("DISTILL.CE_WEIGHT needs labels, which the transductive protocol does not use; "
                          "set it to 0 or use DISTILL.PROTOCOL inductive")
    if kd_loss is None and ce_weight == 0:
        raise ConfigError("nothing to learn from: DISTILL.WEIGHT and DISTILL.CE_WEIGHT are both 0")
    if cfg.TEST.FINAL_MODEL == "val" and not data.select.val:
        raise ConfigError(f"{data.spec.name} has no held-out val split (its val would be the test set); "
                          "use TEST.FINAL_MODEL last")
    teacher, student = build_models(cfg, data.spec, device)
    optimizer = build_optimizer(student.trainable_parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    autocast, use_scaler = autocast_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    classnames = data.train.classnames

    world = dist.world_size()
    batch_size = cfg.DATALOADER.TRAIN_X.BATCH_SIZE  # the global batch, split across processes
    if batch_size % world:
        raise ConfigError(f"DATALOADER.TRAIN_X.BATCH_SIZE {batch_size} must divide among {world} processes")
    logits_fn = None
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        logits_fn = DistributedDataParallel(_LogitsModule(student, data.train.classnames),
                                            device_ids=[device.index] if device.type == "cuda" else None)
    main_rank = dist.is_main()
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / CONFIG_FILE).write_text(cfg.dump())
    log = RunLog(out, echo=echo) if main_rank else _SilentLog()
    try:
        start_epoch, best = 0, {"accuracy": -1.0, "epoch": -1}
        if has_checkpoint:
            ckpt = load_checkpoint(out / LAST_CKPT)
            student.load_trainable_state_dict(ckpt["state_dict"], source=str(out / LAST_CKPT))
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, best = ckpt["epoch"], ckpt["best"]
            log.info(f"resumed from {out / LAST_CKPT} after epoch {start_epoch}")
        else:
            n_train = sum(p.numel() for p in student.trainable_parameters())
            log.info(f"clipkd run: {data.spec.name}, {cfg.DISTILL.PROTOCOL} protocol, "
                     f"{len(data.train.train)} train images over {len(classnames)} classes, "
                     f"student {cfg.MODEL.STUDENT.TYPE} ({n_train:,} trainable parameters), "
                     f"loss {cfg.DISTILL.LOSS} x {cfg.DISTILL.WEIGHT}, device {device}")

        dataset = ImageListDataset(data.train.train, data.train.dataset_dir, build_transform(cfg, is_train=True))
        steps_per_epoch = len(dataset) // batch_size if len(dataset) >= batch_size else 1
        teacher_text = teacher.text_features(classnames) if kd_loss is not None else None  # once per run

        for epoch in range(start_epoch, cfg.OPTIM.MAX_EPOCH):
            torch.manual_seed(epoch_seed(cfg.SEED, epoch))
            # One permutation per epoch, the same in every process; process r takes items r, r+W, ...: the
            # union of the processes' k-th batches is the single-process k-th batch.
            sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.rank(), shuffle=True,
                                         seed=epoch_seed(cfg.SEED, epoch), drop_last=True)
            dataset.aug_seed = epoch_seed(cfg.SEED, epoch)
            loader = build_loader(dataset, max(batch_size // world, 1), shuffle=False, sampler=sampler,
                                  num_workers=cfg.DATALOADER.NUM_WORKERS,
                                  drop_last=len(dataset) >= batch_size)
            student.train()
            lr = optimizer.param_groups[0]["lr"]
            total, started, step = 0.0, time.time(), -1
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.OPTIM.MAX_EPOCH}", leave=False, disable=None)
            for step, (images, labels, _) in enumerate(bar):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast():
                    loss = distill_loss(student, teacher, teacher_text, classnames, images, labels, kd_loss,
                                        cfg.DISTILL.WEIGHT, ce_weight, logits_fn=logits_fn)
                global_step = epoch * steps_per_epoch + step
                if dist.any_rank(not bool(torch.isfinite(loss))):
                    kept = f"{out / LAST_CKPT} (after epoch {epoch})" if epoch > 0 else "none (first epoch)"
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1} (global step "
                        f"{global_step + 1}); stopped. Last good checkpoint: {kept}. Lower OPTIM.LR, set "
                        "OPTIM.GRAD_CLIP, or check DISTILL.* values"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.OPTIM.GRAD_CLIP > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(student.trainable_parameters(), cfg.OPTIM.GRAD_CLIP)
                scaler.step(optimizer)
                scaler.update()
                step_loss = dist.mean(loss.item())  # the global batch's loss
                total += step_loss
                log.metrics("step", epoch=epoch + 1, step=step + 1, global_step=global_step + 1,
                            loss=step_loss, lr=lr)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            scheduler.step()
            n_steps = max(step + 1, 1)
            epoch_metrics: dict[str, Any] = {"loss": total / n_steps}
            if cfg.TEST.FINAL_MODEL == "val":
                val = evaluate_half(student, data.select, cfg, device, autocast, items="val")
                epoch_metrics["val_accuracy"] = val["accuracy"]
                if val["accuracy"] > best["accuracy"]:
                    best = {"accuracy": val["accuracy"], "epoch": epoch + 1}
                    if main_rank:
                        save_checkpoint(out / BEST_CKPT, student.trainable_state_dict(), epoch=epoch + 1)
            log.metrics("epoch", epoch=epoch + 1, lr=lr, time=round(time.time() - started, 3), **epoch_metrics)
            log.info(f"epoch [{epoch + 1}/{cfg.OPTIM.MAX_EPOCH}] loss {epoch_metrics['loss']:.4f} lr {lr:.3e}"
                     + (f" val acc {epoch_metrics['val_accuracy']:.2f}%" if "val_accuracy" in epoch_metrics else "")
                     + f" ({time.time() - started:.1f}s)")
            if main_rank:
                save_checkpoint(out / LAST_CKPT, student.trainable_state_dict(), epoch=epoch + 1,
                                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                scaler=scaler.state_dict(), best=best)
            dist.barrier()

        final_epoch = cfg.OPTIM.MAX_EPOCH
        if cfg.TEST.FINAL_MODEL == "val" and best["epoch"] > 0:
            student.load_trainable_state_dict(load_checkpoint(out / BEST_CKPT)["state_dict"])
            final_epoch = best["epoch"]
            log.info(f"final model: epoch {final_epoch} (best few-shot val accuracy {best['accuracy']:.2f}%)")
        if main_rank:
            save_checkpoint(out / MODEL_FILE, student.trainable_state_dict(), epoch=final_epoch,
                            student_type=cfg.MODEL.STUDENT.TYPE)
        results = evaluate_run(student, data, cfg, device, log=log)
        results["epoch"] = final_epoch
        if main_rank:
            (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        log.metrics("results", **results)
        dist.barrier()
        return results
    finally:
        log.close()

