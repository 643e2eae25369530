"""Classifier-head evaluators: ``multilabel_classification`` (a multi-label head's findings against the dataset's
labels) and ``classification`` (a single-label multi-class head, radgen_spec §6.1, with ROC-curve and
confusion-matrix pictures)."""

from __future__ import annotations

import math
import pathlib

import numpy as np
from absl import logging
from matplotlib.figure import Figure

from rrg_jax.evaluators import Predictions, register
from rrg_jax.metrics import clinical

THRESHOLD = 0.5
ROC_FILE = "roc.png"
CONFUSION_FILE = "confusion.png"


def _require(predictions: Predictions, evaluator: str) -> tuple[np.ndarray, np.ndarray]:
  """The system's ``outputs['probs']`` and the records' ``batch['labels']``, or an error naming the evaluator."""
  for where, key in ((predictions.outputs, "probs"), (predictions.batch, "labels")):
    if key not in where:
      raise ValueError(f"{evaluator} needs the system's {key!r}; this system gives none (drop the evaluator from "
                       "config.eval.evaluators).")
  return np.asarray(predictions.outputs["probs"]), np.asarray(predictions.batch["labels"])


@register("multilabel_classification")
def multilabel_classification(predictions: Predictions, config) -> dict[str, float]:
  """CLS_* precision / recall / F1 of ``outputs['probs'] >= 0.5`` vs ``batch['labels'] >= 0.5`` (the averages of
  ``metrics.clinical.precision_recall_f1``)."""
  del config
  probs, labels = _require(predictions, "multilabel_classification")
  scores = clinical.precision_recall_f1(probs >= THRESHOLD, labels >= THRESHOLD)
  return {k.replace("CE_", "CLS_"): v for k, v in scores.items()}


# --- single-label multi-class (radgen_spec §6.1) -----------------------------------------------------------------

def _single_label(predictions: Predictions, config) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """``probs`` (N, C), integer class ids ``labels`` (N,) in [0, C) and the C class names (score-key safe)."""
  from rrg_jax.evaluate import class_names  # pylint: disable=g-import-not-at-top  (evaluate imports evaluators)

  probs, labels = _require(predictions, "classification")
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"classification needs probs (N, C) and single-label class ids labels (N,); got probs "
                     f"{probs.shape} and labels {labels.shape} (multi-label targets: multilabel_classification).")
  ids = labels.astype(np.int64)
  if not np.array_equal(ids, labels) or ids.min() < 0 or ids.max() >= probs.shape[1]:
    raise ValueError(f"classification: labels must be class ids in [0, {probs.shape[1]}); got values "
                     f"{sorted(set(labels.tolist()))[:10]}.")
  names = class_names(config)
  if len(names) != probs.shape[1]:
    raise ValueError(f"classification: probs has {probs.shape[1]} classes but the config names {len(names)} "
                     f"({names}); set config.model.num_classes / config.data.class_names.")
  return probs, ids, [n.replace(" ", "_") for n in names]


def _auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
  """One-vs-rest ROC AUC (scikit-learn; ties count ½), None without a positive or without a negative."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (1.4 s; only when scoring)
  return float(metrics.roc_auc_score(positive, scores)) if 0 < positive.sum() < positive.size else None


def _mean(values: list[float | None]) -> float:
  """Mean of the defined values; NaN if none is."""
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else math.nan


def plot_classification(predictions: Predictions, config, out_dir: pathlib.Path, prefix: str) -> list[pathlib.Path]:
  """``<prefix>roc.png`` (one-vs-rest ROC curve per class, scikit-learn ``roc_curve``; classes without an AUC are
  listed as undefined) and ``<prefix>confusion.png`` (counts, true class per row) in ``out_dir``."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (1.4 s; only when scoring)
  probs, y, names = _single_label(predictions, config)
  classes = np.arange(probs.shape[1])
  roc = Figure(figsize=(5.5, 5))
  ax = roc.subplots()
  ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
  for c in classes:
    auc = _auc(y == c, probs[:, c])
    if auc is None:
      ax.plot([], [], " ", label=f"{names[c]} (AUC undefined)")
      continue
    fpr, tpr, _ = metrics.roc_curve(y == c, probs[:, c])
    ax.plot(fpr, tpr, label=f"{names[c]} (AUC {auc:.3f})")
  ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
         title=f"ROC, one vs rest ({y.size} records)", xlim=(0, 1), ylim=(0, 1.02))
  ax.legend(fontsize="small", loc="lower right")
  ax.grid(alpha=0.3)
  roc.tight_layout()

  m = metrics.confusion_matrix(y, probs.argmax(1), labels=classes)
  side = max(4.0, 1.6 + 0.7 * len(classes))
  confusion = Figure(figsize=(side + 1, side))
  ax = confusion.subplots()
  image = ax.imshow(m, cmap="Blues")
  confusion.colorbar(image, ax=ax, fraction=0.046)
  for i in classes:
    for j in classes:
      ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
  ax.set_xticks(classes, names, rotation=45, ha="right")
  ax.set_yticks(classes, names)
  ax.set(xlabel="predicted class", ylabel="true class", title="confusion matrix")
  confusion.tight_layout()

  paths = [out_dir / f"{prefix}{ROC_FILE}", out_dir / f"{prefix}{CONFUSION_FILE}"]
  for fig, path in zip((roc, confusion), paths):
    fig.savefig(path, dpi=100)
  return paths


@register("classification", plot=plot_classification)
def classification(predictions: Predictions, config) -> dict[str, float | None]:
  """radgen_spec §6.1 over the split: ``ŷ = argmax p`` (ties → lowest index).

  Scores: ``accuracy``; ``macro_auc`` (mean of the defined one-vs-rest AUCs, NaN if none; an undefined one — no
  positive or no negative for the class — is None, logged and left out) and ``auc_classes_used``; ``macro_f1``
  over the classes occurring in y or ŷ (scikit-learn's default label set); ``macro_sensitivity`` /
  ``macro_specificity`` over the defined values; per class ``auc_<name>``, ``sensitivity_<name>`` (None without
  positives), ``specificity_<name>`` (None without negatives), ``precision_<name>`` (0 when nothing is predicted
  as it), ``f1_<name>`` (None when the class occurs in neither y nor ŷ); ``confusion_<i>_<j>`` = #{y = i, ŷ = j}.
  Class names come from ``rrg_jax.evaluate.class_names`` (spaces → ``_``).
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (1.4 s; only when scoring)
  probs, y, names = _single_label(predictions, config)
  n, num = probs.shape
  pred = probs.argmax(1)  # first maximum: ties go to the lowest index
  classes = np.arange(num)
  m = metrics.confusion_matrix(y, pred, labels=classes)
  tp, fn, fp = np.diag(m), m.sum(1) - np.diag(m), m.sum(0) - np.diag(m)
  tn = n - tp - fn - fp
  precision, recall, f1, _ = metrics.precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
  occurs = set(y.tolist()) | set(pred.tolist())
  auc = [_auc(y == c, probs[:, c]) for c in classes]
  sens = [float(recall[c]) if tp[c] + fn[c] else None for c in classes]
  spec = [float(tn[c] / (tn[c] + fp[c])) if tn[c] + fp[c] else None for c in classes]
  for c in classes:
    if auc[c] is None:
      logging.warning("classification: the AUC of class %s is undefined (%d of %d records are of it); it is left "
                      "out of macro_auc.", names[c], tp[c] + fn[c], n)
  scores: dict[str, float | None] = {
      "accuracy": float(metrics.accuracy_score(y, pred)),
      "macro_auc": _mean(auc), "auc_classes_used": sum(a is not None for a in auc),
      "macro_f1": float(metrics.f1_score(y, pred, average="macro")),
      "macro_sensitivity": _mean(sens), "macro_specificity": _mean(spec)}
  for c, name in enumerate(names):
    scores.update({f"auc_{name}": auc[c], f"sensitivity_{name}": sens[c], f"specificity_{name}": spec[c],
                   f"precision_{name}": float(precision[c]), f"f1_{name}": float(f1[c]) if c in occurs else None})
  scores.update({f"confusion_{i}_{j}": int(m[i, j]) for i in classes for j in classes})
  return scores
