"""Base / New / HM evaluation: each half classified among its own classes only, micro top-1 accuracy."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from clipkd.engine.metrics import harmonic_mean

__all__ = ["harmonic_mean", "predict", "classification_metrics", "results_payload", "format_dassl_lines"]


@torch.no_grad()
def predict(
    image_features: Callable[[torch.Tensor], torch.Tensor],
    class_features: torch.Tensor,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], object],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels over a loader (cosine similarity; the logit scale does not change argmax)."""
    preds, labels = [], []
    class_features = class_features.to(device).float()
    for images, y, _ in loader:
        with autocast():
            feats = image_features(images.to(device, non_blocking=True))
        preds.append((feats.float() @ class_features.t()).argmax(dim=-1).cpu())
        labels.append(y)
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


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


def format_dassl_lines(name: str, metrics: dict) -> list[str]:
    """Dassl-style result lines, so existing log parsers keep working."""
    return [
        f"=> result ({name})",
        f"* total: {metrics['n']:,}",
        f"* accuracy: {metrics['accuracy']:.2f}%",
        f"* macro_f1: {metrics['macro_f1']:.2f}%",
    ]

