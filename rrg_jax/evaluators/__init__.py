"""Evaluator registry: ``config.eval.evaluators`` names the scorers a system's reports are evaluated with.

An evaluator is ``fn(predictions, config) -> {score name: float}`` registered with ``@register(name)``:

* ``report_text`` — BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, as the originals) and sacreBLEU;
* ``clinical_efficacy`` — CE precision/recall/F1 of the 14 CheXpert observations, generated vs reference text
  through the offline labeler (``rrg_jax.metrics.clinical``);
* ``multilabel_classification`` — CLS_* precision/recall/F1 of a classifier head's findings (``probs`` ≥ 0.5)
  against the dataset's ``labels``, same averages as CE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Evaluator = Callable[["Predictions", Any], dict[str, float]]
_EVALUATORS: dict[str, Evaluator] = {}


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


def register(name: str) -> Callable[[Evaluator], Evaluator]:
  def wrap(fn: Evaluator) -> Evaluator:
    if name in _EVALUATORS:
      raise ValueError(f"Evaluator {name!r} is registered twice.")
    _EVALUATORS[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  return sorted(_EVALUATORS)


def check(evaluator_names: Sequence[str]) -> None:
  """Raises ``ValueError`` naming an unknown evaluator (before any decoding is spent)."""
  unknown = [n for n in evaluator_names if n not in _EVALUATORS]
  if unknown:
    raise ValueError(f"config.eval.evaluators names unknown evaluator(s) {unknown}; known: {names()}.")


def evaluate(evaluator_names: Sequence[str], predictions: Predictions, config: Any) -> dict[str, float]:
  """The union of the named evaluators' scores, in the order named."""
  check(evaluator_names)
  scores: dict[str, float] = {}
  for name in evaluator_names:
    scores.update(_EVALUATORS[name](predictions, config))
  return scores


from rrg_jax.evaluators import classification, clinical_efficacy, report_text  # noqa: E402,F401
