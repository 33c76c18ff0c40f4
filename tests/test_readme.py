"""The README's test command is the one CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith(("#", "set ", "cd "))]
    # the test command is the last line; before it only the best-effort chromium install for the browser tests
    assert lines[-1].startswith("python3 -m venv") and lines[-1] in (ROOT / "README.md").read_text()
    assert all(not line.startswith("python3") for line in lines[:-1])
    assert "chromium" in "".join(lines[:-1]) or not lines[:-1]
