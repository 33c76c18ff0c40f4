"""What the toy benchmark scripts share: the assets and the seed-averaged Base/New/HM table."""

from __future__ import annotations

import statistics
from pathlib import Path

from clipkd.data.cache import default_cache_dir
from clipkd.metrics import harmonic_mean
from clipkd.toy.demo import prepare_assets


def toy_assets(cache_dir: Path | None) -> tuple[Path, dict[str, Path]]:
    """The toy dataset and the shipped tiny CLIPs' weight files (generated into the cache when missing)."""
    return prepare_assets(cache_dir or default_cache_dir() / "toy", progress=False)


def seed_table(rows: list[dict], keys: tuple[str, str]) -> str:
    """Markdown, one line per (keys) group: Base / New mean +- population std over seeds, HM of the means."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)

    def cell(values: list[float]) -> str:
        return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}"

    out = [f"| {keys[0]} | {keys[1]} | seeds | Base | New | HM |", "|---|---|---|---|---|---|"]
    for (a, b), rs in groups.items():
        base, new = [r["base"] for r in rs], [r["new"] for r in rs]
        out.append(f"| {a} | {b} | {len(rs)} | {cell(base)} | {cell(new)} | "
                   f"{harmonic_mean(statistics.fmean(base), statistics.fmean(new)):.2f} |")
    return "\n".join(out)
