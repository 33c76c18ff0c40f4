"""CUDA smoke tests: run only where a GPU is present (skipped on CPU-only machines such as CI's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import DATASET_CFG, ROOT, TINY, check_results, config, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda(synth_root, tmp_path, precision):
    check_results(fit(config(synth_root, "abkd_promptkd", "OPTIM.PRECISION", precision), tmp_path / precision))
    assert "device cuda:0" in (tmp_path / precision / "log.txt").read_text()


def test_torchrun_nccl_on_cuda(synth_root, tmp_path):
    """torchrun on CUDA: set_device per process and collectives over the cpu:gloo,cuda:nccl group."""
    nproc = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", "29541",
           "-m", "clipkd", "train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
           str(ROOT / "configs/methods/abkd_promptkd.yaml"), "--seed", "1", "--output-dir", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_results(json.loads((out / "results.json").read_text()))
