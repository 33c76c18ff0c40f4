"""Config merging: defaults <- dataset yaml <- method yaml <- KEY VALUE; unknown keys and bad types fail."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipkd.config import build_config, get_cfg_defaults, merge_overrides, validate
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
        (["DATASET.SUBSAMPLE_CLASSES", "half"], "SUBSAMPLE_CLASSES must be one of all, base; got 'half'"),
        (["DATASET.SUBSAMPLE_CLASSES", "new"], "SUBSAMPLE_CLASSES must be one of all, base; got 'new'"),
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


# ------------------------------------------------------------------------------------------------ every shipped config
def _method_files():
    """Each method yaml alone, and with each of its per-dataset files (as the scripts merge them)."""
    for method in sorted((CONFIGS / "methods").glob("*.yaml")):
        yield method.stem, [method]
        for extra in sorted((CONFIGS / "per_dataset" / method.stem).glob("*.yaml")):
            yield f"{method.stem}+{extra.stem}", [method, extra]


@pytest.mark.parametrize("dataset_yaml", sorted((CONFIGS / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_method_combination_merges(dataset_yaml):
    combos = list(_method_files())
    assert len(combos) >= 5
    for _, files in combos:
        cfg = build_config([dataset_yaml, *files])
        validate(cfg)


def test_demo_config_merges():
    demo = Path(__file__).resolve().parents[1] / "clipkd" / "toy" / "demo.yaml"
    assert build_config([demo]).DATASET.SUBSAMPLE_CLASSES == "base"


# ------------------------------------------------------------------------------------------------ value checks
# (key, a value that passes, values that fail): each rule at its edge.
RULES = [
    ("SEED", "0", ["-1"]),
    ("DATASET.NUM_SHOTS", "0", ["-3", "-1"]),
    ("INPUT.SIZE", "(32, 48)", ["(0, 32)", "(32, -1)"]),
    ("INPUT.RRCROP_SCALE", "(0.5, 0.5)", ["(0.0, 1.0)", "(0.6, 0.5)", "(0.5, 1.5)", "(-0.1, 0.5)"]),
    ("INPUT.FLIP_PROB", "1", ["1.5", "-0.1"]),
    ("INPUT.PIXEL_STD", "(0.1, 0.2, 0.3)", ["(0.1, 0.0, 0.3)", "(-0.1, 0.2, 0.3)"]),
    ("DATALOADER.NUM_WORKERS", "0", ["-1"]),
    ("DATALOADER.TRAIN_X.BATCH_SIZE", "1", ["0", "-8"]),
    ("DATALOADER.TEST.BATCH_SIZE", "1", ["0"]),
    ("DISTILL.TEMPERATURE", "0.5", ["0", "-1"]),
    ("DISTILL.WEIGHT", "0", ["-1"]),
    ("DISTILL.CE_WEIGHT", "0", ["-0.5"]),
    ("OPTIM.LR", "1e-6", ["0", "-0.1"]),
    ("OPTIM.WEIGHT_DECAY", "0", ["-1e-4"]),
    ("OPTIM.MOMENTUM", "0", ["1", "1.0", "-0.1"]),
    ("OPTIM.MAX_EPOCH", "1", ["0", "-2"]),
    ("OPTIM.WARMUP_EPOCH", "0", ["-1"]),
    ("OPTIM.WARMUP_CONS_LR", "0", ["-1e-5"]),
    ("OPTIM.GRAD_CLIP", "0", ["-1"]),
]


@pytest.mark.parametrize("key, good, bads", RULES, ids=[r[0] for r in RULES])
def test_value_rules(key, good, bads):
    build_config([], [key, good])  # the edge value passes
    for bad in bads:
        with pytest.raises(ConfigError) as err:
            build_config([], [key, bad])
        msg = str(err.value)
        assert msg.startswith(f"{key} must be ") and "(got " in msg and "\n" not in msg, msg


def test_value_rule_messages():
    cases = {
        ("DATASET.NUM_SHOTS", "-3"): "DATASET.NUM_SHOTS must be >= 0 (got -3); K images per class, or 0 for the full",
        ("OPTIM.MAX_EPOCH", "0"): "OPTIM.MAX_EPOCH must be >= 1 (got 0); to evaluate untrained prompts use clipkd eval",
        ("OPTIM.LR", "-0.1"): "OPTIM.LR must be > 0 (got -0.1)",
        ("SEED", "-1"): "SEED must be >= 0 (got -1)",
        ("DATALOADER.TRAIN_X.BATCH_SIZE", "0"): "DATALOADER.TRAIN_X.BATCH_SIZE must be >= 1 (got 0)",
        ("OPTIM.MOMENTUM", "1"): "OPTIM.MOMENTUM must be in [0, 1) (got 1.0)",
    }
    for (key, bad), start in cases.items():
        with pytest.raises(ConfigError) as err:
            build_config([], [key, bad])
        assert str(err.value).startswith(start), str(err.value)


def test_values_in_files_are_checked_too(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("DATASET:\n  NUM_SHOTS: -3\n")
    with pytest.raises(ConfigError, match=r"^DATASET.NUM_SHOTS must be >= 0 \(got -3\)"):
        build_config([f])


def test_validate_refuses_hand_set_values_of_the_wrong_type():
    cfg = get_cfg_defaults()
    cfg.SEED = "one"
    with pytest.raises(ConfigError, match="^SEED must be >= 0"):
        validate(cfg)
    cfg = get_cfg_defaults()
    cfg.INPUT.RRCROP_SCALE = (0.5,)
    with pytest.raises(ConfigError, match="^INPUT.RRCROP_SCALE must be"):
        validate(cfg)


def test_defaults_pass_validation():
    validate(get_cfg_defaults())


def _float_keys():
    out = []

    def walk(node, prefix=""):
        for name, value in node.items():
            if isinstance(value, type(node)):
                walk(value, f"{prefix}{name}.")
            elif isinstance(value, float):
                out.append(f"{prefix}{name}")

    walk(get_cfg_defaults())
    return out


def test_float_keys_cover_the_brief():
    keys = set(_float_keys())
    assert {"OPTIM.LR", "OPTIM.WEIGHT_DECAY", "OPTIM.MOMENTUM", "OPTIM.WARMUP_CONS_LR", "OPTIM.GRAD_CLIP",
            "DISTILL.ALPHA", "DISTILL.BETA", "DISTILL.TEMPERATURE", "DISTILL.WEIGHT", "DISTILL.CE_WEIGHT",
            "INPUT.FLIP_PROB"} <= keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "Infinity", "1e999"])
def test_non_finite_floats_are_refused_as_such(key, text):
    with pytest.raises(ConfigError) as err:
        build_config([], [key, text])
    msg = str(err.value)
    assert f"{key} must be a finite number" in msg and "must be float" not in msg, msg


def test_non_finite_in_tuples_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"^INPUT.RRCROP_SCALE must be a finite number, got \[0.5, inf\]"):
        build_config([], ["INPUT.RRCROP_SCALE", "(0.5, 1e999)"])
    f = tmp_path / "m.yaml"
    f.write_text("DISTILL:\n  ALPHA: .nan\n")
    with pytest.raises(ConfigError, match="^DISTILL.ALPHA must be a finite number, got nan"):
        build_config([f])
    assert math.isfinite(build_config([], ["DISTILL.ALPHA", "-2.5"]).DISTILL.ALPHA)  # any finite alpha is fine


# ------------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize(
    "opts, message",
    [
        (["OPTIM.LR", "0.1", "DISTILL.ALPHA"],
         "overrides come in KEY VALUE pairs, got 3 tokens: OPTIM.LR 0.1, DISTILL.ALPHA; "
         "'DISTILL.ALPHA' has no value"),
        (["DATASET.NUM_SHOTS"],
         "overrides come in KEY VALUE pairs, got 1 tokens: DATASET.NUM_SHOTS; 'DATASET.NUM_SHOTS' has no value"),
        (["MODEL.PROMPT.CTX_INIT", "a photo of a", "SEED"],
         "overrides come in KEY VALUE pairs, got 3 tokens: MODEL.PROMPT.CTX_INIT 'a photo of a', SEED; "
         "'SEED' has no value"),
    ],
)
def test_odd_number_of_overrides(opts, message):
    with pytest.raises(ConfigError) as err:
        merge_overrides(get_cfg_defaults(), opts)
    assert str(err.value) == message


def test_config_imports_neither_torch_nor_open_clip():
    code = ("import sys, clipkd.config, clipkd.registry; "
            "from clipkd.config import build_config; build_config([], ['DISTILL.LOSS', 'kl']); "
            "bad = [m for m in ('torch', 'open_clip', 'clipkd.losses', 'clipkd.models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_choice_message_names_key_value_and_choices():
    with pytest.raises(ConfigError, match=re.escape("DISTILL.LOSS must be one of ab, kl, rkl, js, skl, promptkd_kl, dkd, lsd, ttm, dist; "
                                                    "got 'kld'")):
        build_config([], ["DISTILL.LOSS", "kld"])
    with pytest.raises(ConfigError, match=re.escape("(base trains on the base classes")):
        build_config([], ["DATASET.SUBSAMPLE_CLASSES", "new"])


def test_all_choices_accept_their_names():
    from clipkd.config.defaults import CHOICES

    for key, allowed in CHOICES.items():
        for value in allowed:
            assert build_config([], [key, value])  # each name passes


# ------------------------------------------------------------------------------------------------ issue 16
def test_seed_range_is_what_every_generator_takes():
    """SEED is range-checked in the config (before any write): the largest allowed seed works for Python's
    random, numpy (as seed_everything passes it) and torch, and so do the per-epoch and per-image torch seeds
    made from it (train.epoch_seed, then the loader's * 1000003 + index); one more is refused."""
    import random

    import numpy as np
    import torch

    from clipkd.config.merge import SEED_MAX
    from clipkd.engine.runtime import epoch_seed, seed_everything

    assert build_config([], ["SEED", str(SEED_MAX)]).SEED == SEED_MAX
    seed_everything(SEED_MAX)
    random.seed(SEED_MAX)
    np.random.seed(SEED_MAX)
    torch.manual_seed(epoch_seed(SEED_MAX, 10**6) * 1_000_003 + 10**9)  # a million epochs, a billion images
    for bad in (SEED_MAX + 1, 2**32 - 1, 2**63 - 1, 2**64):
        with pytest.raises(ConfigError) as err:
            build_config([], ["SEED", str(bad)])
        msg = str(err.value)
        assert msg.startswith(f"SEED must be <= {SEED_MAX} (got {bad})") and "2**64" in msg and "\n" not in msg


def test_negative_prompt_sizes_are_config_errors():
    for key in ("N_CTX_VISION", "N_CTX_TEXT", "DEPTH_VISION", "DEPTH_TEXT"):
        build_config([], [f"MODEL.PROMPT.{key}", "0"])  # 0 = no prompts there
        with pytest.raises(ConfigError, match=rf"^MODEL.PROMPT.{key} must be >= 0 \(got -1\)"):
            build_config([], [f"MODEL.PROMPT.{key}", "-1"])


@pytest.mark.parametrize("text", ["(nan, 0.4, 0.4)", "[0.4, inf, 0.4]", "(0.4, 0.4, -Infinity)"])
def test_non_finite_numbers_in_a_tuple_say_so(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        build_config([], ["INPUT.PIXEL_MEAN", text])
    assert "INPUT.PIXEL_MEAN must hold finite numbers" in str(err.value) and "must be tuple" not in str(err.value)
    f = tmp_path / "m.yaml"
    f.write_text(f"INPUT:\n  PIXEL_MEAN: \"{text}\"\n")  # a string in YAML: parsed as on the command line
    with pytest.raises(ConfigError, match=f"^{re.escape(str(f))}: INPUT.PIXEL_MEAN must hold finite numbers"):
        build_config([f])
    with pytest.raises(ConfigError, match="must be tuple"):  # not a number at all: the type message stays
        build_config([], ["INPUT.PIXEL_MEAN", "(a, 0.4, 0.4)"])


def test_config_file_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config([tmp_path])
    assert str(err.value).startswith(f"config file {tmp_path} is a folder; expected a YAML file")
    assert "not found" not in str(err.value)


def test_config_file_not_utf8(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("OPTIM:\n  LR: 0.01  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        build_config([f])
    assert str(err.value) == (f"{f}: not UTF-8 text (byte 0xe9 on line 2); save the file as UTF-8 "
                              "(config files are YAML text)")


def test_loss_arguments_are_read_without_importing_torch():
    """check_config asks which settings a loss takes from the registry, which reads the signature from the
    source: the same names inspect gives once imported, and torch stays unimported."""
    code = ("import sys; from clipkd.registry import LOSSES; "
            "args = {n: LOSSES.arguments(n) for n in LOSSES}; "
            "assert 'torch' not in sys.modules and 'clipkd.losses' not in sys.modules; "
            "import inspect; "
            "assert args == {n: tuple(inspect.signature(LOSSES.get(n)).parameters) for n in LOSSES}, args")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_loss_parameter_key_is_distill_param():
    """check_config finds a loss parameter's key as DISTILL.<PARAM>: the keys are made from the loss builder's
    table (PARAMS), with its defaults."""
    from clipkd.losses import PARAMS

    defaults = get_cfg_defaults()
    for param, spec in PARAMS.items():
        assert spec.key == f"DISTILL.{param.upper()}" and spec.default == defaults.DISTILL[param.upper()]


def test_check_config_refuses_what_training_refuses_without_torch():
    code = ("import sys\n"
            "from clipkd.config import build_config, check_config\n"
            "from clipkd.errors import ConfigError\n"
            "check_config(build_config([], ['DISTILL.LOSS', 'dkd', 'DISTILL.DIVERGENCE', 'ab', 'DISTILL.ALPHA', "
            "'0.5']))\n"
            "try:\n"
            "    check_config(build_config([], ['DISTILL.LOSS', 'ab', 'DISTILL.DIVERGENCE', 'ab']))\n"
            "    raise SystemExit('accepted')\n"
            "except ConfigError as exc:\n"
            "    assert 'DISTILL.DIVERGENCE' in str(exc) and 'does not apply to DISTILL.LOSS ab' in str(exc), exc\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ issue 17
def test_choices_are_one_plain_dict_read_now():
    """validate() reads the allowed values once per merge, as a dict (the registries' names as they are now)."""
    from clipkd.config.defaults import CHOICES, choices

    now = choices()
    assert type(now) is dict and list(now.items()) == list(CHOICES.items())


def test_loss_parameter_ranges_are_checked_from_their_table_rows():
    """The range validate() checks for a loss parameter's key is the one its PARAMS row declares (no twin)."""
    from clipkd.config.defaults import PARAMS

    ranged = {p for p, spec in PARAMS.items() if spec.bound}
    assert ranged == {"temperature", "dkd_alpha", "dkd_beta", "dkd_warmup", "ttm_exponent", "dist_beta",
                      "dist_gamma"}
    for param in ranged:
        spec = PARAMS[param]
        bad = "0" if spec.bound == "> 0" else "-1"
        with pytest.raises(ConfigError, match=re.escape(f"{spec.key} must be {spec.bound} (got {float(bad)!r}); "
                                                        f"{spec.fix}")):
            build_config([], [spec.key, bad])


def test_check_loss_keys_reads_the_configured_loss_only(monkeypatch):
    """A config whose loss keys are fine is checked from its own loss's arguments (one read, not one per loss)."""
    from clipkd.config.checks import check_loss_keys
    from clipkd.registry import LOSSES

    asked = []
    real = LOSSES.arguments
    monkeypatch.setattr(LOSSES, "arguments", lambda name: asked.append(name) or real(name))
    assert check_loss_keys(build_config([], ["DISTILL.LOSS", "dkd"])) == (
        "divergence", "temperature", "dkd_alpha", "dkd_beta", "dkd_warmup")
    assert asked == ["dkd"]
    with pytest.raises(ConfigError, match="DISTILL.TTM_EXPONENT 0.5 does not apply to DISTILL.LOSS dkd; it is used "
                                          "by ttm"):
        check_loss_keys(build_config([], ["DISTILL.LOSS", "dkd", "DISTILL.TTM_EXPONENT", "0.5"]))
