"""``clipkd report --format html``: one self-contained page that a researcher can mail to a colleague.

The tables are the Markdown report's own (the md renderers' text, read back here), so the page and the md
report can never disagree on a number; the problems and warnings are the md report's lines; figures are
embedded as ``data:`` PNGs. No scripts, no links, no fonts or images from elsewhere: a Content-Security-Policy
meta says so to the browser, and every piece of text (run folder and method names included) is escaped.
No date on the page: the same runs give the same file.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from html import escape

PLOT_HINT = "Figures need matplotlib: pip install 'clipkd[plot]'"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1280px; margin: 1.5em auto; padding: 0 1.2em; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.2em; margin: 1.6em 0 .4em; padding-bottom: .2em; border-bottom: 1px solid #d0d7de; }
.meta { color: #57606a; margin: 0 0 1em; }
.meta code { background: #f6f8fa; padding: 0 .3em; border-radius: 3px; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: .4em 0 .8em; font-variant-numeric: tabular-nums; }
th, td { padding: .3em .75em; border-bottom: 1px solid #d8dee4; text-align: left; vertical-align: top; }
th { background: #f6f8fa; border-bottom: 2px solid #afb8c1; white-space: nowrap; }
td.r, th.r { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tr.avg td { border-top: 2px solid #afb8c1; background: #f6f8fa; }
.sub { color: #57606a; font-size: .85em; white-space: normal; }
td.r .sub { display: inline-block; max-width: 11.5em; }
section.problems p { font-weight: 600; margin-top: .6em; }
p { margin: .3em 0; max-width: 75em; }
section.tables p { color: #57606a; font-size: .93em; }
section.problems { border-left: 4px solid #d4a72c; background: #fff8e5; padding: .3em 1em .6em; margin-top: 1.5em; }
section.problems h2 { border: none; }
ul { margin: .2em 0 .6em; padding-left: 1.4em; }
li { margin: .1em 0; word-break: break-word; }
figure { display: inline-block; margin: .5em 1.5em 1em 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #d8dee4; }
figcaption { color: #57606a; font-size: .9em; }
footer { margin-top: 2.5em; color: #8c959f; font-size: .85em; }
"""

_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """Escaped text with the Markdown the renderers use inline (``**bold**``) as HTML."""
    return _BOLD.sub(r"<strong>\1</strong>", escape(text, quote=True))


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row as render.md_row wrote them (``\\|`` is a | inside a cell)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    if inner.endswith("|") and not inner.endswith("\\|"):
        inner = inner[:-1]
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(inner)]


_LABEL = re.compile(r"^(.*?\S): (.+)$")  # "**Average** (3 datasets): HM of ..."
_NUMBER_NOTE = re.compile(r"^(\S+) (\(.+\))$")  # "72.43 (mean of per-dataset HMs: 72.43)"


def _average_cell(text: str, i: int) -> str:
    """An Average-row cell with its explanation (the words after the label's colon, a number's parenthesis)
    below it in small type, so that the long words do not widen the table's columns."""
    m = (_LABEL if i == 0 else _NUMBER_NOTE).match(text)
    if m is None:
        return _inline(text)
    head = m.group(1) + (":" if i == 0 else "")
    return f'{_inline(head)}<br><span class="sub">{_inline(m.group(2))}</span>'


def _table(lines: list[str]) -> list[str]:
    header, rows = _cells(lines[0]), lines[1:]
    right = [False] * len(header)
    if rows and _SEPARATOR.match(rows[0].strip()):
        right = [c.strip().endswith(":") for c in _cells(rows[0])]
        rows = rows[1:]

    def cls(i: int) -> str:
        return ' class="r"' if i < len(right) and right[i] else ""

    out = ['<div class="wrap"><table>', "<thead><tr>"
           + "".join(f"<th{cls(i)}>{_inline(c)}</th>" for i, c in enumerate(header)) + "</tr></thead>", "<tbody>"]
    for line in rows:
        cells = _cells(line)
        if cells and cells[0].startswith("**"):  # the Average row: its explanations go small, on a line of their own
            out.append('<tr class="avg">' + "".join(f"<td{cls(i)}>{_average_cell(c, i)}</td>"
                                                   for i, c in enumerate(cells)) + "</tr>")
        else:
            out.append("<tr>" + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def markdown_html(text: str) -> str:
    """The Markdown the report's md renderers write (``#`` headings, pipe tables, ``- `` lists, paragraphs,
    ``**bold**``) as HTML; each plain line is its own paragraph, as the notes are one sentence group each."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            h = min(max(level - 1, 2), 6)  # h1 is the page's title
            out.append(f"<h{h}>{_inline(line[level:].strip())}</h{h}>")
            i += 1
            continue
        j = i
        if line.startswith("|"):
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out += _table(lines[i:j])
        elif line.startswith("- "):
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            out += ["<ul>", *(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]), "</ul>"]
        else:
            j += 1
            out.append(f"<p>{_inline(line)}</p>")
        i = j
    return "\n".join(out)


def page(root: str, mode: str, markdown: str, problems: Sequence[str] = (),
         figures: Sequence[tuple[str, bytes]] = (), figures_note: str | None = None,
         options: Sequence[str] = ()) -> str:
    """The whole page: title (ROOT and mode), the tables and their notes, problems and warnings, figures."""
    title = f"clipkd report: {mode}"
    meta = f"ROOT <code>{escape(root)}</code>"
    if options:
        meta += " · " + " ".join(f"<code>{escape(o)}</code>" for o in options)
    body = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)} ({escape(root)})</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
            f"<h1>{escape(title)}</h1>", f'<p class="meta">{meta}</p>',
            '<section class="tables">', markdown_html(markdown), "</section>"]
    if problems:
        body += ['<section class="problems">', "<h2>Problems and warnings</h2>", markdown_html("\n".join(problems)),
                 "</section>"]
    if figures or figures_note:
        body += ["<section>", "<h2>Figures</h2>"]
        if figures_note:
            body.append(f"<p>{escape(figures_note)}</p>")
        for caption, png in figures:
            data = base64.b64encode(png).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
                        f"<figcaption>{escape(caption)}</figcaption></figure>")
        body.append("</section>")
    body += ["<footer>Written by clipkd report --format html: one self-contained file (no scripts, nothing "
             "fetched from elsewhere).</footer>", "</body>", "</html>"]
    return "\n".join(body) + "\n"


def embedded_figures(kind: str, data: object, ci: bool = False) -> tuple[list[tuple[str, bytes]], str | None]:
    """The report's figures as (name, PNG bytes), and a note when they cannot be drawn (no matplotlib, or a
    figure the data does not allow): the tables still make a page, and the page says why it has no figures."""
    from clipkd.errors import ClipkdError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], PLOT_HINT
    from clipkd.reports.plot import png_bytes, report_figures

    try:
        drawn = report_figures(kind, data, ci=ci)
    except ClipkdError as exc:
        return [], f"No figures: {exc}"
    return [(name, png_bytes(fig)) for name, fig in drawn], None
