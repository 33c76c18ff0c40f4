"""A run is one object: a config, an output folder, and what is built from them (data, teacher, student).

``Run(cfg, dir).fit(resume=...)`` trains and evaluates; ``Run.load(dir)`` reopens a finished or interrupted
run; ``run.evaluate(halves, which=...)`` scores the trained student, the teacher or the zero-shot student.
``clipkd train``, ``clipkd eval``, ``clipkd sweep``, the demo and the benchmarks all go through here, so they
assemble the same models the same way.

Set-up order matters and is fixed: every check that can fail (config, data, model sizes, the folder) runs
before anything is written, and the RNG is seeded before the models are built, so a run is reproducible
from its config alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from yacs.config import CfgNode

from clipkd.config import build_config, check_config
from clipkd.data.loaders import ImageListDataset, build_transform
from clipkd.data.rundata import RunData, prepare_data
from clipkd.data.specs import get_spec
from clipkd.engine import runtime
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.engine.evaluate import Predictions, epoch_selection, evaluate_per_image, predict_half
from clipkd.engine.loop import train_epochs
from clipkd.engine.runlog import RunLog, require_tensorboard
from clipkd.engine.runtime import autocast_for, seed_everything
from clipkd.engine.teacher_features import EvalFeatureCache, TeacherFeatures, eval_entry, train_entry
from clipkd.engine.trainer import Trainer, check_folder
from clipkd.errors import ConfigError, TrainingError
from clipkd.methods.distiller import build_distiller
from clipkd.models.state import read_state_dict, resolve_checkpoint_file
from clipkd.models.student import build_student
from clipkd.models.teacher import build_teacher, teacher_description
from clipkd.models.zeroshot import build_zero_shot
from clipkd.rundir import CONFIG_FILE, INPUTS_FILE, MODEL_FILE, RunDir
from clipkd.runs.checks import check_setup, check_teacher, check_trainable, needs_teacher, records_teacher
from clipkd.runs.inputs import check_inputs, read_record, record_inputs

WHICH = ("final", "teacher", "student")  # trained student, configured teacher, zero-shot student CLIP


class Run:
    """One run: ``cfg`` plus an output folder (None for an evaluation that writes nothing)."""

    def __init__(self, cfg: CfgNode, output_dir: str | Path | None = None, *, echo: bool = True,
                 tensorboard: bool = False) -> None:
        self.cfg = cfg
        self.dir = RunDir(output_dir) if output_dir is not None else None
        self.echo = echo
        self.tensorboard = tensorboard
        self.device = runtime.pick_device()
        self._data: RunData | None = None
        self.teacher: Any = None
        self.student: Any = None
        self._zero_shot_student: Any = None
        self._eval_cache: Any = None

    @classmethod
    def load(cls, folder: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> Run:
        """Reopen a run folder (finished or not) with its saved config; ``overrides`` such as
        ``DATASET.ROOT`` adapt it to this machine."""
        rundir = RunDir(folder)
        rundir.check_resumable(what="a run folder")
        return cls(build_config([rundir / CONFIG_FILE], list(overrides)), folder, **kwargs)

    def check_inputs(self, dataset: bool = True) -> None:
        """The dataset and weight files this run's config names still hold what the run recorded when it started
        (``inputs.json``; :mod:`clipkd.runs.inputs`). ``dataset`` False checks the weight files only."""
        assert self.dir is not None
        saved = read_record(self.dir / INPUTS_FILE)
        if saved is not None:
            check_inputs(saved, self.cfg, (lambda: self.data) if dataset else None, needs_teacher(self.cfg),
                         str(self.dir.path))

    # ------------------------------------------------------------------------------------ parts
    @property
    def data(self) -> RunData:
        if self._data is None:
            self._data = prepare_data(self.cfg)
        return self._data

    @data.setter
    def data(self, data: RunData) -> None:
        """Lists another run prepared from the same DATASET.*, SEED and DISTILL.PROTOCOL (a fused group's)."""
        self._data = data

    @property
    def has_data(self) -> bool:
        return self._data is not None

    def build(self) -> None:
        """Seed, then build teacher and student (in that order: both consume the RNG)."""
        check_teacher(self.cfg)
        seed_everything(self.cfg.SEED)
        template = get_spec(self.cfg.DATASET.NAME).template  # no data needed (benchmarks build without any)
        self.teacher = build_teacher(self.cfg, template, device=self.device) if needs_teacher(self.cfg) else None
        self.student = build_student(self.cfg, self.teacher, device=self.device)

    def model(self, which: str = "final") -> Any:
        """``final``: the trained student (from ``model.pt`` unless this object just trained it);
        ``teacher``: the configured teacher; ``student``: the student's CLIP zero-shot, with its own text
        tower and the teacher's templates."""
        if which not in WHICH:
            raise ConfigError(f"which model: one of {', '.join(WHICH)}, not {which!r}")
        # Seeded like a training run's build, so a random-init CLIP (tests, tiny models) is the same one.
        if which == "student":
            if self._zero_shot_student is None:
                seed_everything(self.cfg.SEED)
                self._zero_shot_student = build_zero_shot(self.cfg, "student", self.data.spec.template,
                                                          device=self.device)
            return self._zero_shot_student
        if which == "teacher":
            if self.teacher is None:
                seed_everything(self.cfg.SEED)
                self.teacher = build_zero_shot(self.cfg, "teacher", self.data.spec.template, device=self.device)
            return self.teacher
        if self.student is None:
            if self.dir is None:
                raise TrainingError("this run has no folder to load a trained model from")
            path = self.dir / MODEL_FILE
            ckpt = load_checkpoint(path)
            self.build()
            self.student.load_trainable_state_dict(ckpt["state_dict"], source=str(path))
        return self.student

    def load_student_file(self, path: str | Path) -> Any:
        """Build the configured teacher and student as training does and load a student checkpoint into the
        student, which ``model("final")`` / ``evaluate()`` then use: clipkd's ``model.pt`` (or a run folder)
        or a PromptKD student file (Dassl ``model-best.pth.tar``: prompts + ``VPT_image_trans.*``). Read
        without running code from the file; its frozen CLIP weights and class buffers are ignored (they come
        from MODEL.STUDENT.PRETRAINED), every prompt / projector tensor must be there with the model's shape."""
        file = resolve_checkpoint_file(path, key="--checkpoint", per_dataset=False)
        state = read_state_dict(file, what="student checkpoint")
        self.build()
        self.student.load_trainable_state_dict(state, source=str(file), ignore_frozen_clip_weights=True)
        return self.student

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, halves: Sequence[str] | None = None, which: str = "final", log: RunLog | None = None,
                 predictions: dict[str, Predictions] | None = None) -> dict:
        return self.evaluate_per_image(halves, which, log, predictions)[0]  # the results alone

    def evaluate_per_image(self, halves: Sequence[str] | None = None, which: str = "final", log: RunLog | None = None,
                           predictions: dict[str, Predictions] | None = None) -> tuple[dict, dict[str, dict]]:
        """Base/New/HM (or all) of ``which`` model, and each half's ``predictions.npz`` arrays; ``predictions``:
        each half's by that model, already made (a fused group predicts in one pass: :mod:`clipkd.runs.fused`)."""
        data = self.data
        names = tuple(halves or data.halves)
        if missing := [h for h in names if h not in data.halves]:
            raise ConfigError(f"this run evaluates {', '.join(data.halves)}, not {missing[0]} "
                              "(DATASET.SUBSAMPLE_CLASSES base gives base and new, all gives all)")
        autocast, model = autocast_for(self.cfg.OPTIM.PRECISION, self.device)[0], self.model(which)
        teacher = self.teacher if which == "final" and records_teacher(self.cfg) else None  # built with the student
        return evaluate_per_image(model, {h: data.halves[h] for h in names}, self.cfg, self.device, autocast,
                                  log.info if log is not None else None, self.teacher_eval_cache(which), predictions,
                                  teacher, self.teacher_eval_cache("teacher") if teacher is not None else None)

    def predict(self, half: str, which: str = "final") -> torch.Tensor:
        """Predicted labels on one half's test images (e.g. for teacher-student agreement)."""
        autocast, _ = autocast_for(self.cfg.OPTIM.PRECISION, self.device)
        return predict_half(self.model(which), self.data.halves[half], self.cfg, self.device, autocast,
                            feature_cache=self.teacher_eval_cache(which))[0]

    def teacher_eval_cache(self, which: str) -> Any:
        """With DISTILL.TEACHER_CACHE, where the teacher's test-set features are kept (``which`` teacher only;
        single process only: under torchrun each rank predicts a share and the shares are merged instead)."""
        if which != "teacher" or not self.cfg.DISTILL.TEACHER_CACHE or runtime.is_initialized():
            return None
        if self._eval_cache is None:
            self._eval_cache = EvalFeatureCache(eval_entry(self.cfg, self.model("teacher"), self.device))
        return self._eval_cache

    @property
    def teacher_label(self) -> str:
        """results.json's "teacher" of this run."""
        return teacher_description(self.cfg) if self.teacher is not None else "none"

    # ------------------------------------------------------------------------------------ training
    def fit(self, resume: bool = False) -> dict:
        """Train, write ``model.pt`` and ``results.json``; returns the results."""
        inputs = self.prepare(resume)
        self.build()
        trainer, stream = self.trainer()
        self.open(trainer, resume, inputs)
        try:
            train_epochs([trainer], stream, self.device, trainer.teacher_features)
            if trainer.error is not None:
                raise trainer.error
            trainer.finish_model()
            return trainer.write_results(*self.evaluate_per_image(log=trainer.log), self.teacher_label)
        finally:
            trainer.close()

    def prepare(self, resume: bool = False) -> dict | None:
        """The checks before any model is built (config, data, sizes, folder); returns what the run reads, to
        record in ``inputs.json`` (None when already recorded, or not rank 0)."""
        if self.dir is None:
            raise TrainingError("a run needs an output folder to train into")
        cfg, out = self.cfg, self.dir
        runtime.init(self.device)
        check_folder(out, cfg, resume)
        if self.tensorboard:
            require_tensorboard()
        check_config(cfg)  # what the config alone decides (clipkd config show runs the same)
        check_trainable(cfg)  # before the data: an evaluation set has no train list to prepare
        check_setup(cfg, self.data, runtime.world_size(), self.device)
        if resume:
            self.check_inputs()
        # what this run reads, recorded once (also when a run killed before recording resumes)
        if runtime.is_main() and not (resume and (out / INPUTS_FILE).is_file()):
            return record_inputs(cfg, self.data, needs_teacher(cfg))
        return None

    def trainer(self, cache_entry: Any = None) -> tuple[Trainer, ImageListDataset]:
        """The built student's trainer and the training stream; with DISTILL.TEACHER_CACHE, the teacher's
        features of the stream come from ``cache_entry`` (a fused group's, opened once) or a new entry."""
        assert self.dir is not None
        cfg, data, student = self.cfg, self.data, self.student
        distiller = build_distiller(cfg, student, self.teacher, data.train.classnames)
        model = runtime.distribute(distiller, self.device)
        trainer = Trainer(distiller, model, cfg, self.dir, self.device,
                          epoch_selection(student, data, cfg, self.device))
        dataset = ImageListDataset(data.train.train, data.train.dataset_dir, build_transform(cfg, is_train=True))
        if self.teacher is not None:
            entry = None
            if cfg.DISTILL.TEACHER_CACHE and distiller.objective.needs_teacher:  # checked (maybe refused) before writing
                entry = cache_entry
                if entry is None:
                    entry = train_entry(cfg, dataset.items, dataset.paths, self.teacher, self.device,
                                        runtime.world_size())
            trainer.teacher_features = TeacherFeatures(self.teacher, entry, rank=runtime.rank())
        return trainer, dataset

    def open(self, trainer: Trainer, resume: bool, inputs: dict | None) -> None:
        """Take the folder and open the log (:meth:`Trainer.open`); pair it with ``trainer.close()``."""
        cfg, data = self.cfg, self.data
        n_train = sum(p.numel() for p in self.student.trainable_parameters())
        intro = (f"clipkd run: {data.spec.name}, {cfg.DISTILL.PROTOCOL} protocol, "
                 f"{len(data.train.train)} training images, {len(data.train.classnames)} classes, "
                 f"student {cfg.MODEL.STUDENT.TYPE} ({n_train:,} trainable parameters), "
                 f"objective {trainer.distiller.objective!r}, device {self.device}")
        intro += f"; {trainer.distiller.describe()}" if trainer.distiller.describe() else ""
        n_classes = cfg.KDPL.K_MAX if trainer.distiller.select is not None else len(data.train.classnames)
        per_process = cfg.DATALOADER.TRAIN_X.BATCH_SIZE // runtime.world_size()
        intro = "\n".join([intro, *self.student.setup_lines(per_process, n_classes)])
        trainer.open(resume, inputs, self.echo, self.tensorboard, intro)
