"""Classifier-head evaluators: ``multilabel_classification`` (a multi-label head's findings against the dataset's
labels) and ``classification``: a single-label multi-class head (radgen_spec §6.1, with ROC-curve and
confusion-matrix pictures) or, for multi-hot labels, a multi-label detector such as CT-AGRG's 18 abnormality heads
(ct_agrg_spec §8: per class precision / recall / F1 of ``p > τ`` and AUROC, with ROC curves).

``binary_scores`` (per-class and averaged precision / recall / F1 of binary decisions) also serves
``ct_clinical_efficacy``."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

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


# --- classification: single-label (radgen_spec §6.1) or multi-label (ct_agrg_spec §8) ----------------------------

def _multi_label(predictions: Predictions) -> bool:
  """Whether ``classification`` scores a multi-label detector: multi-hot ``labels`` of the shape of ``probs``."""
  probs, labels = _require(predictions, "classification")
  return probs.ndim == 2 and labels.shape == probs.shape


def _class_names(config, num: int) -> list[str]:
  """The ``num`` class names of ``rrg_jax.evaluate.class_names``, spaces → ``_`` (score-key safe)."""
  from rrg_jax.evaluate import class_names  # pylint: disable=g-import-not-at-top  (evaluate imports evaluators)

  names = class_names(config)
  if len(names) != num:
    raise ValueError(f"classification: probs has {num} classes but the config names {len(names)} "
                     f"({names}); set config.model.num_classes / config.data.class_names.")
  return [n.replace(" ", "_") for n in names]


def _single_label(predictions: Predictions, config) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """``probs`` (N, C), integer class ids ``labels`` (N,) in [0, C) and the C class names (score-key safe)."""
  probs, labels = _require(predictions, "classification")
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"classification needs probs (N, C) and single-label class ids labels (N,) or multi-hot "
                     f"labels (N, C); got probs {probs.shape} and labels {labels.shape}.")
  ids = labels.astype(np.int64)
  if not np.array_equal(ids, labels) or ids.min() < 0 or ids.max() >= probs.shape[1]:
    raise ValueError(f"classification: labels must be class ids in [0, {probs.shape[1]}); got values "
                     f"{sorted(set(labels.tolist()))[:10]}.")
  return probs, ids, _class_names(config, probs.shape[1])


def _multi_label_inputs(predictions: Predictions, config) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """``probs`` (N, C) of independent classes, the multi-hot ``labels`` (N, C) as bool and the C class names."""
  probs, labels = _require(predictions, "classification")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"classification: multi-hot labels (N, C) must be 0/1; got values "
                     f"{np.unique(labels)[:10].tolist()}.")
  return probs, labels == 1, _class_names(config, probs.shape[1])


def _thresholds(config, num: int) -> np.ndarray:
  """τ (num,): ``config.model.thresholds`` (num numbers, e.g. CT-AGRG's per-abnormality thresholds) when set and
  non-empty, else 0.5 for every class."""
  values = config.model.get("thresholds", None)
  tau = np.asarray(() if values is None else values)
  if tau.size == 0:
    return np.full(num, THRESHOLD)
  if tau.shape != (num,) or not np.issubdtype(tau.dtype, np.number) or not np.isfinite(tau).all():
    raise ValueError(f"classification: config.model.thresholds must be {num} finite numbers (one τ per class, "
                     f"decision p > τ); got {values!r}.")
  return tau


def _auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
  """One-vs-rest ROC AUC (scikit-learn; ties count ½), None without a positive or without a negative."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (1.4 s; only when scoring)
  return float(metrics.roc_auc_score(positive, scores)) if 0 < positive.sum() < positive.size else None


def _mean(values: list[float | None]) -> float:
  """Mean of the defined values; NaN if none is."""
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else math.nan


def binary_scores(pred: np.ndarray, true: np.ndarray, names: Sequence[str], prefix: str = ""
                  ) -> dict[str, float | None]:
  """Precision / recall / F1 of the positive class of bool (N, C) decisions ``pred`` against references ``true``.

  Keys: ``<prefix>macro_precision`` / ``_recall`` / ``_f1`` (means over the defined classes, NaN if none is),
  ``<prefix>micro_*`` (from the counts pooled over the classes, NaN when nothing is positive anywhere) and per class
  ``<prefix>precision_<name>``, ``recall_<name>``, ``f1_<name>``, ``support_<name>`` (positives in ``true``). A class
  positive in neither ``pred`` nor ``true`` has None for its precision, recall and F1; otherwise they are
  scikit-learn's ``precision_recall_fscore_support(zero_division=0)`` values: precision 0 when nothing is predicted
  positive, recall 0 without positives, F1 = 2 TP / (2 TP + FP + FN).
  """
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  tp, fp, fn = (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)

  def prf(tp: int, fp: int, fn: int) -> tuple[float | None, float | None, float | None]:
    if tp + fp + fn == 0:
      return None, None, None
    return tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0, 2 * tp / (2 * tp + fp + fn)

  per_class = [prf(*counts) for counts in zip(tp.tolist(), fp.tolist(), fn.tolist())]
  micro = prf(int(tp.sum()), int(fp.sum()), int(fn.sum()))
  scores: dict[str, float | None] = {}
  for i, metric in enumerate(("precision", "recall", "f1")):
    scores[f"{prefix}macro_{metric}"] = _mean([v[i] for v in per_class])
    scores[f"{prefix}micro_{metric}"] = math.nan if micro[i] is None else micro[i]
  for c, name in enumerate(names):
    scores.update({f"{prefix}precision_{name}": per_class[c][0], f"{prefix}recall_{name}": per_class[c][1],
                   f"{prefix}f1_{name}": per_class[c][2], f"{prefix}support_{name}": int(tp[c] + fn[c])})
  return scores


def _roc_figure(positive: np.ndarray, probs: np.ndarray, names: Sequence[str], title: str) -> Figure:
  """ROC curve per class (column) of bool ``positive`` (N, C) against ``probs`` (N, C), scikit-learn
  ``roc_curve``; classes without an AUC are listed as undefined. More than 10 classes: dashed lines from the 11th
  on (the colour cycle repeats) and the legend beside the axes."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (1.4 s; only when scoring)
  many = len(names) > 10
  fig = Figure(figsize=(10, 6) if many else (5.5, 5))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
  for c, name in enumerate(names):
    auc = _auc(positive[:, c], probs[:, c])
    if auc is None:
      ax.plot([], [], " ", label=f"{name} (AUC undefined)")
      continue
    fpr, tpr, _ = metrics.roc_curve(positive[:, c], probs[:, c])
    ax.plot(fpr, tpr, linestyle="--" if c >= 10 else "-", label=f"{name} (AUC {auc:.3f})")
  ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)", title=title,
         xlim=(0, 1), ylim=(0, 1.02))
  if many:
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
  else:
    ax.legend(fontsize="small", loc="lower right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def plot_classification(predictions: Predictions, config, out_dir: pathlib.Path, prefix: str) -> list[pathlib.Path]:
  """Single-label: ``<prefix>roc.png`` (one-vs-rest ROC curve per class) and ``<prefix>confusion.png`` (counts,
  true class per row) in ``out_dir``. Multi-label: ``<prefix>roc.png``, one ROC curve per class."""
  if _multi_label(predictions):
    probs, true, names = _multi_label_inputs(predictions, config)
    path = out_dir / f"{prefix}{ROC_FILE}"
    _roc_figure(true, probs, names, f"ROC per class ({len(true)} records)").savefig(path, dpi=100)
    return [path]
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (1.4 s; only when scoring)
  probs, y, names = _single_label(predictions, config)
  classes = np.arange(probs.shape[1])
  roc = _roc_figure(y[:, None] == classes, probs, names, f"ROC, one vs rest ({y.size} records)")

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


def _multi_label_classification(predictions: Predictions, config) -> dict[str, float | None]:
  """``classification`` of a multi-label detector (its docstring)."""
  probs, true, names = _multi_label_inputs(predictions, config)
  dtype = np.result_type(probs.dtype, np.float32)
  pred = probs.astype(dtype) > _thresholds(config, probs.shape[1]).astype(dtype)
  auc = [_auc(true[:, c], probs[:, c]) for c in range(probs.shape[1])]
  for c, name in enumerate(names):
    if auc[c] is None:
      logging.warning("classification: the AUC of class %s is undefined (%d of %d records are positive); it is "
                      "left out of macro_auc.", name, true[:, c].sum(), len(true))
  scores: dict[str, float | None] = {"macro_auc": _mean(auc), "auc_classes_used": sum(a is not None for a in auc)}
  scores.update(binary_scores(pred, true, names))
  scores.update({f"auc_{name}": auc[c] for c, name in enumerate(names)})
  return scores


@register("classification", plot=plot_classification)
def classification(predictions: Predictions, config) -> dict[str, float | None]:
  """Single-label (class ids ``labels`` (N,)) or multi-label (multi-hot ``labels`` (N, C)) classification.

  **Multi-label** (ct_agrg_spec §8, the detector): ``probs`` (N, C) are independent (sigmoid) probabilities, the
  decision is ``p > τ_c`` (strict; τ from ``config.model.thresholds``, C numbers, else 0.5 for every class —
  ``multilabel_classification`` uses ``p ≥ 0.5``), compared in the probabilities' precision (float32 as the model
  does). Scores: ``macro_auc`` / ``auc_classes_used`` and per class ``auc_<name>`` as below (AUC undefined when
  the class has one label value only); ``binary_scores``' ``macro_precision`` / ``macro_recall`` / ``macro_f1``
  (over the classes positive in labels or decisions), ``micro_precision`` / ``micro_recall`` / ``micro_f1`` and
  per class ``precision_<name>``, ``recall_<name>``, ``f1_<name>`` (None for a class positive nowhere),
  ``support_<name>`` (positive records).

  **Single-label** (radgen_spec §6.1) over the split: ``ŷ = argmax p`` (ties → lowest index).

  Scores: ``accuracy``; ``macro_auc`` (mean of the defined one-vs-rest AUCs, NaN if none; an undefined one — no
  positive or no negative for the class — is None, logged and left out) and ``auc_classes_used``; ``macro_f1``
  over the classes occurring in y or ŷ (scikit-learn's default label set); ``macro_sensitivity`` /
  ``macro_specificity`` over the defined values; per class ``auc_<name>``, ``sensitivity_<name>`` (None without
  positives), ``specificity_<name>`` (None without negatives), ``precision_<name>`` (0 when nothing is predicted
  as it), ``f1_<name>`` (None when the class occurs in neither y nor ŷ); ``confusion_<i>_<j>`` = #{y = i, ŷ = j}.
  Class names come from ``rrg_jax.evaluate.class_names`` (spaces → ``_``).
  """
  if _multi_label(predictions):
    return _multi_label_classification(predictions, config)
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
