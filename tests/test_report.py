"""clipkd report: tables recomputed from fake run trees (results.json files written here)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from clipkd.cli.main import main
from clipkd.reports.published import PROMPTKD, PROMPTKD_SOURCE, TABLE1_AVERAGES
from tests_helpers import run_config

# method promptkd: oxford_pets 3 seeds, dtd 2 complete seeds + seed3 failed (log.txt only)
PETS = {1: (95.0, 97.0), 2: (96.0, 98.0), 3: (97.5, 99.5)}
DTD = {1: (80.0, 60.0), 2: (82.0, 66.0)}
KD_PETS = {1: (90.0, 91.0), 2: (92.0, 93.0)}
FEWSHOT = {  # (K, stem) -> {seed: accuracy}
    (4, "oxford_pets"): {1: 85.0, 2: 87.0, 3: 86.0},
    (4, "dtd"): {1: 50.0, 2: 54.0},
    (16, "oxford_pets"): {1: 91.0, 2: 93.0},
}
ALPHAS, BETAS = (0.0, 0.5, 1.0), (-0.5, 0.3, 1.0)


def sweep_values(a: float, b: float, seed: int) -> tuple[float, float]:
    # best HM at alpha=0.5, beta=0.3 by construction
    bonus = 5.0 if (a, b) == (0.5, 0.3) else 0.0
    return 80.0 + 2 * a + b + seed + bonus, 70.0 - a + 2 * b - seed + bonus


def write_run(folder: Path, payload: dict | str | None, config: str = "SEED: 1\n") -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    if payload is None:
        return
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (folder / "results.json").write_text(text)


def b2n(base: float, new: float) -> dict:
    return {"base": {"accuracy": base, "macro_f1": base - 1, "n": 100},
            "new": {"accuracy": new, "macro_f1": new - 1, "n": 90},
            "hm": 2 * base * new / (base + new), "epoch": 20}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "runs"
    for s, (b, n) in PETS.items():
        write_run(r / "promptkd" / "oxford_pets" / f"seed{s}", b2n(b, n))
    for s, (b, n) in DTD.items():
        write_run(r / "promptkd" / "dtd" / f"seed{s}", b2n(b, n))
    failed = r / "promptkd" / "dtd" / "seed3"
    failed.mkdir(parents=True)
    (failed / "log.txt").write_text("loss is nan\n")
    for s, (b, n) in KD_PETS.items():
        write_run(r / "kd" / "oxford_pets" / f"seed{s}", b2n(b, n))
    for (k, stem), accs in FEWSHOT.items():
        for s, acc in accs.items():
            write_run(r / "fewshot" / "promptkd" / stem / f"shots{k}" / f"seed{s}",
                      {"all": {"accuracy": acc, "macro_f1": acc, "n": 50}, "epoch": 20})
    write_run(r / "fewshot" / "promptkd" / "dtd" / "shots16" / "seed1", "{not json")
    for a in ALPHAS:
        for b in BETAS:
            for s in (1, 2):
                write_run(r / "abkd" / "eurosat" / f"a{format(a, 'g')}_b{format(b, 'g')}" / f"seed{s}",
                          b2n(*sweep_values(a, b, s)))
    return r


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def mean(xs):
    return sum(xs) / len(xs)


def sstd(xs):  # the sample std (ddof 1): the report's default since issue #19 (test_report_spread.py: --std)
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def hm(b, n):
    return 2 * b * n / (b + n)


def test_json_numbers_recomputed(root, capsys):
    rc, out, err = run_cli(capsys, "report", str(root), "--method", "promptkd", "--format", "json")
    assert rc == 0
    data = json.loads(out)
    assert set(data) == {"datasets", "average"}
    assert list(data["datasets"]) == ["OxfordPets", "DescribableTextures"]  # benchmark order, Dassl NAMEs
    pets = data["datasets"]["OxfordPets"]
    pb, pn = [v[0] for v in PETS.values()], [v[1] for v in PETS.values()]
    assert pets["base"] == pytest.approx({"mean": mean(pb), "std": sstd(pb), "n": 3})
    assert pets["new"] == pytest.approx({"mean": mean(pn), "std": sstd(pn), "n": 3})
    assert pets["hm"] == pytest.approx(hm(mean(pb), mean(pn)))
    db, dn = [v[0] for v in DTD.values()], [v[1] for v in DTD.values()]
    dtd = data["datasets"]["DescribableTextures"]
    assert dtd["base"]["n"] == 2 and dtd["base"]["std"] == pytest.approx(math.sqrt(2))  # sample std (ddof 1)
    assert dtd["new"]["std"] == pytest.approx(math.sqrt(18))
    avg_b, avg_n = mean([mean(pb), mean(db)]), mean([mean(pn), mean(dn)])
    assert data["average"] == pytest.approx({"base": avg_b, "new": avg_n, "hm": hm(avg_b, avg_n),
                                             "mean_hm": mean([pets["hm"], dtd["hm"]])})
    # the Average HM is the HM of the mean Base/New, not the mean of the per-dataset HMs
    assert data["average"]["hm"] != pytest.approx(mean([pets["hm"], dtd["hm"]]))
    assert "promptkd/dtd/seed3" in err and "no results.json" in err


def test_json_needs_method_when_several(root, capsys):
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "json")
    assert rc == 2 and "--method" in err and "kd" in err and "promptkd" in err


def test_markdown_tables_and_failed_runs(root, capsys):
    rc, out, _ = run_cli(capsys, "report", str(root))
    assert rc == 0
    assert "### kd" in out and "### promptkd" in out
    pb, pn = [v[0] for v in PETS.values()], [v[1] for v in PETS.values()]
    row = next(line for line in out.splitlines() if line.startswith("| OxfordPets") and "96.17" in line)
    assert f"{mean(pb):.2f} ± {sstd(pb):.2f}" in row and f"{mean(pn):.2f} ± {sstd(pn):.2f}" in row
    assert f"{hm(mean(pb), mean(pn)):.2f}" in row and row.rstrip(" |").endswith("3")
    assert "| DescribableTextures | 81.00 ± 1.41 | 63.00 ± 4.24 |" in out
    assert "**Average** (2 datasets)" in out
    tail = out.split("Incomplete or failed runs")[1]
    assert "promptkd/dtd/seed3" in tail
    assert "fewshot" not in tail  # a failed few-shot run belongs to the few-shot report


def test_compare_published(root, capsys):
    rc, out, _ = run_cli(capsys, "report", str(root), "--method", "promptkd", "--format", "json",
                         "--compare", "published")
    assert rc == 0
    data = json.loads(out)
    pets, pub = data["datasets"]["OxfordPets"], PROMPTKD["oxford_pets"]
    assert pets["published"] == {"base": 96.30, "new": 98.01, "hm": 97.15}
    assert pets["delta"]["base"] == pytest.approx(pets["base"]["mean"] - pub.base)
    assert pets["delta"]["new"] == pytest.approx(pets["new"]["mean"] - pub.new)
    assert pets["delta"]["hm"] == pytest.approx(pets["hm"] - pub.hm)
    assert data["published_source"] == PROMPTKD_SOURCE
    assert "published" not in data["average"]  # 2 of 11 datasets: not comparable with the 11-dataset average

    rc, out, _ = run_cli(capsys, "report", str(root), "--method", "promptkd", "--compare", "published")
    assert "Δ HM" in out and f"{pets['delta']['hm']:+.2f}" in out and "PromptKD" in out


def test_published_data():
    assert len(PROMPTKD) == 11
    assert TABLE1_AVERAGES["PromptKD"].hm == 83.73
    # stored as printed (PROTOCOL.md section 2), not recomputed
    assert (PROMPTKD["ucf101"].base, PROMPTKD["ucf101"].new, PROMPTKD["ucf101"].hm) == (89.71, 82.27, 86.10)
    assert PROMPTKD["fgvc_aircraft"].hm == 45.17


def test_csv_parses(root, capsys):
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "csv", "--compare", "published")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    by = {(r["method"], r["dataset"]): r for r in rows}
    assert set(by) == {("kd", "oxford_pets"), ("kd", "average"), ("promptkd", "oxford_pets"),
                       ("promptkd", "dtd"), ("promptkd", "average")}
    kb = [v[0] for v in KD_PETS.values()]
    assert float(by["kd", "oxford_pets"]["base_mean"]) == pytest.approx(mean(kb))
    assert float(by["kd", "oxford_pets"]["base_std"]) == pytest.approx(sstd(kb))
    assert float(by["promptkd", "dtd"]["delta_new"]) == pytest.approx(63.0 - PROMPTKD["dtd"].new)
    avg = by["promptkd", "average"]
    assert float(avg["hm"]) == pytest.approx(hm(float(avg["base_mean"]), float(avg["new_mean"])))
    assert "promptkd/dtd/seed3" in err


def test_fewshot_tables(root, capsys):
    rc, out, err = run_cli(capsys, "report", str(root), "--fewshot", "--format", "json")
    assert rc == 0
    data = json.loads(out)["methods"]["promptkd"]
    assert set(data) == {"4", "16"}
    pets4 = list(FEWSHOT[4, "oxford_pets"].values())
    assert data["4"]["datasets"]["OxfordPets"] == pytest.approx({"mean": 86.0, "std": sstd(pets4), "n": 3})
    assert data["4"]["average"] == pytest.approx(mean([86.0, 52.0]))
    assert data["16"]["datasets"] == {"OxfordPets": pytest.approx({"mean": 92.0, "std": math.sqrt(2), "n": 2})}
    assert "shots16/seed1" in err and "unreadable" in err
    rc, out, _ = run_cli(capsys, "report", str(root), "--fewshot")
    assert "### promptkd, 4 shots" in out and "| OxfordPets | 86.00 ± 1.00 | 3 |" in out
    assert "Incomplete or failed runs (1)" in out


def test_sweep_best_cell(root, capsys):
    rc, out, _ = run_cli(capsys, "report", str(root), "--sweep", "--format", "json")
    assert rc == 0
    (sweep,) = json.loads(out)["sweeps"]
    assert sweep["method"] == "abkd" and sweep["dataset"] == "EuroSAT" and len(sweep["cells"]) == 9
    for c in sweep["cells"]:
        vals = [sweep_values(c["alpha"], c["beta"], s) for s in (1, 2)]
        assert c["hm"] == pytest.approx(hm(mean([v[0] for v in vals]), mean([v[1] for v in vals])))
    assert (sweep["best"]["alpha"], sweep["best"]["beta"]) == (0.5, 0.3)
    assert sweep["best"]["hm"] == pytest.approx(max(c["hm"] for c in sweep["cells"]))
    rc, out, _ = run_cli(capsys, "report", str(root), "--sweep")
    assert "Best cell: alpha=0.5, beta=0.3" in out
    assert "| alpha \\ beta | -0.5 | 0.3 | 1 |" in out


def test_sweep_plot(root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plots" / "sweep.png"
    rc, _, err = run_cli(capsys, "report", str(root), "--sweep", "--plot", str(png))
    assert rc == 0 and str(png) in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(tmp_path, root, capsys):
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert rc == 2 and "not a folder" in err
    (tmp_path / "x.png").write_text("a file where --plot wants a folder")
    rc, _, err = run_cli(capsys, "report", str(root), "--plot", str(tmp_path / "x.png"))
    assert rc == 2 and "not a folder" in err  # --plot DIR outside --sweep (tests/test_plots.py)
    rc, _, err = run_cli(capsys, "report", str(root), "--method", "nope")
    assert rc == 2 and "no completed" in err


def test_plot_without_matplotlib(root, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    rc, _, err = run_cli(capsys, "report", str(root), "--sweep", "--plot", str(tmp_path / "s.png"))
    assert rc == 2 and "pip install 'clipkd[plot]'" in err


def test_sweep_plot_with_missing_cell(root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import shutil

    shutil.rmtree(root / "abkd" / "eurosat" / "a1_b1")
    rc, out, _ = run_cli(capsys, "report", str(root), "--sweep", "--plot", str(tmp_path / "s.png"))
    assert rc == 0 and "—" in out and (tmp_path / "s.png").is_file()


# ------------------------------------------------ ROOT below the results folder (method, dataset, run folder)
def b2n_json(capsys, folder: Path, *extra: str) -> dict:
    rc, out, err = run_cli(capsys, "report", str(folder), "--format", "json", *extra)
    assert rc == 0, err
    return json.loads(out)


def test_method_and_dataset_folders_give_the_same_numbers(root, capsys):
    full = b2n_json(capsys, root, "--method", "promptkd")
    assert b2n_json(capsys, root / "promptkd") == full  # one method: no --method needed
    assert b2n_json(capsys, root / "promptkd", "--method", "promptkd") == full
    for stem, name in (("oxford_pets", "OxfordPets"), ("dtd", "DescribableTextures")):
        one = b2n_json(capsys, root / "promptkd" / stem)
        assert one["datasets"] == {name: full["datasets"][name]}
        assert b2n_json(capsys, root / "promptkd" / stem, "--method", "promptkd", "--dataset", name) == one
    # markdown from the method folder: the same table under the method's name
    rc, out, _ = run_cli(capsys, "report", str(root / "promptkd"))
    assert rc == 0 and "### promptkd" in out and "### kd" not in out
    assert "| DescribableTextures | 81.00 ± 1.41 | 63.00 ± 4.24 |" in out
    # a single run folder: that run's numbers
    data = b2n_json(capsys, root / "promptkd" / "oxford_pets" / "seed2")
    assert data["datasets"]["OxfordPets"]["base"] == pytest.approx({"mean": PETS[2][0], "std": None, "n": 1})


def test_method_folder_names_from_the_path_above(tmp_path, capsys):
    # the run scripts' tree: output/base2new/<method>/<dataset>/seed<S>
    b2n_root = tmp_path / "output" / "base2new"
    for s, (b, n) in PETS.items():
        write_run(b2n_root / "abkd_promptkd" / "oxford_pets" / f"seed{s}", b2n(b, n))
    want = b2n_json(capsys, b2n_root)
    for folder in (b2n_root / "abkd_promptkd", b2n_root / "abkd_promptkd" / "oxford_pets"):
        assert b2n_json(capsys, folder, "--method", "abkd_promptkd") == want
    rc, out, _ = run_cli(capsys, "report", str(b2n_root / "abkd_promptkd" / "oxford_pets"), "--format", "csv")
    assert {(r["method"], r["dataset"]) for r in csv.DictReader(io.StringIO(out))} == {
        ("abkd_promptkd", "oxford_pets"), ("abkd_promptkd", "average")}
    # one level too high: the error names the folder to pass
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "output"))
    assert rc == 2 and f"pass {b2n_root}" in err and len(err.strip().splitlines()) == 1


def test_incomplete_run_listed_at_every_depth(root, capsys):
    write_run(root / "promptkd" / "oxford_pets" / "seed4", None)  # interrupted: config.yaml, no results.json
    pets = root / "promptkd" / "oxford_pets"
    for folder, shown in ((root, "promptkd/oxford_pets/seed4"), (root / "promptkd", "oxford_pets/seed4"),
                          (pets, "seed4")):
        rc, out, err = run_cli(capsys, "report", str(folder), "--method", "promptkd", "--format", "json")
        assert rc == 0
        assert json.loads(out)["datasets"]["OxfordPets"]["base"]["n"] == 3  # the 3 finished seeds only
        assert f"- {shown}: no results.json" in err
        rc, out, _ = run_cli(capsys, "report", str(folder))
        assert rc == 0 and f"- {shown}: no results.json" in out.split("Incomplete or failed runs")[1]
    # the interrupted run folder itself: nothing completed, and the error says the run is incomplete
    rc, _, err = run_cli(capsys, "report", str(pets / "seed4"))
    assert rc == 2 and "1 incomplete" in err and str(pets / "seed4") in err and "no results.json" in err


def test_sweep_from_method_and_dataset_folders(root, capsys):
    write_run(root / "abkd" / "eurosat" / "a0.5_b0.3" / "seed3", None)  # interrupted cell run
    full = json.loads(run_cli(capsys, "report", str(root), "--sweep", "--format", "json")[1])
    for folder in (root / "abkd", root / "abkd" / "eurosat"):
        rc, out, err = run_cli(capsys, "report", str(folder), "--sweep", "--format", "json")
        assert rc == 0 and json.loads(out) == full
        assert "a0.5_b0.3/seed3: no results.json" in err
    rc, out, _ = run_cli(capsys, "report", str(root / "abkd"), "--sweep")
    assert rc == 0 and "Best cell: alpha=0.5, beta=0.3" in out and "a0.5_b0.3/seed3" in out
    # one cell folder: a 1-cell sweep of the right method and dataset
    rc, out, _ = run_cli(capsys, "report", str(root / "abkd" / "eurosat" / "a0_b1"), "--sweep", "--format", "json")
    (sweep,) = json.loads(out)["sweeps"]
    assert (sweep["method"], sweep["dataset"], len(sweep["cells"])) == ("abkd", "EuroSAT", 1)
    # a sweep folder without --sweep is not read as base-to-new runs of method "eurosat"
    rc, _, err = run_cli(capsys, "report", str(root / "abkd"))
    assert rc == 2 and "holds sweep runs" in err and "--sweep" in err


def test_fewshot_from_lower_folders(root, capsys):
    full = json.loads(run_cli(capsys, "report", str(root), "--fewshot", "--format", "json")[1])
    for folder in (root / "fewshot", root / "fewshot" / "promptkd"):
        rc, out, err = run_cli(capsys, "report", str(folder), "--fewshot", "--format", "json")
        assert rc == 0 and json.loads(out) == full and "shots16/seed1" in err and "unreadable" in err
    rc, out, _ = run_cli(capsys, "report", str(root / "fewshot" / "promptkd" / "oxford_pets" / "shots4"),
                         "--fewshot", "--format", "json")
    four = json.loads(out)["methods"]["promptkd"]
    assert list(four) == ["4"] and four["4"]["average"] == pytest.approx(86.0)
    assert four["4"]["datasets"] == {"OxfordPets": full["methods"]["promptkd"]["4"]["datasets"]["OxfordPets"]}


def test_folder_without_runs(tmp_path, capsys):
    empty = tmp_path / "output" / "base2new" / "nothing_here"
    (empty / "notes").mkdir(parents=True)
    for extra in ((), ("--sweep",), ("--fewshot",)):
        rc, out, err = run_cli(capsys, "report", str(empty), *extra)
        assert rc == 2 and out == ""
        (line,) = err.strip().splitlines()  # one line
        assert f"no run folders under {empty}" in line and "pass the folder" in line


def test_ambiguous_layouts_are_explained(tmp_path, capsys):
    # runs written straight into a results folder (no method level): not read as method "base2new"
    write_run(tmp_path / "base2new" / "dtd" / "seed1", b2n(80.0, 60.0))
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "base2new"))
    assert rc == 2 and "'base2new' would be the method" in err and "base2new/<method>/<dataset>/seed<S>" in err
    # runs at two depths: the deeper ones set the layout, the others are listed, never dropped
    mixed = tmp_path / "mixed"
    write_run(mixed / "kd" / "dtd" / "seed1", b2n(80.0, 60.0))
    write_run(mixed / "dtd" / "seed2", b2n(70.0, 50.0))
    rc, out, _ = run_cli(capsys, "report", str(mixed))
    assert rc == 0 and "### kd" in out and "| DescribableTextures | 80.00 ± n/a (1 seed) |" in out
    assert "- dtd/seed2: sits higher than the other runs" in out


# ---------------------------------------------------------------- --format latex
def latex_rows(out: str, method: str) -> list[str]:
    """The body of one method's tabular: the lines between its \\begin{tabular} and \\end{tabular}."""
    lines = out.splitlines()
    start = lines.index(f"% {method}") + 1
    end = lines.index(r"\end{tabular}", start)
    return lines[start:end + 1]


def test_latex_booktabs_table(root, capsys):
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "latex")
    assert rc == 0 and "promptkd/dtd/seed3" in err  # the incomplete run goes to stderr, off the table
    assert out.count(r"\begin{tabular}") == 2  # one tabular per method: kd, promptkd
    body = latex_rows(out, "promptkd")
    assert body[0] == r"\begin{tabular}{lccc}" and body[1] == r"\toprule" and body[-2] == r"\bottomrule"
    assert r"\multicolumn{4}{l}{promptkd} \\" in body
    assert r"Dataset & Base & New & HM \\" in body
    pb, pn = [v[0] for v in PETS.values()], [v[1] for v in PETS.values()]
    assert (f"OxfordPets & {mean(pb):.2f} $\\pm$ {sstd(pb):.2f} & {mean(pn):.2f} $\\pm$ {sstd(pn):.2f} & "
            f"{hm(mean(pb), mean(pn)):.2f} \\\\") in body
    assert r"DescribableTextures & 81.00 $\pm$ 1.41 & 63.00 $\pm$ 4.24 & 70.88 \\" in body
    db, dn = [v[0] for v in DTD.values()], [v[1] for v in DTD.values()]
    avg_b, avg_n = mean([mean(pb), mean(db)]), mean([mean(pn), mean(dn)])
    avg = f"Average (2 datasets) & {avg_b:.2f} & {avg_n:.2f} & {hm(avg_b, avg_n):.2f} \\\\"
    assert body[-3] == avg and body[-4] == r"\midrule"  # the Average row below its own rule
    assert body.count(r"\midrule") == 3
    # every row has the tabular's 4 columns
    assert all(line.count(" & ") == 3 for line in body if line.endswith(r"\\") and "multicolumn" not in line)
    kd = latex_rows(out, "kd")
    assert any(line.startswith("OxfordPets & 91.00 $\\pm$ 1.41 & 92.00 $\\pm$ 1.41 & ") for line in kd)
    assert "| " not in out and "±" not in out  # nothing of the Markdown table


def test_latex_escapes_and_single_seed(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "ab_kd_100%" / "my_set" / "seed1", b2n(50.0, 40.0))
    rc, out, _ = run_cli(capsys, "report", str(root), "--format", "latex")
    assert rc == 0
    assert r"\multicolumn{4}{l}{ab\_kd\_100\%} \\" in out
    assert r"my\_set & 50.00 & 40.00 & 44.44 \\" in out  # one seed: the bare mean, no $\pm$ 0.00
    assert "over one seed" in out
    assert "ab_kd" not in out.replace(r"ab\_kd", "")


def test_latex_compare_published(root, capsys):
    rc, out, _ = run_cli(capsys, "report", str(root), "--method", "promptkd", "--format", "latex",
                         "--compare", "published")
    assert rc == 0
    body = latex_rows(out, "promptkd")
    assert body[0] == r"\begin{tabular}{lccccccccc}"
    assert r"\cmidrule(lr){2-4} \cmidrule(lr){5-7} \cmidrule(lr){8-10}" in body
    assert r"Dataset & Base & New & HM & Base & New & HM & Base & New & HM \\" in body
    p = PROMPTKD["oxford_pets"]
    pb, pn = [v[0] for v in PETS.values()], [v[1] for v in PETS.values()]
    row = next(line for line in body if line.startswith("OxfordPets &"))
    cells = row.removesuffix(r" \\").split(" & ")
    assert cells[4:7] == [f"{p.base:.2f}", f"{p.new:.2f}", f"{p.hm:.2f}"]
    assert cells[7] == f"${mean(pb) - p.base:+.2f}$" and cells[8] == f"${mean(pn) - p.new:+.2f}$"
    avg_row = next(line for line in body if line.startswith("Average"))
    assert avg_row.count("--") == 6  # 2 of 11 datasets: no published average to compare with
    assert "% Published: " in out


def test_latex_fewshot_and_not_sweep(root, capsys):
    rc, out, _ = run_cli(capsys, "report", str(root), "--fewshot", "--format", "latex")
    assert rc == 0
    body = latex_rows(out, "promptkd, 4 shots")
    assert r"Dataset & Accuracy \\" in body and r"DescribableTextures & 52.00 $\pm$ 2.83 \\" in body
    assert r"OxfordPets & 86.00 $\pm$ 1.00 \\" in body and r"Average (2 datasets) & 69.00 \\" in body
    rc, out, err = run_cli(capsys, "report", str(root), "--sweep", "--format", "latex")
    assert rc == 2 and out == "" and "--format latex" in err and err.count("\n") == 1


def test_base_test_selected_runs_are_marked_and_never_averaged_with_honest_ones(tmp_path, capsys):
    r = tmp_path / "runs"
    write_run(r / "abkd" / "dtd" / "seed1", b2n(70.0, 60.0))
    write_run(r / "abkd" / "dtd" / "seed2", {**b2n(90.0, 80.0), "selected_on": "base_test"})
    assert main(["report", str(r), "--format", "json", "--method", "abkd"]) == 2  # two tables now: pick one
    capsys.readouterr()
    assert main(["report", str(r)]) == 0
    out = capsys.readouterr().out
    assert "### abkd\n" in out and "### abkd [selected on base test]" in out
    assert "| 70.00 ± n/a (1 seed) |" in out and "| 90.00 ± n/a (1 seed) |" in out  # never averaged
    assert "± 10.00" not in out and "± 14.14" not in out
    assert main(["report", str(r), "--format", "csv", "--method", "abkd"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {row["method"] for row in rows} == {"abkd", "abkd [selected on base test]"}


# ------------------------------------------------ runs that do not belong together are never averaged
DTD_NAME, PETS_NAME = "DescribableTextures", "OxfordPets"
KINDS = {  # attribute: (config keys, results.json keys) of the usual runs, then of the odd one, and the labels
    "protocol": (({"DISTILL__PROTOCOL": "inductive"}, {}), ({"DISTILL__PROTOCOL": "transductive"}, {}),
                 ("inductive", "transductive")),
    "shots": (({"DATASET__NUM_SHOTS": 16}, {}), ({"DATASET__NUM_SHOTS": 1}, {}), ("16 shots", "1 shot")),
    "teacher": (({}, {"teacher": "prompted: /teachers/dtd/model.pt"}), ({}, {"teacher": "zero-shot"}),
                ("prompted teacher", "zero-shot teacher")),
    "selection": (({}, {"selected_on": "last"}), ({}, {"selected_on": "val"}), ("last epoch", "selected on val")),
}


def mixed_tree(root: Path, attr: str) -> None:
    """kd on DTD (seeds 1, 2) and OxfordPets (seed 1) of one kind, and DTD seed 3 of another kind."""
    usual, odd, _ = KINDS[attr]
    for stem, name, seed, (cfg, extra), (b, n) in (
            ("dtd", DTD_NAME, 1, usual, (80.0, 60.0)), ("dtd", DTD_NAME, 2, usual, (82.0, 66.0)),
            ("oxford_pets", PETS_NAME, 1, usual, (95.0, 97.0)), ("dtd", DTD_NAME, 3, odd, (40.0, 30.0))):
        write_run(root / "kd" / stem / f"seed{seed}", {**b2n(b, n), **extra},
                  run_config(DATASET__NAME=name, SEED=seed, **cfg))


@pytest.mark.parametrize("attr", list(KINDS))
def test_runs_of_different_kinds_are_never_averaged(tmp_path, capsys, attr):
    root = tmp_path / "runs"
    mixed_tree(root, attr)
    usual, odd = (f"kd [{label}]" for label in KINDS[attr][2])
    rc, out, _ = run_cli(capsys, "report", str(root))
    assert rc == 0
    assert f"### {usual}\n" in out and f"### {odd}\n" in out and "### kd\n" not in out
    assert "| DescribableTextures | 81.00 ± 1.41 | 63.00 ± 4.24 |" in out  # seeds 1 and 2 only
    # seed 3 in a table of its own
    assert "| DescribableTextures | 40.00 ± n/a (1 seed) | 30.00 ± n/a (1 seed) |" in out
    problems = out.split("Not averaged with the others (1):")[1]
    assert "- kd: mixes runs of different kinds" in problems and usual.removeprefix("kd ")[1:-1] in problems
    # csv and latex: the same two tables; the mixture on stderr
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "csv")
    rows = {(r["method"], r["dataset"]): r for r in csv.DictReader(io.StringIO(out))}
    assert rows[usual, "dtd"]["base_n"] == "2" and rows[odd, "dtd"]["base_n"] == "1"
    assert float(rows[usual, "dtd"]["base_mean"]) == pytest.approx(81.0) and "mixes runs" in err
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "latex")
    assert rc == 0 and out.count(r"\begin{tabular}") == 2 and "mixes runs" in err
    # json reports one table: --method cannot pick one kind, so the error says to pass a ROOT holding one kind
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "json", "--method", "kd")
    assert rc == 2 and out == "" and usual in err and odd in err and "pass a ROOT" in err


def test_misplaced_runs_duplicate_seeds_and_bad_accuracies_are_left_out(tmp_path, capsys):
    root = tmp_path / "runs"
    dtd = root / "kd" / "dtd"
    cfg = run_config(DATASET__NAME=DTD_NAME)
    write_run(dtd / "seed1", b2n(80.0, 60.0), cfg)
    write_run(dtd / "seed01", b2n(70.0, 50.0), cfg)  # seed 1 again
    write_run(dtd / "seed2", b2n(82.0, 66.0), cfg)
    write_run(dtd / "seed3", b2n(99.0, 99.0), run_config(DATASET__NAME="EuroSAT"))  # another dataset's run
    write_run(dtd / "seed4", b2n(150.0, 60.0), cfg)  # not a percentage
    write_run(dtd / "seed5", b2n(80.0, -1.0), cfg)
    write_run(dtd / "seed6", json.dumps(b2n(80.0, 60.0)).replace("60.0", "NaN", 1), cfg)
    write_run(dtd / "seed7", b2n(84.0, 72.0), cfg)
    rc, out, err = run_cli(capsys, "report", str(root), "--format", "json")
    assert rc == 0
    row = json.loads(out)["datasets"]["DescribableTextures"]
    assert row["base"] == pytest.approx({"mean": 83.0, "std": math.sqrt(2), "n": 2})  # seeds 2 and 7 only
    assert row["new"] == pytest.approx({"mean": 69.0, "std": math.sqrt(18), "n": 2})
    assert "kd/dtd/seed3: its config.yaml names dataset eurosat" in err
    for seed in ("seed1", "seed01"):
        assert f"kd/dtd/{seed}: seed 1 is there 2 times" in err
    assert "kd/dtd/seed4: malformed results.json" in err and "150.0, outside [0, 100]" in err
    assert "kd/dtd/seed5: malformed results.json" in err and "-1.0, outside [0, 100]" in err
    assert "kd/dtd/seed6: malformed results.json" in err and "not a finite number" in err
    rc, out, _ = run_cli(capsys, "report", str(root))
    assert "| DescribableTextures | 83.00 ± 1.41 | 69.00 ± 4.24 |" in out
    assert "Incomplete or failed runs (3):" in out and "Not averaged with the others (3):" in out
    # nothing left to average: one line naming a run and why
    rc, out, err = run_cli(capsys, "report", str(dtd / "seed3"))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "can be averaged" in err and "names dataset eurosat" in err


def test_fewshot_kinds_shots_and_duplicates(tmp_path, capsys):
    root = tmp_path / "out"
    pets = root / "fewshot" / "kd" / "oxford_pets"
    for seed, acc in ((1, 80.0), (2, 84.0)):
        write_run(pets / "shots4" / f"seed{seed}", {"all": {"accuracy": acc}},
                  run_config(DATASET__NAME=PETS_NAME, DATASET__NUM_SHOTS=4))
    write_run(pets / "shots4" / "seed3", {"all": {"accuracy": 10.0}},  # a 16-shot run in the 4-shot folder
              run_config(DATASET__NAME=PETS_NAME, DATASET__NUM_SHOTS=16))
    write_run(pets / "shots4" / "seed4", {"all": {"accuracy": 20.0}},
              run_config(DATASET__NAME=PETS_NAME, DATASET__NUM_SHOTS=4, DISTILL__PROTOCOL="transductive"))
    write_run(pets / "shots4" / "seed002", {"all": {"accuracy": 30.0}},
              run_config(DATASET__NAME=PETS_NAME, DATASET__NUM_SHOTS=4))
    rc, out, err = run_cli(capsys, "report", str(root), "--fewshot", "--format", "json")
    assert rc == 0
    methods = json.loads(out)["methods"]
    assert set(methods) == {"kd [inductive]", "kd [transductive]"}
    assert methods["kd [inductive]"]["4"]["datasets"]["OxfordPets"] == {"mean": 80.0, "std": None, "n": 1}
    assert methods["kd [transductive]"]["4"]["datasets"]["OxfordPets"]["mean"] == 20.0
    assert "shots4/seed3: its config.yaml says DATASET.NUM_SHOTS 16, not 4" in err
    assert "shots4/seed002: seed 2 is there 2 times" in err and "mixes runs of different kinds" in err


def test_sweep_cells_of_one_kind_and_each_seed_once(tmp_path, capsys):
    root = tmp_path / "sweep"
    cfg = run_config(DATASET__NAME="EuroSAT")
    for cell, seeds in (("a0_b1", {1: (80.0, 60.0), 2: (82.0, 62.0)}), ("a1_b1", {1: (70.0, 50.0), 2: (72.0, 52.0)})):
        for seed, (b, n) in seeds.items():
            write_run(root / "abkd" / "eurosat" / cell / f"seed{seed}", b2n(b, n), cfg)
    write_run(root / "abkd" / "eurosat" / "a1_b1" / "seed01", b2n(99.0, 99.0), cfg)  # seed 1 again
    write_run(root / "abkd" / "eurosat" / "a0_b1" / "seed3", b2n(10.0, 10.0),
              run_config(DATASET__NAME="EuroSAT", DISTILL__PROTOCOL="transductive"))
    rc, out, err = run_cli(capsys, "report", str(root), "--sweep", "--format", "json")
    assert rc == 0
    sweeps = {s["method"]: s for s in json.loads(out)["sweeps"]}
    assert set(sweeps) == {"abkd [inductive]", "abkd [transductive]"}
    cells = {(c["alpha"], c["beta"]): c for c in sweeps["abkd [inductive]"]["cells"]}
    assert cells[0.0, 1.0]["base"] == pytest.approx({"mean": 81.0, "std": math.sqrt(2), "n": 2})
    assert cells[1.0, 1.0]["base"] == {"mean": 72.0, "std": None, "n": 1}  # seed 2 only
    assert [c["base"]["mean"] for c in sweeps["abkd [transductive]"]["cells"]] == [10.0]
    assert "a1_b1/seed01: seed 1 is there 2 times" in err and "abkd/eurosat: mixes runs" in err


def test_sweep_plot_into_a_folder_or_without_suffix_says_the_file_written(root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "plots"
    folder.mkdir()
    rc, _, err = run_cli(capsys, "report", str(root), "--sweep", "--plot", str(folder))
    png = folder / "sweep_abkd_eurosat.png"
    assert rc == 0 and err.splitlines()[0] == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "plots.png").exists()
    bare = tmp_path / "heatmap"
    rc, _, err = run_cli(capsys, "report", str(root), "--sweep", "--plot", str(bare))
    assert rc == 0 and err.splitlines()[0] == f"wrote {bare}.png" and Path(f"{bare}.png").is_file()
    assert not bare.exists()
