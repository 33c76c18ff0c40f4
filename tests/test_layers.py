"""The package's layers: every import (module-level, function-level, TYPE_CHECKING) goes down or sideways, never
up, and no modules or packages import each other in a circle. Read from the source with ``ast`` (nothing is
imported), so a function-level import that dodges a circle at run time is still seen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "clipkd"

# low -> high; a unit is a top-level module or subpackage of clipkd
LAYERS = [
    {"errors", "fileio", "locks", "registry", "metrics"},
    {"config"},
    {"rundir"},  # reads a run's config.yaml back (RunDir.check_config)
    {"data"},
    {"models"},
    {"losses"},
    {"methods"},
    {"engine"},
    {"runs"},
    {"launch"},  # the cells of grids and sweeps as jobs (reads recipes, run folders, sweep grids), run by engines
    {"reports", "cli", "toy", "__main__"},
]
LAYER = {unit: n for n, units in enumerate(LAYERS) for unit in units}
# what reports may read: torch-free modules only (reports stay fast and run without torch)
REPORTS_MAY_IMPORT = ("clipkd.errors", "clipkd.fileio", "clipkd.rundir", "clipkd.metrics", "clipkd.config",
                      "clipkd.data.specs", "clipkd.reports")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(name: str) -> str:
    """The longest known module a dotted import name starts with (``clipkd.engine.x.attr`` -> ``clipkd.engine.x``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return name


def imports_of(module: str) -> set[str]:
    """The clipkd modules ``module`` imports anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: set[str] = set()
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "clipkd" or name.startswith("clipkd."):
                target = resolve(name)
                if target != module and target != "clipkd":
                    out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_layer():
    units = {unit(m) for m in MODULES} - {""}
    assert units <= set(LAYER), f"place these in LAYERS: {sorted(units - set(LAYER))}"


def test_no_import_goes_up_a_layer():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in sorted(targets)
              if unit(m) and unit(t) and LAYER[unit(t)] > LAYER[unit(m)]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_circle_between_modules():
    assert not cycles(GRAPH), f"modules importing each other in a circle: {cycles(GRAPH)}"


def test_no_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        packages.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m))
    assert not cycles(packages), f"packages importing each other in a circle: {cycles(packages)}"


def test_reports_stay_torch_free():
    bad = []
    for m, targets in GRAPH.items():
        if unit(m) != "reports":
            continue
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{m} -> {n}" for n in names if n.split(".")[0] in ("torch", "torchvision", "open_clip")]
        bad += [f"{m} -> {t}" for t in sorted(targets) if not t.startswith(REPORTS_MAY_IMPORT)]
    assert not bad, "reports import beyond the torch-free modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("graph, expected", [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
                                             ({"a": {"b"}, "b": set()}, [])])
def test_cycles_finds_circles(graph, expected):
    assert cycles(graph) == expected


def test_run_stays_a_page():
    """Run (cfg -> data, teacher, student; fit, evaluate, load) stays within ~250 lines: what belongs to the
    engine (DDP, epoch selection), the models (the teacher's description) or the fused sweep lives there."""
    lines = (PKG / "runs" / "run.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, lines
