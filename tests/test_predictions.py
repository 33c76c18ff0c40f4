"""Per-image predictions (predictions.npz beside results.json, issue 19 item 1): written by every run and every
cross-dataset evaluation, consistent with results.json to the last bit, the statistics restated from the model's
logits, and a tampered file refused by the reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from clipkd.data.loaders import ImageListDataset, build_transform
from clipkd.engine.evaluate import _image_statistics
from clipkd.errors import ClipkdError
from clipkd.reports.predictions import read_predictions
from clipkd.runs.run import Run
from clipkd.runs.sweep import build_grid, run_grid
from clipkd.runs.transfer import evaluate_transfer, target_overrides
from test_train import ROOT, TINY, config, fit

ONE_EPOCH = ["OPTIM.MAX_EPOCH", "1"]
TEACHER = ["TEST.TEACHER_PREDICTIONS", "True"]


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory) -> Path:
    """A PromptKD-style run with a teacher, its teacher's predictions recorded."""
    out = tmp_path_factory.mktemp("preds") / "run"
    fit(config(synth_root, "abkd_promptkd", *ONE_EPOCH, *TEACHER), out)
    return out


def check_against_results(folder: Path, halves: tuple[str, ...], teacher: bool) -> dict:
    results = json.loads((folder / "results.json").read_text())
    preds = read_predictions(folder)
    assert tuple(preds) == halves
    for half in halves:
        a, m = preds[half], results[half]
        assert a["label"].dtype == a["pred"].dtype == np.int32 and a["prob"].dtype == np.float32
        assert len(a["label"]) == m["n"] > 0
        assert 100.0 * float((a["pred"] == a["label"]).sum()) / len(a["label"]) == m["accuracy"]  # exactly
        f1 = 100.0 * f1_score(a["label"], a["pred"], labels=list(range(int(a["label"].max()) + 1)), average="macro",
                              zero_division=0)
        assert f1 == pytest.approx(m["macro_f1"], abs=1e-9)
        assert (TEACHER_PRED_NAME in a) == teacher
        assert np.all((a["prob"] >= 0) & (a["prob"] <= a["confidence"] + 1e-6) & (a["confidence"] <= 1 + 1e-6))
    return preds


TEACHER_PRED_NAME = "teacher_pred"


def test_a_run_writes_each_halfs_predictions_as_results_json_counts_them(trained):
    preds = check_against_results(trained, ("base", "new"), teacher=True)
    again = Run.load(trained, echo=False)
    for half in ("base", "new"):  # the file's predictions are the run's, and the teacher's the teacher's
        assert np.array_equal(preds[half]["pred"], again.predict(half).numpy())
        assert np.array_equal(preds[half]["teacher_pred"], again.predict(half, which="teacher").numpy())
        assert np.all(preds[half]["top5_out"] == 0)  # 4 base, 3 new classes: nothing outside the top 5


def test_no_teacher_pred_without_a_teacher_or_unasked(synth_root, tmp_path):
    fit(config(synth_root, "ivlp", *ONE_EPOCH, *TEACHER), tmp_path / "ivlp")  # CE only: no teacher is built
    check_against_results(tmp_path / "ivlp", ("base", "new"), teacher=False)
    fit(config(synth_root, "abkd_promptkd", *ONE_EPOCH), tmp_path / "kd")  # a teacher, not asked for
    check_against_results(tmp_path / "kd", ("base", "new"), teacher=False)


def test_a_cross_dataset_evaluation_writes_its_predictions_and_the_statistics_restate(trained, synth_root):
    results, path = evaluate_transfer(trained, "dtd", ["DATASET.ROOT", str(synth_root)])
    preds = check_against_results(path.parent, ("all",), teacher=True)["all"]
    assert (trained / "eval" / "dtd" / "predictions.npz").is_file()
    # restated from the model's logits: 7 classes, so the mass outside the top 5 is not zero
    run = Run.load(trained, ["DATASET.ROOT", str(synth_root), *target_overrides(Run.load(trained).cfg, "dtd")],
                   echo=False)
    model, split = run.model().eval(), run.data.halves["all"]
    data = ImageListDataset(split.test, split.dataset_dir, build_transform(run.cfg, is_train=False))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        feats, classes = model.image_features(images).double(), model.text_features(split.classnames).double()
    logits = model.logit_scale * feats @ classes.t()
    p = torch.softmax(logits, dim=-1)
    assert np.array_equal(preds["label"], labels.numpy())
    np.testing.assert_allclose(preds["prob"], p[torch.arange(len(p)), labels].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(preds["confidence"], p.max(dim=-1).values.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(preds["entropy"], -(p * p.log()).sum(dim=-1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(preds["top5_out"], 1 - p.topk(5, dim=-1).values.sum(dim=-1).numpy(), atol=1e-5)
    assert preds["top5_out"].max() > 0


def test_image_statistics_are_the_softmax_at_the_scale():
    cosine = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)) / 3
    labels = torch.tensor([0, 3, 8, 2, 2, 5])
    stats = _image_statistics(cosine, labels, 50.0)
    p = torch.softmax(50.0 * cosine.double(), dim=-1)
    close = dict(rtol=1e-5, atol=1e-6)  # float32 against float64
    torch.testing.assert_close(stats["prob"].double(), p[torch.arange(6), labels], **close)
    torch.testing.assert_close(stats["confidence"].double(), p.max(dim=-1).values, **close)
    torch.testing.assert_close(stats["entropy"].double(), -(p * p.log()).sum(dim=-1), **close)
    torch.testing.assert_close(stats["top5_out"].double(), p.sort(dim=-1).values[:, :4].sum(dim=-1), **close)


def test_a_tampered_or_missing_file_is_refused_naming_it(trained, tmp_path):
    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "eval", "*.pt"))
        return folder

    changed = copy("changed")
    with np.load(changed / "predictions.npz") as f:
        arrays = {k: f[k] for k in f.files}
    original = arrays["base.pred"][0]
    label = arrays["base.label"][0]
    arrays["base.pred"][0] = (label + 1) % 4 if original == label else label  # one image's correctness flips
    np.savez_compressed(changed / "predictions.npz", **arrays)
    with pytest.raises(ClipkdError, match=r"predictions\.npz does not hold this run's predictions.*base accuracy"):
        read_predictions(changed)
    short = copy("short")
    arrays["base.pred"][0] = original
    arrays["new.prob"] = arrays["new.prob"][:-1]
    np.savez_compressed(short / "predictions.npz", **arrays)
    with pytest.raises(ClipkdError, match=r"new\.prob has shape \(23,\)"):
        read_predictions(short)
    cut = copy("cut")
    data = (cut / "predictions.npz").read_bytes()
    (cut / "predictions.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipkdError, match=f"{cut / 'predictions.npz'} does not hold .* cannot be read"):
        read_predictions(cut)
    missing = copy("missing")
    (missing / "predictions.npz").unlink()
    with pytest.raises(ClipkdError, match="predictions.npz not found"):
        read_predictions(missing)
    assert len(str(pytest.raises(ClipkdError, read_predictions, cut).value).splitlines()) == 1


def test_a_fused_sweep_writes_each_cells_predictions_as_the_cell_alone(synth_root, tmp_path):
    method = str(ROOT / "configs/methods/abkd_promptkd.yaml")
    grid = build_grid(method, "dtd", "0.5:1:0.5", "0:0:1", [1], tmp_path / "sweep", [*TINY, *ONE_EPOCH, *TEACHER])
    assert run_grid(grid, str(synth_root), fused=True).lines()[0].startswith("sweep: 2 done")
    for cell in grid.cells:
        single = tmp_path / "alone" / cell.out.relative_to(tmp_path / "sweep")
        Run(grid.config(cell, str(synth_root)), single, echo=False).fit()
        fused, alone = read_predictions(cell.out), read_predictions(single)
        for half in ("base", "new"):
            assert set(fused[half]) == set(alone[half]) and "teacher_pred" in fused[half]
            for name in ("label", "pred", "teacher_pred"):
                assert np.array_equal(fused[half][name], alone[half][name]), (half, name)
            for name in ("prob", "confidence", "entropy"):
                np.testing.assert_allclose(fused[half][name], alone[half][name], atol=1e-5)
