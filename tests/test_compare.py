"""``clipkd report ROOT --compare A B``: paired bootstrap of A - B over seeds and test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from clipkd.cli.main import main
from clipkd.reports.collect import collect, sort_out
from clipkd.reports.compare import compare
from clipkd.reports.predictions import PREDICTIONS_FILE, PredictionsError, read_predictions


def write_run(folder: Path, correct: dict[str, np.ndarray] | dict[str, float], predictions: bool = True) -> None:
    """A finished run: results.json from per-image correctness (bool arrays per half) and its predictions.npz."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("SEED: 1\n")
    results, arrays = {}, {"format": np.array(1)}
    for half, c in correct.items():
        c = np.asarray(c, dtype=bool)
        n = len(c)
        label = (np.arange(n) % 7).astype(np.int32)
        pred = np.where(c, label, (label + 1) % 7).astype(np.int32)
        results[half] = {"accuracy": 100.0 * float(np.count_nonzero(pred == label)) / n, "macro_f1": 0.0, "n": n}
        ones = np.ones(n, np.float32)
        arrays.update({f"{half}.label": label, f"{half}.pred": pred, f"{half}.prob": ones * 0.5,
                       f"{half}.confidence": ones * 0.6, f"{half}.entropy": ones, f"{half}.top5_out": ones * 0})
    (folder / "results.json").write_text(json.dumps(results))
    if predictions:
        np.savez_compressed(folder / PREDICTIONS_FILE, **arrays)


def bern(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return rng.random(n) < p


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def json_compare(capsys, root: Path, *extra: str) -> dict:
    rc, out, err = run_cli(capsys, "report", str(root), "--compare", *extra, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


def two_methods(root: Path, rng: np.random.Generator, pa: float, pb: float, seeds=(1, 2, 3), n: int = 300,
                datasets=("dtd",), predictions: bool = True) -> None:
    for stem in datasets:
        for s in seeds:
            for method, p in (("kd", pb), ("abkd", pa)):
                write_run(root / method / stem / f"seed{s}",
                          {"base": bern(rng, p, n), "new": bern(rng, p - 0.1, n)}, predictions)


def comparison(root: Path, a: str = "abkd", b: str = "kd", **kw):
    runs, _ = sort_out(collect(root).complete("base2new"))
    return compare(runs, a, b, **kw)


def test_identical_methods_give_zero(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for stem in ("dtd", "eurosat"):
        for s in (1, 2, 3):
            c = {"base": bern(rng, 0.7, 200), "new": bern(rng, 0.6, 150)}
            write_run(tmp_path / "kd" / stem / f"seed{s}", c)
            write_run(tmp_path / "kd_copy" / stem / f"seed{s}", c)
    out = json_compare(capsys, tmp_path, "kd", "kd_copy")
    for row in [*out["datasets"].values(), out["average"]]:
        assert row["resampled"] == "seeds and images"
        assert row["verdict"] == "not resolved"
        for m in ("base", "new", "hm"):
            d = row["delta"][m]
            assert d["value"] == 0 and d["low"] <= 0 <= d["high"]


def test_planted_difference_detected_and_null_not():
    """40 seeded repetitions: a 10-point gain is found (CI above 0) and no gain is not (CI holds 0), each >= 95%."""
    import tempfile

    found = null_found = 0
    reps = 40
    for i in range(reps):
        rng = np.random.default_rng(1000 + i)
        with tempfile.TemporaryDirectory() as d:
            two_methods(Path(d) / "diff", rng, 0.85, 0.75, n=300)
            two_methods(Path(d) / "null", rng, 0.75, 0.75, n=300)
            found += comparison(Path(d) / "diff", resamples=2000, seed=i).rows[0].deltas["hm"].resolved == 1
            null_found += comparison(Path(d) / "null", resamples=2000, seed=i).rows[0].deltas["hm"].resolved != 0
    assert found >= 0.95 * reps, f"planted difference found in {found}/{reps}"
    assert reps - null_found >= 0.95 * reps, f"null called a difference in {null_found}/{reps}"


def test_ci_agrees_with_scipy_bootstrap(tmp_path):
    """One seed: the interval is the paired image bootstrap, which scipy.stats.bootstrap(paired=True) computes."""
    rng = np.random.default_rng(3)
    ca = {"base": bern(rng, 0.72, 500), "new": bern(rng, 0.60, 400)}
    cb = {"base": ca["base"] ^ bern(rng, 0.15, 500), "new": ca["new"] ^ bern(rng, 0.2, 400)}
    write_run(tmp_path / "a" / "dtd" / "seed1", ca)
    write_run(tmp_path / "b" / "dtd" / "seed1", cb)
    row = comparison(tmp_path, "a", "b", resamples=10_000, seed=1).rows[0]
    assert row.p_note == "n/a (1 seed)" and row.resampled == "seeds and images"
    for half in ("base", "new"):
        x, y = 100.0 * ca[half], 100.0 * cb[half]
        ref = stats.bootstrap((x, y), lambda u, v, axis: u.mean(axis) - v.mean(axis), paired=True, vectorized=True,
                              n_resamples=10_000, method="percentile", random_state=np.random.default_rng(2))
        se = ref.standard_error
        d = row.deltas[half]
        assert d.value == pytest.approx(x.mean() - y.mean())
        # percentile-bound Monte Carlo error at 10,000 replicates is a few % of the SE on each side
        assert d.low == pytest.approx(ref.confidence_interval.low, abs=0.1 * se)
        assert d.high == pytest.approx(ref.confidence_interval.high, abs=0.1 * se)


def test_seeds_only_fallback_says_so(tmp_path, capsys):
    rng = np.random.default_rng(5)
    two_methods(tmp_path, rng, 0.8, 0.7, seeds=(1, 2, 3), datasets=("dtd", "eurosat"))
    (tmp_path / "kd" / "eurosat" / "seed2" / PREDICTIONS_FILE).unlink()
    c = comparison(tmp_path, resamples=500)
    dtd, eurosat = c.rows
    assert dtd.resampled == "seeds and images" and eurosat.resampled == "seeds only"
    assert any(f"no {PREDICTIONS_FILE}" in n and "eurosat" in n for n in eurosat.notes)
    assert c.average.resampled == "seeds only on 1 of 2 datasets"
    # seeds only: the paired t-test is scipy's on the per-seed HMs
    acc = {m: [json.loads((tmp_path / m / "eurosat" / f"seed{s}" / "results.json").read_text()) for s in (1, 2, 3)]
           for m in ("abkd", "kd")}
    hms = {m: np.array([2 * r["base"]["accuracy"] * r["new"]["accuracy"] / (r["base"]["accuracy"]
                                                                            + r["new"]["accuracy"]) for r in acc[m]])
           for m in acc}
    assert eurosat.p_value["hm"] == pytest.approx(stats.ttest_rel(hms["abkd"], hms["kd"]).pvalue)
    rc, out, _ = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", "--resamples", "500")
    assert rc == 0
    assert "| EuroSAT | 1, 2, 3 |" in out and "| seeds only |" in out
    assert f"- EuroSAT: no {PREDICTIONS_FILE} in" in out
    rc, out, err = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", "--resamples", "500",
                           "--format", "csv")
    assert rc == 0 and f"- EuroSAT: no {PREDICTIONS_FILE} in" in err and "EuroSAT" in out


@pytest.mark.parametrize("damage", ["garbage", "stale"])
def test_corrupt_or_stale_predictions_are_named_not_used(tmp_path, damage):
    rng = np.random.default_rng(6)
    two_methods(tmp_path, rng, 0.8, 0.7, seeds=(1, 2))
    run = tmp_path / "abkd" / "dtd" / "seed2"
    if damage == "garbage":
        (run / PREDICTIONS_FILE).write_bytes(b"not a zip")
    else:
        results = json.loads((run / "results.json").read_text())
        results["base"]["accuracy"] += 1.0  # re-evaluated since: the file no longer matches
        (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(PredictionsError, match=str(run / PREDICTIONS_FILE)):
        read_predictions(run)
    row = comparison(tmp_path, resamples=200).rows[0]
    assert row.resampled == "seeds only"
    assert str(run / PREDICTIONS_FILE) in row.notes[0]
    assert ("cannot be read as a .npz file" if damage == "garbage" else "its base accuracy is") in row.notes[0]


def test_single_common_seed(tmp_path, capsys):
    rng = np.random.default_rng(7)
    two_methods(tmp_path, rng, 0.9, 0.6, seeds=(1,))
    write_run(tmp_path / "kd" / "dtd" / "seed2", {"base": bern(rng, 0.6, 300), "new": bern(rng, 0.5, 300)})
    rc, out, _ = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", "--resamples", "500")
    assert rc == 0
    assert "n/a (1 seed)" in out and "| abkd better |" in out and "nan" not in out.lower()
    assert "left out: dtd: kd seed 2 (no partner)" in out
    # and without predictions there is nothing to resample: no interval, not resolved
    for f in tmp_path.rglob(PREDICTIONS_FILE):
        f.unlink()
    row = comparison(tmp_path, resamples=100).rows[0]
    assert (row.deltas["hm"].low, row.verdict("abkd", "kd")) == (None, "not resolved")


def test_bad_input_messages(tmp_path, capsys):
    rng = np.random.default_rng(8)
    two_methods(tmp_path, rng, 0.8, 0.7, seeds=(1, 2), datasets=("dtd",))
    write_run(tmp_path / "coop" / "eurosat" / "seed3", {"base": bern(rng, 0.6, 50), "new": bern(rng, 0.5, 50)})
    rc, _, err = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "promptsrc")
    assert rc == 2 and err.count("\n") == 1
    assert "no base-to-new runs of promptsrc" in err and "methods here: abkd, coop, kd" in err
    rc, _, err = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "coop")
    assert rc == 2 and err.count("\n") == 1
    assert "abkd: dtd (seeds 1, 2)" in err and "coop: eurosat (seeds 3)" in err
    rc, _, err = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", "coop")
    assert rc == 2 and "give 'published' or two methods A B" in err
    rc, _, err = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", "--format", "latex")
    assert rc == 2 and "drop --format latex" in err
    for extra in (["--ci"], ["--std", "population"]):  # the seed tables' spread; a comparison has its own CIs
        rc, _, err = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", *extra)
        assert rc == 2 and err.count("\n") == 1 and f"{' '.join(extra)} shapes the seed tables" in err
    rc, _, err = run_cli(capsys, "report", str(tmp_path), "--seed", "3")
    assert rc == 2 and "add --compare A B" in err


def test_seeded_and_csv(tmp_path, capsys):
    rng = np.random.default_rng(9)
    two_methods(tmp_path, rng, 0.8, 0.75, seeds=(1, 2, 3), datasets=("dtd", "eurosat"))
    first = json_compare(capsys, tmp_path, "abkd", "kd", "--resamples", "300", "--seed", "4")
    assert first == json_compare(capsys, tmp_path, "abkd", "kd", "--resamples", "300", "--seed", "4")
    assert first != json_compare(capsys, tmp_path, "abkd", "kd", "--resamples", "300", "--seed", "5")
    rc, out, _ = run_cli(capsys, "report", str(tmp_path), "--compare", "abkd", "kd", "--format", "csv",
                         "--resamples", "300", "--seed", "4")
    rows = out.strip().split("\n")
    assert rc == 0 and len(rows) == 4 and rows[0].startswith("a,b,dataset,seeds,delta_base,")
    assert rows[3].split(",")[2] == "Average (2 datasets)"
    dtd = rows[1].split(",")
    assert float(dtd[10]) == pytest.approx(first["datasets"][dtd[2]]["delta"]["hm"]["value"])
