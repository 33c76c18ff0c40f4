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
