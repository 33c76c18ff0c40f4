"""Base / New / HM evaluation: each half classified among its own classes only, micro top-1 accuracy.

Any model with ``image_features(images)`` and ``text_features(classnames)`` can be evaluated: a trained
student, the frozen teacher or a zero-shot CLIP; a conditional student (``conditional``, CoCoOp) is scored with
its per-image class features ``conditional_text_features(features, classnames)`` ``[B, C, D]``. Under
torchrun each rank predicts a share of the test images and the shares are put back in order, so every image
counts once.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from yacs.config import CfgNode

from clipkd.data.loaders import ImageListDataset, build_loader, build_transform
from clipkd.data.rundata import RunData
from clipkd.data.splits import ResolvedSplit
from clipkd.engine import runtime
from clipkd.fileio import atomic_write
from clipkd.metrics import harmonic_mean
from clipkd.rundir import PER_IMAGE, PREDICTIONS_FORMAT, TEACHER_PRED

__all__ = ["harmonic_mean", "Predictions", "predict", "predict_many", "predict_half", "evaluate_half",
           "epoch_selection", "evaluate_halves", "evaluate_per_image", "score_halves", "classification_metrics",
           "results_payload", "write_predictions", "format_dassl_lines", "dassl_log_lines"]


# What scores a batch's image features: the class features [C, D], or (a conditional student) a function of the
# batch's image features giving each image's class features [B, C, D].
Classifier = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(
    image_features: Callable[[torch.Tensor], torch.Tensor],
    class_features: Classifier,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], object],
    logit_scale: float = 1.0,
) -> Predictions:
    """Predicted and true labels over a loader (cosine similarity; the logit scale does not change argmax), with
    each image's statistics at ``logit_scale`` (:class:`Predictions`)."""
    batches, labels = [], []
    if isinstance(class_features, torch.Tensor):
        class_features = class_features.to(device).float()
    for images, y, _ in loader:
        batches.append(_predict_batch(image_features, class_features, images.to(device, non_blocking=True), autocast,
                                      logit_scale, y))
        labels.append(y)
    return _joined_predictions(batches, labels)


class Predictions(tuple):
    """A half's ``(predicted, true)`` labels (unpacked as before) with each image's statistics in ``per_image``:
    the arrays of the prediction file (:data:`clipkd.rundir.PER_IMAGE`: label, pred, prob, confidence, entropy,
    top5_out), as CPU tensors in the list's order; ``teacher_pred`` is added where a teacher also predicted."""

    per_image: dict[str, torch.Tensor]

    def __new__(cls, pred: torch.Tensor, true: torch.Tensor, per_image: dict[str, torch.Tensor]) -> Predictions:
        self = super().__new__(cls, (pred, true))
        self.per_image = per_image
        return self


def _predict_batch(image_features: Callable[[torch.Tensor], torch.Tensor], class_features: Classifier,
                   images: torch.Tensor, autocast: Callable[[], Any], logit_scale: float = 1.0,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One batch's predictions: every path that predicts goes through here, so all agree bit for bit."""
    with autocast():
        feats = image_features(images)
    return _predict_features(feats, class_features, autocast, logit_scale, labels)


@torch.no_grad()
def _predict_features(feats: torch.Tensor, class_features: Classifier, autocast: Callable[[], Any],
                      logit_scale: float = 1.0, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A batch's predicted labels (``pred``) from its image features (computed now or read from the feature
    cache) and, given the true ``labels``, each image's statistics (:func:`_image_statistics`), on the CPU."""
    if isinstance(class_features, torch.Tensor):
        logits = feats.float() @ class_features.t()
    else:
        with autocast():
            per_image = class_features(feats)
        logits = torch.einsum("bd,bcd->bc", feats.float(), per_image.float())
    out = {"pred": logits.argmax(dim=-1).cpu()}
    if labels is not None:
        out.update(_image_statistics(logits, labels.to(logits.device), logit_scale))
    return out


def _image_statistics(cosine: torch.Tensor, labels: torch.Tensor, logit_scale: float) -> dict[str, torch.Tensor]:
    """What a paired comparison or a calibration analysis needs per image, from the softmax of
    ``logit_scale * cosine`` (the logits the model is trained on): the probability of the true label, the
    largest probability, the entropy in nats and the mass outside the 5 most probable classes (0 with <= 5)."""
    logp = torch.log_softmax(logit_scale * cosine.float(), dim=-1)
    p = logp.exp()
    ranked = p.sort(dim=-1, descending=True).values
    return {
        "prob": p.gather(1, labels.long().view(-1, 1)).view(-1).cpu(),
        "confidence": ranked[:, 0].cpu(),
        "entropy": -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1).cpu(),
        "top5_out": ranked[:, 5:].sum(dim=-1).cpu(),
    }


def _joined_predictions(batches: list[dict[str, torch.Tensor]], labels: list[torch.Tensor]) -> Predictions:
    """The batches' predictions as one :class:`Predictions` (the file's dtypes: int32 labels, float32 rest)."""
    pred, true = _joined([b["pred"] for b in batches]), _joined(labels)
    per_image = {"label": true.to(torch.int32), "pred": pred.to(torch.int32)}
    for name in ("prob", "confidence", "entropy", "top5_out"):
        parts = [b[name] for b in batches if name in b]
        per_image[name] = torch.cat(parts).float() if parts else torch.empty(0)
    return Predictions(pred, true, per_image)


def _classifier(model: Any, classnames: Sequence[str], device: torch.device, autocast: Callable[[], Any]) -> Classifier:
    """``model``'s :data:`Classifier` of ``classnames`` on ``device`` (class features computed once, unless the
    model is conditional)."""
    if getattr(model, "conditional", False):
        names = list(classnames)
        return lambda feats: model.conditional_text_features(feats, names)
    with torch.no_grad(), autocast():
        return model.text_features(classnames).float().to(device)


def _logit_scale(model: Any) -> float:
    """The scale of the logits ``model`` is trained and distilled at (CLIP's, about 100); a model that declares
    none (a stand-in in a test) is scored on the raw cosine similarities."""
    return float(getattr(model, "logit_scale", 1.0))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def predict_many(
    models: Sequence[Any], split: ResolvedSplit, cfg: CfgNode, device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext, items: str = "test",
) -> list[Predictions | Exception]:
    """:func:`predict_half` for several models in one pass over the list (single process): each image is
    decoded and transformed once and each batch goes to every model, which sees the batches it would see
    alone. A model that fails gets its exception in its place and the others go on; a failure to read the
    list (e.g. a missing image) is raised."""
    out: list[Any] = [None] * len(models)
    class_features: list[Any] = [None] * len(models)
    for k, model in enumerate(models):
        try:
            model.eval()
            class_features[k] = _classifier(model, split.classnames, device, autocast)
        except Exception as exc:  # noqa: BLE001 - this model cannot be scored; the others can
            out[k] = exc
    dataset = ImageListDataset(getattr(split, items), split.dataset_dir, build_transform(cfg, is_train=False))
    loader = build_loader(dataset, cfg.DATALOADER.TEST.BATCH_SIZE, shuffle=False,
                          num_workers=cfg.DATALOADER.NUM_WORKERS)
    preds: list[list[dict[str, torch.Tensor]]] = [[] for _ in models]
    labels = []
    for images, y, _ in loader:
        images = images.to(device, non_blocking=True)
        for k, model in enumerate(models):
            if out[k] is None:
                try:
                    preds[k].append(_predict_batch(model.image_features, class_features[k], images, autocast,
                                                   _logit_scale(model), y))
                except Exception as exc:  # noqa: BLE001 - as above
                    out[k] = exc
        labels.append(y)
    return [o if o is not None else _joined_predictions(p, labels) for o, p in zip(out, preds)]


def classification_metrics(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> dict:
    """Accuracy and macro-F1 in percent (macro-F1 over the classes of the half, as Dassl prints it)."""
    from sklearn.metrics import f1_score

    n = int(true.numel())
    if n == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}
    acc = 100.0 * float((pred == true).sum()) / n
    f1 = 100.0 * float(f1_score(true.numpy(), pred.numpy(), labels=list(range(num_classes)), average="macro",
                                zero_division=0))
    return {"accuracy": acc, "macro_f1": f1, "n": n}


def results_payload(halves: dict[str, dict]) -> dict:
    """``{"base": {...}, "new": {...}, "hm": %}`` (hm only when both halves were evaluated)."""
    out = dict(halves)
    if "base" in halves and "new" in halves:
        out["hm"] = harmonic_mean(halves["base"]["accuracy"], halves["new"]["accuracy"])
    return out


def write_predictions(path: str | os.PathLike, per_image: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write each half's per-image arrays (:attr:`Predictions.per_image`) as the prediction file
    (:data:`clipkd.rundir.PREDICTIONS_FILE`), atomically; written before results.json, so a finished run has it."""
    dtypes = {**{name: np.float32 for name in PER_IMAGE}, "label": np.int32, "pred": np.int32, TEACHER_PRED: np.int32}
    arrays = {"format": np.array(PREDICTIONS_FORMAT)}
    for half, stats in per_image.items():
        for name, value in stats.items():
            arrays[f"{half}.{name}"] = np.asarray(value.cpu().numpy() if isinstance(value, torch.Tensor) else value,
                                                  dtype=dtypes[name])
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def format_dassl_lines(name: str, metrics: dict) -> list[str]:
    """Dassl-style result lines of one half, for people reading log.txt (``=> result (base)`` is not the
    ``=> result`` line Dassl's parse_test_res.py waits for: it reads the ending :func:`dassl_log_lines` gives)."""
    return [
        f"=> result ({name})",
        f"* total: {metrics['n']:,}",
        f"* accuracy: {metrics['accuracy']:.2f}%",
        f"* macro_f1: {metrics['macro_f1']:.2f}%",
    ]


# The two lines Dassl's tools/parse_test_res.py waits for (a whole stripped line, compared exactly) before it
# reads ``* accuracy: X%`` lines: a training log's (default) and a test log's (--test-log).
DASSL_FINISH_TRAINING = "Finish training"
DASSL_RESULT = "=> result"


def dassl_log_lines(results: dict, half: str | None = None, *, training: bool = True) -> list[str]:
    """One half's result as the lines Dassl writes, for Dassl's ``tools/parse_test_res.py``.

    That parser reads ``<seed folder>/log.txt``, starts reading at the first line that is exactly
    ``Finish training`` (or ``=> result`` with ``--test-log``) and keeps the *last* ``* accuracy: X%`` line
    after it, so a log it reads holds one accuracy. ``training=True`` gives a training log's ending
    (``Finish training``, then the result: both parser modes read it); ``False`` a test log's (``--test-log``
    only). ``half`` defaults to base (base-to-new runs) or all (few-shot runs). The accuracy is written with
    full float precision, so the parser reads exactly the value in results.json.
    """
    if half is None:
        half = "base" if "base" in results else "all"
    if half not in results or not isinstance(results[half], dict):
        raise KeyError(f"the results hold no {half!r} half (they hold {', '.join(sorted(results))})")
    m = results[half]
    acc = float(m["accuracy"])
    lines = [DASSL_FINISH_TRAINING] if training else []
    lines.append(DASSL_RESULT)
    if "n" in m:
        n = int(m["n"])
        lines += [f"* total: {n:,}", f"* correct: {round(acc * n / 100):,}"]
    lines += [f"* accuracy: {acc!r}%", f"* error: {100.0 - acc!r}%"]
    if "macro_f1" in m:
        lines.append(f"* macro_f1: {float(m['macro_f1'])!r}%")
    return lines



@torch.no_grad()
def _image_features(model: Any, loader: DataLoader, device: torch.device,
                    autocast: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features as the model computes them, on the CPU; labels) over a loader, in its order."""
    feats, labels = [], []
    for images, y, _ in loader:
        with autocast():
            feats.append(model.image_features(images.to(device, non_blocking=True)).cpu())
        labels.append(y)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def predict_half(
    model: Any, split: ResolvedSplit, cfg: CfgNode, device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext, items: str = "test", feature_cache: Any = None,
) -> Predictions:
    """Predicted and true labels of ``model`` on one half's ``items`` list, among that half's classes only.
    ``feature_cache`` (single process; :class:`clipkd.engine.teacher_features.EvalFeatureCache`): the model's image
    features of the list are read from it or computed once and stored, then scored batch by batch as below."""
    if feature_cache is None and not runtime.is_initialized():
        result = predict_many([model], split, cfg, device, autocast, items)[0]
        if isinstance(result, Exception):
            raise result
        return result
    model.eval()
    class_features = _classifier(model, split.classnames, device, autocast)
    dataset = ImageListDataset(getattr(split, items), split.dataset_dir, build_transform(cfg, is_train=False))
    sampler = DistributedSampler(dataset, shuffle=False) if runtime.is_initialized() else None
    loader = build_loader(dataset, cfg.DATALOADER.TEST.BATCH_SIZE, shuffle=False,
                          num_workers=cfg.DATALOADER.NUM_WORKERS, sampler=sampler)
    scale = _logit_scale(model)
    if feature_cache is not None and sampler is None:
        feats, true = feature_cache.features(dataset, lambda: _image_features(model, loader, device, autocast))
        # the same batches as predict(), so the same matmuls: cached and computed predictions are identical
        size = cfg.DATALOADER.TEST.BATCH_SIZE
        labels = list(true.split(size)) if len(true) else []
        batches = [_predict_features(f.to(device), class_features, autocast, scale, y)
                   for f, y in zip(feats.split(size), labels)] if len(true) else []
        return _joined_predictions(batches, labels)
    result = predict(model.image_features, class_features, loader, device, autocast, scale)
    if sampler is None:
        return result
    # rank 0's view of every rank's share, in dataset order
    names = list(result.per_image)
    merged: dict[int, tuple] = {}
    for idx, p, t, stats in runtime.gather_objects((list(sampler), result[0].tolist(), result[1].tolist(),
                                                    [result.per_image[k].tolist() for k in names])):
        merged.update({i: row for i, *row in zip(idx, p, t, *stats)})  # padding repeats are dropped here
    rows = [merged[i] for i in range(len(dataset))]
    pred = torch.tensor([r[0] for r in rows], dtype=torch.long)
    true = torch.tensor([r[1] for r in rows], dtype=torch.long)
    per_image = {k: torch.tensor([r[2 + j] for r in rows], dtype=result.per_image[k].dtype)
                 for j, k in enumerate(names)}
    return Predictions(pred, true, per_image)


def evaluate_half(
    model: Any, split: ResolvedSplit, cfg: CfgNode, device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext, items: str = "test", feature_cache: Any = None,
) -> dict:
    """Accuracy / macro-F1 of ``model`` on one half, among that half's classes only."""
    pred, true = predict_half(model, split, cfg, device, autocast, items, feature_cache)
    return classification_metrics(pred, true, len(split.classnames))


def epoch_selection(model: Any, data: RunData, cfg: CfgNode, device: torch.device) -> Callable[[], float] | None:
    """How TEST.FINAL_MODEL measures an epoch to pick the final one: ``model``'s accuracy on the few-shot val
    list (val) or on the test list (best_base_test, the reference code's choice) of ``data.select``; None for
    last."""
    if cfg.TEST.FINAL_MODEL == "last":
        return None
    items = "val" if cfg.TEST.FINAL_MODEL == "val" else "test"
    split = data.select
    autocast, _ = runtime.autocast_for(cfg.OPTIM.PRECISION, device)
    return lambda: evaluate_half(model, split, cfg, device, autocast, items=items)["accuracy"]


def evaluate_halves(
    model: Any, halves: dict[str, ResolvedSplit], cfg: CfgNode, device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext, log: Callable[..., None] | None = None,
    feature_cache: Any = None,
) -> dict:
    """``{"base": {...}, "new": {...}, "hm": ...}`` (or ``{"all": ...}``) on the halves' test lists; the Dassl
    result lines go to ``log``, a block per call (the lines as its arguments, as
    :meth:`clipkd.engine.runlog.RunLog.info` takes them); ``feature_cache`` as in :func:`predict_half`."""
    predictions = {name: predict_half(model, split, cfg, device, autocast, feature_cache=feature_cache)
                   for name, split in halves.items()}
    return score_halves(predictions, halves, log)


def evaluate_per_image(
    model: Any, halves: dict[str, ResolvedSplit], cfg: CfgNode, device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext, log: Callable[..., None] | None = None,
    feature_cache: Any = None, predictions: dict[str, Predictions] | None = None, teacher: Any = None,
    teacher_cache: Any = None,
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """:func:`evaluate_halves`' results and, from the same predictions, each half's per-image arrays
    (:attr:`Predictions.per_image`); ``predictions``: each half's, already made (e.g. :func:`predict_many`'s).
    With ``teacher``, its predictions of the same images go to ``teacher_pred``: made in the model's pass over
    the images (each decoded once) where it can (single process, no feature caches), else read from its
    ``teacher_cache`` or predicted in a pass of their own."""
    if predictions is None:
        predictions = {}
        for name, split in halves.items():
            if teacher is None or feature_cache is not None or teacher_cache is not None or runtime.is_initialized():
                predictions[name] = predict_half(model, split, cfg, device, autocast, feature_cache=feature_cache)
                continue
            student, taught = predict_many([model, teacher], split, cfg, device, autocast)
            if isinstance(student, Exception):
                raise student
            if not isinstance(taught, Exception):
                student.per_image[TEACHER_PRED] = taught.per_image["pred"]
            predictions[name] = student
    per_image = {name: dict(predictions[name].per_image) for name in halves}
    for name, split in halves.items():
        if teacher is not None and TEACHER_PRED not in per_image[name]:
            taught = predict_half(teacher, split, cfg, device, autocast, feature_cache=teacher_cache)
            per_image[name][TEACHER_PRED] = taught[0].to(torch.int32)
    return score_halves(predictions, halves, log), per_image


def score_halves(predictions: dict[str, tuple[torch.Tensor, torch.Tensor]], halves: dict[str, ResolvedSplit],
                 log: Callable[..., None] | None = None) -> dict:
    """:func:`evaluate_halves`' results from each half's (predicted, true) labels, e.g. :func:`predict_many`'s."""
    metrics = {}
    for name, split in halves.items():
        metrics[name] = classification_metrics(*predictions[name], len(split.classnames))
        if log is not None:
            log(*format_dassl_lines(name, metrics[name]))
    results = results_payload(metrics)
    if log is not None and "hm" in results:
        log(f"* base: {metrics['base']['accuracy']:.2f}%  new: {metrics['new']['accuracy']:.2f}%  "
            f"HM: {results['hm']:.2f}%")
    return results
