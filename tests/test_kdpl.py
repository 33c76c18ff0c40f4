"""KDPL (Mistretta et al., ECCV 2024): its loss restated here, its per-batch top-K class selection, label-free
training (labels never reach the objective), the class-agnostic variant (KDPL-CA) end to end with the tiny CLIPs,
resume, the refusals, and its ViT-H-14-quickgelu / dfn5b teacher resolved offline."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipkd.cli.main import main
from clipkd.config import build_config, check_config
from clipkd.errors import ClipkdError, ConfigError
from clipkd.methods.distiller import Distiller, build_objective
from clipkd.methods.kdpl import read_dictionary, top_k_classes
from clipkd.models.student import IVLPStudent
from clipkd.models.teacher import Teacher
from test_train import (DATASET_CFG, ROOT, TINY, check_results, check_resume_is_exact, config, fit,
                        interrupt_after_checkpoint)

# Dictionary names that are none of the synthetic datasets' class names (those look like 'Amber_Circle_3').
WORDS = ["red kite", "blue whale", "green tea", "yellow cab", "black swan", "white rose", "brown bear",
         "grey heron", "pink salmon", "orange tabby", "violet wren", "golden eagle"]


def dictionary_file(tmp_path, names=WORDS, csv=True):
    """A dictionary as KDPL ships it (CSV, one column ClassName, quoted where a name has a comma) or plain."""
    if csv:
        path = tmp_path / "dictionary.csv"
        path.write_text("ClassName\n" + "".join(f'"{n}"\n' if "," in n else f"{n}\n" for n in names),
                        encoding="utf-8")
    else:
        path = tmp_path / "dictionary.txt"
        path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return path


def ca(tmp_path, k=5, *extra):
    return ["KDPL.DICTIONARY", str(dictionary_file(tmp_path)), "KDPL.K_MAX", str(k), *extra]


# ------------------------------------------------------------------------------------------------ the loss
def kdpl_loss_restated(student_logits, teacher_logits):
    """KDPL's forward_backward: 0.5 KL(p_T || p_S) + 0.5 KL(p_S || p_T), each summed over classes and averaged
    over the batch (F.kl_div batchmean), temperature 1, written out with plain sums."""
    lq = student_logits.double().log_softmax(-1)
    lp = teacher_logits.double().log_softmax(-1)
    forward = (lp.exp() * (lp - lq)).sum(-1).mean()
    reverse = (lq.exp() * (lq - lp)).sum(-1).mean()
    return 0.5 * forward + 0.5 * reverse


@functools.cache
def recipe_objective(method="kdpl_ivlp"):
    """The objective the recipe builds (it computes in fp32, as every KD objective)."""
    cfg = build_config([DATASET_CFG, ROOT / "configs" / "methods" / f"{method}.yaml"], TINY)
    return build_objective(cfg)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_recipe_loss_is_kdpls_symmetric_kl(data):
    n = data.draw(st.integers(2, 6))
    b = data.draw(st.integers(1, 4))
    row = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=n, max_size=n)
    s = torch.tensor(data.draw(st.lists(row, min_size=b, max_size=b)), dtype=torch.float64, requires_grad=True)
    t = torch.tensor(data.draw(st.lists(row, min_size=b, max_size=b)), dtype=torch.float64)
    objective = recipe_objective()
    assert not objective.needs_labels
    loss, terms = objective(s, t, None)
    ref = kdpl_loss_restated(s, t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    (g,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g.double(), g_ref, rtol=1e-4, atol=1e-6)
    # symmetric in teacher and student; zero when they agree (up to a per-row shift); never negative
    assert objective(t, s.detach(), None)[0].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    assert objective(t + 3.0, t, None)[0].item() == pytest.approx(0.0, abs=1e-5)
    assert loss.item() >= -1e-6


def test_label_free_dkd_takes_the_teachers_argmax_as_its_target():
    cfg = build_config([DATASET_CFG, ROOT / "configs" / "methods" / "kdpl_ivlp.yaml"], [*TINY, "DISTILL.LOSS", "dkd"])
    objective = build_objective(cfg)
    assert objective.target_from_teacher and not objective.needs_labels
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    from clipkd.losses import build_distill_loss

    want = 0.5 * build_distill_loss("dkd")(s, t, target=t.argmax(-1), epoch=1)  # the recipe's WEIGHT 0.5
    assert torch.allclose(objective(s, t, None)[0], want)


def test_loss_limits_by_hand():
    # two classes, p = (1/2, 1/2), q = (1/(1+e), e/(1+e)): KL(p||q) and KL(q||p) written out
    import math

    e = math.e
    p, q = (0.5, 0.5), (1 / (1 + e), e / (1 + e))
    fwd = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    rev = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    loss, _ = recipe_objective()(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]]), None)
    assert loss.item() == pytest.approx(0.5 * fwd + 0.5 * rev, rel=1e-6)
    # far apart (gap g): KL(p||q) = g/2 - log 2 + o(1), KL(q||p) = log 2 + o(1): the loss tends to g/4, linear
    for gap in (100.0, 200.0):
        big, _ = recipe_objective()(torch.tensor([[0.0, gap]]), torch.tensor([[0.0, 0.0]]), None)
        assert big.item() == pytest.approx(gap / 4, rel=1e-6)


# ------------------------------------------------------------------------------------------------ top-K selection
def top_k_restated(teacher_logits, k):
    probs = teacher_logits.double().softmax(-1).mean(0).tolist()
    return set(sorted(range(len(probs)), key=lambda i: -probs[i])[:k])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_top_k_is_the_batch_mean_probability_rule(data):
    n = data.draw(st.integers(2, 12))
    b = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, n))
    row = st.lists(st.integers(-40, 40), min_size=n, max_size=n, unique=True)  # no ties in the batch mean
    logits = torch.tensor(data.draw(st.lists(row, min_size=b, max_size=b)), dtype=torch.float32) / 4
    probs = logits.double().softmax(-1).mean(0)
    kth = probs.sort(descending=True).values
    if k < n and (kth[k - 1] - kth[k]).abs() < 1e-6:
        return  # a near-tie at the cut: either choice is KDPL's
    idx = top_k_classes(logits, k)
    assert idx.dtype == torch.long and len(set(idx.tolist())) == k
    assert set(idx.tolist()) == top_k_restated(logits, k)


def test_top_k_averages_probabilities_not_logits_nor_votes():
    # class 0 wins on the mean logit; class 1 on the mean probability (sigmoid(10), sigmoid(-2) x 2: mean 0.41)
    logits = torch.tensor([[10.0, 0.0], [-2.0, 0.0], [-2.0, 0.0]])
    assert logits.mean(0).argmax().item() == 0
    assert top_k_classes(logits, 1).tolist() == [1]
    # class 0 wins the per-image votes (2 of 3); class 1 the mean probability (0.73, 0.73, 0.00005: mean 0.49)
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-10.0, 0.0]])
    assert logits.argmax(-1).tolist() == [0, 0, 1]
    assert top_k_classes(logits, 1).tolist() == [1]


# ------------------------------------------------------------------------------------------------ the dictionary
def test_dictionary_reads_kdpls_csv_and_plain_lists(tmp_path):
    names = ["10 cane", "Cucumber, gourd, and melon family", 'Fiat 500 "topolino"', "Żubrówka"]
    assert read_dictionary(dictionary_file(tmp_path, names)) == names
    csv = tmp_path / "quoted.csv"
    csv.write_text('ClassName\n"Fiat 500 ""topolino"""\n', encoding="utf-8")
    assert read_dictionary(csv) == ['Fiat 500 "topolino"']
    assert read_dictionary(dictionary_file(tmp_path, WORDS, csv=False)) == WORDS
    bad = tmp_path / "bad.csv"
    bad.write_text("Name,Other\na,b\n")
    with pytest.raises(ClipkdError, match=r"bad.csv.*ClassName"):
        read_dictionary(bad)
    with pytest.raises(ClipkdError, match="no such file"):
        read_dictionary(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------------ label-free
def test_label_free_labels_never_reach_the_objective(synth_root):
    cfg = config(synth_root, "kdpl_ivlp")
    from clipkd.runs.run import Run

    run = Run(cfg, None, echo=False)
    run.build()
    seen = []
    objective = build_objective(cfg, run.student, run.data.train.classnames)
    real = objective.__call__

    class Spy:
        needs_teacher, needs_labels, needs_features = True, False, False

        def __call__(self, s, t, labels, features=None):
            seen.append(labels)
            return real(s, t, labels)

    distiller = Distiller(run.student, run.teacher, run.data.train.classnames, Spy(), label_free=True)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])

    def step(lab):
        distiller.student.zero_grad(set_to_none=True)
        loss = distiller(images, lab).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in distiller.student.trainable_parameters()]

    a, ga = step(labels)
    b, gb = step(labels[torch.tensor([3, 1, 0, 2])])  # shuffled: the same step
    c, gc = step(torch.full((4,), 10_000))  # not even valid labels: the same step
    assert torch.equal(a, b) and torch.equal(a, c)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(ga, gb, gc))
    assert seen == [None, None, None]


def test_teacher_logits_use_the_students_logit_scale_as_kdpl(synth_root, tmp_path):
    """KDPL's teacher logits are the student's exp(logit_scale) times the teacher's cosines."""
    from clipkd.runs.run import Run

    for scale, expected in (("student", 37.5), ("teacher", None)):
        run = Run(config(synth_root, "kdpl_ivlp", "DISTILL.TEACHER_LOGIT_SCALE", scale), tmp_path / scale, echo=False)
        run.build()
        run.student._logit_scale = 37.5  # tiny random CLIPs share one initial scale: make them differ
        distiller = run.trainer()[0].distiller
        images = torch.randn(2, 3, 32, 32)
        cos = run.teacher.image_features(images) @ run.teacher.text_features(distiller.classnames).t()
        want = (expected or run.teacher.logit_scale) * cos
        assert run.teacher.logit_scale != 37.5 and torch.allclose(distiller.teacher_logits(images), want)


def test_class_agnostic_under_torchrun_picks_one_set_for_the_whole_batch(synth_root, tmp_path):
    """Two processes train what one trains: the top-K rule sees the whole batch, not each process's share."""
    from pathlib import Path

    dictionary = dictionary_file(tmp_path)

    def run(out, launcher):
        args = ["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
                str(ROOT / "configs/methods/kdpl_ca_ivlp.yaml"), "--output-dir", str(out), *TINY,
                "OPTIM.MAX_EPOCH", "1", "KDPL.DICTIONARY", str(dictionary), "KDPL.K_MAX", "3"]
        proc = subprocess.run([*launcher, "-m", "clipkd", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out / "model.pt", weights_only=True)["state_dict"]

    one = run(tmp_path / "one", [sys.executable])
    two = run(tmp_path / "two", [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                                 "--master_port", "29531"])
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4) for k in one)


KDPL_RECIPES = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("kdpl_*.yaml") if "_ca_" not in p.stem)
KDPL_CA_RECIPES = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("kdpl_ca_*.yaml"))


def test_every_student_has_its_kdpl_recipes():
    from clipkd.registry import STUDENTS

    assert {f"kdpl_{s}" for s in STUDENTS if s != "kgcoop"} <= set(KDPL_RECIPES)  # KgCoOp: no KDPL trainer
    ca_able = {s for s in STUDENTS if not STUDENTS.attribute(s, "needs_teacher") and not STUDENTS.attribute(
        s, "objectives", ())}  # what DISTILL.CLASS_AGNOSTIC accepts (kgcoop, promptsrc: per-class references)
    assert {f"kdpl_ca_{s}" for s in ca_able} <= set(KDPL_CA_RECIPES)


@pytest.mark.parametrize("method", KDPL_RECIPES)
def test_label_free_recipes_train(synth_root, tmp_path, method):
    check_results(fit(config(synth_root, method, "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4"),
                      tmp_path / method))
    assert "label-free" in (tmp_path / method / "log.txt").read_text()


@pytest.mark.parametrize("method", KDPL_CA_RECIPES)
def test_class_agnostic_recipes_train(synth_root, tmp_path, method):
    check_results(fit(config(synth_root, method, "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
                             *ca(tmp_path, 3)), tmp_path / method))
    assert "class-agnostic" in (tmp_path / method / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------ KDPL-CA runs
def test_class_agnostic_run_trains_on_dictionary_names_only(synth_root, tmp_path, monkeypatch, capsys):
    calls = {"teacher_text": [], "student_text_train": []}
    real_t, real_s = Teacher._compute_text_features, IVLPStudent.text_features

    def t_spy(self, names):
        calls["teacher_text"].append(list(names))
        return real_t(self, names)

    def s_spy(self, names):
        if self.training:
            calls["student_text_train"].append(list(names))
        return real_s(self, names)

    monkeypatch.setattr(Teacher, "_compute_text_features", t_spy)
    monkeypatch.setattr(IVLPStudent, "text_features", s_spy)
    out = tmp_path / "run"
    rc = main(["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
               str(ROOT / "configs" / "methods" / "kdpl_ca_ivlp.yaml"), "--output-dir", str(out), *TINY,
               "OPTIM.MAX_EPOCH", "1", *ca(tmp_path, 5)])
    assert rc == 0, capsys.readouterr().err
    check_results(json.loads((out / "results.json").read_text()))  # evaluated on the dataset's class names
    # the teacher encoded the whole dictionary once, before training (never per batch)
    assert calls["teacher_text"][0] == WORDS and sum(c == WORDS for c in calls["teacher_text"]) == 1
    # every training step's student classes: 5 dictionary names, none of the dataset's
    assert calls["student_text_train"] and all(len(c) == 5 and set(c) <= set(WORDS)
                                                for c in calls["student_text_train"])
    log = (out / "log.txt").read_text()
    assert "class-agnostic" in log and "top-5 by the teacher's batch-mean probability of the 12 names" in log


def test_class_agnostic_resume_is_bit_identical(synth_root, tmp_path, monkeypatch):
    check_resume_is_exact(config(synth_root, "kdpl_ca_ivlp", *ca(tmp_path, 4), "OPTIM.MAX_EPOCH", "2"), tmp_path,
                          monkeypatch)


def test_class_agnostic_with_the_teacher_cache_trains_the_same(synth_root, tmp_path):
    """The cached teacher image features give the same top-K picks and the same run."""
    cfg = config(synth_root, "kdpl_ca_ivlp", *ca(tmp_path, 4), "OPTIM.MAX_EPOCH", "1")
    plain = fit(cfg, tmp_path / "plain")
    cached = config(synth_root, "kdpl_ca_ivlp", *ca(tmp_path, 4), "OPTIM.MAX_EPOCH", "1",
                    "DISTILL.TEACHER_CACHE", str(tmp_path / "cache"))
    assert fit(cached, tmp_path / "cached") == plain
    assert fit(cached, tmp_path / "again") == plain  # read back from the cache this time
    assert any((tmp_path / "cache").rglob("*"))


def test_changed_dictionary_is_refused_on_resume(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "kdpl_ca_ivlp", *ca(tmp_path, 4), "OPTIM.MAX_EPOCH", "2")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    undo()
    dictionary_file(tmp_path, WORDS[::-1])
    with pytest.raises(ClipkdError, match="KDPL.DICTIONARY .* has changed"):
        fit(cfg, tmp_path / "cut", resume=True)


def test_class_agnostic_fused_sweep_cells_equal_the_cells_alone(synth_root, tmp_path):
    """clipkd sweep --fused over KDPL.K_MAX: the cells share the teacher's forward, each trains what it trains
    alone."""
    from clipkd.runs.fused import group_cells
    from clipkd.runs.sweep import build_grid, run_grid
    from test_fused import cells_equal_alone

    grid = build_grid(ROOT / "configs/methods/kdpl_ca_ivlp.yaml", "dtd", None, None, [1], tmp_path / "sweep",
                      [*TINY, "OPTIM.MAX_EPOCH", "1", "KDPL.DICTIONARY", str(dictionary_file(tmp_path))],
                      vary=[("KDPL.K_MAX", "3,6")])
    assert len(group_cells([grid.config(c, str(synth_root)) for c in grid.cells])) == 1
    assert run_grid(grid, str(synth_root), fused=True).lines()[0].startswith("sweep: 2 done")
    cells_equal_alone(grid, synth_root, tmp_path)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "method, extra, pattern",
    [
        ("kdpl_ivlp", ["DISTILL.CE_WEIGHT", "1"], r"DISTILL.CE_WEIGHT .*DISTILL.LABEL_FREE"),
        ("kdpl_ca_ivlp", ["DISTILL.CE_WEIGHT", "1"], r"DISTILL.CE_WEIGHT .*DISTILL.CLASS_AGNOSTIC"),
        ("kdpl_ca_ivlp", ["MODEL.STUDENT.TYPE", "promptkd"],
         r"DISTILL.CLASS_AGNOSTIC .*own text tower.*MODEL.STUDENT.TYPE promptkd"),
        ("kdpl_ca_ivlp", ["MODEL.TEACHER.TEMPLATES", "dataset"], r"DISTILL.CLASS_AGNOSTIC .*MODEL.TEACHER.TEMPLATES"),
        ("kdpl_ca_ivlp", ["KDPL.K_MAX", "0"], r"KDPL.K_MAX"),
        ("kdpl_ivlp", ["DISTILL.OBJECTIVE", "promptsrc", "DISTILL.WEIGHT", "0", "DISTILL.CE_WEIGHT", "1"],
         r"DISTILL.CE_WEIGHT 1 is a label loss and DISTILL.LABEL_FREE"),
        ("kdpl_ca_ivlp", ["DISTILL.OBJECTIVE", "promptsrc"], r"DISTILL.OBJECTIVE promptsrc .*DISTILL.CLASS_AGNOSTIC"),
        ("kdpl_ivlp", ["DISTILL.LOSS", "dkd", "DISTILL.DKD_TARGET", "label"], r"DISTILL.DKD_TARGET .*LABEL_FREE"),
    ],
)
def test_config_refusals_name_both_keys(synth_root, method, extra, pattern):
    with pytest.raises(ConfigError, match=pattern):  # KDPL.K_MAX 0: when the config is built
        check_config(config(synth_root, method, *extra))


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ([], r"KDPL.DICTIONARY is empty.*classnames_dictionay.csv"),
        (["KDPL.DICTIONARY", "/no/such/dictionary.csv"], r"KDPL.DICTIONARY /no/such/dictionary.csv: no such file"),
        ("k99", r"KDPL.K_MAX 99 .* 12 names"),
    ],
)
def test_run_refusals_leave_nothing_behind(synth_root, tmp_path, capsys, extra, pattern):
    import re

    if extra == "k99":
        extra = ca(tmp_path, 99)
    out = tmp_path / "run"
    rc = main(["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
               str(ROOT / "configs" / "methods" / "kdpl_ca_ivlp.yaml"), "--output-dir", str(out), *TINY, *extra])
    assert rc == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipkd: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), errors
    assert not out.exists()


def test_kdpl_recipes_pass_the_config_checks():
    for method in ("kdpl_ivlp", "kdpl_ca_ivlp", "kdpl_promptkd"):
        cfg = build_config([DATASET_CFG, ROOT / "configs" / "methods" / f"{method}.yaml"], [])
        check_config(cfg)
        t = cfg.MODEL.TEACHER
        assert (t.NAME, t.PRETRAINED, t.CHECKPOINT) == ("ViT-H-14-quickgelu", "dfn5b", "zero-shot")
        assert cfg.DISTILL.CE_WEIGHT == 0 and (cfg.DISTILL.LABEL_FREE or cfg.DISTILL.CLASS_AGNOSTIC)


# ------------------------------------------------------------------------------------------------ the teacher
def test_vit_h_dfn5b_teacher_resolves_offline_with_an_actionable_error(tmp_path):
    """open_clip knows the tag (QuickGELU, the Hugging Face repo); without the weights in the cache the run stops
    before building a 1B-parameter model, saying how to fill the cache or which key takes a local file."""
    import open_clip

    pcfg = open_clip.get_pretrained_cfg("ViT-H-14-quickgelu", "dfn5b")
    assert pcfg and pcfg["quick_gelu"] and "DFN5B" in pcfg["hf_hub"]
    code = ("import sys; from clipkd.config import build_config; from clipkd.models.teacher import build_teacher\n"
            f"cfg = build_config([{DATASET_CFG!r}, {str(ROOT / 'configs' / 'methods' / 'kdpl_ivlp.yaml')!r}], [])\n"
            "from clipkd.errors import ModelError\n"
            "try:\n    build_teacher(cfg)\nexcept ModelError as e:\n    print(e); sys.exit(3)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    msg = proc.stdout
    assert "'dfn5b'" in msg and "ViT-H-14-quickgelu" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "MODEL.TEACHER.PRETRAINED /path/to/file" in msg and str(tmp_path / "hub") in msg
