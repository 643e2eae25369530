"""``multilabel_classification``: a classifier head's findings against the dataset's labels."""

import numpy as np

from rrg_jax.evaluators import Predictions, register
from rrg_jax.metrics import clinical

THRESHOLD = 0.5


@register("multilabel_classification")
def multilabel_classification(predictions: Predictions, config) -> dict[str, float]:
  """CLS_* precision / recall / F1 of ``outputs['probs'] >= 0.5`` vs ``batch['labels'] >= 0.5`` (the averages of
  ``metrics.clinical.precision_recall_f1``)."""
  del config
  for where, key in ((predictions.outputs, "probs"), (predictions.batch, "labels")):
    if key not in where:
      raise ValueError(f"multilabel_classification needs the system's {key!r}; this system gives none (drop the "
                       "evaluator from config.eval.evaluators).")
  probs = np.asarray(predictions.outputs["probs"])
  labels = np.asarray(predictions.batch["labels"])
  scores = clinical.precision_recall_f1(probs >= THRESHOLD, labels >= THRESHOLD)
  return {k.replace("CE_", "CLS_"): v for k, v in scores.items()}
