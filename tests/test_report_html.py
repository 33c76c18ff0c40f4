"""``clipkd report --format html`` and ``-o FILE``: one self-contained page whose tables are the md report's,
everything escaped, nothing fetched; checked in a real headless browser when Debian's chromium is installed."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clipkd.cli.main import main
from clipkd.reports.html import CSP, PLOT_HINT, markdown_html
from clipkd.reports.plot import PNG_MAGIC
from clipkd.reports.render import md_row
from test_compare import bern
from test_compare import write_run as write_predicted_run

METHODS = {"kd": {"dtd": 0.62, "eurosat": 0.80, "oxford_pets": 0.90},
           "abkd": {"dtd": 0.66, "eurosat": 0.83, "oxford_pets": 0.905}}
HOSTILE = 'k<img src=x onerror=alert(1)>d & "x" | \'y\''  # a folder name Linux allows: a tag, &, quotes, a pipe


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """2 methods x 3 datasets x 3 seeds with predictions.npz; abkd/eurosat/seed3 failed (so: a missing-seeds
    warning)."""
    r = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for method, datasets in METHODS.items():
        for stem, p in datasets.items():
            for s in (1, 2, 3):
                folder = r / method / stem / f"seed{s}"
                if (method, stem, s) == ("abkd", "eurosat", 3):
                    folder.mkdir(parents=True)
                    (folder / "config.yaml").write_text("SEED: 3\n")
                    (folder / "log.txt").write_text("RuntimeError: CUDA out of memory\n")
                    continue
                write_predicted_run(folder, {"base": bern(rng, p, 200), "new": bern(rng, p - 0.12, 150)})
    return r


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


class Page(HTMLParser):
    """What the tests look at: tables as rows of cell texts, headings, list items, tags, attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self.items: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self._cell: list[str] | None = None
        self._text: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h2", "h3", "li"):
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("h2", "h3", "li") and self._text is not None:
            (self.items if tag == "li" else self.headings).append("".join(self._text).strip())
            self._text = None

    def handle_data(self, data: str) -> None:
        for part in (self._cell, self._text):
            if part is not None:
                part.append(data)


def md_tables(text: str) -> list[list[list[str]]]:
    """The pipe tables of a Markdown report, cells unescaped and bold marks dropped (separator rows skipped)."""
    tables: list[list[list[str]]] = []
    previous = False
    for line in text.splitlines():
        if not line.startswith("|"):
            previous = False
            continue
        if not previous:
            tables.append([])
        previous = True
        if re.fullmatch(r"\|([-:]+\|)+", line):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        tables[-1].append([c.strip().replace("\\|", "|").replace("**", "") for c in cells])
    return tables


def same_cells(md: list[list[list[str]]], page: Page) -> None:
    assert len(md) == len(page.tables)
    for m, h in zip(md, page.tables):
        assert len(m) == len(h)
        for mr, hr in zip(m, h):
            assert len(mr) == len(hr)
            # the Average row's explanation sits below its number on the page (<br>): compare without spaces
            assert [c.replace(" ", "") for c in mr] == [c.replace(" ", "") for c in hr]


def check_self_contained(text: str, page: Page) -> None:
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP.replace(chr(39), "&#x27;")}">' in text
    assert "default-src 'none'" in CSP and "img-src data:" in CSP and "script" not in CSP
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    words = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).replace("</", "")
    assert not re.search(r"(?i)(?:https?:|//)[^\s\"'<>]", words), "no network references"
    for tag, name, value in page.attrs:
        assert name != "href" and not name.startswith("on")
        if name == "src":
            assert tag == "img" and value.startswith("data:image/png;base64,")


def test_b2n_page_has_the_md_tables_problems_and_no_network(root, capsys):
    rc, md, _ = run_cli(capsys, "report", str(root), "--ci")
    assert rc == 0
    rc, text, err = run_cli(capsys, "report", str(root), "--ci", "--format", "html")
    assert rc == 0 and err == ""
    page = Page(text)
    same_cells(md_tables(md), page)
    assert [len(t) for t in page.tables] == [1 + 3 + 1] * 2  # header, 3 datasets, Average; one table per method
    assert all(len(row) == 7 for t in page.tables for row in t)
    kd = page.tables[1]
    summary = json.loads(run_cli(capsys, "report", str(root), "--method", "kd", "--format", "json")[1])
    assert kd[-1][1] == f"{summary['average']['base']:.2f}"  # numbers: the json's, to the md's two decimals
    assert kd[-1][3].startswith(f"{summary['average']['hm']:.2f}")
    assert page.headings[:2] == ["abkd", "kd"] and "Problems and warnings" in page.headings
    assert any(i.startswith("abkd/eurosat/seed3: no results.json") for i in page.items)
    assert any("missing seeds" in i for i in page.items)
    check_self_contained(text, page)
    assert "<title>clipkd report: base-to-new (" in text


def test_hostile_names_are_escaped_in_md_and_html(root, tmp_path, capsys):
    (root / "kd").rename(root / HOSTILE)
    rc, md, _ = run_cli(capsys, "report", str(root))
    assert rc == 0
    rows = [line for line in md.splitlines() if line.startswith("| **Average**")]
    assert len(rows) == 2  # the Average row of each method
    assert f"### {HOSTILE}" in md
    tables = md_tables(md)
    assert {len(row) for t in tables for row in t} == {5}  # the | in the name did not add a cell
    rc, text, _ = run_cli(capsys, "report", str(root), "--format", "html")
    page = Page(text)
    assert HOSTILE in page.headings and "<img src=x" not in text
    srcs = [v for tag, k, v in page.attrs if tag == "img" and k == "src"]
    assert srcs and all(v.startswith("data:image/png;base64,") for v in srcs)  # only the embedded figures
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&amp;" in text and "&quot;x&quot;" in text
    check_self_contained(text, page)
    same_cells(tables, page)
    # the method name also in a table cell: --compare
    rc, text, _ = run_cli(capsys, "report", str(root), "--compare", HOSTILE, "abkd", "--resamples", "200",
                          "--format", "html")
    assert rc == 0
    page = Page(text)
    assert f"{HOSTILE} vs abkd" in page.headings and "<img src=x" not in text
    check_self_contained(text, page)


def test_md_row_escapes_pipes():
    assert md_row(["a|b", "c\nd", 1.5]) == "| a\\|b | c d | 1.5 |"
    html = markdown_html("### x\n\n" + md_row(["Dataset", "HM"]) + "\n|---|---:|\n" + md_row(["a|b <c>", "1.00"]))
    page = Page(html)
    assert page.tables == [[["Dataset", "HM"], ["a|b <c>", "1.00"]]]
    assert '<td class="r">1.00</td>' in html and "&lt;c&gt;" in html


def test_every_mode_writes_a_page(root, tmp_path, capsys):
    """--sweep, --fewshot, --compare A B and --xd (their own layouts) give a page each."""
    sweep = tmp_path / "sweep"
    for a in (0.0, 0.5):
        for b in (0.3, 1.0):
            for s in (1, 2):
                write_predicted_run(sweep / "abkd" / "eurosat" / f"a{a:g}_b{b:g}" / f"seed{s}",
                                    {"base": [True] * (60 + int(20 * a + 10 * b) + s) + [False] * 40,
                                     "new": [True] * 70 + [False] * (30 + s)}, predictions=False)
    few = tmp_path / "few"
    for stem in ("dtd", "eurosat"):
        for s in (1, 2):
            folder = few / "fewshot" / "kd" / stem / "shots4" / f"seed{s}"
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text("SEED: 1\n")
            (folder / "results.json").write_text(json.dumps({"all": {"accuracy": 50.0 + s, "macro_f1": 1, "n": 9}}))
    for argv, heading in (([str(sweep), "--sweep"], "abkd, EuroSAT: HM over (alpha, beta)"),
                          ([str(few), "--fewshot"], "kd, 4 shots"),
                          ([str(root), "--compare", "abkd", "kd", "--resamples", "200"], "abkd vs kd")):
        rc, md, _ = run_cli(capsys, "report", *argv)
        rc, text, _ = run_cli(capsys, "report", *argv, "--format", "html")
        assert rc == 0
        page = Page(text)
        assert heading in page.headings
        same_cells(md_tables(md), page)
        check_self_contained(text, page)
    transfer = tmp_path / "transfer"
    for seed, (src, dtd) in {1: (70.0, 50.0), 2: (72.0, 54.0)}.items():
        for folder, acc in (("", src), ("eval/dtd", dtd)):
            run = transfer / "kd_xd" / "imagenet" / f"seed{seed}" / folder
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.yaml").write_text("SEED: 1\n")
            (run / "results.json").write_text(json.dumps({"all": {"accuracy": acc, "n": 10}}))
    (transfer / "kd_xd" / "imagenet" / "seed3").mkdir()  # unfinished
    rc, md, _ = run_cli(capsys, "report", str(transfer), "--xd")
    rc, text, _ = run_cli(capsys, "report", str(transfer), "--xd", "--format", "html")
    assert rc == 0
    page = Page(text)
    same_cells(md_tables(md), page)
    assert page.tables[0][1][:3] == ["kd_xd", "71.00 ± 1.41", "—"]  # source, then the first target (Caltech101)
    assert any(i.startswith("kd_xd/imagenet/seed3: no results.json") for i in page.items)
    check_self_contained(text, page)


def test_sweep_page_embeds_its_heatmap_as_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    sweep = tmp_path / "sweep"
    for a in (0.0, 1.0):
        for b in (0.5, 1.0):
            write_predicted_run(sweep / "abkd" / "dtd" / f"a{a:g}_b{b:g}" / "seed1",
                                {"base": [True] * (50 + int(10 * a + 5 * b)) + [False] * 50, "new": [True, False]},
                                predictions=False)
    rc, text, _ = run_cli(capsys, "report", str(sweep), "--sweep", "--format", "html")
    assert rc == 0
    srcs = [v for tag, k, v in Page(text).attrs if tag == "img" and k == "src"]
    assert srcs
    for src in srcs:
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0.05
    rc, again, _ = run_cli(capsys, "report", str(sweep), "--sweep", "--format", "html")
    assert again == text  # no date: the same runs give the same page


def test_without_matplotlib_the_page_says_how_to_get_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    sweep = tmp_path / "sweep"
    write_predicted_run(sweep / "abkd" / "dtd" / "a0_b1" / "seed1", {"base": [True, False], "new": [True]},
                        predictions=False)
    rc, text, _ = run_cli(capsys, "report", str(sweep), "--sweep", "--format", "html")
    assert rc == 0 and "<table>" in text and "<img" not in text
    assert PLOT_HINT.replace("'", "&#x27;") in text


def test_output_file_for_every_format(root, tmp_path, capsys):
    rc, md, md_err = run_cli(capsys, "report", str(root))
    for fmt, suffix in (("md", "md"), ("html", "html"), ("csv", "csv"), ("json", "json"), ("latex", "tex")):
        out = tmp_path / "reports" / f"report.{suffix}"
        extra = ("--method", "abkd") if fmt == "json" else ()
        rc, stdout, err = run_cli(capsys, "report", str(root), "--format", fmt, "-o", str(out), *extra)
        assert rc == 0 and stdout == ""
        text = out.read_text(encoding="utf-8")
        if fmt in ("md", "html"):  # problems inside the file
            assert err == f"wrote {out}\n"
            assert "abkd/eurosat/seed3" in text
        else:  # problems on stderr, the file stays parseable
            assert err.startswith(f"wrote {out}\n") and "abkd/eurosat/seed3" in err
            assert "abkd/eurosat/seed3" not in text
        if fmt == "md":
            assert text == md
        if fmt == "json":
            json.loads(text)
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]  # no temp files left


def test_output_refuses_folders_and_run_folders_and_never_leaves_half_a_file(root, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    for target in (str(folder), str(tmp_path / "new") + os.sep):
        rc, _, err = run_cli(capsys, "report", str(root), "-o", target)
        assert rc == 2 and "is a folder" in err
    assert not (tmp_path / "new").exists()
    for target in (root / "kd" / "dtd" / "seed1" / "report.md", root / "kd" / "dtd" / "seed1" / "eval" / "r.md",
                   root / "abkd" / "eurosat" / "seed3" / "results.json"):
        rc, _, err = run_cli(capsys, "report", str(root), "-o", str(target))
        assert rc == 2 and "is a run folder" in err
        assert not target.exists()
    seed = root / "kd" / "dtd" / "seed2"
    rc, _, err = run_cli(capsys, "report", str(seed), "-o", str(seed / "report.html"), "--format", "html")
    assert rc == 2 and "is a run folder" in err
    # a report that fails leaves the old file as it was
    old = tmp_path / "report.html"
    old.write_text("old")
    rc, _, err = run_cli(capsys, "report", str(root), "--method", "nope", "--format", "html", "-o", str(old))
    assert rc == 2 and old.read_text() == "old"
    rc, _, err = run_cli(capsys, "report", str(root), "--format", "html", "-o", str(old))
    assert rc == 0 and old.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- a real browser (Debian's chromium package)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); "
                                    "the page is checked with html.parser above")


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", *args, page.as_uri()]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish in 90 s (a busy machine); the html.parser tests still ran")


@needs_chromium
def test_chromium_renders_the_tables(root, tmp_path, capsys):
    out = tmp_path / "report.html"
    rc, md, _ = run_cli(capsys, "report", str(root))
    assert run_cli(capsys, "report", str(root), "--format", "html", "-o", str(out))[0] == 0
    dom = chromium(out, tmp_path / "profile", "--dump-dom").stdout
    page = Page(dom)
    same_cells(md_tables(md), page)  # what the browser built holds the md report's values
    assert "abkd/eurosat/seed3: no results.json (unfinished or failed run)" in page.items


@needs_chromium
def test_chromium_screenshot_is_not_blank(tmp_path, root, capsys):
    mpl_image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "report.html"
    assert run_cli(capsys, "report", str(root), "--format", "html", "-o", str(out))[0] == 0
    shot = tmp_path / "shot.png"
    chromium(out, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1000,700")
    pixels = mpl_image.imread(shot)
    assert shot.read_bytes().startswith(PNG_MAGIC) and pixels.shape[:2] == (700, 1000)
    grey = pixels[..., :3].mean(axis=2)
    assert (grey < 0.5).mean() > 0.005  # text drawn (dark pixels), not a white page
    assert (grey > 0.9).mean() > 0.5  # on a light background


def test_figures_come_from_plot_report_figures(root, capsys, monkeypatch):
    """Every mode gets its figures from plot.report_figures(kind, data, ci); one it cannot draw is named."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from clipkd.errors import ClipkdError
    from clipkd.reports import plot

    seen = []

    def report_figures(kind, data, ci=False):
        seen.append((kind, type(data).__name__, ci))
        if kind == "compare":
            raise ClipkdError("no figure for this comparison")
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.plot([0, 1], [1, 0])
        return [(f"{kind} <fig>", fig)]

    def png_bytes(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    monkeypatch.setattr(plot, "report_figures", report_figures, raising=False)
    monkeypatch.setattr(plot, "png_bytes", png_bytes, raising=False)
    rc, text, _ = run_cli(capsys, "report", str(root), "--ci", "--format", "html")
    assert rc == 0 and seen == [("b2n", "list", True)]
    page = Page(text)
    assert [v for tag, k, v in page.attrs if tag == "img" and k == "alt"] == ["b2n <fig>"]
    check_self_contained(text, page)
    rc, text, _ = run_cli(capsys, "report", str(root), "--compare", "abkd", "kd", "--resamples", "100",
                          "--format", "html")
    assert rc == 0 and seen[-1] == ("compare", "Comparison", False)
    assert "No figures: no figure for this comparison" in text and "<img" not in text
