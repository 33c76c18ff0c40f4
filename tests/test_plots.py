"""``clipkd report --plot DIR``: the figures hold the report's numbers (bars, error bars, bands, CIs), the files
are PNGs, and the errors are one line (no matplotlib, a file where the folder goes, a non-PNG in the way)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from clipkd.errors import ClipkdError
from clipkd.reports import aggregate
from clipkd.reports.collect import collect, sort_out
from test_report import b2n, run_cli, write_run

pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402

from clipkd.reports import figures, plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
STEMS2 = ("oxford_pets", "dtd")


def value(method: str, stem: str, seed: int, half: str) -> float:
    """A deterministic accuracy that differs by method, dataset, seed and half."""
    base = {"oxford_pets": 90.0, "dtd": 70.0, "eurosat": 80.0}.get(stem, 75.0 + len(stem) % 7)
    return round(base + (3.0 if method == "abkd" else 0.0) + (seed * 1.5 if half == "base" else -seed * 2.0)
                 - (12.0 if half == "new" else 0.0) + (sum(map(ord, method)) % 7) * 0.5, 2)


def b2n_tree(root: Path, methods=("abkd", "kd"), stems=STEMS2, seeds=(1, 2, 3)) -> Path:
    for m in methods:
        for stem in stems:
            for s in seeds:
                write_run(root / m / stem / f"seed{s}", b2n(value(m, stem, s, "base"), value(m, stem, s, "new")))
    return root


def fewshot_tree(root: Path, methods=("abkd", "kd"), stems=STEMS2, shots=(1, 4, 16), seeds=(1, 2, 3)) -> Path:
    for m in methods:
        for stem in stems:
            for k in shots:
                for s in seeds:
                    acc = min(99.0, value(m, stem, s, "base") - 20 + 4 * math.log2(k))
                    write_run(root / "fewshot" / m / stem / f"shots{k}" / f"seed{s}",
                              {"all": {"accuracy": acc, "n": 50}, "epoch": 20})
    return root


def transfer_tree(root: Path, setting_targets=("dtd", "eurosat"), methods=("abkd", "kd"), seeds=(1, 2)) -> Path:
    for m in methods:
        for s in seeds:
            run = root / m / "imagenet" / f"seed{s}"
            write_run(run, {"all": {"accuracy": value(m, "imagenet", s, "base"), "n": 10}})
            for t in setting_targets:
                (run / "eval" / t).mkdir(parents=True)
                (run / "eval" / t / "results.json").write_text(json.dumps(
                    {"all": {"accuracy": value(m, t, s, "new"), "n": 10}}))
    return root


def tables(root: Path, kind: str = "base2new"):
    runs, _ = sort_out(collect(root).complete(kind), (lambda r: r.method) if kind == "base2new"
                       else (lambda r: (r.method, r.shots)))
    return aggregate.base_to_new_tables(runs) if kind == "base2new" else aggregate.fewshot_tables(runs)


def bars(ax, label: str) -> tuple[list[float], list[float], list[float]]:
    """x, heights and error half-lengths (NaN: no bar) of the bar series named ``label``."""
    c = next(c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == label)
    xs = [p.get_x() + p.get_width() / 2 for p in c.patches]
    heights = [p.get_height() for p in c.patches]
    half = {}
    if c.errorbar is not None:
        for seg in c.errorbar.lines[2][0].get_segments():
            if len(seg) == 0:  # a NaN error: no bar drawn
                continue
            (x0, y0), (_, y1) = seg
            half[round(x0, 6)] = (y1 - y0) / 2
    return xs, heights, [half.get(round(x, 6), math.nan) for x in xs]


def points(ax, label: str) -> tuple[list[float], list[float], list[float]]:
    """x, y and error half-lengths of the points (errorbar) named ``label``."""
    c = next(c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == label)
    xs, ys = list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())
    half = {round(float(seg[0][0]), 6): (seg[1][1] - seg[0][1]) / 2
            for seg in c.lines[2][0].get_segments() if len(seg)}
    return xs, ys, [half.get(round(float(x), 6), math.nan) for x in xs]


def ci95(values: list[float]) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def caption(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts).replace("\n", " ")


def hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


# ---------------------------------------------------------------- figure content
@pytest.mark.parametrize("ci", [False, True])
def test_b2n_bars_hold_the_table_and_its_spread(tmp_path, ci):
    (table,) = [t for t in tables(b2n_tree(tmp_path / "r")) if t.method == "abkd"]
    fig = figures.b2n_bars(table, ci)
    ax = fig.axes[0]
    spread = ci95 if ci else (lambda v: float(np.std(v, ddof=1)))
    for label, half in (("Base", "base"), ("New", "new")):
        _, heights, errs = bars(ax, label)
        per_dataset = [[value("abkd", st, s, half) for s in (1, 2, 3)] for st in STEMS2]
        assert len(heights) == len(STEMS2) + 1  # two datasets and the average
        assert heights[:2] == pytest.approx([np.mean(v) for v in per_dataset])
        assert errs[:2] == pytest.approx([spread(v) for v in per_dataset])
        per_seed_avg = np.mean(per_dataset, axis=0)  # same seeds everywhere: the average gets a spread too
        assert heights[2] == pytest.approx(per_seed_avg.mean()) and errs[2] == pytest.approx(spread(per_seed_avg))
    _, heights, errs = bars(ax, "HM")
    assert heights[:2] == pytest.approx([r.hm for r in table.rows])
    for err, st in zip(errs, STEMS2):
        seeds_hm = [hm(value("abkd", st, s, "base"), value("abkd", st, s, "new")) for s in (1, 2, 3)]
        assert err == pytest.approx(spread(seeds_hm))
    assert heights[2] == pytest.approx(table.average.hm)
    assert ("95% t-CI" if ci else "sample std") in ax.get_title()
    plot.close(fig)


def test_one_seed_has_no_error_bar_and_different_seeds_no_average_spread(tmp_path):
    root = b2n_tree(tmp_path / "r", methods=("kd",), stems=("dtd",), seeds=(1,))
    b2n_tree(root, methods=("kd",), stems=("oxford_pets",), seeds=(1, 2))
    (table,) = tables(root)
    fig = figures.b2n_bars(table)
    _, heights, errs = bars(fig.axes[0], "Base")
    assert len(heights) == 3 and math.isnan(errs[1]) and not math.isnan(errs[0]) and math.isnan(errs[2])
    assert "no error bars (the datasets have different seeds)" in caption(fig)
    plot.close(fig)


def test_hm_by_method_side_by_side(tmp_path):
    ts = tables(b2n_tree(tmp_path / "r", methods=("abkd", "kd", "ttm")))
    fig = figures.hm_by_method(ts)
    ax = fig.axes[0]
    for t in ts:
        xs, ys, errs = points(ax, t.method)
        assert ys == pytest.approx([r.hm for r in t.rows] + [t.average.hm])
        per_seed = [[hm(b, n) for b, n in zip(r.base.values, r.new.values)] for r in t.rows]
        assert errs[:2] == pytest.approx([float(np.std(v, ddof=1)) for v in per_seed])
        seed_avg = zip(np.mean([r.base.values for r in t.rows], axis=0),
                       np.mean([r.new.values for r in t.rows], axis=0))
        assert errs[2] == pytest.approx(float(np.std([hm(b, n) for b, n in seed_avg], ddof=1)))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["OxfordPets", "DescribableTextures", "Average"]
    xs = [points(ax, t.method)[0][0] for t in ts]
    assert xs == sorted(xs) and len(set(xs)) == 3  # side by side in method order, not on top of each other
    plot.close(fig)


@pytest.mark.parametrize("ci", [False, True])
def test_fewshot_lines_and_bands(tmp_path, ci):
    ts = tables(fewshot_tree(tmp_path / "r"), "fewshot")
    fig = figures.fewshot_curves(ts, ci)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["OxfordPets", "DescribableTextures", "Average"]
    spread = ci95 if ci else (lambda v: float(np.std(v, ddof=1)))
    for ax, stem in zip(panels, (*STEMS2, None)):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert sorted(lines) == ["abkd", "kd"]
        for i, m in enumerate(("abkd", "kd")):
            mt = sorted((t for t in ts if t.method == m), key=lambda t: t.shots)
            if stem is None:
                per_seed = [np.mean([r.acc.values for r in t.rows], axis=0) for t in mt]
            else:
                per_seed = [next(r for r in t.rows if r.stem == stem).acc.values for t in mt]
            means = [float(np.mean(v)) for v in per_seed]
            assert list(lines[m].get_xdata()) == [1, 4, 16]
            assert list(lines[m].get_ydata()) == pytest.approx(means)
            band = ax.collections[i].get_paths()[0].vertices  # fill_between: the lower edge, then the upper
            ys = {round(float(y), 6) for y in band[:, 1]}
            for mu, v in zip(means, per_seed):
                assert round(mu - spread(list(v)), 6) in ys and round(mu + spread(list(v)), 6) in ys
    plot.close(fig)


def test_forest_plot_holds_the_comparison(tmp_path):
    from test_compare import comparison, two_methods

    rng = np.random.default_rng(3)
    two_methods(tmp_path / "r", rng, 0.8, 0.7, datasets=("dtd", "eurosat", "oxford_pets"), n=200)
    c = comparison(tmp_path / "r", resamples=500)
    fig = figures.forest(c)
    ax = fig.axes[0]
    rows = c.rows + [c.average]
    (err,) = [x for x in ax.containers if x.get_label().endswith("paired-bootstrap CI")]
    segs = err.lines[2][0].get_segments()
    got = sorted((round(float(s[0][1]), 6), float(s[0][0]), float(s[1][0])) for s in segs)
    want = sorted((float(len(rows) - 1 - i), r.deltas["hm"].low, r.deltas["hm"].high) for i, r in enumerate(rows))
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [x for g in got for x in g[1:]] == pytest.approx([x for w in want for x in w[1:]])
    points = {}
    for coll in ax.collections:
        if coll.get_label() in ("abkd better", "kd better", "not resolved"):
            for x, y in coll.get_offsets():
                points[round(float(y))] = (float(x), coll.get_label())
    for i, r in enumerate(rows):
        x, label = points[len(rows) - 1 - i]
        assert x == pytest.approx(r.deltas["hm"].value) and label == r.verdict(c.a, c.b)
    assert any(ln.get_xdata()[0] == 0 for ln in ax.get_lines())  # the line at 0
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels][::-1] == [r.name for r in rows]  # the first dataset on top
    assert labels[0].get_fontweight() == "bold"  # the average
    plot.close(fig)


def test_transfer_bars(tmp_path):
    from clipkd.reports.transfer import transfer_table

    table = transfer_table(transfer_tree(tmp_path / "t"), "xd")
    fig = figures.transfer_bars(table)
    ax = fig.axes[0]
    for row in table.rows:
        _, heights, errs = bars(ax, row.method)
        stats = [row.source, row.targets["dtd"], row.targets["eurosat"]]
        assert heights == pytest.approx([s.mean for s in stats] + [row.average(table.targets)])
        assert errs[:3] == pytest.approx([s.std for s in stats]) and math.isnan(errs[3])
    plot.close(fig)


# ---------------------------------------------------------------- the interface for other reports
def test_report_figures_names_png_bytes_and_save(tmp_path):
    ts = tables(b2n_tree(tmp_path / "r", methods=("abkd", "kd [transductive]")))
    named = plot.report_figures("b2n", ts)
    assert [n for n, _ in named] == ["b2n_abkd", "b2n_kd_transductive", "b2n_hm"]
    first = plot.png_bytes(named[0][1])
    again = plot.png_bytes(plot.report_figures("b2n", ts[:1])[0][1])
    assert first[:8] == PNG and first == again  # deterministic: no version or time stamp in the file
    assert b"Software" not in first
    out = plot.save_figure(named[1][1], tmp_path / "x" / "fig.png")
    assert out.read_bytes()[:8] == PNG and [p.name for p in out.parent.iterdir()] == ["fig.png"]
    assert [n for n, _ in plot.report_figures("b2n", ts[:1])] == ["b2n_abkd"]  # one method: no b2n_hm
    with pytest.raises(ValueError, match="kind must be one of"):
        plot.report_figures("pie", ts)
    assert plot.require_matplotlib().get_backend().lower() == "agg"


# ---------------------------------------------------------------- the command
def test_plot_every_report_kind(tmp_path, capsys):
    from test_compare import two_methods

    out = tmp_path / "plots"
    root = b2n_tree(tmp_path / "r")
    rc, _, err = run_cli(capsys, "report", str(root), "--plot", str(out), "--ci")
    assert rc == 0 and err.splitlines()[:3] == [f"wrote {out / n}.png" for n in ("b2n_abkd", "b2n_kd", "b2n_hm")]
    fewshot_tree(root)
    rc, _, err = run_cli(capsys, "report", str(root), "--fewshot", "--plot", str(out))
    assert rc == 0 and f"wrote {out / 'fewshot.png'}" in err
    two_methods(tmp_path / "c", np.random.default_rng(0), 0.8, 0.75, datasets=("dtd", "eurosat"), n=100)
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "c"), "--compare", "abkd", "kd", "--resamples", "200",
                         "--plot", str(out))
    assert rc == 0 and f"wrote {out / 'compare_abkd_vs_kd.png'}" in err
    rc, _, err = run_cli(capsys, "report", str(transfer_tree(tmp_path / "t")), "--xd", "--plot", str(out))
    assert rc == 0 and f"wrote {out / 'xd.png'}" in err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["b2n_abkd.png", "b2n_hm.png", "b2n_kd.png", "compare_abkd_vs_kd.png", "fewshot.png", "xd.png"]
    assert all((out / n).read_bytes()[:8] == PNG for n in names)
    rc, _, err = run_cli(capsys, "report", str(root), "--plot", str(out))  # a PNG of ours is replaced
    assert rc == 0 and "wrote" in err


def test_plot_target_errors(tmp_path, capsys):
    root = b2n_tree(tmp_path / "r", methods=("kd",))
    file = tmp_path / "table.md"
    file.write_text("| keep me |\n")
    rc, out, err = run_cli(capsys, "report", str(root), "--plot", str(file))
    assert rc == 2 and out == "" and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "report", str(root), "--plot", str(file / "sub"))
    assert rc == 2 and f"is under {file}, a file" in err
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "b2n_kd.png").write_text("not a picture")
    rc, _, err = run_cli(capsys, "report", str(root), "--plot", str(folder))
    assert rc == 2 and "is not a PNG: not overwritten" in err
    assert (folder / "b2n_kd.png").read_text() == "not a picture" and file.read_text() == "| keep me |\n"
    with pytest.raises(ClipkdError, match="is a folder"):
        plot.check_target(folder)
    sweep = tmp_path / "s"
    write_run(sweep / "abkd" / "eurosat" / "a0.5_b0.5" / "seed1", b2n(80.0, 70.0))
    rc, _, err = run_cli(capsys, "report", str(sweep), "--sweep", "--plot", str(file))  # --sweep: FILE, not a PNG
    assert rc == 2 and "is not a PNG: not overwritten" in err and file.read_text() == "| keep me |\n"


@pytest.mark.parametrize("extra", [(), ("--fewshot",), ("--sweep",), ("--xd",), ("--compare", "kd", "abkd")])
def test_without_matplotlib_one_line(tmp_path, capsys, monkeypatch, extra):
    root = b2n_tree(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    rc, out, err = run_cli(capsys, "report", str(root), *extra, "--plot", str(tmp_path / "p"))
    assert rc == 2 and out == ""
    assert err.splitlines() == ["clipkd: error: --plot needs matplotlib: pip install 'clipkd[plot]'"]
    assert not (tmp_path / "p").exists()
