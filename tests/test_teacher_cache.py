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

from clipkd.engine.run import Run
from clipkd.engine.teacher_cache import CacheEntry, TeacherFeatures
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
    from clipkd.engine.sweep import build_grid, run_grid

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
