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

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from yacs.config import CfgNode

from clipkd.config import build_config, flatten
from clipkd.config.checks import check_config
from clipkd.data.specs import DatasetSpec, get_spec
from clipkd.data.splits import ResolvedSplit, resolve_split
from clipkd.engine import runtime
from clipkd.engine.checkpoint import load_checkpoint, save_checkpoint
from clipkd.methods.distiller import Distiller, build_objective
from clipkd.engine.evaluate import dassl_log_lines, evaluate_half, evaluate_halves, predict_half, score_halves
from clipkd.engine.inputs import record_inputs
from clipkd.rundir import BEST_CKPT, CONFIG_FILE, INPUTS_FILE, LAST_CKPT, MODEL_FILE, RESULTS_FILE, RunDir
from clipkd.engine.runlog import RunLog, require_tensorboard
from clipkd.engine.teacher_cache import TeacherFeatures
from clipkd.engine.runtime import autocast_for, restore_rng, rng_snapshot, seed_everything
from clipkd.engine.train import Trainee, TrainState, train_epochs
from clipkd.errors import ConfigError, TrainingError
from clipkd.fileio import atomic_write_text
from clipkd.models.teacher import ZERO_SHOT
from clipkd.registry import STUDENTS

WHICH = ("final", "teacher", "student")  # trained student, configured teacher, zero-shot student CLIP
# results.json "selected_on": how the final epoch was chosen (reports never average "base_test" with the rest)
SELECTED_ON = {"last": "last", "val": "val", "best_base_test": "base_test"}


def student_key(cfg: CfgNode) -> str:
    """The config keys a student is built from (besides the seed and the teacher): equal keys, equal students."""
    flat = flatten(cfg)
    return json.dumps({k: v for k, v in flat.items() if k.startswith(("MODEL.STUDENT.", "MODEL.PROMPT."))},
                      sort_keys=True, default=str)


def copy_student(student: torch.nn.Module) -> Any:
    """A copy that trains on its own (prompts, projector, buffers) over the *same* frozen CLIP tensors: nothing
    writes them, so a fused group's K students hold one ViT, not K, and a copy does not clone ~100M weights."""
    memo: dict[int, Any] = {id(p): p for p in student.parameters() if not p.requires_grad}
    return copy.deepcopy(student, memo)


@dataclass
class Built:
    """The models a fused sweep's cells share (:meth:`Run.build`): one teacher, one student per student config."""

    teacher: Any
    after_teacher: dict  # RNG state right after building the teacher
    # student_key -> (an untouched copy of the student built for it, the RNG state right after that build)
    students: dict[str, tuple[Any, dict]] = field(default_factory=dict)
    # the teacher cache's entry of the training stream (DISTILL.TEACHER_CACHE), opened by the first cell needing it
    train_entry: Any = None


def teacher_description(cfg: CfgNode) -> str:
    """What results.json records as the teacher: "zero-shot" or "prompted: <checkpoint>"."""
    ckpt = cfg.MODEL.TEACHER.CHECKPOINT
    return f"prompted: {ckpt}" if ckpt and ckpt != ZERO_SHOT else "zero-shot"


@dataclass
class RunData:
    """The lists one run trains and evaluates on."""

    spec: DatasetSpec
    train: ResolvedSplit  # what the student learns from
    halves: dict[str, ResolvedSplit]  # evaluated halves: base + new (base-to-new) or all (few-shot setting)

    @property
    def select(self) -> ResolvedSplit:
        """The half whose split picks the epoch when TEST.FINAL_MODEL is not last: its few-shot val list for
        ``val``; its test list only for ``best_base_test`` (the reference code's choice, marked as such)."""
        return self.halves.get("base") or self.halves["all"]


def prepare_data(cfg: CfgNode) -> RunData:
    """DATASET.SUBSAMPLE_CLASSES base = the base-to-new setting (train on base, evaluate base and new);
    all = the few-shot setting (train and evaluate on all classes)."""
    if not cfg.DATASET.ROOT:
        raise ConfigError("DATASET.ROOT is empty; pass --root DATA")
    spec = get_spec(cfg.DATASET.NAME)
    shots, seed = cfg.DATASET.NUM_SHOTS, cfg.SEED
    names = ("base", "new") if cfg.DATASET.SUBSAMPLE_CLASSES == "base" else ("all",)
    halves = {h: resolve_split(cfg.DATASET.ROOT, spec, shots, seed, h) for h in names}
    if cfg.DISTILL.PROTOCOL == "inductive":
        train = halves.get("base") or halves["all"]
    else:  # transductive (PromptKD): train images of all classes, labels unused, logits over all classes
        train = halves.get("all") or resolve_split(cfg.DATASET.ROOT, spec, shots, seed, "all")
    return RunData(spec, train, halves)


def needs_teacher(cfg: CfgNode) -> bool:
    return STUDENTS.get(cfg.MODEL.STUDENT.TYPE).needs_teacher or cfg.DISTILL.WEIGHT > 0


def model_input_size(name: str) -> tuple[int, int] | None:
    """The image size an open_clip architecture takes, read from its config (None when unknown)."""
    import open_clip

    from clipkd.models.factory import register_model_configs

    register_model_configs()
    mcfg = open_clip.get_model_config(name.replace("/", "-"))
    size = (mcfg or {}).get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def check_teacher(cfg: CfgNode) -> None:
    """A recipe that distils from a prompted teacher never silently gets a zero-shot one (training or eval: a
    PromptKD student's classifier is its teacher's class embeddings)."""
    t = cfg.MODEL.TEACHER
    if t.PROMPTED and not t.CHECKPOINT and needs_teacher(cfg):
        raise ConfigError(
            "this method distils from a PromptSRC-prompted teacher (MODEL.TEACHER.PROMPTED True) and "
            "MODEL.TEACHER.CHECKPOINT is empty: train one with scripts/teacher.sh DATASET SEED and pass "
            "MODEL.TEACHER.CHECKPOINT output/teachers/<dataset>/seed<S>, or import PromptKD's released teacher "
            "(MODEL.TEACHER.CHECKPOINT path/to/model-best.pth.tar or its teacher_model folder), or distil from the "
            "zero-shot teacher on purpose with MODEL.TEACHER.CHECKPOINT zero-shot")


def check_trainable(cfg: CfgNode) -> None:
    """An evaluation set (ImageNetV2/-Sketch/-A/-R: test images only) cannot be trained on; say what to do instead."""
    spec = get_spec(cfg.DATASET.NAME) if cfg.DATASET.NAME else None  # an empty name: prepare_data reports it
    if spec is not None and spec.test_only:
        raise ConfigError(
            f"DATASET.NAME {spec.name} is an evaluation set (test images only, as in CoOp): nothing can be trained "
            f"on it; train on ImageNet (scripts/dg.sh SEED METHOD) and evaluate that run on it with "
            f"clipkd eval --run DIR --dataset {spec.stem}")


def check_setup(cfg: CfgNode, data: RunData, world: int = 1) -> None:
    """The combinations that would otherwise fail deep inside a step, or train something meaningless, and need
    more than the config (the data, model configs, the device; what the config alone decides is check_config)."""
    check_teacher(cfg)
    if cfg.TEST.FINAL_MODEL == "val" and not data.select.val:
        raise ConfigError(f"{data.spec.name} has no held-out val split (its val would be the test set); "
                          "use TEST.FINAL_MODEL last")
    batch = cfg.DATALOADER.TRAIN_X.BATCH_SIZE
    if batch % world:
        raise ConfigError(f"DATALOADER.TRAIN_X.BATCH_SIZE {batch} must divide among {world} processes")
    per_process = min(batch, len(data.train.train)) // world
    student = STUDENTS.get(cfg.MODEL.STUDENT.TYPE)
    if per_process < student.min_images_per_process:
        raise ConfigError(
            f"{student.min_images_reason}, which needs at least {student.min_images_per_process} images per "
            f"process and step; "
            f"this run has {per_process} (DATALOADER.TRAIN_X.BATCH_SIZE {batch}, {world} process(es), "
            f"{len(data.train.train)} training images): raise the batch size or NUM_SHOTS")
    size = tuple(cfg.INPUT.SIZE)
    roles = [("MODEL.STUDENT.NAME", cfg.MODEL.STUDENT.NAME)]
    if needs_teacher(cfg):
        roles.insert(0, ("MODEL.TEACHER.NAME", cfg.MODEL.TEACHER.NAME))
    for key, name in roles:
        wants = model_input_size(name)
        if wants is not None and wants != size:
            raise ConfigError(
                f"INPUT.SIZE {size} does not fit {key} {name}, which takes {wants[0]}x{wants[1]} images; "
                f"set INPUT.SIZE \"({wants[0]}, {wants[1]})\" (teacher and student must take the same size)")
    autocast_for(cfg.OPTIM.PRECISION, runtime.pick_device())  # fp16 without CUDA


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
        self.built: Built | None = None  # what build(keep=True) made, for other cells of a fused sweep
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
        (``inputs.json``; :mod:`clipkd.engine.inputs`). ``dataset`` False checks the weight files only."""
        from clipkd.engine.inputs import check_inputs, read_record

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

    def build(self, shared: Built | None = None, keep: bool = False) -> None:
        """Seed, then build teacher and student (in that order: both consume the RNG).

        A fused sweep builds once for all its cells: ``keep`` stores in :attr:`built` the teacher, an untouched
        copy of the student and the RNG states after each; a later cell passes that as ``shared`` and gets the
        same teacher and a copy of the student built for its student config (built and added on first use),
        with the RNG where its own build would have left it: exactly the models it would have built alone."""
        from clipkd.models.student import build_student
        from clipkd.models.teacher import build_teacher

        check_teacher(self.cfg)
        if shared is None:
            seed_everything(self.cfg.SEED)
            template = get_spec(self.cfg.DATASET.NAME).template  # no data needed (benchmarks build without any)
            self.teacher = build_teacher(self.cfg, template, device=self.device) if needs_teacher(self.cfg) else None
            after_teacher = rng_snapshot() if keep else {}
        else:
            self.teacher, after_teacher = shared.teacher, shared.after_teacher
            restore_rng(after_teacher)
        key = student_key(self.cfg)
        if shared is not None and key in shared.students:
            student, after_student = shared.students[key]
            self.student = copy_student(student)
            restore_rng(after_student)
        else:
            self.student = build_student(self.cfg, self.teacher, device=self.device)
            if keep or shared is not None:
                shared = shared or Built(self.teacher, after_teacher)
                shared.students[key] = (copy_student(self.student), rng_snapshot())
        self.built = shared

    def model(self, which: str = "final") -> Any:
        """``final``: the trained student (from ``model.pt`` unless this object just trained it);
        ``teacher``: the configured teacher; ``student``: the student's CLIP zero-shot, with its own text
        tower and the teacher's templates."""
        from clipkd.models.zeroshot import build_zero_shot

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
        from clipkd.models.state import read_state_dict, resolve_checkpoint_file

        file = resolve_checkpoint_file(path, key="--checkpoint", per_dataset=False)
        state = read_state_dict(file, what="student checkpoint")
        self.build()
        self.student.load_trainable_state_dict(state, source=str(file), ignore_frozen_clip_weights=True)
        return self.student

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, halves: Sequence[str] | None = None, which: str = "final", log: RunLog | None = None,
                 predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
        """Base/New/HM (or all) of ``which`` model; ``predictions``: each half's (predicted, true) labels of
        that model, already made (a fused group predicts for all its cells in one pass: :mod:`clipkd.engine.fused`)."""
        data = self.data
        names = tuple(halves or data.halves)
        for half in names:
            if half not in data.halves:
                raise ConfigError(f"this run evaluates {', '.join(data.halves)}, not {half} "
                                  "(DATASET.SUBSAMPLE_CLASSES base gives base and new, all gives all)")
        if predictions is not None:
            return score_halves(predictions, {h: data.halves[h] for h in names},
                                log=log.info if log is not None else None)
        autocast, _ = autocast_for(self.cfg.OPTIM.PRECISION, self.device)
        return evaluate_halves(self.model(which), {h: data.halves[h] for h in names}, self.cfg, self.device,
                               autocast, log=log.info if log is not None else None,
                               feature_cache=self.teacher_eval_cache(which))

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
            from clipkd.engine.teacher_cache import EvalFeatureCache, eval_entry

            self._eval_cache = EvalFeatureCache(eval_entry(self.cfg, self.model("teacher"), self.device))
        return self._eval_cache

    # ------------------------------------------------------------------------------------ training
    def _check_folder(self, resume: bool) -> None:
        assert self.dir is not None
        if not resume:
            self.dir.check_new()
            return
        self.dir.check_resumable()
        self.dir.check_config(self.cfg)

    def _take_folder(self, resume: bool) -> None:
        """Rank 0 locks the folder and re-checks it under the lock; every rank learns the outcome."""
        assert self.dir is not None
        error = None
        if runtime.is_main():
            try:
                self.dir.acquire()
                self._check_folder(resume)  # again: another process may have written meanwhile
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                self.dir.release()
                error = exc
        error = runtime.broadcast_object(error)
        if error is not None:
            raise error

    def fit(self, resume: bool = False) -> dict:
        """Train, write ``model.pt`` and ``results.json``; returns the results."""
        training = self.start_training(resume)
        try:
            train_epochs([training.trainee], training.dataset, self.device, training.teacher_features)
            if training.trainee.error is not None:
                raise training.trainee.error
            return self.finish_training(training)
        finally:
            self.close_training(training)

    def start_training(self, resume: bool = False, shared: Built | None = None, keep: bool = False) -> Training:
        """Everything before the first epoch: checks, models, folder (locked), restored state, log. ``fit`` and
        the fused sweep (:mod:`clipkd.engine.fused`: ``shared`` / ``keep`` as in :meth:`build`) go through here;
        pair it with :meth:`close_training`."""
        if self.dir is None:
            raise TrainingError("a run needs an output folder to train into")
        cfg, out = self.cfg, self.dir
        distributed = runtime.init(self.device)
        main = runtime.is_main()
        self._check_folder(resume)
        if self.tensorboard:
            require_tensorboard()
        check_config(cfg)  # what the config alone decides (clipkd config show runs the same)
        check_trainable(cfg)  # before the data: an evaluation set has no train list to prepare
        check_setup(cfg, self.data, runtime.world_size())
        if resume:
            self.check_inputs()
        inputs = None  # what this run reads, recorded once (also when a run killed before recording resumes)
        if main and not (resume and (out / INPUTS_FILE).is_file()):
            inputs = record_inputs(cfg, self.data, needs_teacher(cfg))
        self.build(shared, keep)
        data, student = self.data, self.student
        objective = build_objective(cfg, student, data.train.classnames)
        distiller = Distiller(student, self.teacher, data.train.classnames, objective)
        model: torch.nn.Module = distiller
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(distiller, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
        from clipkd.data.loaders import ImageListDataset
        from clipkd.data.transforms import build_transform
        from clipkd.engine.optim import build_optimizer, build_scheduler

        optimizer = build_optimizer(student.trainable_parameters(), cfg)
        _, use_scaler = autocast_for(cfg.OPTIM.PRECISION, self.device)
        state = TrainState(distiller, model, optimizer, build_scheduler(optimizer, cfg),
                           torch.amp.GradScaler(self.device.type, enabled=use_scaler))
        dataset = ImageListDataset(data.train.train, data.train.dataset_dir, build_transform(cfg, is_train=True))
        features = None
        if self.teacher is not None:
            entry = None
            if cfg.DISTILL.TEACHER_CACHE and objective.needs_teacher:  # checked (maybe refused) before writing
                from clipkd.engine.teacher_cache import train_entry

                entry = self.built.train_entry if self.built is not None else None  # a fused group's, made once
                if entry is None:
                    entry = train_entry(cfg, dataset.items, dataset.paths, self.teacher, self.device,
                                        runtime.world_size())
                if self.built is not None:
                    self.built.train_entry = entry
            features = TeacherFeatures(self.teacher, entry, rank=runtime.rank())
        self._take_folder(resume)
        log = None
        try:
            if resume and (out / LAST_CKPT).is_file():
                state.restore(load_checkpoint(out / LAST_CKPT), source=str(out / LAST_CKPT))
            if main and resume:
                out.clean_for_resume(state.epoch)
            elif main:
                atomic_write_text(out / CONFIG_FILE, cfg.dump())
            if inputs is not None:
                atomic_write_text(out / INPUTS_FILE, json.dumps(inputs, indent=1) + "\n")
            log = RunLog(out.path if main else None, echo=self.echo, tensorboard=self.tensorboard)
            if state.epoch:
                log.info(f"resumed from {out / LAST_CKPT} after epoch {state.epoch}")
            else:
                n_train = sum(p.numel() for p in student.trainable_parameters())
                log.info(f"clipkd run: {data.spec.name}, {cfg.DISTILL.PROTOCOL} protocol, "
                         f"{len(data.train.train)} training images, {len(data.train.classnames)} classes, "
                         f"student {cfg.MODEL.STUDENT.TYPE} ({n_train:,} trainable parameters), "
                         f"objective {objective!r}, device {self.device}")
            if features is not None and features.entry is not None:
                log.info(f"teacher cache {features.entry.describe()} before this run (delete the folder to free it)")
            autocast, _ = autocast_for(cfg.OPTIM.PRECISION, self.device)
            validate = None
            if cfg.TEST.FINAL_MODEL != "last":  # val: the few-shot val split; best_base_test: the test split
                items = "val" if cfg.TEST.FINAL_MODEL == "val" else "test"
                validate = (lambda: evaluate_half(student, data.select, cfg, self.device, autocast,
                                                  items=items)["accuracy"])
            metric = "val_accuracy" if cfg.TEST.FINAL_MODEL == "val" else "base_test_accuracy"
            return Training(Trainee(state, cfg, out, log, validate, metric), dataset, features)
        except BaseException:
            if log is not None:
                log.close()
            if main:
                out.release()
            raise

    def finish_training(self, training: Training) -> dict:
        """After the last epoch: the final model (objective's, best or last), ``model.pt``, the evaluation and
        ``results.json``; returns the results. A fused group runs the three steps itself, the evaluation once
        for all its cells."""
        self.save_final_model(training)
        return self.write_results(training, self.evaluate(log=training.trainee.log))

    def save_final_model(self, training: Training) -> None:
        """The final model (the objective's, the best epoch's or the last) into the student, and ``model.pt``."""
        cfg, out, main = self.cfg, self.dir, runtime.is_main()
        assert out is not None
        state, log, student = training.trainee.state, training.trainee.log, self.student
        final_epoch = cfg.OPTIM.MAX_EPOCH
        final = state.distiller.objective.final_state()
        if final is not None:  # e.g. PromptSRC's Gaussian-weighted prompts
            student.load_trainable_state_dict(final, source="the objective's final state")
        elif training.trainee.validate is not None and state.best["epoch"] > 0:
            student.load_trainable_state_dict(load_checkpoint(out / BEST_CKPT)["state_dict"])
            final_epoch = state.best["epoch"]
            on = "few-shot val" if cfg.TEST.FINAL_MODEL == "val" else "base TEST (the reference code's choice)"
            log.info(f"final model: epoch {final_epoch} (best {on} accuracy {state.best['accuracy']:.2f}%)")
        if main:
            save_checkpoint(out / MODEL_FILE, student.trainable_state_dict(), epoch=final_epoch,
                            student_type=cfg.MODEL.STUDENT.TYPE)
        features = training.teacher_features
        if features is not None and features.entry is not None:
            log.info(f"teacher cache {features.entry.describe()} after this run ({features.read} batches read, "
                     f"{features.computed} computed; delete the folder to free it)")
        training.final_epoch = final_epoch

    def write_results(self, training: Training, results: dict) -> dict:
        """The evaluation's Dassl lines, ``results.json`` and its metrics line; returns the results."""
        cfg, out, log = self.cfg, self.dir, training.trainee.log
        assert out is not None
        final_epoch = training.final_epoch
        for line in dassl_log_lines(results):  # what Dassl's tools/parse_test_res.py reads
            log.info(line)
        results.update(epoch=final_epoch, selected_on=SELECTED_ON[cfg.TEST.FINAL_MODEL],
                       teacher=teacher_description(cfg) if self.teacher is not None else "none")
        if runtime.is_main():
            atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        log.metrics("results", **results)
        runtime.barrier()
        return results

    def close_training(self, training: Training) -> None:
        """Close the log and unlock the folder (whatever happened in between)."""
        training.trainee.log.close()
        if runtime.is_main() and self.dir is not None:
            self.dir.release()


@dataclass
class Training:
    """A run between :meth:`Run.start_training` and :meth:`Run.close_training`: what the trainer needs."""

    trainee: Trainee
    dataset: Any  # ImageListDataset of the training list
    teacher_features: TeacherFeatures | None  # None when the run has no teacher
    final_epoch: int | None = None  # the epoch of the final model (:meth:`Run.save_final_model`)
