"""Config merging: defaults <- dataset yaml <- method yaml <- KEY VALUE; unknown keys and bad types fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipkd.config import build_config, get_cfg_defaults
from clipkd.data.specs import DATASETS, get_spec
from clipkd.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_dassl_style():
    cfg = get_cfg_defaults()
    assert cfg.DATASET.NUM_SHOTS == 16 and cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    assert tuple(cfg.INPUT.SIZE) == (224, 224) and cfg.INPUT.INTERPOLATION == "bicubic"
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 8


@pytest.mark.parametrize("stem", list(DATASETS))
def test_every_dataset_config_names_its_dataset(stem):
    cfg = build_config([CONFIGS / "datasets" / f"{stem}.yaml"])
    assert get_spec(cfg.DATASET.NAME).stem == stem


def test_merge_order(tmp_path):
    method = tmp_path / "m.yaml"
    method.write_text("DATASET:\n  NUM_SHOTS: 4\nOPTIM:\n  LR: 1\n")
    cfg = build_config([CONFIGS / "datasets" / "dtd.yaml", method], ["DATASET.NUM_SHOTS", "8"])
    assert cfg.DATASET.NAME == "DescribableTextures"
    assert cfg.DATASET.NUM_SHOTS == 8  # command line wins
    assert cfg.OPTIM.LR == 1.0 and isinstance(cfg.OPTIM.LR, float)  # int widened to float
    assert cfg.is_frozen()


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("DATASET:\n  NUM_SHOT: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*DATASET.NUM_SHOT"):
        build_config([bad])


@pytest.mark.parametrize(
    "opts, pattern",
    [
        (["DATASET.NUM_SHOT", "4"], "unknown config key DATASET.NUM_SHOT"),
        (["DATASET.NUM_SHOTS", "abc"], "DATASET.NUM_SHOTS must be int"),
        (["DATASET.NUM_SHOTS", "1.5"], "DATASET.NUM_SHOTS must be int"),
        (["OPTIM.LR", "fast"], "OPTIM.LR must be float"),
        (["INPUT.SIZE", "(32,)"], "INPUT.SIZE needs 2 values"),
        (["DATASET.SUBSAMPLE_CLASSES", "half"], "SUBSAMPLE_CLASSES must be one of all, base, new"),
        (["DATASET", "1"], "DATASET is a group"),
        (["DATASET.NUM_SHOTS"], "KEY VALUE pairs"),
    ],
)
def test_bad_overrides(opts, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config([], opts)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("DATASET: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config([broken])


def test_tuple_override_and_string_values():
    cfg = build_config([], ["INPUT.SIZE", "(32, 32)", "DATASET.ROOT", "/some/where", "DATASET.NAME", "dtd"])
    assert tuple(cfg.INPUT.SIZE) == (32, 32) and cfg.DATASET.ROOT == "/some/where"


def test_yaml_literals_like_yacs(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text('INPUT:\n  SIZE: "(32, 32)"\nOPTIM:\n  LR: "1e-4"\n')
    cfg = build_config([f])
    assert tuple(cfg.INPUT.SIZE) == (32, 32) and cfg.OPTIM.LR == 1e-4
