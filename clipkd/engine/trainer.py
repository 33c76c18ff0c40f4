"""One student in training: its optimizer, LR schedule, loss scaler, epoch and best-so-far, folder, log and the
checkpoints it writes. :func:`clipkd.engine.loop.train_epochs` drives a list of them over one data stream (a run
alone is a list of one; a fused sweep trains K).

Between :meth:`Trainer.open` and :meth:`Trainer.close` the trainer holds its folder's lock. ``checkpoints/last.pt``
(every epoch) holds :meth:`Trainer.checkpoint`, so a run resumed from it continues as the uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from clipkd.engine import runtime
from clipkd.engine.checkpoint import load_checkpoint, save_checkpoint
from clipkd.engine.evaluate import dassl_log_lines, write_predictions
from clipkd.engine.optim import build_optimizer, build_scheduler
from clipkd.engine.runlog import RunLog
from clipkd.errors import TrainingError
from clipkd.fileio import atomic_write_text
from clipkd.methods.distiller import Distiller
from clipkd.rundir import (BEST_CKPT, CONFIG_FILE, INPUTS_FILE, LAST_CKPT, MODEL_FILE, PREDICTIONS_FILE, RESULTS_FILE,
                           RunDir)

# results.json "selected_on": how the final epoch was chosen (reports never average "base_test" with the rest)
SELECTED_ON = {"last": "last", "val": "val", "best_base_test": "base_test"}


class Trainer:
    """One student's training state and outputs. ``model`` is the Distiller, or DistributedDataParallel around it."""

    def __init__(self, distiller: Distiller, model: nn.Module, cfg: CfgNode, rundir: RunDir, device: torch.device,
                 validate: Callable[[], float] | None = None) -> None:
        self.distiller, self.model, self.cfg, self.rundir = distiller, model, cfg, rundir
        self.main = runtime.is_main()  # this process writes the run's files (rank 0; fixed once it has a rank)
        self.optimizer = build_optimizer(distiller.student.trainable_parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        _, use_scaler = runtime.autocast_for(cfg.OPTIM.PRECISION, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.validate = validate  # picks the best epoch (TEST.FINAL_MODEL val / best_base_test)
        self.select_metric = "val_accuracy" if cfg.TEST.FINAL_MODEL == "val" else "base_test_accuracy"
        self.epoch = 0  # epochs finished
        self.best: dict = {"accuracy": -1.0, "epoch": -1}
        self.error: Exception | None = None  # why it stopped early (e.g. a non-finite loss): the others go on
        self.log: Any = None  # the RunLog, from open()
        self.teacher_features: Any = None  # where the teacher's features came from (for the log lines)
        self.final_epoch: int | None = None  # the epoch of the final model (finish_model)

    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    # ------------------------------------------------------------------------------------ state
    def checkpoint(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "best": self.best,
                "objective": self.distiller.objective.state_dict()}

    def restore(self, ckpt: dict, source: str) -> None:
        self.student.load_trainable_state_dict(ckpt["state_dict"], source=source)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.distiller.objective.load_state_dict(ckpt.get("objective", {}))
        self.epoch, self.best = ckpt["epoch"], ckpt["best"]

    # ------------------------------------------------------------------------------------ folder and log
    def open(self, resume: bool, inputs: dict | None, echo: bool, tensorboard: bool, intro: str) -> None:
        """Take the folder (locked: rank 0 re-checks it under the lock, every rank learns the outcome), restore
        ``last.pt`` when resuming, write ``config.yaml`` / ``inputs.json`` and open the log."""
        out, main = self.rundir, self.main
        error = None
        if main:
            try:
                out.acquire()
                check_folder(out, self.cfg, resume)  # again: another process may have written meanwhile
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                out.release()
                error = exc
        error = runtime.broadcast_object(error)
        if error is not None:
            raise error
        try:
            if resume and (out / LAST_CKPT).is_file():
                self.restore(load_checkpoint(out / LAST_CKPT), source=str(out / LAST_CKPT))
            if main and resume:
                out.clean_for_resume(self.epoch)
            elif main:
                atomic_write_text(out / CONFIG_FILE, self.cfg.dump())
            if inputs is not None:
                atomic_write_text(out / INPUTS_FILE, json.dumps(inputs, indent=1) + "\n")
            self.log = RunLog(out.path if main else None, echo=echo, tensorboard=tensorboard)
            if self.epoch:
                self.log.info(f"resumed from {out / LAST_CKPT} after epoch {self.epoch}")
            else:
                for line in intro.splitlines():
                    self.log.info(line)
            entry = getattr(self.teacher_features, "entry", None)
            if entry is not None:
                self.log.info(f"teacher cache {entry.describe()} before this run (delete the folder to free it)")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the log and unlock the folder (whatever happened in between)."""
        if self.log is not None:
            self.log.close()
        if self.main:
            self.rundir.release()

    # ------------------------------------------------------------------------------------ training
    def step(self, images: torch.Tensor, labels: torch.Tensor, teacher_features: torch.Tensor | None,
             autocast: Callable[[], Any], epoch: int, step: int, global_step: int, lr: float) -> float:
        """One optimizer step; returns the global batch's loss."""
        with autocast():
            loss = self.model(images, labels, teacher_features=teacher_features).loss
        if runtime.any_rank(not bool(torch.isfinite(loss))):
            kept = f"{self.rundir / LAST_CKPT} (after epoch {epoch})" if epoch > 0 else "none (first epoch)"
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1} (global step "
                f"{global_step}); stopped. Last good checkpoint: {kept}. Lower OPTIM.LR, set "
                "OPTIM.GRAD_CLIP, or check DISTILL.* values")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.OPTIM.GRAD_CLIP > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.trainable_parameters(), self.cfg.OPTIM.GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        step_loss = runtime.mean(loss.item())  # the global batch's loss
        self.log.metrics("step", epoch=epoch + 1, step=step + 1, global_step=global_step, loss=step_loss, lr=lr)
        return step_loss

    def end_epoch(self, epoch: int, lr: float, loss: float, started: float) -> None:
        """The LR schedule, the objective's epoch state, validation, the epoch's log lines and ``last.pt``."""
        student = self.student
        self.scheduler.step()
        self.distiller.objective.end_epoch(epoch + 1, student)
        self.epoch = epoch + 1
        epoch_metrics: dict[str, Any] = {"loss": loss}
        if self.validate is not None:
            epoch_metrics[self.select_metric] = accuracy = self.validate()
            if accuracy > self.best["accuracy"]:
                self.best = {"accuracy": accuracy, "epoch": epoch + 1}
                if self.main:
                    save_checkpoint(self.rundir / BEST_CKPT, student.trainable_state_dict(), epoch=epoch + 1)
        self.log.metrics("epoch", epoch=epoch + 1, lr=lr, time=round(time.time() - started, 3), **epoch_metrics)
        self.log.info(f"epoch [{epoch + 1}/{self.cfg.OPTIM.MAX_EPOCH}] loss {epoch_metrics['loss']:.4f} lr {lr:.3e}"
                      + (f" {self.select_metric.replace('_', ' ')} {epoch_metrics[self.select_metric]:.2f}%"
                         if self.validate is not None else "")
                      + f" ({time.time() - started:.1f}s)")
        if self.main:
            save_checkpoint(self.rundir / LAST_CKPT, student.trainable_state_dict(), **self.checkpoint())

    # ------------------------------------------------------------------------------------ outputs
    def finish_model(self) -> None:
        """The final model (the objective's, the best epoch's or the last) into the student, and ``model.pt``."""
        cfg, out, student = self.cfg, self.rundir, self.student
        final_epoch = cfg.OPTIM.MAX_EPOCH
        final = self.distiller.objective.final_state()
        if final is not None:  # e.g. PromptSRC's Gaussian-weighted prompts
            student.load_trainable_state_dict(final, source="the objective's final state")
        elif self.validate is not None and self.best["epoch"] > 0:
            student.load_trainable_state_dict(load_checkpoint(out / BEST_CKPT)["state_dict"])
            final_epoch = self.best["epoch"]
            on = "few-shot val" if cfg.TEST.FINAL_MODEL == "val" else "base TEST (the reference code's choice)"
            self.log.info(f"final model: epoch {final_epoch} (best {on} accuracy {self.best['accuracy']:.2f}%)")
        if self.main:
            save_checkpoint(out / MODEL_FILE, student.trainable_state_dict(), epoch=final_epoch,
                            student_type=cfg.MODEL.STUDENT.TYPE)
        features = self.teacher_features
        if features is not None and features.entry is not None:
            self.log.info(f"teacher cache {features.entry.describe()} after this run ({features.read} batches "
                          f"read, {features.computed} computed; delete the folder to free it)")
        self.final_epoch = final_epoch

    def write_results(self, results: dict, per_image: dict[str, dict[str, Any]], teacher: str) -> dict:
        """The evaluation's Dassl lines, ``predictions.npz`` (``per_image``: :func:`write_predictions`), then
        ``results.json`` and its metrics line; returns the results."""
        self.log.info(*dassl_log_lines(results))  # what Dassl's tools/parse_test_res.py reads
        results.update(epoch=self.final_epoch, selected_on=SELECTED_ON[self.cfg.TEST.FINAL_MODEL], teacher=teacher)
        if self.main:
            write_predictions(self.rundir / PREDICTIONS_FILE, per_image)
            atomic_write_text(self.rundir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        self.log.metrics("results", **results)
        runtime.barrier()
        return results


def check_folder(rundir: RunDir, cfg: CfgNode, resume: bool) -> None:
    """A new run needs an empty folder; a resumed one a folder started with this config."""
    if not resume:
        rundir.check_new()
        return
    rundir.check_resumable()
    rundir.check_config(cfg)
