"""Contrastive pretraining of the tiny CLIPs on the toy world's pretraining domain.

The weights clipkd ships (``clipkd/toy/weights/``) are this module's output for the seeds and step counts
in ``RECIPES``; ``clipkd toy pretrain`` reproduces them. They are stored compactly: a CLIP text tower has a
49,408-row token embedding, of which the toy vocabulary uses a few dozen rows; only those rows are stored
(the others are never trained and never used by toy prompts), which keeps both models under 5 MB.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipkd.errors import ModelError
from clipkd.fileio import atomic_write
from clipkd.models.factory import create_clip
from clipkd.models.state import load_error_cause
from clipkd.toy.world import CAPTION_TEMPLATES, all_classes, render

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT = "clipkd-toy-weights"
EXTRA_VOCAB = ("X", "a photo of a", "texture", "type of")  # prompt words users may init prompts with


@dataclass(frozen=True)
class Recipe:
    model: str  # a clipkd open_clip config name
    steps: int
    batch_size: int
    lr: float
    seed: int
    domain: str  # the toy world's pretraining domain this model learns from
    pool: int = 12000  # pre-rendered pretraining images


RECIPES = {
    "teacher": Recipe("clipkd-toy-teacher", steps=1000, batch_size=128, lr=1e-3, seed=1, domain="pretrain_varied"),
    "student": Recipe("clipkd-toy-student", steps=1000, batch_size=128, lr=1e-3, seed=2, domain="pretrain"),
}


def weights_path(role: str) -> Path:
    return WEIGHTS_DIR / f"{RECIPES[role].model}.pt"


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (images - mean) / std


def render_pool(n: int, seed: int, domain: str = "pretrain") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pretraining-domain images (normalised, [n, 3, 32, 32]) and their class indices."""
    import numpy as np

    rng = random.Random(seed)
    classes = all_classes()
    labels = torch.tensor([rng.randrange(len(classes)) for _ in range(n)])
    arrays = np.stack([np.asarray(render(classes[int(y)], rng, domain)) for y in labels])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255)
    return _normalize(images), labels


def toy_token_ids(tokenizer) -> torch.Tensor:  # noqa: ANN001
    """Every token id that toy captions and prompts use."""
    texts = [t.format(c.text) for t in CAPTION_TEMPLATES for c in all_classes()] + list(EXTRA_VOCAB)
    texts += [f"{c.colour}_{c.shape}" for c in all_classes()]
    return torch.unique(tokenizer(texts).flatten())


def pretrain(role: str, out: Path | None = None, progress: bool = True) -> Path:
    """Train one tiny CLIP contrastively and save its compact weights; returns the file."""
    from tqdm import tqdm

    r = RECIPES[role]
    torch.manual_seed(r.seed)
    model, tokenizer = create_clip(r.model, "")
    model.train()
    images, labels = render_pool(r.pool, r.seed, r.domain)
    classes = all_classes()
    # captions: every class under every template, tokenised once
    tokens = tokenizer([t.format(c.text) for c in classes for t in CAPTION_TEMPLATES]).view(
        len(classes), len(CAPTION_TEMPLATES), -1)
    gen = torch.Generator().manual_seed(r.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no decay on gains, biases and the logit scale (as CLIP)
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=r.lr)
    warmup = max(1, r.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (r.steps - warmup))))
    started = time.time()
    bar = tqdm(range(r.steps), desc=f"pretrain {role}", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(images), (r.batch_size,), generator=gen)
        tpl = torch.randint(len(CAPTION_TEMPLATES), (r.batch_size,), generator=gen)
        x, y = images[idx], labels[idx]
        # light augmentation: random flips and 0-2 px shifts keep the pool from being memorised
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        shift = [int(v) for v in torch.randint(-2, 3, (2,), generator=gen)]
        x = torch.roll(x, shifts=shift, dims=(-2, -1))
        text = tokens[y, tpl]
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
        # same-class pairs are positives too (soft targets), so duplicates in a batch are not pushed apart
        same = (y[:, None] == y[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out = out or weights_path(role)
    save_compact(model, tokenizer, out, role=role, recipe=r, seconds=time.time() - started)
    return out


def save_compact(model, tokenizer, path: Path, **meta) -> None:  # noqa: ANN001
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = state.pop("token_embedding.weight")
    ids = toy_token_ids(tokenizer)
    payload = {"format": FORMAT, "version": 1, "token_ids": ids, "token_rows": emb[ids].clone(),
               "vocab_size": emb.shape[0], "state_dict": state,
               "meta": {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in meta.items()}}
    atomic_write(path, lambda f: torch.save(payload, f))


def expand_compact(path: Path, out: Path) -> Path:
    """Write a full open_clip state dict (unused token rows zero) that ``create_clip`` can load as a file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is the file's fault
        payload = exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        cause = f" ({load_error_cause(payload)})" if isinstance(payload, Exception) else ""
        raise ModelError(f"toy weights {path} cannot be read{cause}: it is damaged or not a clipkd toy weights "
                         "file (clipkd never runs code from one); delete it (clipkd demo pretrains it again) or "
                         "reinstall clipkd")
    state = dict(payload["state_dict"])
    rows = payload["token_rows"]
    emb = torch.zeros(payload["vocab_size"], rows.shape[1], dtype=rows.dtype)
    emb[payload["token_ids"]] = rows
    state["token_embedding.weight"] = emb
    atomic_write(out, lambda f: torch.save(state, f))
    return out
