"""The toy world behind `clipkd demo`: dataset layout, deterministic pretraining, compact weights."""

from __future__ import annotations

from dataclasses import replace

import torch

from clipkd.data.splits import resolve_split
from clipkd.toy import pretrain as P
from clipkd.toy.dataset import write_toy_dataset
from clipkd.toy.world import all_classes


def test_toy_dataset_is_a_coop_dataset(tmp_path):
    folder = write_toy_dataset(tmp_path)
    assert (folder / "split_toy.json").is_file()
    base = resolve_split(tmp_path, "toy", 16, 1, "base", cache_dir=False)
    new = resolve_split(tmp_path, "Toy", 16, 1, "new", cache_dir=False)
    assert len(base.classnames) == 18 and len(new.classnames) == 18
    assert len(base.train) == 18 * 16 and len(base.test) == 18 * 25
    assert set(base.classnames) | set(new.classnames) == {c.text for c in all_classes()}
    assert write_toy_dataset(tmp_path) == folder  # a finished dataset is reused


def test_pretraining_is_deterministic_and_compact_weights_load(tmp_path, monkeypatch):
    recipe = replace(P.RECIPES["student"], steps=3, pool=64, batch_size=16)
    monkeypatch.setitem(P.RECIPES, "student", recipe)
    a = P.pretrain("student", out=tmp_path / "a.pt", progress=False)
    b = P.pretrain("student", out=tmp_path / "b.pt", progress=False)
    pa, pb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert pa["state_dict"].keys() == pb["state_dict"].keys()
    assert all(torch.equal(pa["state_dict"][k], pb["state_dict"][k]) for k in pa["state_dict"])
    assert torch.equal(pa["token_rows"], pb["token_rows"])

    from clipkd.models.factory import create_clip

    full = P.expand_compact(a, tmp_path / "full.pt")
    model, tokenizer = create_clip(recipe.model, str(full))
    emb = model.token_embedding.weight
    assert torch.equal(emb[pa["token_ids"]], pa["token_rows"])
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(tokenizer(["a photo of a red circle."]))).all()


def test_shipped_weights_fit_the_architectures(tmp_path):
    from clipkd.models.factory import create_clip

    for role, recipe in P.RECIPES.items():
        full = P.expand_compact(P.weights_path(role), tmp_path / f"{role}.pt")
        create_clip(recipe.model, str(full))  # strict load: raises if a tensor does not fit
