"""`clipkd data ...` end to end, and every bad input of the data layer: one clear line, exit != 0."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from clipkd.cli.main import main
from clipkd.data.loaders import ImageListDataset, load_image
from clipkd.data.readers import read_dataset
from clipkd.data.specs import DATASETS, STEMS, get_spec
from clipkd.errors import DataError


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("stem", STEMS)
def test_synth_then_split_json(tmp_path, capsys, stem):
    rc, out, _ = run(["data", "synth", "--dataset", stem, "--root", str(tmp_path), "--classes", "5",
                      "--images-per-class", "4"], capsys)
    assert rc == 0 and "wrote synthetic" in out
    rc, out, _ = run(["data", "split", "--root", str(tmp_path), "--dataset", stem, "--shots", "2",
                      "--seed", "1", "--subsample", "base", "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert set(data) == {"classnames", "train", "val", "test"}
    assert len(data["classnames"]) == 3  # 5 classes: base 3
    folder = tmp_path / DATASETS[stem].folder
    for key in ("train", "val", "test"):
        for path, label in data[key]:
            assert (folder / path).is_file() and 0 <= label < 3
    assert len(data["train"]) == 6  # 2 shots x 3 classes


def test_split_human_and_check(synth_root, capsys):
    rc, out, _ = run(["data", "split", "--root", str(synth_root), "--dataset", "OxfordPets", "--shots", "0",
                      "--seed", "1"], capsys)
    assert rc == 0 and "OxfordPets (oxford_pets) all" in out and "class name" in out
    rc, out, _ = run(["data", "check", "--root", str(synth_root)], capsys)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 11 and all(line.startswith("OK") for line in lines)
    assert "base 4 / new 3 classes" in lines[0]
    rc, out, _ = run(["data", "check", "--root", str(synth_root), "--dataset", "dtd", "--decode"], capsys)
    assert rc == 0 and out.startswith("OK   dtd (DescribableTextures): 7 classes")


def test_data_commands_do_not_import_torch(synth_root):
    code = ("import sys; from clipkd.cli.main import main; "
            f"rc = main(['data', 'split', '--root', {str(synth_root)!r}, '--dataset', 'dtd', '--shots', '2', "
            "'--seed', '1', '--json']); "
            f"rc |= main(['data', 'check', '--root', {str(synth_root)!r}, '--dataset', 'dtd']); "
            "rc |= main(['config', 'show', 'OPTIM.LR', '0.5', '--diff']); "
            "assert rc == 0 and 'torch' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cli_help_does_not_import_torch():
    code = ("import sys; from clipkd.cli.main import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clipkd", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - start < 5  # generous; torch alone takes several seconds to import


def _copy(synth_root, tmp_path, stem):
    folder = DATASETS[stem].folder
    shutil.copytree(synth_root / folder, tmp_path / folder)
    return tmp_path / folder


def _split_cmd(root, stem, shots="1"):
    return ["data", "split", "--root", str(root), "--dataset", stem, "--shots", shots, "--seed", "1"]


def test_missing_root_and_folder(tmp_path, capsys):
    rc, _, err = run(_split_cmd(tmp_path / "nowhere", "dtd"), capsys)
    assert rc == 2 and "DATA root" in err and "nowhere" in err and "Traceback" not in err
    rc, _, err = run(_split_cmd(tmp_path, "dtd"), capsys)
    assert rc == 2 and "folder" in err and str(tmp_path / "dtd") in err and "datasets/README.md" in err
    rc, out, err = run(["data", "check", "--root", str(tmp_path), "--dataset", "dtd"], capsys)
    assert rc == 1 and out.startswith("FAIL dtd")
    rc, _, err = run(["data", "check", "--root", str(tmp_path)], capsys)
    assert rc == 2 and "no dataset folders found" in err


def test_unknown_stem(tmp_path, capsys):
    rc, _, err = run(_split_cmd(tmp_path, "mnist"), capsys)
    assert rc == 2 and "unknown dataset 'mnist'" in err and "oxford_pets" in err


def test_missing_split_file(synth_root, tmp_path, capsys):
    folder = _copy(synth_root, tmp_path, "eurosat")
    (folder / "split_zhou_EuroSAT.json").unlink()
    rc, _, err = run(_split_cmd(tmp_path, "eurosat"), capsys)
    assert rc == 2 and "split_zhou_EuroSAT.json not found" in err and "never regenerates" in err


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: "{broken", "not valid JSON"),
        (lambda d: json.dumps({"train": d["train"], "val": d["val"]}), "missing list 'test'"),
        (lambda d: json.dumps({**d, "val": d["val"][:3] + [["x.jpg", 1]]}), r"entry val\[3\]"),
        (lambda d: json.dumps({**d, "train": [[1, 2, 3]] + d["train"]}), r"entry train\[0\]"),
        (lambda d: json.dumps({**d, "test": [["x.jpg", "one", "c"]]}), r"test\[0\] has label 'one'"),
        (lambda d: json.dumps({**d, "test": [[d["test"][0][0], d["test"][0][1], "Other_Name"]] + d["test"]}),
         "is called both"),
    ],
)
def test_malformed_split_json(synth_root, tmp_path, capsys, mutate, pattern):
    folder = _copy(synth_root, tmp_path, "food101")
    path = folder / "split_zhou_Food101.json"
    path.write_text(mutate(json.loads(path.read_text())))
    rc, _, err = run(_split_cmd(tmp_path, "food101"), capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "split_zhou_Food101.json" in err
    import re

    assert re.search(pattern, err), err


def test_fgvc_line_without_class(synth_root, tmp_path, capsys):
    folder = _copy(synth_root, tmp_path, "fgvc_aircraft")
    path = folder / "images_variant_val.txt"
    path.write_text(path.read_text() + "1234567\n")
    rc, _, err = run(_split_cmd(tmp_path, "fgvc_aircraft"), capsys)
    n = len(path.read_text().splitlines())
    assert rc == 2 and f"images_variant_val.txt:{n}" in err and "has no class name" in err


def test_missing_and_unreadable_images(synth_root, tmp_path, capsys):
    folder = _copy(synth_root, tmp_path, "oxford_pets")
    split = read_dataset(tmp_path, get_spec("oxford_pets"))
    missing = split.impath(split.test[0])
    (folder / split.test[0].relpath).unlink()
    rc, out, _ = run(["data", "check", "--root", str(tmp_path), "--dataset", "oxford_pets"], capsys)
    assert rc == 1 and "FAIL oxford_pets" in out and missing in out and "missing" in out
    with pytest.raises(DataError, match="is missing"):
        load_image(missing)
    shutil.copy(synth_root / "oxford_pets" / split.test[0].relpath, missing)
    bad = split.impath(split.train[0])
    with open(bad, "wb") as f:
        f.write(b"definitely not a jpeg")
    rc, out, _ = run(["data", "check", "--root", str(tmp_path), "--dataset", "oxford_pets"], capsys)
    assert rc == 0  # existence only without --decode
    rc, out, _ = run(["data", "check", "--root", str(tmp_path), "--dataset", "oxford_pets", "--decode"], capsys)
    assert rc == 1 and bad in out and "cannot be read" in out
    ds = ImageListDataset(split.train, split.dataset_dir, transform=lambda img: img)
    with pytest.raises(DataError, match="cannot be read"):
        ds[0]
    assert isinstance(ds[1][0], Image.Image) and ds[1][1:] == (split.train[1].label, 1)


def test_shots_larger_than_class_warn_once(synth_root):
    proc = subprocess.run([sys.executable, "-m", "clipkd", *_split_cmd(synth_root, "dtd", shots="100")],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.count("clipkd: warning:") == 1
    assert "7 class(es) have fewer than 100 train images" in proc.stderr


def test_synth_refuses_existing_folder(synth_root, tmp_path, capsys):
    folder = _copy(synth_root, tmp_path, "dtd")
    before = sorted(p.name for p in folder.rglob("*"))
    rc, _, err = run(["data", "synth", "--dataset", "dtd", "--root", str(tmp_path)], capsys)
    assert rc == 2 and "already exists" in err
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(DataError):
        main(_split_cmd(tmp_path, "dtd") + ["--debug"])


def test_imagenet_classnames_command(synth_root, tmp_path, capsys):
    folder = _copy(synth_root, tmp_path, "imagenet")
    original = (folder / "classnames.txt").read_text()
    (folder / "classnames.txt").unlink()
    rc, _, err = run(_split_cmd(tmp_path, "imagenet"), capsys)
    assert rc == 2 and "classnames.txt not found" in err and "imagenet-classnames" in err
    rc, out, _ = run(["data", "imagenet-classnames", "--root", str(tmp_path)], capsys)
    assert rc == 0 and (folder / "classnames.txt").read_text() == original
    (folder / "classnames.txt").write_text("n01440764 hand edited\n")
    rc, _, err = run(["data", "imagenet-classnames", "--root", str(tmp_path)], capsys)
    assert rc == 2 and "--force" in err
    assert (folder / "classnames.txt").read_text() == "n01440764 hand edited\n"
    rc, _, _ = run(["data", "imagenet-classnames", "--root", str(tmp_path), "--force"], capsys)
    assert rc == 0 and (folder / "classnames.txt").read_text() == original


# ------------------------------------------------------------------------------------------------ issue 16
@pytest.mark.parametrize("flag, value, key", [("--shots", "-1", "DATASET.NUM_SHOTS"), ("--seed", "-1", "SEED"),
                                              ("--seed", "4294967296", "SEED")])
def test_split_takes_the_shots_and_seed_train_takes(synth_root, capsys, flag, value, key):
    """data split refuses the shot counts and seeds clipkd train refuses, in the same words."""
    from clipkd.config import build_config
    from clipkd.errors import ConfigError

    argv = {"--shots": "4", "--seed": "1", flag: value}
    rc, out, err = run(["data", "split", "--root", str(synth_root), "--dataset", "oxford_pets", "--no-cache",
                        "--shots", argv["--shots"], "--seed", argv["--seed"]], capsys)
    with pytest.raises(ConfigError) as train_error:
        build_config([], [key, value])
    assert rc == 2 and out == ""
    train_words = str(train_error.value)
    assert train_words.startswith(f"{key} must be ")
    assert err == f"clipkd: error: {flag} ({key}){train_words[len(key):]}\n"


def test_check_root_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "data.txt"
    file.write_text("not a folder")
    for argv in (["data", "check", "--root", str(file)], _split_cmd(file, "dtd")):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and f"DATA root {file} is a file, not a folder" in err and "does not exist" not in err


def _help(parser, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(argv)
    return out.getvalue()


def test_a_command_builds_only_its_own_parser():
    """`clipkd CMD` imports CMD's module alone; its --help (and the full --help) read as with every parser."""
    code = ("import sys; from clipkd.cli.main import main; rc = main(['config', 'show', '--diff']); "
            "mods = sorted(m for m in sys.modules if m.startswith('clipkd.cli.') and m != 'clipkd.cli.main'); "
            "assert rc == 0 and mods == ['clipkd.cli.config_cmd'], mods")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    from clipkd.cli.main import build_parser

    full = build_parser()
    for cmd in ("data", "train", "eval", "demo", "toy", "report", "analyze", "sweep", "launch", "config"):
        assert _help(build_parser(cmd), [cmd, "--help"]) == _help(full, [cmd, "--help"]), cmd
    assert _help(build_parser("nonsense"), ["--help"]) == _help(full, ["--help"])
    assert "report" in _help(full, ["--help"])
