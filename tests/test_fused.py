"""Fused sweeps (``clipkd sweep --fused``): every cell equals the same cell run alone, the teacher runs once per
batch for the whole group, and resume, skip and failure stay per cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipkd.cli.main import main
from clipkd.runs.fused import group_cells, stream_key
from clipkd.runs.run import Run
from clipkd.runs.sweep import build_grid, run_grid
from test_train import ROOT, TINY, interrupt_after_checkpoint

METHOD = str(ROOT / "configs/methods/abkd_promptkd.yaml")
OPTS = [*TINY, "OPTIM.MAX_EPOCH", "2"]


def alone(grid, cell, root, folder: Path) -> dict:
    return Run(grid.config(cell, str(root)), folder, echo=False).fit()


def state(folder: Path) -> dict:
    return torch.load(folder / "model.pt", weights_only=True)["state_dict"]


def lines(folder: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == kind]


def cells_equal_alone(grid, root, tmp_path: Path, cells=None) -> None:
    """Each fused cell of ``grid`` (run under ``tmp_path / "sweep"``) writes what the cell run alone writes."""
    for cell in grid.cells if cells is None else cells:
        single = tmp_path / "alone" / cell.out.relative_to(tmp_path / "sweep")
        alone(grid, cell, root, single)
        assert_same_cell(cell.out, single)


def assert_same_cell(fused: Path, single: Path) -> None:
    """What a separate run writes, a fused cell writes: the same files, model, metrics and results."""
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*"))  # noqa: E731
    assert files(fused) == files(single)
    a, b = state(fused), state(single)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert json.loads((fused / "results.json").read_text()) == json.loads((single / "results.json").read_text())
    assert lines(fused, "step") == lines(single, "step") and lines(fused, "results") == lines(single, "results")
    configs = [[x for x in (p / "config.yaml").read_text().splitlines() if not x.startswith("OUTPUT_DIR")]
               for p in (fused, single)]
    assert configs[0] == configs[1]


def test_fused_cells_equal_the_cells_alone_and_share_one_teacher_forward(synth_root, tmp_path, monkeypatch,
                                                                          teacher_calls):
    calls = teacher_calls
    import clipkd.runs.fused as student_mod  # where the fused sweep looks build_student up

    builds, real_build = [], student_mod.build_student
    monkeypatch.setattr(student_mod, "build_student", lambda cfg, *a, **k: builds.append(1) or real_build(cfg, *a, **k))
    # 3 (alpha, beta) cells x 2 student types (PromptKD, IVLP: two student builds, each copied) = 6 cells
    grid = build_grid(METHOD, "dtd", "0.5:1:0.5", "0:0.5:0.5", [1], tmp_path / "sweep", OPTS,
                      vary=[("MODEL.STUDENT.TYPE", "promptkd,ivlp")])
    cells = grid.cells[:3] + grid.cells[-3:]
    grid.cells = cells
    assert len(group_cells([grid.config(c, str(synth_root)) for c in cells])) == 1
    summary = run_grid(grid, str(synth_root), fused=True)
    assert summary.lines()[0] == "sweep: 6 done, 0 skipped (finished before), 0 failed"
    fused_batches = len(calls)
    assert fused_batches == 2 * 4  # 2 epochs x 16 images / batch 4: once per batch, not once per cell
    assert len(builds) == 2  # one PromptKD and one IVLP student built; the other cells got copies
    calls.clear()
    for cell in cells:
        alone(grid, cell, synth_root, tmp_path / "alone" / cell.out.relative_to(tmp_path / "sweep"))
        assert_same_cell(cell.out, tmp_path / "alone" / cell.out.relative_to(tmp_path / "sweep"))
    assert len(calls) == len(cells) * fused_batches
    first = state(cells[0].out)
    assert all(any(not torch.equal(first[k], state(c.out)[k]) for k in first) for c in cells[1:3])  # own students


def test_stream_key_groups_what_shares_the_stream(synth_root):
    i = TINY.index("OPTIM.MAX_EPOCH")  # swept here, so not also set in the overrides
    grid = build_grid(METHOD, "dtd", "0.5:1:0.5", "0:0:1", [1, 2], Path("/unused"), TINY[:i] + TINY[i + 2:],
                      vary=[("OPTIM.MAX_EPOCH", "1,2")])
    configs = [grid.config(c, str(synth_root)) for c in grid.cells]
    groups = group_cells(configs)
    assert len(groups) == 2  # by seed; alpha, beta and the number of epochs are the students' own
    assert all(len({configs[i].SEED for i in g}) == 1 and len(g) == 4 for g in groups)
    base = configs[0]
    for key, value in (("DATALOADER.TRAIN_X.BATCH_SIZE", 8), ("INPUT.FLIP_PROB", 0.0), ("DATASET.NUM_SHOTS", 2),
                       ("DISTILL.PROTOCOL", "transductive"), ("MODEL.TEACHER.NAME", "ViT-B-16")):
        other = base.clone()
        other.defrost()
        section, name = key.rsplit(".", 1)
        node = other
        for part in section.split("."):
            node = node[part]
        node[name] = value
        assert stream_key(other) != stream_key(base), key


def test_fused_sweep_resumes_each_cell_from_its_own_epoch(synth_root, tmp_path, monkeypatch, capsys):
    """Killed mid-group: cells stopped at different epochs resume together, each from its own last.pt; a cell
    finished before is skipped; every cell ends exactly where it ends alone."""
    args = ["sweep", "--fused", "--alpha", "0.5:2:0.5", "--beta", "0:0:1", "--dataset", "dtd", "--root",
            str(synth_root), "--config", METHOD, "--output", str(tmp_path / "sweep"), *OPTS]
    grid = build_grid(METHOD, "dtd", "0.5:2:0.5", "0:0:1", [1], tmp_path / "sweep", OPTS)
    cells = {c.out.parent.name: c for c in grid.cells}
    alone(grid, cells["a2_b0"], synth_root, cells["a2_b0"].out)  # finished before the sweep
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1, inside=str(cells["a1_b0"].out))
    assert main(args) == 130  # stopped right after a1_b0 saved epoch 1: a0.5_b0 at epoch 1, a1.5_b0 at 0
    epochs = {name: torch.load(c.out / "checkpoints/last.pt", weights_only=False)["epoch"]
              if (c.out / "checkpoints/last.pt").is_file() else 0 for name, c in cells.items()}
    assert epochs == {"a0.5_b0": 1, "a1_b0": 1, "a1.5_b0": 0, "a2_b0": 2}
    undo()
    capsys.readouterr()
    assert main(args) == 0
    assert "3 done, 1 skipped (finished before), 0 failed" in capsys.readouterr().out
    for name, cell in cells.items():
        single = tmp_path / "alone" / name
        alone(grid, cell, synth_root, single)
        a, b = state(cell.out), state(single)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert json.loads((cell.out / "results.json").read_text()) == json.loads((single / "results.json").read_text())
        assert lines(cell.out, "step") == lines(single, "step"), name
    assert "resumed from" in (cells["a1_b0"].out / "log.txt").read_text()


def test_a_failing_cell_drops_out_of_the_group_and_the_others_finish(synth_root, tmp_path, monkeypatch):
    """A cell whose folder is taken and cells whose loss turns non-finite fail alone; the sweep names them."""
    import clipkd.methods.kd  # where the KD objective looks its loss builder up

    real = clipkd.methods.kd.build_distill_loss_from_cfg

    def poisoned(cfg):  # the DISTILL.TEMPERATURE 2 cells' loss turns NaN in epoch 2
        fn, calls = real(cfg), []

        def loss(s, t, **kw):
            calls.append(1)
            return fn(s, t, **kw) * (float("nan") if cfg.DISTILL.TEMPERATURE == 2 and len(calls) > 5 else 1.0)
        return loss

    monkeypatch.setattr(clipkd.methods.kd, "build_distill_loss_from_cfg", poisoned)
    out = tmp_path / "sweep"
    grid = build_grid(METHOD, "dtd", "0.5:1:0.5", "0:0:1", [1], out, OPTS, vary=[("DISTILL.TEMPERATURE", "1,2")])
    blocked = grid.cells[1].out
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("not a run")
    summary = run_grid(grid, str(synth_root), fused=True)
    failed = dict(summary.failed)
    assert len(summary.done) == 1 and len(failed) == 3, summary.lines()
    assert "is not empty" in failed[blocked]
    assert all("non-finite loss" in reason for path, reason in failed.items() if path != blocked)
    assert (blocked / "notes.txt").read_text() == "not a run"
    assert sorted(p.name for p in blocked.iterdir()) == ["notes.txt"]
    assert (summary.done[0] / "results.json").is_file()
    for path in failed:
        if path != blocked:  # stopped at epoch 2: its epoch-1 checkpoint is kept, no results
            assert torch.load(path / "checkpoints/last.pt", weights_only=False)["epoch"] == 1
            assert not (path / "results.json").exists()


def test_fit_fused_refuses_runs_of_different_streams(synth_root, tmp_path):
    from clipkd.runs.fused import fit_fused

    grid = build_grid(METHOD, "dtd", "0.5:0.5:1", "0:0:1", [1, 2], tmp_path, OPTS)
    runs = [Run(grid.config(c, str(synth_root)), c.out) for c in grid.cells]
    with pytest.raises(ValueError, match="do not share one data stream"):
        fit_fused(runs, [False, False])
    assert not any(tmp_path.iterdir())


def test_a_fused_group_evaluates_in_one_pass_over_each_test_split(synth_root, tmp_path, monkeypatch, teacher_calls):
    """The group's lists are prepared once and each test image decoded and transformed once for all K students
    (not once per cell), the teacher's test forward is not run at all (a PromptKD student's classifier is the
    teacher's class embeddings), and the cells still score exactly as alone."""
    import clipkd.data.loaders as loaders
    from clipkd.data.rundata import prepare_data

    loaded: list[str] = []
    real = loaders.load_image
    monkeypatch.setattr(loaders, "load_image", lambda path: loaded.append(path) or real(path))
    grid = build_grid(METHOD, "dtd", "0.5:1.5:0.5", "0:0:1", [1], tmp_path / "sweep", OPTS)
    assert len(grid.cells) == 3
    data = prepare_data(grid.config(grid.cells[0], str(synth_root)))
    test_paths = [str(Path(split.dataset_dir) / d.relpath) for split in data.halves.values() for d in split.test]
    assert test_paths and len(set(test_paths)) == len(test_paths)
    import clipkd.runs.run as run_mod

    prepared = []
    monkeypatch.setattr(run_mod, "prepare_data", lambda cfg: prepared.append(1) or prepare_data(cfg))
    summary = run_grid(grid, str(synth_root), fused=True)
    assert len(summary.done) == 3, summary.lines()
    assert sorted(p for p in loaded if p in set(test_paths)) == sorted(test_paths)  # each test image once
    assert len(prepared) == 1  # the group's lists, prepared once
    assert len(teacher_calls) == 2 * 4  # the training batches only
    cell = grid.cells[1]
    single = tmp_path / "alone" / cell.out.name
    alone(grid, cell, synth_root, single)
    assert json.loads((cell.out / "results.json").read_text()) == json.loads((single / "results.json").read_text())


def test_fused_students_share_the_frozen_clip_weights_and_nothing_they_train(synth_root, tmp_path, monkeypatch):
    """A fused cell's student is a copy of the group's first one: its frozen CLIP tensors are the same tensors
    (K students of a ViT-B/16 do not hold K copies of it, nor pay K copies' time), its prompts and projector
    (weights and BatchNorm statistics) are its own."""
    from clipkd.runs.fused import fit_fused

    grid = build_grid(METHOD, "dtd", "0.5:1:0.5", "0:0:1", [1], tmp_path / "sweep", OPTS)
    runs = [Run(grid.config(c, str(synth_root)), c.out, echo=False) for c in grid.cells]
    students = []
    real = Run.open

    def spy(self, *a, **k):
        training = real(self, *a, **k)
        students.append(self.student)
        return training

    monkeypatch.setattr(Run, "open", spy)
    outcomes = fit_fused(runs, [False, False])
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    a, b = (dict(s.named_parameters()) for s in students)
    frozen = [k for k, p in a.items() if not p.requires_grad]
    trained = [k for k, p in a.items() if p.requires_grad]
    assert frozen and trained
    assert all(a[k] is b[k] for k in frozen)
    assert all(a[k].data_ptr() != b[k].data_ptr() for k in trained)
    bufs = [dict(s.projector.named_buffers()) for s in students]
    assert bufs[0] and all(bufs[0][k].data_ptr() != bufs[1][k].data_ptr() for k in bufs[0])


def test_a_fused_group_opens_its_teacher_cache_entry_once(synth_root, tmp_path, monkeypatch, teacher_calls):
    """The training stream's cache entry (fingerprints of every teacher weight and every training image) is the
    same for all cells of a group: it is made once, not once per cell, and every cell logs it."""
    import clipkd.runs.run as tc  # where a run looks train_entry up

    opened, real = [], tc.train_entry
    monkeypatch.setattr(tc, "train_entry", lambda *a, **k: opened.append(1) or real(*a, **k))
    grid = build_grid(METHOD, "dtd", "0.5:1.5:0.5", "0:0:1", [1], tmp_path / "sweep",
                      [*OPTS, "DISTILL.TEACHER_CACHE", str(tmp_path / "cache")])
    assert run_grid(grid, str(synth_root), fused=True).lines()[0].startswith("sweep: 3 done")
    assert len(opened) == 1 and len(teacher_calls) == 2 * 4
    assert all(f"teacher cache {tmp_path / 'cache' / 'train-'}" in (c.out / "log.txt").read_text() for c in grid.cells)


def test_a_cell_whose_evaluation_fails_fails_alone(synth_root, tmp_path, monkeypatch):
    """The shared test pass isolates failures as training does: one student that cannot be scored fails its
    cell (model.pt kept, no results.json) and the others get their results."""
    grid = build_grid(METHOD, "dtd", "0.5:1.5:0.5", "0:0:1", [1], tmp_path / "sweep", OPTS)
    real = Run.model

    class Broken:
        def __init__(self, model):
            self.model = model

        def eval(self):
            return self.model.eval()

        def text_features(self, classnames):
            return self.model.text_features(classnames)

        def image_features(self, images):
            raise RuntimeError("boom")

    def model(self, which="final"):
        m = real(self, which)
        return Broken(m) if self.cfg.DISTILL.ALPHA == 1.0 else m

    monkeypatch.setattr(Run, "model", model)
    summary = run_grid(grid, str(synth_root), fused=True)
    broken = next(c.out for c in grid.cells if c.out.parent.name == "a1_b0")
    assert dict(summary.failed) == {broken: "RuntimeError: boom"} and len(summary.done) == 2
    assert (broken / "model.pt").is_file() and not (broken / "results.json").exists()
    assert all((p / "results.json").is_file() for p in summary.done)


def test_a_fused_group_records_its_lists_once(synth_root, tmp_path, monkeypatch):
    """inputs.json's record of the lists (a stat of every image) is made once per group and written by every
    cell, the same record a cell run alone writes."""
    import clipkd.runs.inputs as inputs_mod

    made, real = [], inputs_mod._list_record
    monkeypatch.setattr(inputs_mod, "_list_record", lambda split: made.append(1) or real(split))
    grid = build_grid(METHOD, "dtd", "0.5:1.5:0.5", "0:0:1", [1], tmp_path / "sweep", OPTS)
    assert run_grid(grid, str(synth_root), fused=True).lines()[0].startswith("sweep: 3 done")
    assert len(made) == 2  # base and new, once for the three cells
    records = [json.loads((c.out / "inputs.json").read_text()) for c in grid.cells]
    assert all(r == records[0] for r in records)
    cell = grid.cells[0]
    alone(grid, cell, synth_root, tmp_path / "alone")
    assert json.loads((tmp_path / "alone" / "inputs.json").read_text()) == records[0]
