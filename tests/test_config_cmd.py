"""`clipkd config show`: the merged config as YAML, --diff, and one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipkd.cli.main import main
from clipkd.config import build_config, get_cfg_defaults

REPO = Path(__file__).resolve().parents[1]
PETS = str(REPO / "configs/datasets/oxford_pets.yaml")
DTD = str(REPO / "configs/datasets/dtd.yaml")
ABKD = str(REPO / "configs/methods/abkd_promptkd.yaml")
KD = str(REPO / "configs/methods/kd_promptkd.yaml")
KD_DTD = str(REPO / "configs/per_dataset/kd_promptkd/dtd.yaml")


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def plain(node):
    """A yacs config as plain dicts and lists (tuples as lists, as YAML reads them back)."""
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, tuple):
        return [plain(v) for v in node]
    return node


def test_show_is_what_build_config_merges(capsys):
    rc, out, err = run(["config", "show", "--dataset-config", PETS, "--config", ABKD, "--root", "/data",
                        "--seed", "3", "OPTIM.LR", "0.5", "INPUT.SIZE", "(32, 32)"], capsys)
    assert rc == 0 and err == ""
    expected = build_config([PETS, ABKD], ["DATASET.ROOT", "/data", "SEED", "3", "OPTIM.LR", "0.5",
                                           "INPUT.SIZE", "(32, 32)"])
    shown = yaml.safe_load(out)
    assert shown == plain(expected)
    assert shown["OPTIM"]["LR"] == 0.5 and shown["SEED"] == 3 and shown["INPUT"]["SIZE"] == [32, 32]
    assert shown["DATASET"]["NAME"] == "OxfordPets" and shown["DATASET"]["ROOT"] == "/data"
    assert out.rstrip("\n") == expected.dump().rstrip("\n")  # the text a run's config.yaml holds


def test_show_merges_configs_in_order(capsys):
    """A per-dataset file given after the method file wins, as in clipkd train."""
    rc, out, _ = run(["config", "show", "--dataset-config", DTD, "--config", KD, "--config", KD_DTD], capsys)
    assert rc == 0
    assert yaml.safe_load(out)["DISTILL"]["WEIGHT"] == 200.0
    rc, out, _ = run(["config", "show", "--dataset-config", DTD, "--config", KD], capsys)
    assert yaml.safe_load(out)["DISTILL"]["WEIGHT"] == build_config([DTD, KD]).DISTILL.WEIGHT != 200.0


def test_show_defaults(capsys):
    rc, out, _ = run(["config", "show"], capsys)
    assert rc == 0 and yaml.safe_load(out) == plain(get_cfg_defaults())


@pytest.mark.parametrize("trailing", [False, True])
def test_diff_only_changed_keys(capsys, trailing):
    argv = ["config", "show", "--dataset-config", DTD, "--config", ABKD, "OPTIM.LR", "0.25"]
    argv = argv + ["--diff"] if trailing else argv[:2] + ["--diff"] + argv[2:]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and err == ""
    shown = yaml.safe_load(out)
    merged, defaults = build_config([DTD, ABKD], ["OPTIM.LR", "0.25"]), get_cfg_defaults()
    assert shown["OPTIM"]["LR"] == 0.25 and shown["DATASET"]["NAME"] == "DescribableTextures"

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    want = {k: v for k, v in flat(plain(merged)).items() if flat(plain(defaults))[k] != v}
    assert flat(shown) == want and want
    assert "SEED" not in shown  # unchanged keys are left out


def test_diff_of_defaults_says_so(capsys):
    rc, out, _ = run(["config", "show", "--diff"], capsys)
    assert rc == 0 and out.strip() == "# no key differs from the defaults" and yaml.safe_load(out) is None


@pytest.mark.parametrize("argv, pattern", [
    (["FOO.BAR", "1"], "unknown config key FOO.BAR"),
    (["OPTIM.LR", "-1"], "OPTIM.LR must be > 0"),
    (["OPTIM.MAX_EPOCH", "abc"], "OPTIM.MAX_EPOCH"),
    (["OPTIM.LR"], "'OPTIM.LR' has no value"),
    (["--config", "/nonexistent/method.yaml"], "config file not found: /nonexistent/method.yaml"),
    (["OPTIM.LR", "0.1", "--seed", "2"], "--seed is not a config key"),
])
def test_errors_are_one_line_exit_2(capsys, argv, pattern):
    rc, out, err = run(["config", "show", *argv], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("clipkd: error: ") and pattern in err and err.count("\n") == 1


def test_bad_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  NOPE: 1\n")
    rc, _, err = run(["config", "show", "--config", str(bad)], capsys)
    assert rc == 2 and f"{bad}: unknown config key OPTIM.NOPE" in err and err.count("\n") == 1


def test_config_show_does_not_import_torch():
    code = ("import sys; from clipkd.cli.main import main; "
            f"rc = main(['config', 'show', '--dataset-config', {PETS!r}, '--config', {ABKD!r}, '--diff']); "
            "assert rc == 0 and 'torch' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ------------------------------------------------------------------------------------------------ issue 16
TINY = ["MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
        "MODEL.TEACHER.CHECKPOINT", "zero-shot", "MODEL.STUDENT.NAME", "clipkd-tiny-student",
        "MODEL.STUDENT.PRETRAINED", "", "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2",
        "INPUT.SIZE", "(32, 32)", "DATASET.NUM_SHOTS", "4", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "1"]
PROMPTSRC = str(REPO / "configs/methods/promptsrc_teacher.yaml")


@pytest.mark.parametrize("method, extra, words", [
    (ABKD, ["MODEL.PROMPT.N_CTX_VISION", "-1"], "MODEL.PROMPT.N_CTX_VISION must be >= 0"),
    (ABKD, ["MODEL.PROMPT.DEPTH_TEXT", "-2"], "MODEL.PROMPT.DEPTH_TEXT must be >= 0"),
    (ABKD, ["DISTILL.DIVERGENCE", "ab"], "DISTILL.DIVERGENCE 'ab' does not apply to DISTILL.LOSS ab"),
    (ABKD, ["DISTILL.TTM_EXPONENT", "0.5"], "DISTILL.TTM_EXPONENT 0.5 does not apply to DISTILL.LOSS ab"),
    (ABKD, ["SEED", "9223372036854775807"], "SEED must be <= 99999999"),
    (ABKD, ["SEED", "4294967295"], "SEED must be <= 99999999"),
    (ABKD, ["DISTILL.PROTOCOL", "transductive", "DISTILL.CE_WEIGHT", "1"], "DISTILL.CE_WEIGHT needs labels"),
    (ABKD, ["DISTILL.WEIGHT", "0"], "nothing to learn from"),
    (ABKD, ["INPUT.PIXEL_MEAN", "(nan, 0.4, 0.4)"], "INPUT.PIXEL_MEAN must hold finite numbers"),
    (PROMPTSRC, ["PROMPTSRC.GPA_STD", "0"], "PROMPTSRC.GPA_STD > 0"),
    (PROMPTSRC, ["PROMPTSRC.GPA_MEAN", "1e6"], "PROMPTSRC.GPA_MEAN 1000000.0 is too far"),
    (PROMPTSRC, ["MODEL.STUDENT.TYPE", "promptkd"], "DISTILL.OBJECTIVE promptsrc: it trains prompts in both towers"),
])
def test_show_refuses_what_train_refuses(synth_root, tmp_path, capsys, method, extra, words):
    """One validation: for a config train refuses on the config alone, config show gives the same one line,
    and train gives it before writing anything."""
    args = ["--dataset-config", PETS, "--config", method]
    rc, out, show_err = run(["config", "show", *args, *TINY, *extra], capsys)
    assert rc == 2 and out == "" and words in show_err and show_err.count("\n") == 1, show_err
    folder = tmp_path / "run"
    rc, _, train_err = run(["train", "--root", str(synth_root), *args, "--output-dir", str(folder), *TINY, *extra],
                           capsys)
    assert rc == 2 and train_err == show_err
    assert not folder.exists()


def test_show_accepts_every_recipe(capsys):
    """The shipped recipes (and their per-dataset files) pass the checks config show now runs."""
    for method in sorted((REPO / "configs/methods").glob("*.yaml")):
        per_dataset = sorted((REPO / "configs/per_dataset" / method.stem).glob("*.yaml"))
        for extra in [[], *[["--config", str(f)] for f in per_dataset]]:
            rc, _, err = run(["config", "show", "--dataset-config", DTD, "--config", str(method), *extra], capsys)
            assert rc == 0, (method.name, extra, err)


def test_config_folder_and_non_utf8_file(tmp_path, capsys):
    rc, _, err = run(["config", "show", "--config", str(tmp_path)], capsys)
    assert rc == 2 and f"config file {tmp_path} is a folder; expected a YAML file" in err and err.count("\n") == 1
    bad = tmp_path / "m.yaml"
    bad.write_bytes(b"OPTIM:\n  LR: 0.01\n# \xff\xfe\n")
    rc, _, err = run(["config", "show", "--dataset-config", str(bad)], capsys)
    assert rc == 2 and f"{bad}: not UTF-8 text (byte 0xff on line 3); save the file as UTF-8" in err
    assert "Traceback" not in err and err.count("\n") == 1
