"""``ct_clinical_efficacy``: the 18 CT-RATE abnormalities found in generated vs reference CT reports (ct_agrg_spec §8).

A **reconstruction**: CT-AGRG's code computes no clinical-efficacy score; the paper labels both reports with
CT-RATE's RadBERT classifier. Without its weights, the reports are labeled here with the rule-based labeler of §9.3
(``input_pipeline.ct_sentences.label_report``: keyword lexicon + clause-level negation), the fallback §8 names,
so the scores are not comparable with the paper's. An abnormality counts as stated by a report when some sentence
has a non-negated match; ``No abnormalities detected.`` (the generated report of a volume without detections,
§7) and an empty reference (a healthy volume, §7.2) state none. The texts may be the cleaned, lower-cased form the
trainer writes (``heart size is enlarged . bilateral pleural effusion .``): the lexicon is case-insensitive and
sentences end at ``" . "``; the cleaning drops ``,`` and ``;``, so a clause split there (§9.3 step 3) is lost.
"""

from __future__ import annotations

import numpy as np

from input_pipeline import ct_rate, ct_sentences
from rrg_jax.evaluators import Predictions, register
from rrg_jax.evaluators.classification import binary_scores


def label_reports(texts: list[str]) -> np.ndarray:
  """bool (N, 18): the abnormalities (``ct_rate.ABNORMALITIES`` order) each text states (``label_report``)."""
  return np.array([ct_sentences.label_report(t) == 1 for t in texts], bool).reshape(-1, ct_rate.NUM_ABNORMALITIES)


@register("ct_clinical_efficacy")
def ct_clinical_efficacy(predictions: Predictions, config) -> dict[str, float | None]:
  """Per abnormality precision / recall / F1 of the positive class, generated labels vs reference labels, and
  their averages (``classification.binary_scores`` with prefix ``CE_``): ``CE_macro_precision``,
  ``CE_macro_recall``, ``CE_macro_f1`` (over the abnormalities stated in some reference or generated report),
  ``CE_micro_*`` (pooled counts) and per abnormality ``CE_precision_<name>``, ``CE_recall_<name>``,
  ``CE_f1_<name>`` (None when no report states it; left out of the macro means), ``CE_support_<name>`` (reference
  reports stating it); names with spaces → ``_`` (``CE_f1_Pleural_effusion``)."""
  del config
  if len(predictions.generated) != len(predictions.references):
    raise ValueError(f"ct_clinical_efficacy: {len(predictions.generated)} generated vs "
                     f"{len(predictions.references)} reference reports.")
  names = [n.replace(" ", "_") for n in ct_rate.ABNORMALITIES]
  return binary_scores(label_reports(list(predictions.generated)), label_reports(list(predictions.references)),
                       names, prefix="CE_")
