"""Heatmap of a sweep's HM over the (alpha, beta) plane. matplotlib is optional (extra ``plot``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from clipkd.errors import ClipkdError
from clipkd.reports.aggregate import Sweep

PLOT_SUFFIX = ".png"


def _safe(name: str) -> str:
    """A method name as part of a file name (a table name such as "abkd [transductive]" has spaces)."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_")


def sweep_plot_paths(target: str, sweeps: list[Sweep]) -> list[Path]:
    """The file each sweep's heatmap goes to, for ``--plot TARGET``: exactly the files written, so that the
    report can name them.

    An existing folder (or a name ending in a slash) gets ``sweep_<method>_<dataset>.png`` per sweep; a file name
    without a suffix gets ``.png`` (matplotlib would add it unasked); several sweeps get
    ``<stem>_<method>_<dataset><suffix>`` beside the name given.
    """
    if os.path.isdir(target) or target.endswith(("/", os.sep)):
        return [Path(target) / f"sweep_{_safe(s.method)}_{s.stem}{PLOT_SUFFIX}" for s in sweeps]
    out = Path(target)
    if not out.suffix:
        out = out.with_name(out.name + PLOT_SUFFIX)
    if len(sweeps) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{_safe(s.method)}_{s.stem}{out.suffix}") for s in sweeps]


def _pyplot():  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ClipkdError("--plot needs matplotlib: pip install matplotlib (or pip install 'clipkd[plot]')") from exc
    return plt


def plot_sweep(sweep: Sweep, path: str | Path) -> Path:
    """Write a PNG: rows alpha, columns beta, cells annotated with HM, best cell outlined."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    alphas, betas, best = sweep.alphas, sweep.betas, sweep.best
    grid = [[float("nan")] * len(betas) for _ in alphas]
    for c in sweep.cells:
        grid[alphas.index(c.alpha)][betas.index(c.beta)] = c.hm
    values = [c.hm for c in sweep.cells]
    lo, hi = min(values), max(values)

    fig, ax = plt.subplots(figsize=(1.1 * len(betas) + 2.6, 0.8 * len(alphas) + 1.8), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    import numpy as np

    im = ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1,
                   origin="lower", aspect="auto")
    ax.set_xticks(range(len(betas)), [format(b, "g") for b in betas])
    ax.set_yticks(range(len(alphas)), [format(a, "g") for a in alphas])
    ax.set_xlabel("beta")
    ax.set_ylabel("alpha")
    mid = (lo + hi) / 2
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            v = grid[i][j]
            text, colour = ("n/a", "black") if v != v else (f"{v:.2f}", "black" if v > mid else "white")
            weight = "bold" if best is not None and (a, b) == (best.alpha, best.beta) else "normal"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9, fontweight=weight)
    if best is not None:
        j, i = betas.index(best.beta), alphas.index(best.alpha)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_title(f"HM (%) over (alpha, beta): {sweep.name}, {sweep.method}\n"
                 f"best alpha={format(best.alpha, 'g')}, beta={format(best.beta, 'g')}: HM {best.hm:.2f}",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="HM (%)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
