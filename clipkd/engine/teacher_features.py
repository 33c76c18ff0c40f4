"""Pay for the teacher once: its image features for every (epoch, index) of a run's data stream, kept on disk.

Why this is exact: the trainer orders each epoch from (SEED, epoch) and augments each image from (SEED, epoch,
index) (:mod:`clipkd.engine.loop`), so what the frozen teacher sees at a step, and so what it outputs, is a pure
function of the teacher, the training images, the seed, the epoch and the index. A second run of the same
stream (another alpha-beta cell, a rerun, a resumed run) can read the features instead of running the teacher.
Only the image features are stored: the logits are ``logit_scale * features @ class embeddings`` as always,
with the class embeddings computed by the teacher once per run (cheap, and they depend on the templates).

Features are stored in the dtype the teacher computed them in (fp32 on CPU, bf16 under CUDA autocast) and read
back bit for bit, so a run that reads the cache, the run that filled it and a run without a cache train
exactly the same student (tests/test_teacher_cache.py). The price is size: 4 bytes per value in fp32, e.g.
ViT-L/14 (768-d) for 1,600 images and 20 epochs is about 100 MB.

Layout of ``DISTILL.TEACHER_CACHE DIR`` (delete any folder, or all of DIR, at any time to free the space; a
later run recomputes what is missing)::

    DIR/train-<16 hex>/key.json                 what the entry holds (see below)
    DIR/train-<16 hex>/epoch-0001-rank0.pt      the features of epoch 1, rank 0: indices [N], features [N, D]
    DIR/eval-<16 hex>/key.json
    DIR/eval-<16 hex>/test-<16 hex>.pt          the teacher's test-set features of one image list

The folder name hashes the *config* that determines the stream: the teacher (MODEL.TEACHER.NAME / PRETRAINED /
QUICK_GELU / CHECKPOINT, and SEED when its weights are random), the device type and precision, and for training
DATASET.NAME / NUM_SHOTS / SUBSAMPLE_CLASSES, DISTILL.PROTOCOL, SEED, INPUT.*, the per-process batch size and
the number of processes (batch composition can change float results); for evaluation the test transform keys
and DATALOADER.TEST.BATCH_SIZE. So runs of different seeds or datasets share one DIR without meeting.
OPTIM.MAX_EPOCH is not part of it: epoch e's stream does not depend on how many epochs follow.

``key.json`` also records the *content*: a fingerprint of the teacher's image-tower weights (sha256 of every
byte of every parameter and buffer: about 1 s for ViT-L/14's 1.1 GiB image tower on one CPU core), of the image
list (path, label, file size and modification time of every image) and the torch version. A run whose config
maps to an existing folder but whose content differs (other weights behind the same file name, re-copied images,
another torch) refuses the cache with an error that says what differs and which folder to delete. One change
goes unseen: an image replaced by another of the same size and modification time (e.g. ``cp -p``); hashing the
image bytes instead would cost a read of every image at every run start (measured: seconds for a 16-shot
ImageNet list, minutes for a full training set), so delete the folder after such a replacement.

Every feature file is stamped with its entry's key and its own name (for an epoch file: its epoch and rank),
and a file whose stamp is not the one its place expects (copied or renamed over another) is refused by name.

Writes are atomic (:func:`clipkd.fileio.atomic_write`): an epoch file is written once its epoch is complete,
under a unique temp name, then renamed; two runs filling the same entry at once write identical files and the
last rename wins. A run interrupted mid-epoch leaves nothing of that epoch but, if killed inside a write, a
temp file; those are removed by the next run that opens the entry while no other run holds it: each run holds
a shared ``flock`` on the entry's folder from opening it to its end (the kernel drops it when a process dies),
and only a run that gets the lock exclusively, i.e. while no live process can be writing there, removes temp
files (the rule of run folders, :mod:`clipkd.rundir`; where the file system cannot lock, none are).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clipkd.config.defaults import ZERO_SHOT
from clipkd.engine.runtime import resolve_precision
from clipkd.errors import ConfigError
from clipkd.fileio import OutputError, atomic_write, atomic_write_text, stale_temp_files, write_failure
from clipkd.models.state import load_error_cause

if TYPE_CHECKING:
    from yacs.config import CfgNode

    from clipkd.data.loaders import ImageListDataset
    from clipkd.data.records import Datum

FORMAT = 2  # bump when the files change shape: old entries then live in other folders
KEY_FILE = "key.json"
_WHAT = {  # key.json content fields, as a user would name them
    "teacher_weights": "teacher weights (MODEL.TEACHER.PRETRAINED / CHECKPOINT file contents)",
    "images": "training images (files added, removed, or changed in size or modification time)",
    "torch": "torch version",
    "format": "cache format",
}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons with a saved key."""
    return json.loads(json.dumps(obj, default=str))


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def images_fingerprint(items: Sequence[Datum], paths: Sequence[str]) -> str:
    """The images a list names, as far as ``stat`` tells: path, label, size and modification time of each
    (cheap for any list size; re-copying images without their times makes a cache refuse, never misread)."""
    h = hashlib.sha256()
    for d, path in zip(items, paths):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # the loader reports a missing image by name when it gets there
            size, mtime = -1, -1
        h.update(f"{d.relpath}\0{d.label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A frozen module's identity: name, shape, dtype and every byte of every parameter and buffer (non-persistent
    ones too). A sample would miss a weight changed between its elements; the full hash costs about 1 s for
    ViT-L/14's image tower (sha256 runs at ~1.2 GiB/s on one core with SHA extensions)."""
    h = hashlib.sha256()
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with torch.no_grad():
        for name, t in sorted(tensors.items()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
            h.update(t.detach().reshape(-1).to("cpu").contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def teacher_identity(cfg: CfgNode) -> dict[str, Any]:
    """The config keys that choose the teacher's image tower (its templates only change the text side)."""
    t = cfg.MODEL.TEACHER
    ident: dict[str, Any] = {"name": t.NAME, "pretrained": t.PRETRAINED, "quick_gelu": bool(t.QUICK_GELU),
                             "checkpoint": t.CHECKPOINT if t.CHECKPOINT not in ("", ZERO_SHOT) else ZERO_SHOT}
    if not t.PRETRAINED:
        ident["seed"] = int(cfg.SEED)  # random weights are drawn from the run's seed
    return ident


def _environment(cfg: CfgNode, device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "precision": resolve_precision(cfg.OPTIM.PRECISION, device)}


class CacheEntry:
    """One folder of the cache: ``key.json`` (what it holds) and the files it holds."""

    def __init__(self, root: str | os.PathLike, kind: str, config: dict[str, Any], content: dict[str, Any]) -> None:
        self.root = Path(root)
        self.config = _json({"kind": kind, "format": FORMAT, **config})
        self.content = _json({"format": FORMAT, "torch": torch.__version__.split("+")[0], **content})
        self.path = self.root / f"{kind}-{_digest(self.config)[:16]}"
        self.key = _digest({"config": self.config, "content": self.content})  # stamped into every file
        self._lock_fd: int | None = None

    def open(self) -> CacheEntry:
        """Create the folder, or check that it holds what this run would compute; refuse otherwise. The run then
        holds the folder (see the module's doc) until :meth:`close`, or its end."""
        key_file = self.path / KEY_FILE
        record = {"config": self.config, "content": self.content}
        with _writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        # hold the folder before writing into it: a run that finds it free removes temp files, and key.json's
        # own temp file, written by a run that did not hold the folder yet, was once removed that way under load
        self._hold()
        if not key_file.is_file():
            with _writing(key_file):
                atomic_write_text(key_file, json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            saved = json.loads(key_file.read_text())
        except (OSError, ValueError) as exc:
            self.close()
            raise ConfigError(f"DISTILL.TEACHER_CACHE: {key_file} cannot be read ({exc}); delete {self.path} "
                              "(a later run recomputes it)") from None
        if saved == record:
            return self
        self.close()
        if not isinstance(saved, dict):
            saved = {}
        if saved.get("config") != self.config:  # a hash-prefix collision, or a hand-edited key.json
            differs = ["config"]
        else:
            old, new = saved.get("content", {}), self.content
            differs = [_WHAT.get(k, k) + (f" ({old.get(k)} then, {new.get(k)} now)" if k in ("torch", "format") else "")
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise ConfigError(
            f"DISTILL.TEACHER_CACHE: {self.path} holds teacher features of this config that differ from what this "
            f"run computes in: {', '.join(differs)}; so the run refuses them. Delete "
            f"{self.path} (rm -r; a later run refills it) or set DISTILL.TEACHER_CACHE to another folder")

    def _hold(self) -> None:
        """Take the folder's shared lock for this run; first, if no other run holds the folder (an exclusive lock
        is granted), remove the temp files of killed writes: no live writer can own one then."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another run holds it (or the file system cannot lock): every temp file may be a live write
        else:
            for tmp in stale_temp_files(self.path):
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:  # a read-only cache: nothing is written there either
                    pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass
        self._lock_fd = fd

    def close(self) -> None:
        """Release the folder (a run's end does it too): another run may then clean it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit; the kernel releases the lock anyway
            pass

    def _stamp(self, name: str) -> dict[str, str]:
        """What a file of this entry holds: the entry's key and the file's own name (epoch and rank)."""
        return {"entry": self.key, "file": name}

    def load(self, name: str) -> dict[str, Any] | None:
        """A file of this entry, or None when it is not there yet."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file: say which and what to do
            raise ConfigError(f"DISTILL.TEACHER_CACHE: {path} cannot be read ({load_error_cause(exc)}): it is damaged "
                              "or not a clipkd cache file; delete it (a later run recomputes it)") from None
        stamp = obj.get("stamp") if isinstance(obj, dict) else None
        if not isinstance(stamp, dict):
            raise ConfigError(f"DISTILL.TEACHER_CACHE: {path} cannot be read (it has no stamp): it is damaged or "
                              "not a clipkd cache file; delete it (a later run recomputes it)")
        if stamp != self._stamp(name):
            what = (f"was not written for {self.path / KEY_FILE} (it belongs to another entry: copied?)"
                    if stamp.get("entry") != self.key else
                    f"was written as {stamp.get('file')}, not {name} (copied or renamed over it?)")
            raise ConfigError(f"DISTILL.TEACHER_CACHE: {path} {what}; delete it (or its folder {self.path}; a "
                              "later run recomputes what is missing) or set DISTILL.TEACHER_CACHE to another folder")
        return obj

    def save(self, name: str, obj: dict[str, Any]) -> None:
        """Write a file of this entry, stamped; a failed write leaves the file as it was."""
        path = self.path / name
        with _writing(path):
            atomic_write(path, lambda f: torch.save({**obj, "stamp": self._stamp(name)}, f))

    def size(self) -> tuple[int, int]:
        """(files, bytes) of this entry's feature files."""
        files = [p for p in self.path.glob("*.pt")] if self.path.is_dir() else []
        return len(files), sum(p.stat().st_size for p in files)

    def describe(self) -> str:
        files, size = self.size()
        return f"{self.path}: {files} file(s), {human_size(size)}"


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (an OSError, or torch.save's full-disk RuntimeError: :func:`clipkd.fileio.write_failure`)
    into one line that names ``path`` and DISTILL.TEACHER_CACHE, the setting to change (not --output-dir)."""
    try:
        yield
    except (OutputError, OSError, RuntimeError) as exc:
        cause = exc.__cause__ if isinstance(exc, OutputError) and exc.__cause__ is not None else exc
        failure = write_failure(cause)
        if failure is None and isinstance(exc, RuntimeError):
            raise  # not a write failure: a bug, shown as one
        elsewhere = "set DISTILL.TEACHER_CACHE to another folder (or to '' to run without the cache)"
        if failure is None:
            reason, hint = str(exc), elsewhere
        else:
            reason = failure.strerror or type(failure).__name__
            hint = {errno.ENOSPC: f"free some space or {elsewhere}",
                    errno.EACCES: f"check the folder's permissions or {elsewhere}",
                    errno.EPERM: f"check the folder's permissions or {elsewhere}",
                    errno.EROFS: f"the file system is read-only; {elsewhere}",
                    errno.ENOTDIR: "a parent of this path is a file; DISTILL.TEACHER_CACHE must name a folder",
                    }.get(failure.errno or 0, elsewhere)
        raise OutputError(f"DISTILL.TEACHER_CACHE: cannot write {path}: {reason}; {hint}") from exc


# ------------------------------------------------------------------------------------------------ training
def train_entry(cfg: CfgNode, train_items: Sequence[Datum], paths: Sequence[str], teacher: torch.nn.Module,
                device: torch.device, world: int = 1) -> CacheEntry:
    """The cache entry of a run's training stream (opened: refused when its content differs)."""
    batch = cfg.DATALOADER.TRAIN_X.BATCH_SIZE  # how the images are grouped: float results may depend on it
    config = {
        "teacher": teacher_identity(cfg), **_environment(cfg, device),
        "dataset": cfg.DATASET.NAME, "shots": cfg.DATASET.NUM_SHOTS, "subsample": cfg.DATASET.SUBSAMPLE_CLASSES,
        "protocol": cfg.DISTILL.PROTOCOL, "seed": cfg.SEED, "input": dict(cfg.INPUT),
        "batch": batch, "world": world,
    }
    content = {"teacher_weights": weights_fingerprint(_image_tower(teacher)),
               "images": images_fingerprint(train_items, paths)}
    return CacheEntry(cfg.DISTILL.TEACHER_CACHE, "train", config, content).open()


def _image_tower(teacher: torch.nn.Module) -> torch.nn.Module:
    return getattr(teacher, "image_encoder", teacher)


class TeacherFeatures:
    """The teacher's image features of each training batch: computed by the teacher, or read from a cache entry
    that an earlier run of the same stream filled; what an epoch computed is added to the entry when it ends."""

    def __init__(self, teacher: Any, entry: CacheEntry | None = None, rank: int = 0) -> None:
        self.teacher = teacher
        self.entry = entry
        self.rank = rank
        self.read = self.computed = 0  # batches, over the run
        self._name = ""
        self._stored: Tensor | None = None
        self._rows: dict[int, int] = {}
        self._new: list[tuple[Tensor, Tensor]] = []

    def begin_epoch(self, epoch: int) -> None:
        self._name, self._stored, self._rows, self._new = f"epoch-{epoch + 1:04d}-rank{self.rank}.pt", None, {}, []
        if self.entry is not None:
            obj = self.entry.load(self._name)
            if obj is not None:
                self._stored = obj["features"]
                self._rows = {int(i): k for k, i in enumerate(obj["indices"].tolist())}

    @torch.no_grad()
    def __call__(self, indices: Tensor, images: Tensor) -> Tensor:
        """Features ``[B, D]`` of the batch whose dataset indices are ``indices``."""
        if self._stored is not None:
            rows = [self._rows.get(int(i), -1) for i in indices]
            if min(rows) >= 0:
                self.read += 1
                return self._stored[rows].to(images.device, non_blocking=True)
        features = self.teacher.image_features(images)
        self.computed += 1
        if self.entry is not None:
            self._new.append((indices.detach().cpu().long(), features.detach().cpu()))
        return features

    def end_epoch(self) -> None:
        """Store the epoch's features (those read and those computed) when it computed any."""
        if self.entry is None or not self._new:
            return
        indices = torch.cat([i for i, _ in self._new])
        features = torch.cat([f for _, f in self._new])
        self._new = []
        if self._stored is not None:  # a partial file (its run failed mid-epoch): keep its rows, add the others
            fresh = torch.tensor([int(i) not in self._rows for i in indices], dtype=torch.bool)
            indices = torch.cat([torch.tensor(list(self._rows), dtype=torch.long), indices[fresh]])
            features = torch.cat([self._stored[list(self._rows.values())], features[fresh]])
        self.entry.save(self._name, {"indices": indices, "features": features})


# ------------------------------------------------------------------------------------------------ evaluation
def eval_entry(cfg: CfgNode, teacher: torch.nn.Module, device: torch.device) -> CacheEntry:
    """The cache entry of a teacher's test-set features (opened: refused when its content differs)."""
    i = cfg.INPUT
    config = {"teacher": teacher_identity(cfg), **_environment(cfg, device),
              "input": {"SIZE": i.SIZE, "INTERPOLATION": i.INTERPOLATION, "PIXEL_MEAN": i.PIXEL_MEAN,
                        "PIXEL_STD": i.PIXEL_STD},
              "batch": cfg.DATALOADER.TEST.BATCH_SIZE}
    return CacheEntry(cfg.DISTILL.TEACHER_CACHE, "eval", config,
                      {"teacher_weights": weights_fingerprint(_image_tower(teacher))}).open()


class EvalFeatureCache:
    """The teacher's image features of whole test lists (one file per list), for its zero-shot rows and the
    teacher-student agreement; what predictions need from them is in :func:`clipkd.engine.evaluate.predict_half`."""

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry

    def features(self, dataset: ImageListDataset,
                 compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(features [N, D] in list order, labels [N]) of ``dataset``: read, or ``compute()``d and stored."""
        name = f"test-{_digest([[d.relpath, d.label] for d in dataset.items])[:16]}.pt"
        images = images_fingerprint(dataset.items, dataset.paths)
        obj = self.entry.load(name)
        if obj is not None:
            if obj.get("images") != images:
                raise ConfigError(f"DISTILL.TEACHER_CACHE: {self.entry.path / name} holds the teacher's features of "
                                  "images that changed since (size or modification time); delete it (a later run "
                                  "recomputes it)")
            return obj["features"], obj["labels"]
        features, labels = compute()
        self.entry.save(name, {"images": images, "features": features, "labels": labels})
        return features, labels
