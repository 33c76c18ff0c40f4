"""Few-shot sampling and base/new split: exact agreement with Dassl, and the sampler's invariants."""

from __future__ import annotations

import math
import random
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dassl_reference
from clipkd.data.fewshot import (
    base_new_labels,
    classnames_for_prompts,
    group_by_label,
    sample_few_shot,
    sample_per_class,
    subsample_classes,
)
from clipkd.data.records import Datum
from clipkd.data.specs import STEMS
from clipkd.data.splits import resolve_split


@pytest.mark.parametrize("stem", STEMS)
def test_matches_dassl_procedure(synth_root, stem):
    """Same items, same order, same labels and class names as Dassl for every K, seed and half."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shots in (1, 2, 4, 8, 16, 0):
            for seed in (1, 2, 3):
                for sub in ("all", "base", "new"):
                    ours = resolve_split(synth_root, stem, shots, seed, sub).to_json()
                    ref = dassl_reference.resolve(str(synth_root), stem, shots, seed, sub)
                    assert ours == ref, (stem, shots, seed, sub)


def test_draw_shared_by_base_and_new(synth_root):
    """One draw over all classes: base and new runs see the halves of the same images."""
    full = resolve_split(synth_root, "dtd", 4, 2, "all")
    base = resolve_split(synth_root, "dtd", 4, 2, "base")
    new = resolve_split(synth_root, "dtd", 4, 2, "new")
    assert {d.relpath for d in base.train} | {d.relpath for d in new.train} == {d.relpath for d in full.train}
    assert len(base.classnames) == 4 and len(new.classnames) == 3  # 7 classes: base gets the extra one
    assert base.classnames + new.classnames == full.classnames


def test_does_not_touch_global_random(synth_root):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    resolve_split(synth_root, "eurosat", 2, 1, "base", cache_dir=False)
    assert random.random() == expected


def _items(draw):
    """Hypothesis strategy output -> Datum list with labels in arbitrary first-appearance order."""
    return [Datum(f"img{i}.jpg", label, f"c{label}") for i, label in enumerate(draw)]


labels_strategy = st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(labels=labels_strategy, shots=st.integers(min_value=-1, max_value=12), seed=st.integers(0, 2**31))
def test_sampler_invariants(labels, shots, seed):
    items = _items(labels)
    out = sample_per_class(items, shots, random.Random(seed))
    again = sample_per_class(items, shots, random.Random(seed))
    assert out == again  # deterministic for a seed
    if shots <= 0:
        assert out == items
        return
    groups = group_by_label(items)
    assert len(set(out)) == len(out)  # no replacement
    assert set(out) <= set(items)
    # per class: min(K, n) items; classes appear in blocks in order of first appearance
    assert [k for k in group_by_label(out)] == list(groups)
    for label, group in group_by_label(out).items():
        assert len(group) == min(shots, len(groups[label]))
        if len(groups[label]) < shots:
            assert group == groups[label]  # taken whole, in order
    blocks = [d.label for d in out]
    assert blocks == sorted(blocks, key=list(groups).index)


def test_short_classes_warn_once():
    items = _items([0] * 2 + [1] * 3 + [2] * 10)
    short = []
    out = sample_per_class(items, 5, random.Random(0), short)
    assert short == [0, 1] and out[:5] == items[:5]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_few_shot(items, items, 5, seed=1)
    assert len(caught) == 1 and "2 class(es) have fewer than 5 train images" in str(caught[0].message)


def test_val_uses_at_most_four_shots_and_same_stream():
    train = _items([0] * 20 + [1] * 20)
    val = [Datum(f"v{i}.jpg", i % 2, f"c{i % 2}") for i in range(20)]
    tr, va = sample_few_shot(train, val, 16, seed=3)
    assert len(tr) == 32 and len(va) == 8
    rng = random.Random(3)
    assert tr == sample_per_class(train, 16, rng)
    assert va == sample_per_class(val, 4, rng)  # continues the same stream
    tr2, va2 = sample_few_shot(train, val, 16, seed=3, sample_val=False)
    assert tr2 == tr and va2 == val


@settings(max_examples=200, deadline=None)
@given(labels=st.sets(st.integers(0, 500), min_size=1, max_size=60))
def test_base_new_partition(labels):
    items = _items(sorted(labels))
    base = base_new_labels(items, "base")
    new = base_new_labels(items, "new")
    n = len(labels)
    assert len(base) == math.ceil(n / 2) and len(new) == n - math.ceil(n / 2)
    assert base + new == sorted(labels)
    assert base_new_labels(items, "all") == sorted(labels)


@settings(max_examples=100, deadline=None)
@given(labels=labels_strategy, sub=st.sampled_from(["all", "base", "new"]))
def test_subsample_relabels_in_order(labels, sub):
    items = _items(labels)
    test = list(reversed(items))
    out_train, out_test = subsample_classes(items, test, subsample=sub)
    if sub == "all":  # Dassl leaves the lists (and labels) as they are
        assert out_train == items and out_test == test
        return
    kept = base_new_labels(items, sub)
    assert [d.relpath for d in out_train] == [d.relpath for d in items if d.label in kept]
    assert [d.relpath for d in out_test] == [d.relpath for d in test if d.label in kept]
    assert sorted({d.label for d in out_train}) == list(range(len(kept)))
    mapping = {d.relpath: d.label for d in out_train}
    for d in items:
        if d.label in kept:
            assert mapping[d.relpath] == kept.index(d.label)
            assert d.classname == f"c{d.label}"


def test_classnames_for_prompts_keep_case():
    items = [Datum("a", 1, "Annual_Crop_Land"), Datum("b", 0, "face"), Datum("c", 2, "2012_Tesla_Model_S")]
    assert classnames_for_prompts(items) == ["face", "Annual Crop Land", "2012 Tesla Model S"]


def test_a_runs_halves_come_from_one_read_and_one_draw(synth_root, monkeypatch):
    """prepare_data reads the dataset and draws once for base, new (and the transductive all); each half is
    what resolve_split gives alone."""
    import clipkd.data.splits as splits
    from clipkd.config import build_config
    from clipkd.data.rundata import prepare_data

    reads = []
    real = splits.read_dataset
    monkeypatch.setattr(splits, "read_dataset", lambda *a, **k: reads.append(1) or real(*a, **k))
    cfg = build_config([], ["DATASET.ROOT", str(synth_root), "DATASET.NAME", "oxford_pets", "DATASET.NUM_SHOTS", "2",
                            "DATASET.SUBSAMPLE_CLASSES", "base", "DISTILL.PROTOCOL", "transductive"])
    data = prepare_data(cfg)
    assert len(reads) == 1
    for half in ("base", "new"):
        assert data.halves[half] == resolve_split(synth_root, "oxford_pets", 2, 1, half)
    assert data.train == resolve_split(synth_root, "oxford_pets", 2, 1, "all")
    assert all(data.train is not split for split in data.halves.values())
