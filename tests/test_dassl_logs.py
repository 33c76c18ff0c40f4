"""Dassl's tools/parse_test_res.py, unchanged, reads the same Base and New as results.json.

``dassl_parse`` below restates that parser's rule (Dassl.pytorch, tools/parse_test_res.py, read at commit
c61a1b5), in this project's own code:

- DIR is the folder given on the command line; every entry of DIR whose name does not start with "." is a
  seed, in sorted order, and must hold ``log.txt`` (the parser stops with an AssertionError otherwise);
- each line is stripped; reading starts at the first line that equals the end signal exactly:
  ``Finish training`` by default, ``=> result`` with ``--test-log`` (``=> result (base)`` does not count);
- from there on, a line in which ``\\* accuracy: ([\\.\\deE+-]+)%`` is found sets the seed's value, so the
  last such line wins (one number per log);
- seeds without a value are left out; no value at all is "Nothing found in DIR" (an AssertionError);
- it prints the mean and the population std (numpy's default) of the seeds' values.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from clipkd.cli.main import main
from clipkd.engine.evaluate import dassl_log_lines, format_dassl_lines, results_payload

ACCURACY = re.compile(r"\* accuracy: ([\.\deE+-]+)%")


def dassl_parse(directory: Path, test_log: bool = False) -> list[float]:
    """The values Dassl's parse_test_res.py averages for DIR (one per seed folder that has one)."""
    signal = "=> result" if test_log else "Finish training"
    values = []
    for name in sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")):
        log = directory / name / "log.txt"
        assert log.is_file(), f"the parser would stop: no {log}"
        reading, value = False, None
        for line in log.read_text().splitlines():
            line = line.strip()
            reading = reading or line == signal
            found = ACCURACY.search(line) if reading else None
            if found:
                value = float(found.group(1))
        if value is not None:
            values.append(value)
    if not values:
        raise AssertionError(f"Nothing found in {directory}")
    return values


def metrics(acc: float, n: int = 120, f1: float | None = None) -> dict:
    return {"accuracy": acc, "macro_f1": acc - 1.5 if f1 is None else f1, "n": n}


def run_log(results: dict, hook: bool = True) -> str:
    """What a run's log.txt holds at its end: evaluate_halves' lines, then (with the run.py hook) the lines
    of dassl_log_lines."""
    lines = ["clipkd run: OxfordPets, inductive protocol, ...", "epoch [1/2] loss 1.0 lr 1.000e-03 (0.1s)"]
    for half in ("base", "new", "all"):
        if half in results:
            lines += format_dassl_lines(half, results[half])
    if hook:
        lines += dassl_log_lines(results)
    return "\n".join(lines) + "\n"


# awkward accuracies: thirds, 0 and 100, a tiny one printed with an exponent
SEEDS = {1: (100 / 3, 200 / 3), 2: (0.0, 100.0), 3: (7.000000000000001, 1e-05)}


def write_seeds(folder: Path, hook: bool = True) -> dict[int, dict]:
    out = {}
    for seed, (b, n) in SEEDS.items():
        results = results_payload({"base": metrics(b), "new": metrics(n, 90)})
        (folder / f"seed{seed}").mkdir(parents=True)
        (folder / f"seed{seed}" / "log.txt").write_text(run_log(results, hook))
        (folder / f"seed{seed}" / "results.json").write_text(json.dumps(results))
        out[seed] = results
    return out


@pytest.mark.parametrize("test_log", [False, True])
def test_run_log_gives_base_exactly(tmp_path, test_log):
    results = write_seeds(tmp_path / "abkd" / "oxford_pets")
    values = dassl_parse(tmp_path / "abkd" / "oxford_pets", test_log=test_log)
    assert values == [results[s]["base"]["accuracy"] for s in sorted(results)]  # exact, not rounded


def test_log_without_the_hook_is_nothing_found(tmp_path):
    """What the issue saw: '=> result (base)' is not the '=> result' line and there is no 'Finish training'."""
    write_seeds(tmp_path / "runs", hook=False)
    for test_log in (False, True):
        with pytest.raises(AssertionError, match="Nothing found"):
            dassl_parse(tmp_path / "runs", test_log=test_log)


def test_lines_are_dassl_shaped():
    results = results_payload({"base": metrics(75.0, 16, 70.0), "new": metrics(50.0, 12)})
    assert dassl_log_lines(results) == ["Finish training", "=> result", "* total: 16", "* correct: 12",
                                        "* accuracy: 75.0%", "* error: 25.0%", "* macro_f1: 70.0%"]
    assert dassl_log_lines(results, "new", training=False)[:2] == ["=> result", "* total: 12"]
    assert dassl_log_lines({"all": metrics(60.0)})[3:5] == ["* correct: 72", "* accuracy: 60.0%"]
    assert dassl_log_lines({"base": {"accuracy": 12.5}}) == ["Finish training", "=> result",
                                                             "* accuracy: 12.5%", "* error: 87.5%"]
    with pytest.raises(KeyError, match="no 'new' half"):
        dassl_log_lines({"all": metrics(60.0)}, "new")


def test_fewshot_run_log_gives_all(tmp_path):
    for seed, acc in ((1, 61.25), (2, 100 / 7)):
        folder = tmp_path / "shots4" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "log.txt").write_text(run_log({"all": metrics(acc)}))
    assert dassl_parse(tmp_path / "shots4") == [61.25, 100 / 7]


def test_test_log_only_for_test_log_mode(tmp_path):
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "log.txt").write_text("\n".join(dassl_log_lines(
        {"new": metrics(100 / 3)}, "new", training=False)) + "\n")
    assert dassl_parse(tmp_path, test_log=True) == [100 / 3]
    with pytest.raises(AssertionError, match="Nothing found"):  # as with Dassl's own test logs
        dassl_parse(tmp_path)


def test_report_dassl_logs_give_base_and_new(tmp_path, capsys):
    root = tmp_path / "output" / "base2new"
    pets = write_seeds(root / "abkd_promptkd" / "oxford_pets")
    (root / "abkd_promptkd" / "dtd" / "seed1").mkdir(parents=True)  # unfinished: no results.json
    (root / "abkd_promptkd" / "dtd" / "seed1" / "log.txt").write_text("epoch [1/20] ...\n")
    kd = {1: results_payload({"base": metrics(80.5), "new": metrics(70.25)})}
    (root / "kd" / "oxford_pets" / "seed1").mkdir(parents=True)
    (root / "kd" / "oxford_pets" / "seed1" / "results.json").write_text(json.dumps(kd[1]))
    out = tmp_path / "dassl"
    assert main(["report", str(root), "--dassl-logs", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"wrote 8 Dassl logs under {out}" in err
    for method, runs in (("abkd_promptkd", pets), ("kd", kd)):
        base = dassl_parse(out / "train_base" / "oxford_pets" / method)
        new = dassl_parse(out / "test_new" / "oxford_pets" / method, test_log=True)
        assert base == [runs[s]["base"]["accuracy"] for s in sorted(runs)]
        assert new == [runs[s]["new"]["accuracy"] for s in sorted(runs)]
        assert dassl_parse(out / "train_base" / "oxford_pets" / method, test_log=True) == base
        with pytest.raises(AssertionError, match="Nothing found"):
            dassl_parse(out / "test_new" / "oxford_pets" / method)  # a test log needs --test-log
    assert not (out / "train_base" / "dtd").exists()  # unfinished runs are not written
    # the seed means equal the report's, and --std population its std (ddof 0, as parse_test_res.py prints it)
    assert main(["report", str(root), "--method", "abkd_promptkd", "--format", "json", "--std", "population"]) == 0
    table = json.loads(capsys.readouterr().out)["datasets"]["OxfordPets"]
    base = dassl_parse(out / "train_base" / "oxford_pets" / "abkd_promptkd")
    new = dassl_parse(out / "test_new" / "oxford_pets" / "abkd_promptkd", test_log=True)
    assert sum(base) / 3 == pytest.approx(table["base"]["mean"], abs=0, rel=1e-15)
    assert sum(new) / 3 == pytest.approx(table["new"]["mean"], abs=0, rel=1e-15)
    assert math.sqrt(sum((b - sum(base) / 3) ** 2 for b in base) / 3) == pytest.approx(table["base"]["std"])


def test_report_dassl_logs_refuses_used_folder_and_other_kinds(tmp_path, capsys):
    root = tmp_path / "runs"
    write_seeds(root / "abkd" / "dtd")
    used = tmp_path / "used"
    (used / "old").mkdir(parents=True)
    assert main(["report", str(root), "--dassl-logs", str(used)]) == 2
    err = capsys.readouterr().err
    assert "not a new or empty folder" in err and err.count("\n") == 1
    assert main(["report", str(root), "--fewshot", "--dassl-logs", str(tmp_path / "new")]) == 2
    assert "--dassl-logs writes base-to-new runs" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_tiny_real_run_log_gives_results_base(synth_root, tmp_path):
    """A real (tiny) run: Dassl's parser reads results.json's Base from the run folders' log.txt (needs the
    dassl_log_lines hook in Run.fit)."""
    from test_train import config, fit

    folder = tmp_path / "abkd" / "oxford_pets"
    results = fit(config(synth_root), folder / "seed1")
    saved = json.loads((folder / "seed1" / "results.json").read_text())
    assert saved["base"]["accuracy"] == results["base"]["accuracy"]
    assert dassl_parse(folder) == [saved["base"]["accuracy"]]
    assert dassl_parse(folder, test_log=True) == [saved["base"]["accuracy"]]
