"""rrg_jax.curves: the training-curves PNG drawn from metrics.jsonl rows."""

import json

import numpy as np
import PIL.Image

from rrg_jax import curves


def _write_rows(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_curves_draws_losses_and_scores(tmp_path):
  rows = [{"kind": "train", "step": s, "loss": 5.0 / s, "ce": 4.0 / s, "bce": 0.7, "mse": 0.1} for s in (1, 2, 3, 4)]
  rows += [{"kind": "epoch", "step": 2 * e, "epoch": e, "val_BLEU_1": 0.1 * e, "val_BLEU_4": 0.01 * e,
            "test_BLEU_1": 0.12 * e, "test_BLEU_4": 0.02 * e, "score": 0.06 * e} for e in (1, 2)]
  _write_rows(tmp_path / "metrics.jsonl", rows)
  out = curves.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
  img = np.asarray(PIL.Image.open(out).convert("RGB"))
  assert img.shape == (400, 1100, 3)
  # Coloured (non-grey) pixels are the plotted lines: both panels have some.
  coloured = np.ptp(img.astype(int), axis=-1) > 60
  assert coloured[:, :550].sum() > 200 and coloured[:, 550:].sum() > 200


def test_plot_curves_without_epochs_yet(tmp_path):
  _write_rows(tmp_path / "metrics.jsonl", [{"kind": "train", "step": 10, "loss": 3.0, "ce": 2.5}])
  out = curves.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")
  assert out.read_bytes()[:4] == b"\x89PNG"
  assert curves.read_metrics(tmp_path / "metrics.jsonl") == [{"kind": "train", "step": 10, "loss": 3.0, "ce": 2.5}]
