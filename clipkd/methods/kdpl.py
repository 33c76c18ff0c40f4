"""KDPL's class-agnostic distillation (KDPL-CA, Mistretta et al., ECCV 2024): training without the target
dataset's class names.

The class names come from a large dictionary (KDPL.DICTIONARY; KDPL ships ``classnames_dictionay.csv``, 20,930
names, column ``ClassName``). The teacher's class embeddings of the whole dictionary are computed once (the
Teacher caches them); per batch, the teacher's probabilities over the dictionary, averaged over the batch's
images, pick the KDPL.K_MAX most likely names, and teacher and student are distilled over those names only
(:class:`clipkd.methods.distiller.Distiller` with ``select``). Evaluation uses the dataset's class names as
always. The label-free part (the objective never gets labels) is DISTILL.LABEL_FREE, which class-agnostic
training implies.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from torch import Tensor
from yacs.config import CfgNode

from clipkd.errors import ConfigError, DataError

DICTIONARY_COLUMN = "ClassName"  # KDPL's CSV column
DICTIONARY_HELP = ("KDPL's dictionary is src/classnames_dictionay.csv in github.com/miccunifi/KDPL (20,930 names; "
                   "the repository states no licence, so clipkd does not ship it), or give a text file with one "
                   "class name per line")


def read_dictionary(path: str | Path) -> list[str]:
    """The class names in ``path``, in file order: a ``.csv`` with a ``ClassName`` column (KDPL's file, CSV
    quoting as pandas reads it), or any other file with one name per line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"KDPL.DICTIONARY {path}: no such file; {DICTIONARY_HELP}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"KDPL.DICTIONARY {path} cannot be read ({type(exc).__name__}: {exc}); it must be UTF-8 "
                        "text") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if DICTIONARY_COLUMN not in (reader.fieldnames or []):
            raise DataError(f"KDPL.DICTIONARY {path} has no {DICTIONARY_COLUMN} column (its header: "
                            f"{', '.join(reader.fieldnames or []) or 'none'}); a .csv needs one, as KDPL's file has")
        names = [row[DICTIONARY_COLUMN] for row in reader if row[DICTIONARY_COLUMN]]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"KDPL.DICTIONARY {path} holds no class names")
    return names


def top_k_classes(teacher_logits: Tensor, k: int) -> Tensor:
    """KDPL's rule: the ``k`` classes with the highest teacher probability averaged over the batch's images
    (softmax per image, then the mean), as indices, most likely first (KDPL's argpartition leaves them in no
    order; the loss does not depend on it)."""
    probs = teacher_logits.detach().float().softmax(dim=-1).mean(dim=0)
    return probs.topk(k).indices


class TopKClasses:
    """A batch's classes for :class:`~clipkd.methods.distiller.Distiller`: :func:`top_k_classes` with a fixed K.
    Under torchrun the rule is applied to the whole batch (the probabilities summed over every process's share),
    so every process trains over the same names and the run is the one-process run."""

    def __init__(self, k: int) -> None:
        self.k = int(k)

    def __call__(self, teacher_logits: Tensor) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return top_k_classes(teacher_logits, self.k)
        total = teacher_logits.detach().float().softmax(dim=-1).sum(dim=0)
        dist.all_reduce(total)  # the batch-mean times the batch size: the same ranking
        return total.topk(self.k).indices

    def __repr__(self) -> str:
        return f"top-{self.k} by the teacher's batch-mean probability"


def training_classes(cfg: CfgNode, classnames: Sequence[str]) -> tuple[list[str], TopKClasses | None]:
    """The class names a run trains over and how a batch picks among them: the dataset's, all of them; or with
    DISTILL.CLASS_AGNOSTIC, KDPL.DICTIONARY's, KDPL.K_MAX per batch (ConfigError when K_MAX exceeds them)."""
    if not cfg.DISTILL.CLASS_AGNOSTIC:
        return list(classnames), None
    names = read_dictionary(dictionary_path(cfg))
    if cfg.KDPL.K_MAX > len(names):
        raise ConfigError(f"KDPL.K_MAX {cfg.KDPL.K_MAX} is more than the {len(names)} names of KDPL.DICTIONARY "
                          f"{cfg.KDPL.DICTIONARY}: set KDPL.K_MAX <= {len(names)} or use a larger dictionary")
    return names, TopKClasses(cfg.KDPL.K_MAX)


def dictionary_path(cfg: CfgNode) -> str:
    """KDPL.DICTIONARY, which class-agnostic training needs (ConfigError naming where to get one when empty)."""
    if not cfg.KDPL.DICTIONARY:
        raise ConfigError(f"DISTILL.CLASS_AGNOSTIC needs class names to train on and KDPL.DICTIONARY is empty: "
                          f"{DICTIONARY_HELP} (KDPL.DICTIONARY /path/to/classnames_dictionay.csv)")
    return cfg.KDPL.DICTIONARY
