"""The few-shot cache: readable JSON, same result as no cache, never stale."""

from __future__ import annotations

import json
import shutil

from clipkd.data.splits import resolve_split


def test_hit_equals_miss_and_no_cache(synth_root, private_cache):
    miss = resolve_split(synth_root, "oxford_pets", 4, 1, "base")
    files = list((private_cache / "fewshot" / "oxford_pets").glob("shot_4-seed_1-*.json"))
    assert len(files) == 1
    payload = json.loads(files[0].read_text())
    assert payload["shots"] == 4 and payload["seed"] == 1 and payload["dataset"] == "oxford_pets"
    assert payload["train"][0][0].startswith("images/")  # relative, relocatable
    hit = resolve_split(synth_root, "oxford_pets", 4, 1, "base")
    assert hit == miss
    assert resolve_split(synth_root, "oxford_pets", 4, 1, "base", cache_dir=False) == miss


def test_cache_is_actually_read(synth_root, private_cache):
    """A hand-edited draw with the right hash is served: proof the cache path is used."""
    drawn = resolve_split(synth_root, "dtd", 2, 1, "all")
    path = next((private_cache / "fewshot" / "dtd").glob("*.json"))
    payload = json.loads(path.read_text())
    payload["train"] = payload["train"][::-1]
    path.write_text(json.dumps(payload))
    assert resolve_split(synth_root, "dtd", 2, 1, "all").train == drawn.train[::-1]


def test_changed_split_never_served_stale(tmp_path, synth_root, private_cache):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "caltech-101", root / "caltech-101")
    before = resolve_split(root, "caltech101", 2, 1, "all")
    split_file = root / "caltech-101" / "split_zhou_Caltech101.json"
    data = json.loads(split_file.read_text())
    data["train"] = list(reversed(data["train"]))
    split_file.write_text(json.dumps(data))
    after = resolve_split(root, "caltech101", 2, 1, "all")
    assert after == resolve_split(root, "caltech101", 2, 1, "all", cache_dir=False)
    assert [d.relpath for d in after.train] != [d.relpath for d in before.train]
    assert len(list((private_cache / "fewshot" / "caltech101").glob("*.json"))) == 2


def test_corrupt_cache_file_is_ignored(synth_root, private_cache):
    good = resolve_split(synth_root, "ucf101", 1, 3, "new")
    for path in (private_cache / "fewshot" / "ucf101").glob("*.json"):
        path.write_text("{not json")
    assert resolve_split(synth_root, "ucf101", 1, 3, "new") == good


def test_cached_draw_draws_once_per_lists_and_key(tmp_path):
    """The whole draw cache is one call: a miss draws and writes, a hit reads, False never caches."""
    from clipkd.data.cache import cached_draw
    from clipkd.data.records import Datum

    train = [Datum(f"c{i % 2}/{i}.jpg", i % 2, f"c{i % 2}") for i in range(6)]
    val = train[:2]
    calls = []

    def draw():
        calls.append(1)
        return train[:2], val[:1]

    first = cached_draw(tmp_path, "dtd", 1, 7, train, val, draw)
    again = cached_draw(tmp_path, "dtd", 1, 7, train, val, draw)
    assert first == again == (train[:2], val[:1]) and len(calls) == 1
    cached_draw(tmp_path, "dtd", 1, 8, train, val, draw)  # another seed: another draw
    cached_draw(False, "dtd", 1, 7, train, val, draw)
    assert len(calls) == 3
