"""Cross-dataset transfer and domain generalisation: the four ImageNet variants as layouts, `clipkd eval --run DIR
--dataset STEM`, the scripts, and `clipkd report --xd/--dg` recomputed from the results files (synthetic data,
tiny random CLIPs)."""

from __future__ import annotations

import csv
import io
import math
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from clipkd.cli.main import main
from clipkd.config import build_config
from clipkd.data.readers import read_dataset
from clipkd.data.specs import DATASETS, DG_STEMS, DG_TARGETS, STEMS, XD_TARGETS, get_spec
from clipkd.data.synth import synthesize
from clipkd.runs.run import Run
from clipkd.errors import ClipkdError, ConfigError, DataError
from tests_helpers import run_config

ROOT = Path(__file__).resolve().parents[1]
CLIPKD = str(Path(sys.executable).parent / "clipkd")
CLASSES = 5
TINY = [
    "MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
    "MODEL.TEACHER.CHECKPOINT", "zero-shot",
    "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
    "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "INPUT.SIZE", "(32, 32)",
    "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "1",
    "DATASET.NUM_SHOTS", "2",
]


@pytest.fixture(scope="session")
def xd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic ImageNet, two cross-dataset targets and the four ImageNet variants (5 classes each)."""
    root = tmp_path_factory.mktemp("xd-data")
    for i, stem in enumerate(("imagenet", "dtd", "eurosat", *DG_STEMS)):
        synthesize(root, stem, classes=CLASSES, images_per_class=6, seed=200 + i)
    return root


# ---------------------------------------------------------------- the four layouts
def test_specs_as_coop_defines_them():
    assert STEMS == ("imagenet", *XD_TARGETS) and len(XD_TARGETS) == 10
    assert DG_TARGETS == DG_STEMS == ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    expected = {  # CoOp's datasets/*.py: folder, image folder, Dassl name; DATASETS.md: classes
        "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "ImageNetV2", 1000),
        "imagenet_sketch": ("imagenet-sketch", "images", "ImageNetSketch", 1000),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", "ImageNetA", 200),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", "ImageNetR", 200),
    }
    for stem, (folder, image_dir, name, n) in expected.items():
        spec = get_spec(name)
        assert (spec.stem, spec.folder, spec.image_dir, spec.num_classes) == (stem, folder, image_dir, n)
        assert spec.test_only and spec.template == "a photo of a {}."
        assert build_config([ROOT / "configs" / "datasets" / f"{stem}.yaml"]).DATASET.NAME == name
    assert not any(DATASETS[s].test_only for s in STEMS)


@pytest.mark.parametrize("stem", DG_STEMS)
def test_variant_reads_back_test_only(xd_root, stem):
    spec = DATASETS[stem]
    split = read_dataset(xd_root, spec)
    assert split.train == [] and split.val == [] and split.test
    assert {d.label for d in split.test} == set(range(CLASSES))
    lines = dict(line.split(" ", 1) for line in (xd_root / spec.folder / "classnames.txt").read_text().splitlines())
    folders = sorted(p.name for p in (xd_root / spec.folder / spec.image_dir).iterdir() if p.is_dir())
    for d in split.test:
        assert os.path.isfile(split.impath(d)) and d.relpath.startswith(spec.image_dir + "/")
        folder = d.relpath.split("/")[-2]
        if stem == "imagenetv2":  # folder i = class i = line i of classnames.txt
            assert folder == str(d.label) and d.classname == list(lines.values())[d.label]
        else:  # label = index of the wnid in the sorted folder list; the name from ImageNet's classnames.txt
            assert folder == folders[d.label] and d.classname == lines[folder]
    if stem != "imagenetv2":
        assert len(lines) == 1000  # a copy of ImageNet's file, as CoOp's DATASETS.md says
    if stem in ("imagenet_a", "imagenet_r"):
        assert (xd_root / spec.folder / spec.image_dir / "README.txt").is_file()  # not a class


@pytest.mark.parametrize("stem", DG_STEMS)
def test_synth_check_split_cli(tmp_path, capsys, stem):
    assert main(["data", "synth", "--dataset", stem, "--root", str(tmp_path), "--classes", "3",
                 "--images-per-class", "4"]) == 0
    assert main(["data", "check", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"OK   {stem} " in out and "3 classes, test 6 images (evaluation set" in out
    assert main(["data", "split", "--root", str(tmp_path), "--dataset", stem, "--shots", "16", "--seed", "1",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train"] == [] and data["val"] == [] and len(data["test"]) == 6 and len(data["classnames"]) == 3
    assert main(["data", "split", "--root", str(tmp_path), "--dataset", stem, "--shots", "2", "--seed", "1",
                 "--subsample", "base"]) == 2
    assert "is an evaluation set" in capsys.readouterr().err


def test_variant_layout_errors(xd_root, tmp_path, capsys):
    for stem in ("imagenetv2", "imagenet_a"):
        shutil.copytree(xd_root / DATASETS[stem].folder, tmp_path / DATASETS[stem].folder)
    v2, a = tmp_path / "imagenetv2", tmp_path / "imagenet-adversarial"
    (a / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"classnames.txt not found.*imagenet-classnames --root DATA --dataset "
                                        r"imagenet_a"):
        read_dataset(tmp_path, get_spec("imagenet_a"))
    assert main(["data", "imagenet-classnames", "--root", str(tmp_path), "--dataset", "imagenet_a"]) == 0
    assert (a / "classnames.txt").read_text() == (xd_root / "imagenet-adversarial" / "classnames.txt").read_text()
    (a / "imagenet-a" / "n99999999").mkdir()
    with pytest.raises(DataError, match="n99999999 has no line in"):
        read_dataset(tmp_path, get_spec("imagenet_a"))
    shutil.rmtree(v2 / "imagenetv2-matched-frequency-format-val" / "3")
    with pytest.raises(DataError, match=r"format-val/3 not found.*5 lines, so class folders 0..4"):
        read_dataset(tmp_path, get_spec("imagenetv2"))
    (v2 / "imagenetv2-matched-frequency-format-val" / "n01440764").mkdir()
    with pytest.raises(DataError, match="n01440764 is not a class index 0..4"):
        read_dataset(tmp_path, get_spec("imagenetv2"))
    capsys.readouterr()


def test_training_on_an_evaluation_set_is_refused(xd_root, tmp_path):
    cfg = build_config([ROOT / "configs/datasets/imagenet_r.yaml", ROOT / "configs/methods/abkd_promptkd.yaml"],
                       [*TINY, "DATASET.ROOT", str(xd_root), "DATASET.SUBSAMPLE_CLASSES", "all"])
    with pytest.raises(ConfigError, match=r"ImageNetR is an evaluation set.*clipkd eval --run DIR --dataset "
                                          r"imagenet_r"):
        Run(cfg, tmp_path / "run", echo=False).fit()
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- train on ImageNet, evaluate elsewhere, report
def split_classnames(root: Path, stem: str, capsys: pytest.CaptureFixture) -> list[str]:
    """The prompt-ready class names of all of ``stem``'s classes, as `clipkd data split --json` gives them."""
    capsys.readouterr()
    assert main(["data", "split", "--root", str(root), "--dataset", stem, "--shots", "0", "--seed", "1",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)["classnames"]


def _train(root: Path, out: Path, seed: int, *extra: str) -> dict:
    cfg = build_config([ROOT / "configs/datasets/imagenet.yaml", ROOT / "configs/methods/abkd_promptkd.yaml",
                        ROOT / "configs/protocols/xd.yaml"],
                       [*TINY, "DATASET.ROOT", str(root), "SEED", str(seed), *extra])
    return Run(cfg, out, echo=False).fit()


def test_train_on_imagenet_evaluate_on_targets_and_report(xd_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "transfer"
    runs = {("abkd_promptkd", 1): (), ("abkd_promptkd", 2): (), ("abkd_ivlp", 1): ("MODEL.STUDENT.TYPE", "ivlp")}
    for (method, seed), extra in runs.items():
        run = out / method / "imagenet" / f"seed{seed}"
        results = _train(xd_root, run, seed, *extra)
        assert set(results) >= {"all"} and "base" not in results and results["all"]["n"] == CLASSES * 3
        for target in ("dtd", "imagenet_a"):
            assert main(["eval", "--run", str(run), "--dataset", target]) == 0
            printed = capsys.readouterr().out
            assert f"wrote {run / 'eval' / target / 'results.json'}" in printed
            saved = json.loads((run / "eval" / target / "results.json").read_text())
            assert saved["dataset"] == target and saved["source"] == "imagenet" and saved["classes"] == CLASSES
            assert saved["all"]["n"] == len(read_dataset(xd_root, get_spec(target)).test)
            assert saved["teacher"] == "zero-shot"
    # the source's own test split, evaluated the same way, gives the training run's number exactly
    seed1 = out / "abkd_promptkd" / "imagenet" / "seed1"
    assert main(["eval", "--run", str(seed1), "--dataset", "imagenet", "--output", str(tmp_path / "self.json")]) == 0
    again = json.loads((tmp_path / "self.json").read_text())["all"]
    assert again == json.loads((seed1 / "results.json").read_text())["all"]
    # a PromptKD student classifies with its teacher's embeddings of the target's class names, an IVLP student with
    # its own text tower
    from clipkd.models.student import IVLPStudent
    from clipkd.models.teacher import Teacher

    asked: list[tuple[str, tuple[str, ...]]] = []
    for cls in (Teacher, IVLPStudent):
        real = cls.text_features
        monkeypatch.setattr(cls, "text_features", lambda self, names, real=real, cls=cls: (
            asked.append((cls.__name__, tuple(names))), real(self, names))[1])
    dtd_names = tuple(split_classnames(xd_root, "dtd", capsys))
    for method, reader in (("abkd_promptkd", "Teacher"), ("abkd_ivlp", "IVLPStudent")):
        asked.clear()
        assert main(["eval", "--run", str(out / method / "imagenet" / "seed1"), "--dataset", "dtd",
                     "--output", str(tmp_path / "again.json")]) == 0
        assert (reader, dtd_names) in asked and all(names == dtd_names for _, names in asked)
        assert all(who == "Teacher" for who, _ in asked) == (reader == "Teacher")
    monkeypatch.undo()
    capsys.readouterr()

    def acc(path: Path) -> float:
        return json.loads(path.read_text())["all"]["accuracy"]

    for setting, target in (("xd", "dtd"), ("dg", "imagenet_a")):
        assert main(["report", str(out), f"--{setting}", "--format", "json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["setting"] == setting and report["source"] == "imagenet"
        for method, seeds in (("abkd_promptkd", (1, 2)), ("abkd_ivlp", (1,))):
            row = report["methods"][method]
            src = [acc(out / method / "imagenet" / f"seed{s}" / "results.json") for s in seeds]
            tgt = [acc(out / method / "imagenet" / f"seed{s}" / "eval" / target / "results.json") for s in seeds]
            # the sample std (ddof 1) since issue #19; one seed: none (null)
            std = lambda v: pytest.approx(statistics.stdev(v)) if len(v) > 1 else None  # noqa: E731
            assert row["source"] == {"mean": pytest.approx(statistics.fmean(src)), "std": std(src), "n": len(seeds)}
            assert row["targets"] == {target: {"mean": pytest.approx(statistics.fmean(tgt)), "std": std(tgt),
                                               "n": len(seeds)}}
            assert row["average"] == pytest.approx(statistics.fmean(tgt)) and row["n_targets"] == 1
            assert row["seeds"] == list(seeds)
    # the other formats carry the same numbers
    assert main(["report", str(out), "--dg", "--method", "abkd_promptkd"]) == 0
    md = capsys.readouterr().out
    assert "Domain generalisation" in md and "| abkd_promptkd |" in md and "abkd_ivlp" not in md and "1/4" in md
    assert main(["report", str(out), "--xd", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "setting,method,dataset,name,role,mean,std,n"
    assert any(line.startswith("xd,abkd_ivlp,dtd,DescribableTextures,target,") for line in lines)
    assert main(["report", str(out), "--dg", "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}{lcccccc}" in tex and "abkd\\_promptkd" in tex and r"$\pm$" in tex


def test_eval_dataset_errors(xd_root, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("SEED: 1\n")
    assert main(["eval", "--run", str(run), "--dataset", "dtd"]) == 2
    assert "model.pt not found" in capsys.readouterr().err
    assert main(["eval", "--zero-shot", "student", "--dataset", "dtd"]) == 2
    assert "--dataset-config configs/datasets/dtd.yaml" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--dataset", "dtd", "--subsample", "base"]) == 2
    assert "drop --subsample" in capsys.readouterr().err


# ---------------------------------------------------------------- report details on hand-written trees
def _results(folder: Path, accuracy: float, **extra: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("SEED: 1\n")
    (folder / "results.json").write_text(json.dumps({"all": {"accuracy": accuracy, "n": 10}, **extra}))


def test_report_reads_transductive_target_runs_and_flags_ambiguity(tmp_path, capsys):
    root = tmp_path / "transfer"
    for seed, (src, dtd, eurosat) in {1: (70.0, 50.0, 40.0), 2: (72.0, 54.0, 44.0)}.items():
        _results(root / "promptkd_xd" / "imagenet" / f"seed{seed}", src)
        _results(root / "promptkd_xd" / "dtd" / f"seed{seed}", dtd)  # a run of its own (transductive)
        _results(root / "promptkd_xd" / "eurosat" / f"seed{seed}", eurosat)
    _results(root / "promptkd_xd" / "imagenet" / "seed2" / "eval" / "eurosat", 99.0)  # and an evaluation: ambiguous
    (root / "promptkd_xd" / "ucf101" / "seed1").mkdir(parents=True)  # unfinished
    (root / "promptkd_xd" / "ucf101" / "seed1" / "config.yaml").write_text("SEED: 1\n")
    assert main(["report", str(root), "--xd", "--format", "json"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)["methods"]["promptkd_xd"]
    assert row["source"]["mean"] == pytest.approx(71.0) and row["source"]["std"] == pytest.approx(math.sqrt(2))
    assert row["targets"]["dtd"] == {"mean": 52.0, "std": pytest.approx(math.sqrt(8)), "n": 2}  # sample std
    assert row["targets"]["eurosat"] == {"mean": 40.0, "std": None, "n": 1}  # seed 2 is ambiguous: left out
    assert row["average"] == pytest.approx(46.0) and row["n_targets"] == 2
    assert "keep one of them" in captured.err and "ucf101/seed1: no results.json" in captured.err
    # a method folder as ROOT gives the same numbers; md lists the problems after the table
    assert main(["report", str(root / "promptkd_xd"), "--xd"]) == 0
    md = capsys.readouterr().out
    assert "| promptkd_xd | 71.00 ± 1.41 |" in md and "Incomplete or failed runs and evaluations (2)" in md


def test_report_errors_and_compare(tmp_path, capsys, monkeypatch):
    root = tmp_path / "transfer"
    _results(root / "m" / "imagenet" / "seed1", 70.0)
    _results(root / "m" / "imagenet" / "seed1" / "eval" / "imagenet_a", 30.0)
    assert main(["report", str(root), "--dg", "--compare", "published"]) == 2
    assert "no published domain generalisation numbers are stored" in capsys.readouterr().err
    assert main(["report", str(root), "--xd", "--dataset", "dtd"]) == 2
    assert "--dataset does not apply to --xd" in capsys.readouterr().err
    assert main(["report", str(root), "--dg", "--method", "other"]) == 2
    assert "no completed dg runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one mode at a time
        main(["report", str(root), "--xd", "--dg"])
    capsys.readouterr()
    from clipkd.reports import published

    fake = published.PublishedTransfer("Paper", "m", 71.0, {"imagenet_a": 31.5}, 31.5)
    monkeypatch.setitem(published.TRANSFER_REFERENCES["published"], "dg", ([fake], "a test row"))
    assert main(["report", str(root), "--dg", "--compare", "published"]) == 0
    md = capsys.readouterr().out
    assert "| published: Paper | 71.00 | — | — | 31.50 | — | 31.50 |" in md
    assert re.search(r"\| Δ m - published \| -1\.00 \| — \| — \| -1\.50 \| — \| — \|", md)  # no full average
    assert "Published: a test row" in md


# ---------------------------------------------------------------- the scripts
def _script(name: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], env={**os.environ, **env},
                          capture_output=True, text=True)


def test_dg_and_xd_scripts_end_to_end(xd_root, tmp_path):
    env = {"DATA": str(xd_root), "OUTPUT": str(tmp_path / "output"), "CLIPKD": CLIPKD, "XD_TARGETS": "dtd",
           "DG_TARGETS": "imagenet_a"}
    proc = _script("dg.sh", "1", "abkd_promptkd", *TINY, env=env)  # trains the ImageNet run, evaluates ImageNet-A
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "output/transfer/abkd_promptkd/imagenet/seed1"
    config = (run / "config.yaml").read_text()
    assert "SUBSAMPLE_CLASSES: all" in config and "NUM_SHOTS: 2" in config  # xd.yaml, then the user's override
    assert json.loads((run / "eval/imagenet_a/results.json").read_text())["dataset"] == "imagenet_a"
    assert "Domain generalisation" in proc.stdout and "| abkd_promptkd |" in proc.stdout
    proc = _script("xd.sh", "1", "abkd_promptkd", *TINY, env=env)  # the same ImageNet run, evaluated on DTD
    assert proc.returncode == 0, proc.stderr
    assert f"skip {run} (finished)" in proc.stdout
    assert json.loads((run / "eval/dtd/results.json").read_text())["dataset"] == "dtd"
    assert "Cross-dataset transfer" in proc.stdout and "1/10" in proc.stdout


FAKE_CLIPKD = """#!/usr/bin/env bash
# records each call; answers `config show` with the real clipkd; `train` / `eval` write results as clipkd would
# (train --resume of a finished run: skipped)
echo "$*" >> "$CALLS"
case "$1" in
  config) exec "$REAL_CLIPKD" "$@" ;;
  train) out=""; prev=""; for a in "$@"; do [ "$prev" = --output-dir ] && out="$a"; prev="$a"; done
         if [[ " $* " == *" --resume "* && -f "$out/results.json" ]]; then echo "skip $out (finished)"; exit 0; fi
         mkdir -p "$out"; touch "$out/config.yaml"; echo '{"all": {"accuracy": 50.0, "n": 1}}' > "$out/results.json" ;;
  eval) run="$3"; ds="$5"; mkdir -p "$run/eval/$ds"
        echo '{"all": {"accuracy": 40.0, "n": 1}}' > "$run/eval/$ds/results.json" ;;
  report) exec "$REAL_CLIPKD" "$@" ;;
esac
"""


def test_scripts_choose_per_dataset_runs_for_a_transductive_method(tmp_path):
    fake = tmp_path / "clipkd"
    fake.write_text(FAKE_CLIPKD)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    teacher = tmp_path / "ImageNet-xd" / "model.pth.tar-20"
    env = {"DATA": str(tmp_path / "data"), "OUTPUT": str(tmp_path / "out"), "CLIPKD": str(fake),
           "REAL_CLIPKD": CLIPKD, "CALLS": str(calls), "XD_TEACHER": str(teacher)}
    proc = _script("xd.sh", "3", "promptkd_xd", env=env)
    assert proc.returncode == 0, proc.stderr
    trains = [line for line in calls.read_text().splitlines() if line.startswith("train")]
    assert len(trains) == 11 and not any(line.startswith("eval") for line in calls.read_text().splitlines())
    for stem, line in zip(("imagenet", *XD_TARGETS), trains):
        assert f"--output-dir {tmp_path}/out/transfer/promptkd_xd/{stem}/seed3" in line
        assert f"configs/datasets/{stem}.yaml" in line and "configs/protocols/xd_transductive.yaml" in line
        assert f"MODEL.TEACHER.CHECKPOINT {teacher}" in line  # the ImageNet teacher everywhere
    assert "| promptkd_xd | 50.00 ± n/a (1 seed) |" in proc.stdout and "10/10" in proc.stdout
    # dg.sh: the finished ImageNet run is reused and evaluated on the variants, whatever the protocol
    calls.unlink()
    proc = _script("dg.sh", "3", "promptkd_xd", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    trains = [line for line in lines if line.startswith("train")]  # clipkd train --resume decides: finished, skipped
    assert len(trains) == 1 and "--resume" in trains[0] and "skip" in proc.stdout
    evals = [line for line in lines if line.startswith("eval")]
    assert [line.split()[4] for line in evals] == list(DG_TARGETS)
    assert "| promptkd_xd | 50.00 ± n/a (1 seed) | 40.00 ± n/a (1 seed) |" in proc.stdout
    # an inductive method is trained once (configs/protocols/xd.yaml) and evaluated on every target
    calls.unlink()
    proc = _script("xd.sh", "1", "kd_promptkd", env={**env, "XD_TEACHER": "", "TEACHERS": str(tmp_path / "t")})
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    trains = [line for line in lines if line.startswith("train")]
    assert len(trains) == 1 and "configs/protocols/xd.yaml" in trains[0]
    assert f"MODEL.TEACHER.CHECKPOINT {tmp_path}/t/ImageNet" in trains[0]  # PromptKD's teacher_model layout
    assert [line.split()[4] for line in lines if line.startswith("eval")] == list(XD_TARGETS)


def test_xd_scripts_list_the_protocol_targets():
    xd = (ROOT / "scripts/xd.sh").read_text()
    dg = (ROOT / "scripts/dg.sh").read_text()
    assert f"XD_TARGETS:-{' '.join(XD_TARGETS)}}}" in xd and f"DG_TARGETS:-{' '.join(DG_TARGETS)}}}" in dg


def test_promptkd_xd_recipe():
    cfg = build_config([ROOT / "configs/datasets/dtd.yaml", ROOT / "configs/methods/promptkd_xd.yaml"])
    assert (cfg.DISTILL.PROTOCOL, cfg.DATASET.NUM_SHOTS, cfg.DATASET.SUBSAMPLE_CLASSES) == ("transductive", 0, "all")
    assert (cfg.MODEL.PROMPT.DEPTH_VISION, cfg.MODEL.STUDENT.TYPE, cfg.DISTILL.LOSS) == (3, "promptkd", "promptkd_kl")
    assert cfg.MODEL.TEACHER.PROMPTED and cfg.DISTILL.WEIGHT == 1000.0


def test_unknown_setting_is_a_value_error():
    from clipkd.reports.transfer import transfer_table

    with pytest.raises(ValueError):
        transfer_table(".", "b2n")
    with pytest.raises(ClipkdError):
        transfer_table("/nonexistent-folder", "xd")


def test_teacher_is_pinned_to_the_source_dataset(tmp_path):
    """PromptKD's teacher_model/<DatasetName>/VLPromptLearner layout: switching DATASET.NAME to the target must not
    switch the teacher to the target's."""
    from clipkd.runs.transfer import target_overrides

    teachers = tmp_path / "teacher_model"
    for name in ("ImageNet", "DescribableTextures"):
        (teachers / name / "VLPromptLearner").mkdir(parents=True)
        (teachers / name / "VLPromptLearner" / "model-best.pth.tar").write_bytes(b"")
    cfg = build_config([ROOT / "configs/datasets/imagenet.yaml", ROOT / "configs/methods/promptkd.yaml"],
                       ["MODEL.TEACHER.CHECKPOINT", str(teachers)])
    pairs = dict(zip(*[iter(target_overrides(cfg, "dtd"))] * 2))
    assert pairs == {"DATASET.NAME": "DescribableTextures", "DATASET.SUBSAMPLE_CLASSES": "all",
                     "DATASET.NUM_SHOTS": "0",
                     "MODEL.TEACHER.CHECKPOINT": str(teachers / "ImageNet/VLPromptLearner/model-best.pth.tar")}
    zero = build_config([ROOT / "configs/datasets/imagenet.yaml", ROOT / "configs/methods/promptkd.yaml"],
                        ["MODEL.TEACHER.CHECKPOINT", "zero-shot"])
    assert "MODEL.TEACHER.CHECKPOINT" not in target_overrides(zero, "imagenet_a")


def test_report_rows_hold_one_kind_of_run_and_each_seed_once(tmp_path, capsys):
    root = tmp_path / "transfer"
    imagenet = root / "m" / "imagenet"
    for seed, src, target, teacher in (("seed1", 70.0, 30.0, "prompted: /t/model.pt"),
                                       ("seed2", 72.0, 34.0, "prompted: /t/model.pt"),
                                       ("seed01", 10.0, 10.0, "prompted: /t/model.pt"),  # seed 1 again
                                       ("seed3", 50.0, 20.0, "zero-shot")):  # another kind of teacher
        _results(imagenet / seed, src, teacher=teacher)
        (imagenet / seed / "config.yaml").write_text(run_config(DATASET__NAME="ImageNet"))
        _results(imagenet / seed / "eval" / "imagenet_a", target, teacher=teacher)
    assert main(["report", str(root), "--dg", "--format", "json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["methods"]
    assert set(rows) == {"m [prompted teacher]", "m [zero-shot teacher]"}
    prompted = rows["m [prompted teacher]"]
    assert prompted["seeds"] == [2] and prompted["source"] == {"mean": 72.0, "std": None, "n": 1}
    assert prompted["targets"]["imagenet_a"]["mean"] == 34.0
    assert rows["m [zero-shot teacher]"]["source"]["mean"] == 50.0
    for seed in ("seed1", "seed01"):
        assert f"m/imagenet/{seed}: seed 1 is there 2 times" in captured.err
    assert "- m/imagenet: mixes runs of different kinds (prompted teacher: 1 run; zero-shot teacher: 1 run)" in \
        captured.err
    assert main(["report", str(root), "--dg"]) == 0
    assert "Not averaged with the others (3):" in capsys.readouterr().out


# ---------------------------------------------------------------- --ci and the warnings (issue #19)
def _ci95(values: list[float]) -> float:
    from scipy import stats

    return stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _transfer_tree(root: Path, method: str = "m", src=(70.0, 72.0, 71.0), dtd=(50.0, 54.0, 52.0),
                   eurosat=(40.0, 42.0, 41.0), epochs: int = 5, **extra: object) -> Path:
    """``method``'s source runs (seeds 1..) with evaluations on DTD and EuroSAT; None: no such evaluation."""
    for seed, (s, d, e) in enumerate(zip(src, dtd, eurosat), start=1):
        run = root / method / "imagenet" / f"seed{seed}"
        _results(run, s, epoch=epochs, **extra)
        (run / "config.yaml").write_text(run_config(DATASET__NAME="ImageNet", SEED=seed, OPTIM__MAX_EPOCH=epochs))
        for stem, acc in (("dtd", d), ("eurosat", e)):
            if acc is not None:
                _results(run / "eval" / stem, acc)
    return root


def _warnings(capsys, root: Path, *extra: str) -> list[str]:
    assert main(["report", str(root), "--xd", *extra]) == 0
    out = capsys.readouterr().out
    return [x for x in out.split("Warnings (")[1].splitlines()[1:] if x.startswith("- ")] if "Warnings (" in out \
        else []


def test_transfer_ci_in_every_format(tmp_path, capsys):
    src, dtd = [70.0, 72.0, 71.0], [50.0, 54.0, 52.0]
    root = _transfer_tree(tmp_path / "t", src=src, dtd=dtd, eurosat=(40.0, None, None))
    assert main(["report", str(root), "--xd", "--format", "json", "--ci"]) == 0
    row = json.loads(capsys.readouterr().out)["methods"]["m"]
    assert row["source"] == pytest.approx({"mean": 71.0, "std": statistics.stdev(src), "n": 3, "ci95": _ci95(src)})
    assert row["targets"]["dtd"]["ci95"] == pytest.approx(_ci95(dtd))
    assert row["targets"]["eurosat"] == {"mean": 40.0, "std": None, "n": 1, "ci95": None}  # one seed: null
    assert main(["report", str(root), "--xd", "--format", "json", "--ci", "--std", "population"]) == 0
    row = json.loads(capsys.readouterr().out)["methods"]["m"]  # the CI always uses the sample std
    assert row["source"]["std"] == pytest.approx(statistics.pstdev(src)) and row["source"]["ci95"] == \
        pytest.approx(_ci95(src))
    assert main(["report", str(root), "--xd", "--format", "json"]) == 0
    assert "ci95" not in json.loads(capsys.readouterr().out)["methods"]["m"]["source"]
    assert main(["report", str(root), "--xd", "--format", "csv", "--ci"]) == 0
    lines = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by = {(r["role"], r["dataset"]): r for r in lines}
    assert float(by["source", "imagenet"]["ci95"]) == pytest.approx(_ci95(src))
    assert float(by["target", "dtd"]["ci95"]) == pytest.approx(_ci95(dtd))
    assert by["target", "eurosat"]["ci95"] == "n/a (1 seed)" and by["average", "average"]["ci95"] == ""
    assert main(["report", str(root), "--xd", "--ci"]) == 0
    md = capsys.readouterr().out
    assert "| Seeds | ImageNet 95% CI | Caltech101 95% CI |" in md and "| UCF101 95% CI |" in md
    line = next(x for x in md.splitlines() if x.startswith("| m |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    want = {"dtd": f"± {_ci95(dtd):.2f}", "eurosat": "n/a (1 seed)"}  # ImageNet, then the targets in order
    assert cells[-11:] == [f"± {_ci95(src):.2f}", *(want.get(t, "—") for t in XD_TARGETS)]
    assert "95% CI: half-width of the t-based 95% confidence interval" in md
    assert main(["report", str(root), "--xd", "--format", "latex", "--ci"]) == 0
    tex = capsys.readouterr().out
    assert f"m & 71.00 $\\pm$ {_ci95(src):.2f} &" in tex and f"52.00 $\\pm$ {_ci95(dtd):.2f}" in tex
    assert "40.00 &" in tex and "95\\% confidence interval" in tex and "nan" not in tex.lower()


def test_transfer_clean_tree_has_no_warnings(tmp_path, capsys):
    root = _transfer_tree(tmp_path / "t")
    _transfer_tree(root, "n")
    assert _warnings(capsys, root) == []


def test_transfer_warns_first_epoch_and_base_test_selection(tmp_path, capsys):
    root = _transfer_tree(tmp_path / "t")
    (root / "m" / "imagenet" / "seed2" / "results.json").write_text(json.dumps({"all": {"accuracy": 72.0},
                                                                               "epoch": 1}))
    (line,) = _warnings(capsys, root)
    assert line.startswith("- m/imagenet/seed2: its final model is epoch 1 of 5")
    # a transductive target run of its own is checked as a run too
    _results(root / "m" / "eurosat" / "seed1", 41.0, epoch=1)
    (root / "m" / "eurosat" / "seed1" / "config.yaml").write_text(run_config(DATASET__NAME="EuroSAT",
                                                                             OPTIM__MAX_EPOCH=5))
    assert any(x.startswith("- m/eurosat/seed1: its final model is epoch 1 of 5") for x in _warnings(capsys, root))
    sel = _transfer_tree(tmp_path / "sel", selected_on="base_test")
    (line,) = _warnings(capsys, sel)
    assert line.startswith("- m/imagenet: 3 run(s) selected on base TEST")
    assert "reported apart as 'm [selected on base test]'" in line


def test_transfer_warns_a_far_seed_in_a_target(tmp_path, capsys):
    root = _transfer_tree(tmp_path / "t", dtd=(50.0, 51.0, 70.0))
    (line,) = _warnings(capsys, root, "--format", "md")
    assert line.startswith("- m/imagenet/seed3/eval/dtd: seed 3 is far from the others: accuracy 70.00 is "
                           "19.00 points from the median 51.00 of the 3 seeds")


def test_transfer_warns_missing_seeds_and_different_target_sets(tmp_path, capsys):
    root = _transfer_tree(tmp_path / "t", eurosat=(40.0, 42.0, None))
    _transfer_tree(root, "n", eurosat=(None, None, None))
    lines = _warnings(capsys, root)
    assert len(lines) == 2, lines
    assert lines[0].startswith("- m/imagenet: missing seeds: m has seed(s) 1, 2 on eurosat but 1, 2, 3 on other "
                               "datasets")
    assert lines[1].endswith(": methods compared on different dataset/seed sets: n lacks eurosat seed(s) 1, 2; "
                             "their averages are over different runs (compare on the datasets and seeds all have)")
    # json/csv: on stderr, stdout stays parseable
    assert main(["report", str(root), "--xd", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "Warnings (2):" in captured.err and json.loads(captured.out)
