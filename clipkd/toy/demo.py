"""``clipkd demo``: the whole pipeline on the embedded toy benchmark, offline, in minutes.

For each seed: the zero-shot teacher and zero-shot student (each CLIP with its own text tower), then the
PromptKD student distilled with KD (forward KL) and with ABKD (alpha-beta divergence), in the inductive
protocol (K-shot base classes) and, unless ``--no-transductive``, the transductive one. KD and ABKD of one
protocol train fused (:mod:`clipkd.runs.fused`: one loader and teacher forward for both, results as alone).
Prints a Base / New / HM table (the last thing printed) and writes it as Markdown and JSON; each distillation
run is a run folder ``OUTPUT/runs/<method>-<protocol>/toy/seed<S>`` that ``clipkd report`` reads. While it runs, a
line per stage and its elapsed time go to stderr (flushed, so a log file shows where a run is without a terminal).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from clipkd.config import build_config
from clipkd.data.cache import default_cache_dir
from clipkd.data.specs import TOY_SPEC
from clipkd.metrics import harmonic_mean
from clipkd.reports.aggregate import SAMPLE, Stat
from clipkd.reports.predictions import read_predictions
from clipkd.reports.render import mean_pm, na
from clipkd.errors import ClipkdError
from clipkd.fileio import atomic_write_text
from clipkd.runs.fused import fit_fused
from clipkd.rundir import TEACHER_PRED
from clipkd.runs.run import Run
from clipkd.toy.dataset import WORLD_VERSION, write_toy_dataset
from clipkd.toy.pretrain import RECIPES, expand_compact, pretrain, weights_path

TOY_STEM = TOY_SPEC.stem  # the dataset folder of the demo's runs (DATASET.NAME Toy)
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
METHODS = {"kd": ["DISTILL.LOSS", "kl"], "abkd": ["DISTILL.LOSS", "ab"]}


def prepare_assets(cache_dir: Path, progress: bool = True) -> tuple[Path, dict[str, Path]]:
    """The toy dataset and the tiny CLIPs' weight files, generated into ``cache_dir`` when missing."""
    import hashlib

    data_root = cache_dir / f"data-v{WORLD_VERSION}"
    write_toy_dataset(data_root)
    weights = {}
    for role, recipe in RECIPES.items():
        compact = weights_path(role)
        if not compact.is_file():  # not shipped (e.g. deleted): pretrain it here, once
            compact = cache_dir / "weights" / f"{recipe.model}-v{WORLD_VERSION}.compact.pt"
            if not compact.is_file():
                pretrain(role, out=compact, progress=progress)
        digest = hashlib.sha256(compact.read_bytes()).hexdigest()[:12]
        full = cache_dir / "weights" / f"{recipe.model}-{digest}.pt"  # keyed by content: never stale
        if not full.is_file():
            expand_compact(compact, full)
        weights[role] = full
    return data_root, weights


def demo_config(data_root: Path, weights: dict[str, Path], seed: int, *overrides: str):
    return build_config([DEMO_CONFIG], [
        "DATASET.ROOT", str(data_root), "SEED", str(seed),
        "MODEL.TEACHER.PRETRAINED", str(weights["teacher"]), "MODEL.STUDENT.PRETRAINED", str(weights["student"]),
        *overrides,
    ])


def run_folder(output_dir: Path, method: str, protocol: str, seed: int) -> Path:
    """``OUTPUT/runs/<method>-<protocol>/toy/seed<S>``: the base-to-new layout ``clipkd report`` reads, so
    ``clipkd report OUTPUT/runs --compare abkd-inductive kd-inductive`` works on a demo folder as it is."""
    return Path(output_dir) / "runs" / f"{method}-{protocol}" / TOY_STEM / f"seed{seed}"


def run_demo(
    output_dir: Path, cache_dir: Path | None = None, seeds: Sequence[int] = (1,), transductive: bool = True,
    progress: bool = True, overrides: Sequence[str] = (),
) -> dict:
    """Run the demo and write ``demo_results.json`` and ``demo_results.md`` into ``output_dir``.

    ``overrides`` (KEY VALUE pairs) change the distillation runs' config, e.g. a shorter schedule in tests.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ClipkdError(f"output dir {output_dir} is not empty; pass a new --output-dir")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "toy"
    started = time.time()
    protocols = ["inductive", "transductive"] if transductive else ["inductive"]
    stages = _Stages(len(seeds) * (1 + len(protocols)), started)
    stages.begin(f"demo: toy dataset and CLIP weights in {cache_dir}", numbered=False)
    data_root, weights = prepare_assets(cache_dir, progress)
    stages.end()
    rows = []
    for seed in seeds:
        stages.begin(f"zero-shot teacher and student, seed {seed}")
        cfg = demo_config(data_root, weights, seed)
        zero_shot = Run(cfg)
        teacher_pred = zero_shot.predict("base", which="teacher")
        for method, which in (("teacher_zeroshot", "teacher"), ("student_zeroshot", "student")):
            agree = _agreement(zero_shot.predict("base", which=which), teacher_pred)
            rows.append(_row(method, "zero-shot", seed, zero_shot.evaluate(which=which), agree))
        stages.end()
        for protocol in protocols:
            stages.begin(f"{' + '.join(METHODS)} {protocol} (trained together), seed {seed}")
            # KD and ABKD read the same stream: trained together, one teacher forward per batch (exactly as alone)
            runs = {method: Run(demo_config(data_root, weights, seed, "DISTILL.PROTOCOL", protocol, *extra,
                                            *overrides),
                                run_folder(output_dir, method, protocol, seed), echo=False)
                    for method, extra in METHODS.items()}
            outcomes = fit_fused(list(runs.values()), [False] * len(runs))
            for (method, run), res in zip(runs.items(), outcomes):
                if isinstance(res, Exception):
                    raise res
                rows.append(_row(method, protocol, seed, res, _recorded_agreement(run_folder(output_dir, method,
                                                                                            protocol, seed))))
            stages.end()
    stages.say(f"demo: {stages.total} stages done in {time.time() - started:.1f} s")
    payload = {"rows": rows, "seconds": round(time.time() - started, 1),
               "alpha": cfg.DISTILL.ALPHA, "beta": cfg.DISTILL.BETA}
    atomic_write_text(output_dir / "demo_results.json", json.dumps(payload, indent=2) + "\n")
    table = format_table(rows)
    atomic_write_text(output_dir / "demo_results.md", table + "\n")
    return payload


class _Stages:
    """``[2/3] kd + abkd inductive (trained together), seed 1`` before a stage and its elapsed time after, on
    stderr (looked up when written, so a redirected stderr gets them), flushed: tqdm's bars show only on a
    terminal."""

    def __init__(self, total: int, started: float) -> None:
        self.total, self.started, self.done, self.since, self.numbered = total, started, 0, started, True

    def say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def begin(self, what: str, numbered: bool = True) -> None:
        self.since, self.numbered = time.time(), numbered
        self.say(f"[{self.done + 1}/{self.total}] {what}" if numbered else what)

    def end(self) -> None:
        now = time.time()
        self.done += self.numbered
        self.say(f"      done in {now - self.since:.1f} s ({now - self.started:.1f} s so far)")


def _agreement(pred: torch.Tensor, reference: torch.Tensor) -> float:
    return 100.0 * float((pred == reference).float().mean())


def _recorded_agreement(folder: Path) -> float:
    """A distillation run's agreement with its teacher on base test images, from the student's and the teacher's
    predictions its predictions.npz holds (demo.yaml: TEST.TEACHER_PREDICTIONS), not from a second pass."""
    base = read_predictions(folder)["base"]
    return _agreement(torch.from_numpy(base["pred"]), torch.from_numpy(base[TEACHER_PRED]))


def _row(method: str, protocol: str, seed: int, res: dict, agreement: float) -> dict:
    return {"method": method, "protocol": protocol, "seed": seed, "base": res["base"]["accuracy"],
            "new": res["new"]["accuracy"], "hm": res["hm"], "agreement": agreement}


def format_table(rows: list[dict]) -> str:
    """Markdown: a line saying what the cells are, then one line per (method, protocol): mean ± sample std over
    seeds (ddof 1, as ``clipkd report``; one seed: n/a (1 seed)); HM of the mean Base and mean New."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["protocol"]), []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Mean ± sample std (ddof 1) over seeds {', '.join(map(str, seeds))} (one seed: {na(1)}); HM of the "
             "mean Base and mean New.", "",
             "| method | protocol | seeds | Base | New | HM | agreement with teacher (base) |",
             "|---|---|---|---|---|---|---|"]

    for (method, protocol), rs in groups.items():
        base, new = Stat.of([r["base"] for r in rs], SAMPLE), Stat.of([r["new"] for r in rs], SAMPLE)
        hm = harmonic_mean(base.mean, new.mean)
        lines.append(f"| {method} | {protocol} | {len(rs)} | {mean_pm(base)} | {mean_pm(new)} | {hm:.2f} | "
                     f"{mean_pm(Stat.of([r['agreement'] for r in rs], SAMPLE))} |")
    return "\n".join(lines)
