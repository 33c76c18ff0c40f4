"""A shortened `clipkd demo` on the shipped tiny CLIPs: distillation must move the student toward the
teacher and lift Base accuracy over the zero-shot student."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from clipkd.toy.demo import run_demo
from clipkd.toy.pretrain import RECIPES, weights_path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    for role in RECIPES:
        if not weights_path(role).is_file():
            pytest.fail(f"shipped toy weights missing: {weights_path(role)} (run 'clipkd toy pretrain')")
    out = tmp_path_factory.mktemp("demo")
    stderr = io.StringIO()  # not a terminal, as a log file
    with contextlib.redirect_stderr(stderr):
        payload = run_demo(out / "run", cache_dir=out / "cache", seeds=[1], transductive=False, progress=False,
                           overrides=["OPTIM.MAX_EPOCH", "5"])
    (out / "stderr.txt").write_text(stderr.getvalue())
    return out / "run", payload


def test_demo_writes_results(demo):
    out, payload = demo
    data = json.loads((out / "demo_results.json").read_text())
    assert data["rows"] == payload["rows"]
    methods = {(r["method"], r["protocol"]) for r in data["rows"]}
    assert methods == {("teacher_zeroshot", "zero-shot"), ("student_zeroshot", "zero-shot"),
                       ("kd", "inductive"), ("abkd", "inductive")}
    for r in data["rows"]:
        assert set(r) >= {"method", "protocol", "seed", "base", "new", "hm"}
    assert "| abkd | inductive |" in (out / "demo_results.md").read_text()


def test_distillation_moves_student_toward_teacher(demo):
    _, payload = demo
    rows = {r["method"]: r for r in payload["rows"]}
    zs, teacher = rows["student_zeroshot"], rows["teacher_zeroshot"]
    assert teacher["base"] > 100 / 18 * 2  # far above chance among 18 base classes
    for method in ("kd", "abkd"):
        assert rows[method]["agreement"] > zs["agreement"] + 5, (method, rows[method], zs)
        assert rows[method]["base"] > zs["base"] + 5, (method, rows[method], zs)


def test_eval_zero_shot_student_gives_the_demo_row(demo, capsys):
    """`clipkd eval --zero-shot student` is the student's CLIP with its own text tower, as the demo's row."""
    from clipkd.cli.main import main
    from clipkd.toy.demo import DEMO_CONFIG, prepare_assets

    out, payload = demo
    data_root, weights = prepare_assets(out.parent / "cache", progress=False)
    rows = {r["method"]: r for r in payload["rows"]}
    result = out.parent / "zs.json"
    for which, row in (("student", rows["student_zeroshot"]), ("teacher", rows["teacher_zeroshot"])):
        assert main(["eval", "--zero-shot", which, "--config", str(DEMO_CONFIG), "--root", str(data_root),
                     "--seed", "1", "--output", str(result), "MODEL.TEACHER.PRETRAINED", str(weights["teacher"]),
                     "MODEL.STUDENT.PRETRAINED", str(weights["student"])]) == 0
        got = json.loads(result.read_text())
        assert (got["base"]["accuracy"], got["new"]["accuracy"]) == (row["base"], row["new"]), which


def test_demo_reports_each_stage_and_its_time_on_stderr(demo):
    """Without a terminal (no progress bars) a log of the demo still says which run it is at and how long each
    took: a numbered line per stage, its elapsed time, and the total."""
    out, _ = demo
    lines = (out.parent / "stderr.txt").read_text().splitlines()
    stages = [line for line in lines if re.match(r"\[\d+/\d+\] ", line)]
    assert stages == ["[1/2] zero-shot teacher and student, seed 1",
                      "[2/2] kd + abkd inductive (trained together), seed 1"], lines
    for stage in stages:  # each stage is followed by its time
        after = lines[lines.index(stage) + 1]
        assert re.fullmatch(r"\s+done in \d+\.\d s \(\d+\.\d s so far\)", after), lines
    assert re.fullmatch(r"demo: 2 stages done in \d+\.\d s", lines[-1]), lines


def test_demo_runs_are_in_the_reports_layout(demo, capsys):
    """The demo writes runs/<method>-<protocol>/toy/seed<S>: `clipkd report` and `--compare A B` read the folder as
    it is, and give the demo's own numbers."""
    from clipkd.cli.main import main
    from clipkd.reports.compare import IMAGES
    from clipkd.toy.demo import run_folder

    out, payload = demo
    for method in ("kd", "abkd"):
        assert (run_folder(out, method, "inductive", 1) / "results.json").is_file()
    assert run_folder(out, "kd", "inductive", 1) == out / "runs" / "kd-inductive" / "toy" / "seed1"
    capsys.readouterr()
    assert main(["report", str(out / "runs"), "--method", "abkd-inductive", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)["datasets"]["Toy"]
    row = next(r for r in payload["rows"] if r["method"] == "abkd")
    assert (got["base"]["mean"], got["new"]["mean"]) == (row["base"], row["new"])
    assert main(["report", str(out / "runs"), "--compare", "abkd-inductive", "kd-inductive", "--resamples", "200",
                 "--format", "json"]) == 0
    toy = json.loads(capsys.readouterr().out)["datasets"]["Toy"]
    kd = next(r for r in payload["rows"] if r["method"] == "kd")
    assert toy["seeds"] == [1] and toy["resampled"] == IMAGES, toy
    assert toy["delta"]["base"]["value"] == pytest.approx(row["base"] - kd["base"])


def test_demo_table_is_mean_and_sample_std():
    """As `clipkd report`: sample std (ddof 1) over seeds, n/a with one seed, and a line that says so."""
    from clipkd.toy.demo import format_table

    rows = [{"method": "kd", "protocol": "inductive", "seed": s, "base": b, "new": 30.0, "hm": 0.0,
             "agreement": 50.0} for s, b in ((1, 50.0), (2, 52.0), (3, 54.0))]
    rows.append({"method": "abkd", "protocol": "inductive", "seed": 1, "base": 40.0, "new": 20.0, "hm": 0.0,
                 "agreement": 45.0})
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("Mean ± sample std (ddof 1) over seeds 1, 2, 3"), lines
    assert "| kd | inductive | 3 | 52.00 ± 2.00 | 30.00 ± 0.00 | 38.05 | 50.00 ± 0.00 |" in lines  # pstdev: 1.63
    assert "| abkd | inductive | 1 | 40.00 ± n/a (1 seed) | 20.00 ± n/a (1 seed) | 26.67 | 45.00 ± n/a (1 seed) |" \
        in lines
