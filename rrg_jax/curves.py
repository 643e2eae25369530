"""Training curves as a PNG (matplotlib, Agg), drawn from a run's ``metrics.jsonl``.

Left: the logged train loss and its parts (every number of the train rows but the learning rates, throughput and
bookkeeping: CAMANet ``loss, ce, bce, mse``, RadGen ``loss, cls, report``, ...) against the optimiser step.
Right: the per-epoch evaluation scores (``<split>_BLEU_4``, ``<split>_BLEU_1`` for every evaluated split and the
selection ``score`` of ``config.train.selection``) against the epoch.
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
from matplotlib import ticker  # noqa: E402  pylint: disable=g-import-not-at-top

NOT_LOSSES = ("kind", "step", "epoch", "examples_per_s")  # and every lr_<group>
SCORE_KEYS = ("BLEU_4", "BLEU_1")


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The rows of a ``metrics.jsonl`` file (see ``rrg_jax.train.MetricsLogger``)."""
  lines = pathlib.Path(path).read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def plot_curves(metrics_path: str | pathlib.Path, out_png: str | pathlib.Path) -> pathlib.Path:
  """Writes ``out_png`` (loss parts per step | scores per epoch) from ``metrics_path``; returns its path."""
  rows = read_metrics(metrics_path)
  train = [r for r in rows if r.get("kind") == "train"]
  epochs = [r for r in rows if r.get("kind") == "epoch"]
  fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
  keys = sorted({k for r in train for k, v in r.items() if isinstance(v, (int, float)) and k not in NOT_LOSSES
                  and not k.startswith("lr_")}, key=lambda k: (k != "loss", k))
  for key in keys:
    points = [(r["step"], r[key]) for r in train if key in r]
    if points:
      ax_loss.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
  ax_loss.set(xlabel="step", ylabel="train loss", title="training loss")
  splits = sorted({k.split("_", 1)[0] for r in epochs for k in r if k.endswith("_" + SCORE_KEYS[0])})
  for split in splits:
    for key in SCORE_KEYS:
      points = [(r["epoch"], r[f"{split}_{key}"]) for r in epochs if f"{split}_{key}" in r]
      ax_score.plot(*zip(*points), label=f"{split} {key}", marker="o")
  points = [(r["epoch"], r["score"]) for r in epochs if "score" in r]
  if points:
    ax_score.plot(*zip(*points), label="selection score", marker="s", linestyle="--")
  ax_score.set(xlabel="epoch", ylabel="score", title="evaluation (beam search)")
  ax_score.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  for ax in (ax_loss, ax_score):
    if ax.lines:
      ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  out_png = pathlib.Path(out_png)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png
