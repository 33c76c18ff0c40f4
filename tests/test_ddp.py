"""torchrun with 2 CPU processes (gloo) trains exactly what one process trains with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from clipkd.reports.predictions import read_predictions

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_two_processes_match_one(synth_root, tmp_path):
    def run(out, launcher):
        args = ["train", "--root", str(synth_root), "--dataset-config", str(ROOT / "configs/datasets/oxford_pets.yaml"),
                "--config", str(ROOT / "configs/methods/abkd_ivlp.yaml"), "--seed", "1", "--output-dir", str(out),
                "MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
                "MODEL.TEACHER.CHECKPOINT", "zero-shot",
                "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
                "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "INPUT.SIZE", "(32, 32)",
                "DATASET.NUM_SHOTS", "4", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
                "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.01", "TEST.TEACHER_PREDICTIONS", "True"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*launcher, "-m", "clipkd", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "one", [sys.executable])
    run(tmp_path / "two", [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517"])
    a = torch.load(tmp_path / "one/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two/model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k

    def losses(run_dir):
        return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "step"]

    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(la) == len(lb) and all(abs(x - y) < 1e-4 for x, y in zip(la, lb))
    ra = json.loads((tmp_path / "one/results.json").read_text())
    rb = json.loads((tmp_path / "two/results.json").read_text())
    for half in ("base", "new"):
        assert ra[half]["n"] == rb[half]["n"]  # evaluation gathered across ranks: every image once
        assert abs(ra[half]["accuracy"] - rb[half]["accuracy"]) < 1e-6
    # only rank 0 wrote: one log, one metrics file, no duplicated lines
    assert (tmp_path / "two/log.txt").read_text().count("* accuracy:") == 3  # base, new, the Dassl tail
    # each image's prediction and statistics, gathered from the ranks in the test-list order (issue 19)
    pa, pb = read_predictions(tmp_path / "one"), read_predictions(tmp_path / "two")
    for half in ("base", "new"):
        assert set(pa[half]) == set(pb[half]) and "teacher_pred" in pa[half]
        for name in ("label", "pred", "teacher_pred"):
            assert np.array_equal(pa[half][name], pb[half][name]), (half, name)
        for name in ("prob", "confidence", "entropy", "top5_out"):
            np.testing.assert_allclose(pa[half][name], pb[half][name], atol=1e-4)
