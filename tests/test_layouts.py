"""Each of the 11 real layouts: synthesised by clipkd, read back by clipkd."""

from __future__ import annotations

import json
import os

import pytest

from clipkd.data.readers import read_dataset
from clipkd.data.specs import DATASETS, STEMS, get_spec
from clipkd.errors import DataError
from tests_helpers import first_appearance_sorted


@pytest.mark.parametrize("stem", STEMS)
def test_synthetic_layout_reads_back(synth_root, stem):
    spec = DATASETS[stem]
    split = read_dataset(synth_root, spec)
    assert split.dataset_dir == str(synth_root / spec.folder)
    n = {d.label for d in split.train}
    assert n == set(range(7))
    for key in ("train", "val", "test"):
        for d in getattr(split, key):
            assert os.path.isfile(split.impath(d)), d
            if spec.image_dir:
                assert d.relpath.startswith(spec.image_dir + "/")
    if stem != "imagenet":  # the generator shuffles lists and labels; ImageNet's come from sorted folders
        assert not first_appearance_sorted(split.train)


def test_layout_specifics(synth_root):
    pets = read_dataset(synth_root, get_spec("OxfordPets"))
    assert all(d.relpath.startswith("images/") and d.relpath.count("/") == 1 for d in pets.train)
    assert any("_" in d.classname and d.classname != d.classname.lower() for d in pets.train)
    cars = read_dataset(synth_root, get_spec("stanford_cars"))
    assert all(d.relpath.startswith("cars_train/") for d in cars.train + cars.val)
    assert all(d.relpath.startswith("cars_test/") for d in cars.test)
    sun = read_dataset(synth_root, get_spec("sun397"))
    assert all(d.relpath.startswith("SUN397/") and d.relpath.count("/") == 3 for d in sun.train)


def test_fgvc_labels_are_line_indices(synth_root):
    folder = synth_root / "fgvc_aircraft"
    variants = [line for line in (folder / "variants.txt").read_text().splitlines()]
    assert variants != sorted(variants)
    split = read_dataset(synth_root, get_spec("fgvc_aircraft"))
    for d in split.train + split.val + split.test:
        assert variants[d.label] == d.classname
        assert d.relpath.startswith("images/") and d.relpath.endswith(".jpg")
    first = (folder / "images_variant_train.txt").read_text().splitlines()[0].split(" ")
    assert split.train[0].relpath == f"images/{first[0]}.jpg"


def test_imagenet_labels_sorted_wnids_and_sorted_files(synth_root):
    split = read_dataset(synth_root, get_spec("imagenet"))
    wnids = sorted(os.listdir(synth_root / "imagenet" / "images" / "train"))
    for d in split.train:
        assert d.relpath.split("/")[2] == wnids[d.label]
    paths = [d.relpath for d in split.train]
    assert paths == sorted(paths)
    assert split.val == []  # Dassl's val is the test set; clipkd keeps none
    assert all(d.relpath.startswith("images/val/") for d in split.test)
    lines = (synth_root / "imagenet" / "classnames.txt").read_text().splitlines()
    assert [line.split(" ")[0] for line in lines] == wnids


def test_imagenet_classnames_come_from_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from clipkd.data.imagenet import imagenet_classnames_lines

    assert imagenet_classnames_lines(["n01440764", "n01443537"]) == [
        f"n01440764 {IMAGENET_CLASSNAMES[0]}", f"n01443537 {IMAGENET_CLASSNAMES[1]}"]
    assert imagenet_classnames_lines(["n15075141"]) == [f"n15075141 {IMAGENET_CLASSNAMES[999]}"]
    with pytest.raises(DataError, match="not ILSVRC-2012 wnids"):
        imagenet_classnames_lines(["n99999999"])


def test_split_json_keeps_verbatim_names(synth_root):
    spec = get_spec("eurosat")
    raw = json.loads((synth_root / spec.folder / spec.split_file).read_text())
    split = read_dataset(synth_root, spec)
    assert [d.classname for d in split.test] == [c for _, _, c in raw["test"]]
    assert [d.label for d in split.test] == [y for _, y, _ in raw["test"]]
