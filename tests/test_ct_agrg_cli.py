"""CT-AGRG end to end through the CLIs: ``rrg_jax.train --config=configs/ct_agrg.py:tiny`` runs pre-training →
stage 1 → stage 2 on a tiny SYNTHETIC set (``eval.protocol = "stages"``), then ``rrg_jax.generate --volume``.

Checked: one sub-workdir per stage with its best model and scores; stage 1 hands its validation best-F1 thresholds
to stage 2 (``thresholds.json`` = stage 2's ``model.thresholds``); stage 2 starts from stage 1's model and leaves the
frozen visual encoder's parameters unchanged while its BatchNorm statistics move (``encoder_mode_stage2 =
train``); reports with the thresholds' predictions; ``generate`` prints 18 probabilities and a report and writes
the slice montage; ``train.eval_every_epochs`` skips the scoring of the epochs between; a volume given to an X-ray model's generate and vice versa is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from configs import ct_agrg
from input_pipeline import ct_rate
from rrg_jax import checkpointing, train


@pytest.mark.slow
def test_staged_run_and_generate_on_the_tiny_synthetic_set(tmp_path):
  env = {**os.environ, "RRG_JAX_DATA": str(tmp_path / "data")}
  workdir = tmp_path / "run"
  # Pre-training runs 2 epochs scored every 2nd (train.eval_every_epochs): its first epoch is not scored.
  r = subprocess.run([sys.executable, "-m", "rrg_jax.train", "--config=configs/ct_agrg.py:tiny",
                      f"--workdir={workdir}", "--config.stages.pretrain.train.epochs=2",
                      "--config.stages.pretrain.train.eval_every_epochs=2"], cwd=REPO, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  pretrain = [json.loads(x) for x in (workdir / "pretrain" / train.METRICS_FILE).read_text().splitlines()]
  scored = [(row["epoch"], "val_macro_auc" in row, "best_epoch" in row) for row in pretrain if row["kind"] == "epoch"]
  assert scored == [(1, False, False), (2, True, True)]
  for stage in ct_agrg.STAGES:
    rows = [json.loads(x) for x in (workdir / stage / train.METRICS_FILE).read_text().splitlines()]
    epoch = [row for row in rows if row["kind"] == "epoch"][-1]
    assert "val_macro_auc" in epoch and "val_f1_Lung_nodule" in epoch, stage
    assert (workdir / stage / checkpointing.BEST_DIR).is_dir()
  assert {"val_CE_macro_f1", "val_BLEU_4", "test_CE_macro_f1", "test_f1_Lung_nodule"} <= set(epoch)  # stage 2

  thresholds = json.loads((workdir / "stage1" / "thresholds.json").read_text())["thresholds"]
  assert list(thresholds) == list(ct_rate.ABNORMALITIES)
  stage2_config, stage2, _ = checkpointing.load_inference(workdir / "stage2")
  np.testing.assert_allclose(stage2_config.model.thresholds, list(thresholds.values()), rtol=1e-6)
  _, stage1, _ = checkpointing.load_inference(workdir / "stage1")
  jax.tree.map(np.testing.assert_array_equal, stage2["params"]["visual_encoder"], stage1["params"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), stage2["batch_stats"]["visual_encoder"],
                                       stage1["batch_stats"]))
  assert moved and all(moved)  # every BN statistic moved: the frozen encoder ran in train mode (§6.2)
  reports = [json.loads(x) for x in (workdir / "stage2" / train.REPORTS_DIR / "test_epoch001.jsonl")
             .read_text().splitlines()]
  assert len(reports) == 8 and all(isinstance(x["generated"], str) and x["generated"] for x in reports)
  assert all(set(x["probabilities"]) == set(ct_rate.ABNORMALITIES) for x in reports)
  assert all(x["predicted_findings"] == [n for n, p in x["probabilities"].items() if p > thresholds[n]]
             for x in reports)

  volume = sorted((tmp_path / "data").glob("synthetic_ct/valid/*/*/*.npz"))[0]
  g = subprocess.run([sys.executable, "-m", "rrg_jax.generate", "--checkpoint", str(workdir / "stage2"),
                      "--volume", str(volume), "--out", str(tmp_path / "out"), "--json"], cwd=REPO, env=env,
                     capture_output=True, text=True)
  assert g.returncode == 0, g.stderr[-3000:]
  result = json.loads(g.stdout.strip().splitlines()[-1])
  assert list(result["findings"]) == list(ct_rate.ABNORMALITIES) and isinstance(result["report"], str)
  assert (result["report"] == "No abnormalities detected.") == (not result["predicted_findings"])
  assert (tmp_path / "out" / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  wrong = subprocess.run([sys.executable, "-m", "rrg_jax.generate", "--checkpoint", str(workdir / "stage2"),
                          "--image", str(volume)], cwd=REPO, env=env, capture_output=True, text=True)
  assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "takes --volume" in wrong.stderr and "Traceback" not in wrong.stderr
