"""A small compositional world: classes are colour x shape, images are drawn procedurally.

The domains share the classes. ``pretrain`` (what the tiny CLIPs learn from, with captions, as web-scale CLIP
learns from the web) shows shapes on plain backgrounds under neutral light; ``pretrain_varied`` adds random
colour casts (light of any warmth), the wider experience that makes the larger teacher robust.
``benchmark`` (the ``toy`` dataset the demo distils on) shows smaller shapes on textured, noisy backgrounds
under one warm colour cast, so a model that never saw such light confuses colours (purple looks red): the
information is in the pixels, the zero-shot mapping is off, and a student can learn the correction from the
teacher on the base classes and carry it to the new ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
IMAGE_SIZE = 32
BENCHMARK_CAST = (1.25, 1.0, 0.7)  # warm light: red up, blue down

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a small {}.",
    "a large {}.",
    "{}",
)


@dataclass(frozen=True)
class ToyClass:
    colour: str
    shape: str

    @property
    def name(self) -> str:
        """How the split file stores it (underscores, like many real split files)."""
        return f"{self.colour}_{self.shape}"

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape}"


def all_classes() -> list[ToyClass]:
    return [ToyClass(c, s) for c in COLOURS for s in SHAPES]


def caption(cls: ToyClass, rng: random.Random) -> str:
    """A caption of the pretraining distribution; every colour and shape word occurs in pretraining."""
    return rng.choice(CAPTION_TEMPLATES).format(cls.text)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    t = max(2, s // 5)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "cross":
        draw.rectangle([cx - t, y0, cx + t, y1], fill=fill)
        draw.rectangle([x0, cy - t, x1, cy + t], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=t)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def render(cls: ToyClass, rng: random.Random, domain: str) -> Image.Image:
    """One image of ``cls`` in ``domain`` ('pretrain' or 'benchmark'), determined by ``rng``."""
    n = IMAGE_SIZE
    jitter = 25
    fill = tuple(int(np.clip(v + rng.randint(-jitter, jitter), 0, 255)) for v in COLOURS[cls.colour])
    cast = None
    if domain == "pretrain_varied":
        strength = rng.uniform(-1.0, 1.0)  # cool ... neutral ... warm, up to the benchmark's cast and beyond
        cast = tuple(1 + strength * (c - 1) * 1.2 for c in BENCHMARK_CAST)
        domain = "pretrain"
    if domain == "pretrain":
        # plain backgrounds of any brightness and a slight tint: colour and shape are what captions name
        level = rng.randint(0, 190)
        bg = np.empty((n, n, 3), dtype=np.float32)
        bg[:] = [level + rng.randint(-15, 15) for _ in range(3)]
        size = rng.randint(12, 26)
    elif domain == "benchmark":
        # lighter, textured backgrounds: a tinted gradient plus stripes
        base = np.array([rng.randint(90, 170) for _ in range(3)], dtype=np.float32)
        ramp = np.linspace(-30, 30, n, dtype=np.float32)
        bg = base + (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
        period = rng.randint(3, 7)
        stripes = ((np.arange(n) // period) % 2).astype(np.float32) * rng.randint(10, 35)
        bg = bg + (stripes[:, None, None] if rng.random() < 0.5 else stripes[None, :, None])
        bg = np.broadcast_to(bg, (n, n, 3)).copy()
        size = rng.randint(9, 18)
    else:
        raise ValueError(f"unknown domain {domain!r}")
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    x, y = rng.randint(0, n - size - 1), rng.randint(0, n - size - 1)
    _draw_shape(ImageDraw.Draw(img), cls.shape, (x, y, x + size, y + size), fill)
    if domain == "benchmark":
        cast = BENCHMARK_CAST
    if cast is not None:
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * np.array(cast), 0, 255).astype(np.uint8))
    if domain == "benchmark":
        arr = np.asarray(img, dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, arr.shape)
        img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    return img
