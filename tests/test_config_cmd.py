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
