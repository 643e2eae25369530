"""rrg_jax.train / train_state: sharded step equivalence, CLI, resume after SIGKILL, non-finite stop, outputs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO
from rrg_jax import train


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "rrg_jax.train", *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, **kw)


# --- model selection / early stopping (spec §8) -------------------------------------------------------------

def test_selection_score_is_the_hard_coded_formula():
  assert train.selection_score({"BLEU_4": 0.1, "BLEU_1": 0.4, "METEOR": 9.0}) == pytest.approx(0.3)


def test_early_stopping_after_early_stop_plus_one_non_improvements():
  sel = train.Selection()
  history = []
  # 0.3 improves; 0.3 again is NOT strictly greater; then 3 more non-improvements with early_stop = 3.
  for score in (0.3, 0.3, 0.2, 0.29, 0.1, 0.5):
    sel, improved, stop = sel.update(score, early_stop=3)
    history.append((improved, sel.bad_epochs, stop))
    if stop:
      break
  assert history == [(True, 0, False), (False, 1, False), (False, 2, False), (False, 3, False), (False, 4, True)]
  assert sel.best_score == 0.3
  sel, improved, stop = train.Selection(0.3, 3).update(0.31, early_stop=3)
  assert improved and not stop and sel == train.Selection(0.31, 0)


# --- CLI ----------------------------------------------------------------------------------------------------

def test_cli_rejects_unknown_config_key(tmp_path):
  r = _cli("--config=configs/camanet.py", "--config.optim.lr_edd=1e-3", f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "lr_edd" in r.stderr and 'Did you mean "lr_ed"' in r.stderr and "Traceback" not in r.stderr
  assert not any(tmp_path.iterdir())  # nothing was started
