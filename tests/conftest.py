"""Shared fixtures: synthetic datasets in the real layouts, and a private few-shot cache."""

from __future__ import annotations

import pytest

from clipkd.data.specs import STEMS
from clipkd.data.synth import synthesize

# 7 classes (odd: base gets the extra one); largest classes hold 17 train images, others 16 and 15, so
# K = 16 exercises both the random draw and Dassl's take-all rule.
SYNTH_CLASSES = 7
SYNTH_PER_CLASS = 17


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("data")
    for i, stem in enumerate(STEMS):
        synthesize(root, stem, classes=SYNTH_CLASSES, images_per_class=SYNTH_PER_CLASS, seed=100 + i)
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep every test's few-shot cache out of the user's home."""
    cache = tmp_path / "clipkd-cache"
    monkeypatch.setenv("CLIPKD_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def teacher_calls(monkeypatch):
    """The batch size of every teacher image forward, to count how often the teacher really ran."""
    from clipkd.models.teacher import Teacher

    calls: list[int] = []
    real = Teacher.image_features

    def counted(self, images):
        calls.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(Teacher, "image_features", counted)
    return calls
