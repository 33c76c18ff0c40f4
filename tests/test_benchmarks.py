"""The benchmark scripts run (quick mode: tiny models, a few steps); their numbers are measured elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_train_step_quick():
    proc = run("train_step.py", "--quick", "--no-ab", "--classes", "5", "--steps", "1", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 5 |" in proc.stdout


def test_gpu_check_quick_on_cpu():
    proc = run("gpu_check.py", "--quick", "--steps", "2", "--classes", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| fp32 | yes |" in proc.stdout and "| bf16 | yes |" in proc.stdout
    assert "torchrun, 1 process(es), gloo: ok" in proc.stdout


def test_sweep_quick():
    proc = run("sweep.py", "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 3 |" in proc.stdout and "| reading the cache |" in proc.stdout
    assert "Results identical with and without the cache: yes; the reading run computed no teacher" in proc.stdout
    assert proc.stdout.count("| yes |") == 2  # fused results identical to separate ones, K = 2 and 3


def test_toy_students_takes_the_method_from_each_recipe_and_the_world_from_the_demo(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import toy_students
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    pairs = dict(zip(*[iter(toy_students.recipe_overrides(ROOT / "configs/methods/abkd_ivlp.yaml"))] * 2))
    assert pairs["MODEL.STUDENT.TYPE"] == "'ivlp'" and pairs["DISTILL.LOSS"] == "'ab'"
    assert pairs["DISTILL.ALPHA"] == "0.8" and pairs["DISTILL.WEIGHT"] == "1.0"  # the toy world's weight, not 100
    assert pairs["MODEL.PROMPT.DEPTH_TEXT"] == "2"  # capped at the toy towers' layers
    assert not any(k.startswith(("OPTIM.", "DATASET.", "MODEL.STUDENT.NAME", "MODEL.TEACHER.")) for k in pairs)
    assert "DISTILL.PROTOCOL" not in pairs
    kd = dict(zip(*[iter(toy_students.recipe_overrides(ROOT / "configs/methods/kd_promptkd.yaml"))] * 2))
    assert kd["DISTILL.LOSS"] == "'kl'" and kd["DISTILL.WEIGHT"] == "1.0"  # PromptKD's KL x 1000 -> KL x 1
    proc = run("toy_students.py", "--students", "promptkd", "--seeds", "1", "--output-dir", str(tmp_path / "t"),
               "OPTIM.MAX_EPOCH", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| promptkd | KD | 1 |" in proc.stdout and "| promptkd | ABKD | 1 |" in proc.stdout
    assert "promptkd (a distillation recipe: see its KD row)" in proc.stdout
