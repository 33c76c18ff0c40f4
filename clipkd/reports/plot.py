"""The report's pictures as files: which figures a report has, their names, PNG bytes, atomic writes.

The figures themselves are built in :mod:`clipkd.reports.figures`. matplotlib is optional (extra ``plot``):
without it every entry point here raises the one-line :data:`~clipkd.reports.figures.MATPLOTLIB_MISSING`.
Output is deterministic: the Agg renderer, and no "Software" (matplotlib version) key in the PNG.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipkd.errors import ClipkdError
from clipkd.fileio import atomic_write
from clipkd.reports import figures
from clipkd.reports.aggregate import Sweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_SUFFIX = ".png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_METADATA = {"Software": None}  # no matplotlib version in the file: the same figure gives the same bytes
KINDS = ("b2n", "fewshot", "sweep", "compare", "transfer")


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


def require_matplotlib():  # noqa: ANN201
    """pyplot on the Agg backend (files only, no display), or the one-line error naming the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ClipkdError(figures.MATPLOTLIB_MISSING) from exc
    return plt


def report_figures(kind: str, data: Any, ci: bool = False) -> list[tuple[str, "Figure"]]:
    """The figures of one report, each with its file stem.

    ``kind``/``data``: "b2n" with the base-to-new tables (``b2n_<method>`` per method, and ``b2n_hm`` with the
    methods side by side when there are several), "fewshot" with the few-shot tables (``fewshot``), "sweep" with
    the sweeps (``sweep_<method>_<dataset>``), "compare" with a ``compare()`` result (``compare_<A>_vs_<B>``),
    "transfer" with a transfer table (``xd`` or ``dg``). ``ci``: error bars and bands are the 95% t-CI
    half-width of the seed mean instead of the std.
    """
    require_matplotlib()
    if kind == "b2n":
        out = [(f"b2n_{_safe(t.method)}", figures.b2n_bars(t, ci)) for t in data]
        if len(data) > 1:
            out.append(("b2n_hm", figures.hm_by_method(data, ci)))
    elif kind == "fewshot":
        out = [("fewshot", figures.fewshot_curves(data, ci))]
    elif kind == "sweep":
        out = [(f"sweep_{_safe(s.method)}_{s.stem}", figures.sweep_heatmap(s)) for s in data]
    elif kind == "compare":
        out = [(f"compare_{_safe(data.a)}_vs_{_safe(data.b)}", figures.forest(data))]
    elif kind == "transfer":
        out = [(data.setting, figures.transfer_bars(data, ci))]
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return _unique(out)


def _unique(named: list[tuple[str, "Figure"]]) -> list[tuple[str, "Figure"]]:
    """Two names that _safe makes equal ("kd [a]" and "kd_a") get _2, _3, ...: no figure overwrites another."""
    seen: dict[str, int] = {}
    out = []
    for stem, fig in named:
        seen[stem] = seen.get(stem, 0) + 1
        out.append((stem if seen[stem] == 1 else f"{stem}_{seen[stem]}", fig))
    return out


def close(fig: "Figure") -> None:
    """Release a figure (one made through pyplot is also dropped from pyplot's registry)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def png_bytes(fig: "Figure") -> bytes:
    """The figure as PNG bytes (for embedding, e.g. in an HTML report); the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", metadata=PNG_METADATA)
    finally:
        close(fig)
    return buf.getvalue()


def check_target(path: str | os.PathLike) -> None:
    """Refuse to write over anything but a PNG (a table or a folder given by mistake is never replaced)."""
    p = Path(path)
    if p.is_dir():
        raise ClipkdError(f"--plot: {p} is a folder; remove it or pick another --plot target")
    if p.exists():
        try:
            with open(p, "rb") as f:
                head = f.read(len(PNG_MAGIC))
        except OSError as exc:
            raise ClipkdError(f"--plot: cannot read {p} ({exc.strerror}); pick another --plot target") from exc
        if head != PNG_MAGIC:
            raise ClipkdError(f"--plot: {p} exists and is not a PNG: not overwritten; move it or pick another "
                              "--plot target")


def save_figure(fig: "Figure", path: str | os.PathLike) -> Path:
    """Write the figure as a PNG, atomically (a reader never sees half a file); the figure is closed."""
    path = Path(path)
    data = png_bytes(fig)
    atomic_write(path, lambda f: f.write(data))
    return path
