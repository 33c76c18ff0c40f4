"""``clipkd analyze`` (issue 19 item 7): its numbers restated independently from the raw arrays of each run's
predictions.npz, ECE by hand and as a property, seed means, and the refusals (no runs, no file, a stale file)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipkd.cli.main import main
from clipkd.reports.analyze import bin_index, expected_calibration_error

CLASSES = 12


def write_run(folder: Path, seed: int, sharpness: float, teacher: bool = True, n: int = 120) -> None:
    """A run folder as a run leaves it, as far as analyze reads it: results.json and a predictions.npz that
    matches it (the writer's format: int32 label/pred, float32 statistics of a softmax)."""
    rng = np.random.default_rng(seed * 1000 + int(10 * sharpness))
    arrays: dict[str, np.ndarray] = {"format": np.array(1)}
    results: dict = {}
    for half in ("base", "new"):
        labels = rng.integers(0, CLASSES, n)
        logits = rng.normal(size=(n, CLASSES))
        logits[np.arange(n), labels] += 1.5
        p = np.exp(sharpness * logits)
        p /= p.sum(axis=1, keepdims=True)
        pred = p.argmax(axis=1)
        top = np.sort(p, axis=1)[:, ::-1]
        stats = {"label": labels, "pred": pred, "prob": p[np.arange(n), labels], "confidence": top[:, 0],
                 "entropy": -(p * np.log(p)).sum(axis=1), "top5_out": 1 - top[:, :5].sum(axis=1)}
        for name, value in stats.items():
            arrays[f"{half}.{name}"] = value.astype(np.int32 if name in ("label", "pred") else np.float32)
        if teacher:
            arrays[f"{half}.teacher_pred"] = np.where(rng.random(n) < 0.7, labels, pred).astype(np.int32)
        results[half] = {"accuracy": 100.0 * float((pred == labels).sum()) / n, "macro_f1": 0.0, "n": n}
    results["hm"] = 0.0
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    np.savez_compressed(folder / "predictions.npz", **arrays)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for method, sharpness in (("kd", 1.0), ("abkd", 2.5)):
        for seed in (1, 2, 3):
            write_run(tmp_path / method / "toy" / f"seed{seed}", seed, sharpness)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["analyze", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def ece_by_hand(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """ECE written out bin by bin: bins (lo, hi], a confidence of 0 in the first."""
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        inside = (conf > lo) & (conf <= hi) | ((i == 0) & (conf <= 0))
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def check_restated(entry: dict, bins: int) -> None:
    """Every number of one --no-mean json entry equals what the raw arrays of its predictions.npz say."""
    with np.load(Path(entry["path"]) / "predictions.npz") as f:
        raw = {k: f[k] for k in f.files}
    for half in ("base", "new"):
        got = entry["halves"][half]
        label, pred = raw[f"{half}.label"], raw[f"{half}.pred"]
        conf = raw[f"{half}.confidence"].astype(np.float64)
        correct = (label == pred).astype(np.float64)
        assert got["n"] == len(label) and got["runs"] == 1 and got["std"]["accuracy"] is None
        assert got["accuracy"] == pytest.approx(100 * correct.mean())
        assert got["confidence"] == pytest.approx(100 * conf.mean())
        assert got["p_label"] == pytest.approx(100 * raw[f"{half}.prob"].astype(np.float64).mean())
        assert got["entropy"] == pytest.approx(raw[f"{half}.entropy"].astype(np.float64).mean())
        assert got["top5_out"] == pytest.approx(100 * raw[f"{half}.top5_out"].astype(np.float64).mean())
        assert got["agreement"] == pytest.approx(100 * (pred == raw[f"{half}.teacher_pred"]).mean())
        assert got["ece"] == pytest.approx(100 * ece_by_hand(conf, correct, bins))
        rel = got["reliability"]
        assert rel["edges"] == pytest.approx(np.linspace(0, 1, bins + 1))
        assert sum(rel["count"]) == len(label)
        for i, count in enumerate(rel["count"]):
            inside = (conf > i / bins) & (conf <= (i + 1) / bins)
            assert count == inside.sum()
            if count:
                assert rel["accuracy"][i] == pytest.approx(100 * correct[inside].mean())
                assert rel["confidence"][i] == pytest.approx(100 * conf[inside].mean())
            else:
                assert rel["accuracy"][i] is None


def test_the_json_restates_what_the_raw_arrays_say(root, capsys):
    rc, out, _ = run(capsys, root / "kd" / "toy", root / "abkd" / "toy", "--no-mean", "--format", "json",
                     "--bins", "10")
    assert rc == 0
    data = json.loads(out)
    assert data["bins"] == 10 and len(data["entries"]) == 6
    assert [e["label"] for e in data["entries"]][:2] == ["kd/toy/seed1", "kd/toy/seed2"]
    for entry in data["entries"]:
        check_restated(entry, 10)
    # the sharper "abkd" runs are more confident, with less entropy and tail mass
    mean = {e["label"].split("/")[0]: [] for e in data["entries"]}
    for e in data["entries"]:
        mean[e["label"].split("/")[0]].append(e["halves"]["base"]["entropy"])
    assert np.mean(mean["abkd"]) < np.mean(mean["kd"])


def test_a_group_is_the_mean_of_its_seeds(root, capsys):
    _, out, _ = run(capsys, root / "kd" / "toy", root / "abkd" / "toy", "--format", "json")
    grouped = json.loads(out)["entries"]
    _, out, _ = run(capsys, root / "kd" / "toy", root / "abkd" / "toy", "--format", "json", "--no-mean")
    single = json.loads(out)["entries"]
    assert [e["label"] for e in grouped] == ["kd/toy", "abkd/toy"]
    for g in grouped:
        members = [s for s in single if s["label"].startswith(g["label"] + "/")]
        assert len(members) == len(g["runs"]) == 3
        for half in ("base", "new"):
            block = g["halves"][half]
            assert block["runs"] == 3 and block["n"] == sum(m["halves"][half]["n"] for m in members)
            for key in ("accuracy", "confidence", "p_label", "entropy", "top5_out", "agreement", "ece"):
                values = [m["halves"][half][key] for m in members]
                assert block[key] == pytest.approx(np.mean(values))
                assert block["std"][key] == pytest.approx(np.std(values, ddof=1))
            counts = np.sum([m["halves"][half]["reliability"]["count"] for m in members], axis=0)
            assert block["reliability"]["count"] == counts.tolist()
    # a folder higher up gives the same two groups
    _, out, _ = run(capsys, root, "--format", "json")
    assert [e["label"] for e in json.loads(out)["entries"]] == ["abkd/toy", "kd/toy"]


def test_ece_of_a_small_example_by_hand():
    conf = np.array([0.9, 0.9, 0.6, 0.3, 0.5])
    correct = np.array([1, 0, 1, 0, 1])
    # bins (0, .5], (.5, 1]: {0.3 wrong, 0.5 right}: acc .5, conf .4; {0.9 right, 0.9 wrong, 0.6 right}: 2/3, .8
    assert expected_calibration_error(conf, correct, 2) == pytest.approx(2 / 5 * 0.1 + 3 / 5 * (0.8 - 2 / 3))
    assert bin_index(np.array([0.0, 0.5, 0.5000001, 1.0]), 2).tolist() == [0, 0, 1, 1]
    assert expected_calibration_error(conf, correct, 1) == pytest.approx(abs(3 / 5 - conf.mean()))


def test_a_calibrated_model_has_ece_near_zero_and_a_confident_wrong_one_near_one():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 200_000)
    correct = rng.random(conf.shape) < conf  # right exactly as often as it is confident
    assert expected_calibration_error(conf, correct, 15) < 0.005
    assert expected_calibration_error(np.full(100, 0.99), np.zeros(100), 15) == pytest.approx(0.99)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=40), st.integers(1, 30))
def test_ece_lies_in_0_1(pairs, bins):
    conf, correct = (np.array(x) for x in zip(*pairs))
    assert 0.0 <= expected_calibration_error(conf, correct, bins) <= 1.0 + 1e-12


def test_without_teacher_predictions_agreement_is_na(tmp_path, capsys):
    write_run(tmp_path / "kd" / "seed1", 1, 1.0, teacher=False)
    write_run(tmp_path / "abkd" / "seed1", 1, 2.0)
    rc, out, _ = run(capsys, tmp_path / "kd", tmp_path / "abkd")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("| kd |"))
    assert row.split("|")[-3].strip() == "n/a"
    assert "TEST.TEACHER_PREDICTIONS True" in out
    _, out, _ = run(capsys, tmp_path / "kd", tmp_path / "abkd", "--format", "json")
    kd, abkd = json.loads(out)["entries"]
    assert kd["halves"]["new"]["agreement"] is None and abkd["halves"]["new"]["agreement"] is not None


def test_stale_missing_and_empty_are_refused_in_one_line(root, tmp_path, capsys):
    stale = root / "kd" / "toy" / "seed2"
    results = json.loads((stale / "results.json").read_text())
    results["base"]["accuracy"] += 1.0  # results.json from another evaluation
    (stale / "results.json").write_text(json.dumps(results))
    rc, out, err = run(capsys, root / "kd" / "toy")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{stale / 'predictions.npz'} does not hold this run's predictions" in err
    (root / "abkd" / "toy" / "seed1" / "predictions.npz").unlink()
    rc, _, err = run(capsys, root / "abkd" / "toy")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "seed1/predictions.npz not found" in err and "TEST.TEACHER_PREDICTIONS" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, tmp_path / "empty")
    assert rc == 2 and "no run folders under" in err and len(err.strip().splitlines()) == 1


def test_an_unfinished_run_is_left_out_and_said(root, capsys):
    (root / "kd" / "toy" / "seed4").mkdir()
    (root / "kd" / "toy" / "seed4" / "config.yaml").write_text("SEED: 4\n")
    rc, out, _ = run(capsys, root / "kd" / "toy")
    assert rc == 0 and "| toy | 3 |" in out and "left out" in out and "seed4" in out


def test_plot_writes_a_png(root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc, _, err = run(capsys, root / "kd" / "toy", root / "abkd" / "toy", "--plot", tmp_path / "plots")
    path = tmp_path / "plots" / "reliability.png"
    assert rc == 0 and f"wrote {path}" in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side


def test_plot_without_matplotlib_names_the_extra(root, tmp_path, capsys, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rc, out, err = run(capsys, root / "kd" / "toy", "--plot", tmp_path / "plots")
    assert rc == 2 and out == "" and "pip install 'clipkd[plot]'" in err and len(err.strip().splitlines()) == 1


def test_csv_and_md_shapes(root, capsys):
    rc, out, _ = run(capsys, root / "kd" / "toy", root / "abkd" / "toy", "--format", "csv", "--counts",
                     "--bins", "5")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [(r["run"], r["half"]) for r in rows] == [
        ("kd/toy", "base"), ("kd/toy", "new"), ("abkd/toy", "base"), ("abkd/toy", "new")]
    assert all(sum(int(r[f"count_{i}"]) for i in range(1, 6)) == int(r["n"]) == 360 for r in rows)
    assert {"accuracy", "ece", "agreement_std", "top5_out"} <= set(rows[0])
    rc, out, _ = run(capsys, root / "kd" / "toy", root / "abkd" / "toy", "--counts", "--bins", "5")
    assert out.count("### ") == 2 and out.count("images per confidence bin") == 2
    assert "| kd/toy | 3 | 360 |" in out and "±" in out


def test_a_trained_runs_file_is_read_as_written(synth_root, tmp_path, capsys):
    """The engine's own predictions.npz (a one-epoch ABKD run with its teacher's predictions recorded)."""
    from test_train import config, fit

    folder = tmp_path / "abkd_promptkd" / "dtd" / "seed1"
    fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "1", "TEST.TEACHER_PREDICTIONS", "True"), folder)
    rc, out, _ = run(capsys, folder, "--format", "json")
    entry = json.loads(out)["entries"][0]
    assert rc == 0 and entry["label"] == "seed1" and entry["runs"] == [{"path": str(folder), "seed": 1}]
    check_restated(entry, 15)
    results = json.loads((folder / "results.json").read_text())
    assert entry["halves"]["new"]["accuracy"] == results["new"]["accuracy"]


def test_seeds_of_different_kinds_are_not_averaged(root, capsys):
    for seed, protocol in ((1, "inductive"), (2, "transductive"), (3, "inductive")):
        (root / "kd" / "toy" / f"seed{seed}" / "config.yaml").write_text(f"DISTILL:\n  PROTOCOL: {protocol}\n")
    rc, _, err = run(capsys, root / "kd" / "toy")
    assert rc == 2 and "different kinds" in err and "--no-mean" in err
    assert run(capsys, root / "kd" / "toy", "--no-mean")[0] == 0
    rc, _, err = run(capsys, root / "kd" / "toy", "--bins", "0")
    assert rc == 2 and "--bins 0" in err
