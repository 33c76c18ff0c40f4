"""DISTILL.TEACHER_CACHE: a run that reads the teacher's features from the cache, the run that filled it and a run
without it train the same student bit for bit; a cache of another teacher or other images is refused by name;
concurrent writers never leave a torn file; the teacher's test-set features are cached too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clipkd.runs.run import Run
from clipkd.engine.teacher_features import CacheEntry, TeacherFeatures
from clipkd.errors import ConfigError
from clipkd.fileio import stale_temp_files
from test_train import DATASET_CFG, ROOT, TINY, config, fit


def model(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def step_losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]


def test_cached_runs_are_bit_identical_to_a_run_without_cache(synth_root, tmp_path, teacher_calls):
    cache = tmp_path / "cache"
    plain = fit(config(synth_root, "abkd_promptkd"), tmp_path / "plain")
    assert len(teacher_calls) == 8  # 2 epochs x 4 batches
    teacher_calls.clear()
    cfg = config(synth_root, "abkd_promptkd", "DISTILL.TEACHER_CACHE", str(cache))
    filled = fit(cfg, tmp_path / "fill")
    assert len(teacher_calls) == 8
    teacher_calls.clear()
    reread = fit(cfg, tmp_path / "read")
    assert teacher_calls == []  # the teacher's image tower never ran
    assert plain == filled == reread
    for run in ("fill", "read"):
        a, b = model(tmp_path / "plain"), model(tmp_path / run)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert step_losses(tmp_path / run) == step_losses(tmp_path / "plain")
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("train-")]
    assert sorted(p.name for p in entry.iterdir()) == ["epoch-0001-rank0.pt", "epoch-0002-rank0.pt", "key.json"]
    log = (tmp_path / "read" / "log.txt").read_text()
    assert f"teacher cache {entry}: 2 file(s)" in log and "(8 batches read, 0 computed;" in log
    assert "KB" in log  # the size, in the log
    # a longer run reuses the first two epochs and adds the third
    longer = fit(config(synth_root, "abkd_promptkd", "DISTILL.TEACHER_CACHE", str(cache), "OPTIM.MAX_EPOCH", "3"),
                 tmp_path / "longer")
    assert len(teacher_calls) == 4 and (entry / "epoch-0003-rank0.pt").is_file()
    assert longer == fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "3"), tmp_path / "longer-plain")


def test_a_run_may_resume_with_the_cache_added(synth_root, tmp_path, monkeypatch):
    """The cache changes no result, so a run started without it may be resumed with it (other keys still count)."""
    from test_train import interrupt_after_checkpoint

    full = fit(config(synth_root, "abkd_promptkd"), tmp_path / "full")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(config(synth_root, "abkd_promptkd"), tmp_path / "run")
    undo()
    cached = ["DISTILL.TEACHER_CACHE", str(tmp_path / "cache")]
    with pytest.raises(Exception, match="config differs .* at OPTIM.LR"):
        fit(config(synth_root, "abkd_promptkd", *cached, "OPTIM.LR", "0.5"), tmp_path / "run", resume=True)
    assert fit(config(synth_root, "abkd_promptkd", *cached), tmp_path / "run", resume=True) == full
    a, b = model(tmp_path / "full"), model(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def make_weights(path: Path, seed: int) -> None:
    import open_clip

    from clipkd.models.factory import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    torch.save(open_clip.create_model("clipkd-tiny-teacher").state_dict(), path)


def test_a_cache_of_other_teacher_weights_or_changed_images_is_refused(synth_root, tmp_path, teacher_calls):
    cache, weights = tmp_path / "cache", tmp_path / "teacher.pt"
    make_weights(weights, 0)
    opts = ["DISTILL.TEACHER_CACHE", str(cache), "MODEL.TEACHER.PRETRAINED", str(weights), "OPTIM.MAX_EPOCH", "1"]
    fit(config(synth_root, "abkd_promptkd", *opts), tmp_path / "first")
    (entry,) = cache.iterdir()
    make_weights(weights, 1)  # other weights behind the same file name
    with pytest.raises(ConfigError, match=rf"{entry} holds teacher features of this config that differ from what "
                                          rf"this run computes in: teacher weights .*Delete {entry} \(rm -r"):
        fit(config(synth_root, "abkd_promptkd", *opts), tmp_path / "second")
    assert not (tmp_path / "second").exists()  # refused before the run wrote anything

    make_weights(weights, 0)
    run = Run(config(synth_root, "abkd_promptkd", *opts))
    image = os.path.join(run.data.train.dataset_dir, run.data.train.train[0].relpath)
    stat = os.stat(image)
    try:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a re-copied (maybe other) image
        with pytest.raises(ConfigError, match="differ from what this run computes in: training images"):
            fit(config(synth_root, "abkd_promptkd", *opts), tmp_path / "third")
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    teacher_calls.clear()
    fit(config(synth_root, "abkd_promptkd", *opts), tmp_path / "fourth")  # as before: accepted, and read
    assert teacher_calls == []


def test_a_damaged_or_foreign_cache_file_is_refused_by_name(tmp_path):
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    other = CacheEntry(tmp_path, "train", {"a": 2}, {"b": 2}).open()
    other.save("epoch-0001-rank0.pt", {"indices": torch.arange(2), "features": torch.zeros(2, 3)})
    os.replace(other.path / "epoch-0001-rank0.pt", entry.path / "epoch-0001-rank0.pt")
    with pytest.raises(ConfigError, match="was not written for .*key.json .*delete it"):
        entry.load("epoch-0001-rank0.pt")
    (entry.path / "epoch-0002-rank0.pt").write_bytes(b"torn")
    with pytest.raises(ConfigError, match="epoch-0002-rank0.pt cannot be read .*delete it"):
        entry.load("epoch-0002-rank0.pt")


def test_two_writers_of_one_entry_never_leave_a_torn_file(tmp_path):
    """Two writers of the same epoch file (two runs filling one cache) and a reader at once: every read is whole."""
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    payload = {"indices": torch.arange(4096), "features": torch.randn(4096, 64)}
    errors, reads = [], []

    def writer():
        try:
            same = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()  # another run's view of the entry
            for _ in range(20):
                same.save("epoch-0001-rank0.pt", payload)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        for _ in range(100_000):  # while the writers write, and at least once after
            if reads and not any(t.is_alive() for t in threads[:2]):
                break
            try:
                obj = entry.load("epoch-0001-rank0.pt")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                continue
            if obj is not None:
                reads.append(torch.equal(obj["features"], payload["features"]))

    threads = [threading.Thread(target=writer), threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and reads and all(reads)
    assert stale_temp_files(entry.path) == []


def test_teacher_features_store_what_an_epoch_computed_and_read_it_back(tmp_path):
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    table = torch.randn(10, 4)

    class Tower:
        calls = 0

        def image_features(self, images):
            Tower.calls += 1
            return table[images.long()]

    feats = TeacherFeatures(Tower(), entry)
    feats.begin_epoch(0)
    for batch in ([3, 1], [7, 0]):
        idx = torch.tensor(batch)
        assert torch.equal(feats(idx, idx.float()), table[idx])
    feats.end_epoch()
    again = TeacherFeatures(Tower(), entry)
    again.begin_epoch(0)
    assert torch.equal(again(torch.tensor([7, 0]), torch.zeros(2)), table[[7, 0]]) and Tower.calls == 2
    idx = torch.tensor([5, 3])  # 5 was not in the stored epoch: the batch is computed, then stored too
    assert torch.equal(again(idx, idx.float()), table[idx]) and Tower.calls == 3
    again.end_epoch()
    stored = entry.load("epoch-0001-rank0.pt")
    assert sorted(stored["indices"].tolist()) == [0, 1, 3, 5, 7]
    assert torch.equal(stored["features"], table[stored["indices"]])
    assert (again.read, again.computed) == (1, 1)


def test_two_processes_fill_one_cache_at_once(synth_root, tmp_path):
    """Two `clipkd train` processes fill the same entry concurrently; both finish alike and a third only reads."""
    cache = tmp_path / "cache"
    def args(out: str) -> list[str]:
        return [sys.executable, "-m", "clipkd", "train", "--root", str(synth_root), "--dataset-config", DATASET_CFG,
                "--config", str(ROOT / "configs/methods/abkd_promptkd.yaml"), "--output-dir", str(tmp_path / out),
                *TINY, "DISTILL.TEACHER_CACHE", str(cache)]

    procs = [subprocess.Popen(args(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads((tmp_path / out / "results.json").read_text()) for out in ("a", "b")]
    assert results[0] == results[1]
    third = Run(config(synth_root, "abkd_promptkd", "DISTILL.TEACHER_CACHE", str(cache)), tmp_path / "c", echo=False)
    assert third.fit() == results[0]
    assert "(8 batches read, 0 computed;" in (tmp_path / "c" / "log.txt").read_text()
    (entry,) = [p for p in cache.iterdir()]
    assert stale_temp_files(entry) == []


def test_teacher_test_set_features_are_cached_too(synth_root, tmp_path, teacher_calls):
    plain = Run(config(synth_root, "abkd_promptkd"))
    expected, expected_pred = plain.evaluate(which="teacher"), plain.predict("base", which="teacher")
    teacher_calls.clear()
    cfg = config(synth_root, "abkd_promptkd", "DISTILL.TEACHER_CACHE", str(tmp_path / "cache"))
    first = Run(cfg)
    assert first.evaluate(which="teacher") == expected
    assert teacher_calls  # computed once, and stored
    teacher_calls.clear()
    again = Run(cfg)  # another process, as far as the cache knows
    assert again.evaluate(which="teacher") == expected
    assert torch.equal(again.predict("base", which="teacher"), expected_pred)  # the agreement's reference
    assert teacher_calls == []
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith("eval-") and len(list(entry.glob("test-*.pt"))) == 2  # base and new


def test_a_fused_sweep_fills_the_cache_that_a_separate_run_reads(synth_root, tmp_path, teacher_calls):
    from clipkd.runs.sweep import build_grid, run_grid

    cache = tmp_path / "cache"
    opts = [*TINY, "OPTIM.MAX_EPOCH", "1", "DISTILL.TEACHER_CACHE", str(cache)]
    grid = build_grid(ROOT / "configs/methods/abkd_promptkd.yaml", "dtd", "0.5:1:0.5", "0:0:1", [1],
                      tmp_path / "sweep", opts)
    assert run_grid(grid, str(synth_root), fused=True).lines()[0].startswith("sweep: 2 done")
    assert len(teacher_calls) == 4  # one epoch of 4 batches, once for both cells
    teacher_calls.clear()
    cell = grid.cells[1]
    alone = Run(grid.config(cell, str(synth_root)), tmp_path / "alone", echo=False).fit()
    assert teacher_calls == [] and alone == json.loads((cell.out / "results.json").read_text())
    assert "(4 batches read, 0 computed;" in (tmp_path / "alone" / "log.txt").read_text()
    assert "(0 batches read, 4 computed;" in (cell.out / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------ hardening (issue 16)
class Tower:
    """A stand-in teacher whose features of image i are row i of a fixed table."""

    def __init__(self) -> None:
        self.table = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))

    def image_features(self, images):
        return self.table[images.long()]


def fill(entry: CacheEntry, epoch: int, rank: int = 0, indices: tuple[int, ...] = ()) -> None:
    feats = TeacherFeatures(Tower(), entry, rank=rank)
    feats.begin_epoch(epoch)
    idx = torch.tensor(indices or [epoch, epoch + 1])
    feats(idx, idx.float())
    feats.end_epoch()


def test_an_epoch_or_rank_file_copied_over_another_is_refused(tmp_path):
    """Files are stamped with their (entry, epoch, rank): a copy is refused by name, never read as the other."""
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    for epoch, rank in ((0, 0), (1, 0), (0, 1)):
        fill(entry, epoch, rank)
    for source, target, epoch, rank in (("epoch-0001-rank0.pt", "epoch-0002-rank0.pt", 1, 0),
                                        ("epoch-0001-rank0.pt", "epoch-0001-rank1.pt", 0, 1)):
        (entry.path / target).write_bytes((entry.path / source).read_bytes())
        feats = TeacherFeatures(Tower(), entry, rank=rank)
        with pytest.raises(ConfigError) as err:
            feats.begin_epoch(epoch)
        msg = str(err.value)
        assert "\n" not in msg and str(entry.path / target) in msg and source in msg
        assert f"delete it (or its folder {entry.path}" in msg and "DISTILL.TEACHER_CACHE" in msg
    assert entry.load("epoch-0001-rank0.pt") is not None  # the original still reads


def test_the_fingerprint_covers_every_value_of_every_parameter_and_buffer():
    from clipkd.engine.teacher_features import weights_fingerprint

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(10_000))
            self.register_buffer("mask", torch.zeros(50), persistent=False)  # not in state_dict

    tower = Tower()
    before = weights_fingerprint(tower)
    with torch.no_grad():
        tower.w[1] = 1e-30  # between the old strided sample's elements (0, 2, 4, ...)
    assert weights_fingerprint(tower) != before
    with torch.no_grad():
        tower.w[1] = 0
    assert weights_fingerprint(tower) == before
    tower.mask[7] = 1
    assert weights_fingerprint(tower) != before


class NotTensors:
    """What a malicious or foreign pickle may hold: an object of a class clipkd never unpickles."""


def damaged_file(tmp_path, content):
    """A cache entry and its epoch-1 file, torn or holding an object clipkd never unpickles."""
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    path = entry.path / "epoch-0001-rank0.pt"
    if content == "torn":
        fill(entry, 0)
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save({"key": entry.key, "features": NotTensors()}, path)
    return entry, path


@pytest.mark.parametrize("content", ["torn", "pickle"])
def test_a_damaged_or_malicious_cache_file_never_suggests_the_unsafe_load(tmp_path, content):
    entry, path = damaged_file(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        entry.load(path.name)
    msg = str(err.value)
    assert "\n" not in msg and "weights_only" not in msg and "succeed" not in msg
    assert str(path) in msg and "it is damaged or not a clipkd cache file; delete it" in msg


def test_stale_temp_files_are_removed_when_no_run_has_the_entry_open(tmp_path):
    """A run holds its entry (a shared lock on the folder) while it may write: temp files are removed only when
    no other run holds it, so a live writer's temp file is never touched."""
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    stale = [entry.path / ".key.json.abc123.tmp", entry.path / ".epoch-0001-rank0.pt.x7y8.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    live = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()  # another run, entry still open
    assert all(p.exists() for p in stale)
    entry.close()
    live.close()
    again = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    assert stale_temp_files(again.path) == [] and (again.path / "key.json").is_file()
    fill(again, 0)
    assert again.load("epoch-0001-rank0.pt") is not None


def full_disk(monkeypatch) -> None:
    """torch.save failing as it does on a full disk: a RuntimeError (not an OSError) after a partial write."""

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_names_the_cache_file_and_loses_nothing(tmp_path, monkeypatch):
    from clipkd.errors import ClipkdError

    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    fill(entry, 0)
    before = (entry.path / "epoch-0001-rank0.pt").read_bytes()
    full_disk(monkeypatch)
    for epoch in (0, 1):  # over an existing file (adding rows 5, 6), and a new one
        with pytest.raises(ClipkdError) as err:
            fill(entry, epoch, indices=(5, 6))
        msg = str(err.value)
        assert "\n" not in msg and str(entry.path / f"epoch-000{epoch + 1}-rank0.pt") in msg
        assert "DISTILL.TEACHER_CACHE" in msg and "--output-dir" not in msg and "space" in msg
    assert (entry.path / "epoch-0001-rank0.pt").read_bytes() == before
    assert not (entry.path / "epoch-0002-rank0.pt").exists() and stale_temp_files(entry.path) == []
    monkeypatch.undo()
    assert torch.equal(entry.load("epoch-0001-rank0.pt")["features"], Tower().table[[0, 1]])


def test_an_unwritable_cache_names_distill_teacher_cache_not_the_output_dir(tmp_path, monkeypatch):
    from clipkd.errors import ClipkdError
    import clipkd.fileio as fileio

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ClipkdError) as err:  # DISTILL.TEACHER_CACHE names a file
        CacheEntry(blocker, "train", {"a": 1}, {"b": 2}).open()
    msg = str(err.value)
    assert "\n" not in msg and str(blocker) in msg and "DISTILL.TEACHER_CACHE" in msg and "--output-dir" not in msg

    entry = CacheEntry(tmp_path / "cache", "train", {"a": 1}, {"b": 2}).open()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    with pytest.raises(ClipkdError) as err:
        fill(entry, 0)
    msg = str(err.value)
    assert "\n" not in msg and str(entry.path / "epoch-0001-rank0.pt") in msg and "Read-only" in msg
    assert "DISTILL.TEACHER_CACHE" in msg and "--output-dir" not in msg


def test_a_run_stopped_by_a_full_cache_disk_keeps_its_checkpoint_and_cache(synth_root, tmp_path, monkeypatch):
    from clipkd.errors import ClipkdError

    cache = tmp_path / "cache"
    cfg = config(synth_root, "abkd_promptkd", "DISTILL.TEACHER_CACHE", str(cache))
    real = TeacherFeatures.end_epoch

    def second_epoch_full(self):
        with monkeypatch.context() as patch:
            if self._name.startswith("epoch-0002"):  # only the cache's write fails, not the checkpoints'
                full_disk(patch)
            real(self)

    monkeypatch.setattr(TeacherFeatures, "end_epoch", second_epoch_full)
    with pytest.raises(ClipkdError, match=r"DISTILL\.TEACHER_CACHE: cannot write .*epoch-0002-rank0\.pt"):
        fit(cfg, tmp_path / "run")
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["epoch-0001-rank0.pt", "key.json"]
    assert fit(cfg, tmp_path / "run", resume=True) == fit(config(synth_root, "abkd_promptkd"), tmp_path / "plain")


@pytest.mark.parametrize("content", ["torn", "pickle"])
def test_a_cache_files_read_failure_is_told_as_a_checkpoints_is(tmp_path, content):
    """One rule says why torch.load refused a file: the teacher cache's message gives load_error_cause's words."""
    from clipkd.models.state import load_error_cause

    entry, path = damaged_file(tmp_path, content)
    with pytest.raises(Exception) as refused:
        torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(ConfigError) as err:
        entry.load(path.name)
    assert f"cannot be read ({load_error_cause(refused.value)}): it is damaged" in str(err.value)



def test_a_run_writing_the_key_holds_the_entry(tmp_path, monkeypatch):
    """A run that opens an entry while another run is writing its key.json must not take that write's temp file
    for a killed one (it once did under load: the first run then failed with 'cannot write ...key.json')."""
    import clipkd.engine.teacher_features as tf
    from clipkd.fileio import atomic_write

    first = []

    def key_write_meets_another_run(path, text):  # noqa: ANN001
        def write(f):  # noqa: ANN001
            f.write(text.encode("utf-8"))
            if not first:  # while the first run's temp file exists, a second run opens the entry
                first.append(stale_temp_files(Path(path).parent))
                CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open().close()
        atomic_write(path, write)

    monkeypatch.setattr(tf, "atomic_write_text", key_write_meets_another_run)
    entry = CacheEntry(tmp_path, "train", {"a": 1}, {"b": 2}).open()
    assert first and first[0]  # the temp file existed when the second run opened the entry
    assert json.loads((entry.path / "key.json").read_text())["config"]["a"] == 1
    entry.close()
