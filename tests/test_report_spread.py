"""clipkd report: honest spread (sample std by default, --std population, --ci) and the warnings (issue #19,
items 3 and 4), on synthetic run folders; every figure restated with statistics / scipy."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats

from test_report import b2n, run_cli, write_run
from tests_helpers import run_config

DTD = {1: (80.0, 60.0), 2: (82.0, 63.0), 3: (81.0, 61.0)}  # close seeds: no outlier
PETS = {1: (95.0, 97.0), 2: (96.0, 98.0), 3: (97.5, 99.5)}
PETS_NAME, DTD_NAME = "OxfordPets", "DescribableTextures"


def ci95(values: list[float]) -> float:
    n = len(values)
    return stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)


def tree(root: Path, methods=("kd", "abkd"), data=None, epochs: int = 20) -> Path:
    """Each method on DTD and OxfordPets with 3 seeds (clean: no warning applies)."""
    for method in methods:
        for stem, name, seeds in (("dtd", DTD_NAME, DTD), ("oxford_pets", PETS_NAME, PETS)):
            for s, (b, n) in (data or {}).get((method, stem), seeds).items():
                write_run(root / method / stem / f"seed{s}", {**b2n(b, n), "epoch": epochs},
                          run_config(DATASET__NAME=name, SEED=s, OPTIM__MAX_EPOCH=epochs))
    return root


def halves(seeds: dict) -> tuple[list[float], list[float]]:
    return [v[0] for v in seeds.values()], [v[1] for v in seeds.values()]


# ---------------------------------------------------------------- item 3: spread
def test_sample_std_by_default_population_on_request(tmp_path, capsys):
    root = tree(tmp_path / "runs", methods=("kd",))
    db, dn = halves(DTD)
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "json")
    dtd = json.loads(out)["datasets"][DTD_NAME]
    assert rc == 0 and dtd["base"]["std"] == pytest.approx(statistics.stdev(db))
    assert dtd["new"]["std"] == pytest.approx(statistics.stdev(dn)) and "ci95" not in dtd["base"]
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "json", "--std", "population")
    dtd = json.loads(out)["datasets"][DTD_NAME]
    assert dtd["base"]["std"] == pytest.approx(statistics.pstdev(db))  # Dassl's parse_test_res.py
    assert dtd["new"]["std"] == pytest.approx(statistics.pstdev(dn))
    rc, out, _ = run_cli(capsys, "report", str(root))
    row = (f"| {DTD_NAME} | 81.00 ± {statistics.stdev(db):.2f} | "
           f"{statistics.fmean(dn):.2f} ± {statistics.stdev(dn):.2f} |")
    assert row in out
    assert "sample std (ddof 1)" in out
    rc, out, _ = run_cli(capsys, "report", str(root), "--std", "population")
    assert f"| {DTD_NAME} | 81.00 ± {statistics.pstdev(db):.2f} |" in out and "population std (ddof 0" in out


def test_ci_is_the_t_interval_in_every_format(tmp_path, capsys):
    root = tree(tmp_path / "runs", methods=("kd",))
    db, dn = halves(DTD)
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "json", "--ci")
    dtd = json.loads(out)["datasets"][DTD_NAME]
    assert dtd["base"]["ci95"] == pytest.approx(ci95(db)) and dtd["new"]["ci95"] == pytest.approx(ci95(dn))
    # the same with the population std shown: the CI always uses the sample std
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "json", "--ci", "--std", "population")
    assert json.loads(out)["datasets"][DTD_NAME]["base"]["ci95"] == pytest.approx(ci95(db))
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "csv", "--ci")
    row = next(r for r in csv.DictReader(io.StringIO(out)) if r["dataset"] == "dtd")
    assert float(row["base_ci95"]) == pytest.approx(ci95(db)) and float(row["new_ci95"]) == pytest.approx(ci95(dn))
    rc, out, _ = run_cli(capsys, "report", str(root), "--ci")
    assert "| Base 95% CI | New 95% CI |" in out
    line = next(x for x in out.splitlines() if x.startswith(f"| {DTD_NAME}"))
    assert line.endswith(f"| 3 | ± {ci95(db):.2f} | ± {ci95(dn):.2f} |")
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "latex", "--ci")
    assert f"{DTD_NAME} & 81.00 $\\pm$ {ci95(db):.2f} & {statistics.fmean(dn):.2f} $\\pm$ {ci95(dn):.2f} &" in out
    assert "95\\% confidence interval" in out


def test_fewshot_and_sweep_spread(tmp_path, capsys):
    root = tmp_path / "out"
    accs = {1: 50.0, 2: 54.0, 3: 53.0}
    for s, acc in accs.items():
        write_run(root / "fewshot" / "kd" / "dtd" / "shots4" / f"seed{s}", {"all": {"accuracy": acc}})
    rc, out, _ = run_cli(capsys, "report", str(root), "--fewshot", "--format", "json", "--ci")
    got = json.loads(out)["methods"]["kd"]["4"]["datasets"][DTD_NAME]
    values = list(accs.values())
    assert got == pytest.approx({"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": 3,
                                 "ci95": ci95(values)})
    rc, out, _ = run_cli(capsys, "report", str(root), "--fewshot", "--format", "csv", "--std", "population")
    assert float(next(csv.DictReader(io.StringIO(out)))["acc_std"]) == pytest.approx(statistics.pstdev(values))
    sweep = tmp_path / "sweep"
    for s, (b, n) in DTD.items():
        write_run(sweep / "abkd" / "dtd" / "a1_b1" / f"seed{s}", b2n(b, n))
    rc, out, _ = run_cli(capsys, "report", str(sweep), "--sweep", "--format", "json", "--ci")
    (cell,) = json.loads(out)["sweeps"][0]["cells"]
    db, _ = halves(DTD)
    assert cell["base"] == pytest.approx({"mean": 81.0, "std": statistics.stdev(db), "n": 3, "ci95": ci95(db)})


def test_one_seed_says_na_never_nan(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "kd" / "dtd" / "seed1", b2n(80.0, 60.0), run_config(DATASET__NAME=DTD_NAME))
    outs = {}
    for fmt in ("md", "csv", "json", "latex"):
        rc, outs[fmt], _ = run_cli(capsys, "report", str(root), "--format", fmt, "--ci")
        assert rc == 0 and "nan" not in outs[fmt].lower()
    assert f"| {DTD_NAME} | 80.00 ± n/a (1 seed) | 60.00 ± n/a (1 seed) |" in outs["md"]
    assert outs["md"].count("| n/a (1 seed) |") == 1 and "| n/a (1 seed) | n/a (1 seed) |" in outs["md"]
    row = next(csv.DictReader(io.StringIO(outs["csv"])))
    assert row["base_std"] == row["new_std"] == row["base_ci95"] == row["new_ci95"] == "n/a (1 seed)"
    assert json.loads(outs["json"])["datasets"][DTD_NAME]["base"] == {"mean": 80.0, "std": None, "n": 1,
                                                                     "ci95": None}
    assert f"{DTD_NAME} & 80.00 & 60.00 &" in outs["latex"]  # one seed: the bare mean
    # --std population: one seed's population std is 0, as Dassl prints it; the CI stays n/a
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "json", "--ci", "--std", "population")
    assert json.loads(out)["datasets"][DTD_NAME]["base"] == {"mean": 80.0, "std": 0.0, "n": 1, "ci95": None}


def test_average_row_labelled_with_the_mean_of_dataset_hms(tmp_path, capsys):
    root = tree(tmp_path / "runs", methods=("kd",))
    (db, dn), (pb, pn) = halves(DTD), halves(PETS)

    def hm(b: float, n: float) -> float:
        return 2 * b * n / (b + n)

    mb, mn = statistics.fmean([statistics.fmean(pb), statistics.fmean(db)]), \
        statistics.fmean([statistics.fmean(pn), statistics.fmean(dn)])
    mean_hm = statistics.fmean([hm(statistics.fmean(pb), statistics.fmean(pn)),
                                hm(statistics.fmean(db), statistics.fmean(dn))])
    assert abs(mean_hm - hm(mb, mn)) > 0.1  # the two differ on these numbers
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "json")
    avg = json.loads(out)["average"]
    assert avg["hm"] == pytest.approx(hm(mb, mn)) and avg["mean_hm"] == pytest.approx(mean_hm)
    rc, out, _ = run_cli(capsys, "report", str(root))
    line = next(x for x in out.splitlines() if x.startswith("| **Average**"))
    assert "HM of mean Base and mean New (as the papers)" in line
    assert f"{hm(mb, mn):.2f} (mean of per-dataset HMs: {mean_hm:.2f})" in line
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "csv")
    avg_row = next(r for r in csv.DictReader(io.StringIO(out)) if r["dataset"] == "average")
    assert float(avg_row["mean_dataset_hm"]) == pytest.approx(mean_hm) and "as the papers" in avg_row["name"]
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "latex")
    assert f"the mean of the per-dataset HMs is {mean_hm:.2f}" in out


# ---------------------------------------------------------------- item 4: warnings
def warnings_of(capsys, root: Path, *extra: str) -> list[str]:
    rc, out, _ = run_cli(capsys, "report", str(root), *extra)
    assert rc == 0
    if "Warnings (" not in out:
        return []
    return [x for x in out.split("Warnings (")[1].splitlines()[1:] if x.startswith("- ")]


def test_clean_tree_has_no_warnings(tmp_path, capsys):
    assert warnings_of(capsys, tree(tmp_path / "runs")) == []


def test_first_epoch_selected(tmp_path, capsys):
    root = tree(tmp_path / "runs")
    seed3 = root / "kd" / "dtd" / "seed3"
    (seed3 / "results.json").write_text(json.dumps({**b2n(*DTD[3]), "epoch": 1}))
    (line,) = warnings_of(capsys, root)
    assert line.startswith("- kd/dtd/seed3: its final model is epoch 1 of 20")
    assert '(results.json "epoch" 1, selected on last)' in line
    one_epoch = tree(tmp_path / "one", epochs=1)  # epoch 1 of 1: nothing to warn about
    assert warnings_of(capsys, one_epoch) == []


def test_far_seed_says_how_far(tmp_path, capsys):
    root = tree(tmp_path / "runs", data={("kd", "dtd"): {1: (80.0, 60.0), 2: (81.0, 61.0), 3: (81.5, 70.0)}})
    (line,) = warnings_of(capsys, root)
    # new: median 61, MAD 1, 70 is 9 points away (> 3 x 1.4826 x 1 = 4.45)
    assert line.startswith("- kd/dtd/seed3: seed 3 is far from the others: new accuracy 70.00 is 9.00 points from "
                           "the median 61.00 of the 3 seeds (MAD 1.00;")
    assert "3 scaled MADs" in line and "more than 1 point" in line
    # a wide but even spread is not an outlier
    even = tree(tmp_path / "even", data={("kd", "dtd"): {1: (80.0, 60.0), 2: (81.0, 65.0), 3: (82.0, 70.0)}})
    assert warnings_of(capsys, even) == []


def test_missing_seeds_and_different_sets(tmp_path, capsys):
    root = tree(tmp_path / "runs", data={("kd", "dtd"): {1: DTD[1], 2: DTD[2]}})
    lines = warnings_of(capsys, root)
    assert len(lines) == 2
    assert lines[0].startswith("- kd/dtd: missing seeds: kd has seed(s) 1, 2 on dtd but 1, 2, 3 on other datasets; "
                               "seed(s) 3 missing")
    assert "methods compared on different dataset/seed sets: kd lacks dtd seed(s) 3;" in lines[1]
    # a method without one of the datasets: the comparison warning names it (no missing seeds within kd)
    other = tree(tmp_path / "other", methods=("abkd",))
    for s, (b, n) in PETS.items():
        write_run(other / "kd" / "oxford_pets" / f"seed{s}", b2n(b, n), run_config(DATASET__NAME=PETS_NAME))
    (line,) = warnings_of(capsys, other)
    assert "kd lacks dtd seed(s) 1, 2, 3" in line


def test_base_test_selection_is_warned(tmp_path, capsys):
    sel = tmp_path / "sel"
    for stem, name, seeds in (("dtd", DTD_NAME, DTD), ("oxford_pets", PETS_NAME, PETS)):
        for s, (b, n) in seeds.items():
            write_run(sel / "kd" / stem / f"seed{s}", {**b2n(b, n), "selected_on": "base_test"},
                      run_config(DATASET__NAME=name))
    lines = warnings_of(capsys, sel)
    assert len(lines) == 2 and all("3 run(s) selected on base TEST" in x for x in lines)
    assert lines[0].startswith("- kd/dtd: ") and "reported apart as 'kd [selected on base test]'" in lines[0]
    assert warnings_of(capsys, tree(tmp_path / "runs", methods=("kd",))) == []


def test_warnings_go_to_stderr_for_machine_formats(tmp_path, capsys):
    root = tree(tmp_path / "runs", data={("kd", "dtd"): {1: DTD[1], 2: DTD[2]}})
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "csv")
    assert rc == 0 and "Warnings (2):" in err and "missing seeds" in err and "missing" not in out
