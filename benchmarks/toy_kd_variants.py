"""The KD variants ABKD plugs into, each with KL and with the alpha-beta divergence, on the toy benchmark.

The demo's PromptKD student and zero-shot toy teacher (``clipkd/toy/demo.yaml``), inductive protocol (16-shot
base classes), one run per (method, divergence, seed) through ``Run`` as ``clipkd train`` would. AB at the
paper's starting point (alpha 0.8, beta 0.3); each method's own parameters at their defaults
(``clipkd/config/defaults.py``: DISTILL.DKD_*, TTM_EXPONENT, DIST_*). The runs are kept under ``--output-dir``.

    python benchmarks/toy_kd_variants.py --seeds 1 2 3 --output-dir toy-kd-variants   # ~4 min on 2 CPU cores

Prints a Markdown table: Base / New / HM, mean +- population std over seeds (HM of the mean Base and mean New).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clipkd.runs.run import Run
from clipkd.toy.demo import demo_config
from toy_common import seed_table, toy_assets  # benchmarks/toy_common.py (scripts run from benchmarks/)

# method -> the DISTILL.LOSS name; each runs once with DISTILL.DIVERGENCE kl and once with ab
METHODS = {"KD": "kl", "DKD": "dkd", "LSD": "lsd", "TTM": "ttm", "DIST": "dist"}


def overrides(loss: str, divergence: str) -> list[str]:
    if loss == "kl":  # plain KD: the divergence is the loss itself
        return ["DISTILL.LOSS", divergence]
    if loss == "dist":  # correlations, no divergence inside: one run only
        return ["DISTILL.LOSS", "dist"]
    return ["DISTILL.LOSS", loss, "DISTILL.DIVERGENCE", divergence]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides for every run, e.g. "
                        "DISTILL.TTM_EXPONENT 0.5 with --methods TTM")
    args = parser.parse_args(argv)
    started = time.time()
    data_root, weights = toy_assets(args.cache_dir)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            loss = METHODS[method]
            for divergence in (("kl",) if loss == "dist" else ("kl", "ab")):
                cfg = demo_config(data_root, weights, seed, *overrides(loss, divergence), *args.opts)
                out = args.output_dir / f"{method.lower()}-{divergence}" / f"seed{seed}"
                try:
                    res = Run(cfg, out, echo=False).fit()
                    rows.append({"method": method, "divergence": "—" if loss == "dist" else divergence, "seed": seed,
                                 "base": res["base"]["accuracy"], "new": res["new"]["accuracy"]})
                except Exception as exc:  # noqa: BLE001 - report a method that does not train, keep going
                    print(f"{method}-{divergence} seed {seed} failed: {exc}", file=sys.stderr)
            print(f"[{time.time() - started:.0f}s] seed {seed}: {method}", file=sys.stderr, flush=True)
    (args.output_dir / "toy_kd_variants.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"## Toy benchmark: KD variants with KL and AB (inductive, {len(args.seeds)} seeds, "
          f"{time.time() - started:.0f} s{', ' + ' '.join(args.opts) if args.opts else ''})\n")
    print(seed_table(rows, ("method", "divergence")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
