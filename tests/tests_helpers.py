"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations


def first_appearance_sorted(items) -> bool:
    """True when labels first appear in increasing order (the case a generator must avoid)."""
    seen: list[int] = []
    for d in items:
        if d.label not in seen:
            seen.append(d.label)
    return seen == sorted(seen)
