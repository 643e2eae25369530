"""Evaluator registry: ``config.eval.evaluators`` names the scorers a system's reports are evaluated with.

An evaluator is ``fn(predictions, config) -> {score name: float | None}`` (None: undefined, written as JSON null,
never 0) registered with ``@register(name)``; ``@register(name, plot=fn)`` adds its pictures, ``fn(predictions,
config, out_dir, prefix) -> [paths written]`` (``write_plots``):

* ``report_text`` — BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, as the originals) and sacreBLEU;
* ``clinical_efficacy`` — CE precision/recall/F1 of the 14 CheXpert observations, generated vs reference text
  through the offline labeler (``rrg_jax.metrics.clinical``);
* ``multilabel_classification`` — CLS_* precision/recall/F1 of a classifier head's findings (``probs`` ≥ 0.5)
  against the dataset's ``labels``, same averages as CE;
* ``classification`` — a single-label classifier's ``probs`` (N, C) against class ids ``labels`` (N,)
  (radgen_spec §6.1): accuracy, per-class and macro AUC / sensitivity / specificity / precision / F1, the
  confusion matrix; pictures: ROC curves and the confusion matrix.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Evaluator = Callable[["Predictions", Any], dict[str, float | None]]
Plotter = Callable[["Predictions", Any, pathlib.Path, str], list[pathlib.Path]]
_EVALUATORS: dict[str, Evaluator] = {}
_PLOTTERS: dict[str, Plotter] = {}


@dataclasses.dataclass
class Predictions:
  """One evaluated split, one entry per record: ``references`` / ``generated`` texts, record ``ids``, the
  system's per-report ``outputs`` (e.g. ``probs`` (N, C)) and the records' batch fields ``batch`` (e.g.
  ``labels`` (N, C))."""
  ids: Sequence[str]
  references: Sequence[str]
  generated: Sequence[str]
  outputs: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  batch: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


def register(name: str, plot: Plotter | None = None) -> Callable[[Evaluator], Evaluator]:
  """Registers the decorated evaluator as ``name``, with its pictures ``plot`` if given."""
  def wrap(fn: Evaluator) -> Evaluator:
    if name in _EVALUATORS:
      raise ValueError(f"Evaluator {name!r} is registered twice.")
    _EVALUATORS[name] = fn
    if plot is not None:
      _PLOTTERS[name] = plot
    return fn
  return wrap


def names() -> list[str]:
  return sorted(_EVALUATORS)


def check(evaluator_names: Sequence[str]) -> None:
  """Raises ``ValueError`` naming an unknown evaluator (before any decoding is spent)."""
  unknown = [n for n in evaluator_names if n not in _EVALUATORS]
  if unknown:
    raise ValueError(f"config.eval.evaluators names unknown evaluator(s) {unknown}; known: {names()}.")


def evaluate(evaluator_names: Sequence[str], predictions: Predictions, config: Any) -> dict[str, float | None]:
  """The union of the named evaluators' scores, in the order named."""
  check(evaluator_names)
  scores: dict[str, float | None] = {}
  for name in evaluator_names:
    scores.update(_EVALUATORS[name](predictions, config))
  return scores


def write_plots(evaluator_names: Sequence[str], predictions: Predictions, config: Any, out_dir: str | pathlib.Path,
                prefix: str = "") -> list[pathlib.Path]:
  """The pictures of those named evaluators that draw any (``register(name, plot=...)``), as files in ``out_dir``
  (created when there is one) whose names start with ``prefix``; returns their paths."""
  check(evaluator_names)
  paths: list[pathlib.Path] = []
  for name in evaluator_names:
    if name in _PLOTTERS:
      pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
      paths += _PLOTTERS[name](predictions, config, pathlib.Path(out_dir), prefix)
  return paths


def json_row(row: Mapping[str, Any]) -> dict[str, Any]:
  """``row`` with undefined numbers (None, NaN, ±inf) as None, so JSON writes null (radgen_spec §6.1)."""
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


from rrg_jax.evaluators import classification, clinical_efficacy, ct_clinical_efficacy, report_text  # noqa: E402,F401
