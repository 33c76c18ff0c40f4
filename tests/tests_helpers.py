"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations


def first_appearance_sorted(items) -> bool:
    """True when labels first appear in increasing order (the case a generator must avoid)."""
    seen: list[int] = []
    for d in items:
        if d.label not in seen:
            seen.append(d.label)
    return seen == sorted(seen)


def run_config(**keys: object) -> str:
    """A run folder's config.yaml as ``clipkd train`` writes it (every key; KEY__SUB=value sets KEY.SUB)."""
    from clipkd.config import get_cfg_defaults

    cfg = get_cfg_defaults()
    for key, value in keys.items():
        node = cfg
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg.dump()
