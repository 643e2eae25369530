"""The ``ct_clinical_efficacy`` evaluator (ct_agrg_spec §8 with the §9.3 rule labeler): hand-written generated /
reference CT report pairs with known labels → exact per-abnormality and averaged precision / recall / F1."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from input_pipeline import ct_rate, ct_sentences
from rrg_jax import evaluators
from rrg_jax.evaluators import ct_clinical_efficacy as ce

# (reference, generated, abnormalities stated by the reference, by the generated report). Generated texts are
# partly in the cleaned lower-case form the CT-AGRG trainer writes.
PAIRS = [
    ("Heart size is enlarged. Bilateral pleural effusion is observed.",
     ct_rate.clean_sentence_text("Heart size is enlarged. Bilateral pleural effusion is observed."),
     {"Cardiomegaly", "Pleural effusion"}, {"Cardiomegaly", "Pleural effusion"}),
    ("A 6 mm nodule is seen in the right upper lobe.", ct_rate.NO_ABNORMALITY_REPORT, {"Lung nodule"}, set()),
    ("", "Emphysematous changes are seen in both lungs.", set(), {"Emphysema"}),
    ("Calcific atheroma plaques are seen in the aorta and coronary arteries.",
     "Coronary artery calcifications are observed. No pleural effusion or pneumothorax was detected.",
     {"Arterial wall calcification", "Coronary artery wall calcification"}, {"Coronary artery wall calcification"}),
    ("Pleural effusion is seen on the right. Subsegmental atelectasis is observed in the right lower lobe.",
     "pleural effusion is seen on the right . heart size is normal .", {"Pleural effusion", "Atelectasis"},
     {"Pleural effusion"}),
    ("Consolidation is present in the left lower lobe.",
     "There is consolidation in the left lower lobe. A 6 mm nodule is seen in the right upper lobe.",
     {"Consolidation"}, {"Consolidation", "Lung nodule"}),
    ("A nodule measuring 5 mm is observed.", "a nodule measuring 5 mm is observed .", {"Lung nodule"},
     {"Lung nodule"}),
    ("Bilateral pleural effusion is observed. Cardiomegaly is observed.", "Cardiomegaly is observed.",
     {"Pleural effusion", "Cardiomegaly"}, {"Cardiomegaly"}),
]
# name → (TP, FP, FN) over PAIRS, and the expected (precision, recall, F1).
COUNTS = {"Cardiomegaly": (2, 0, 0), "Pleural effusion": (2, 0, 1), "Lung nodule": (1, 1, 1), "Emphysema": (0, 1, 0),
          "Arterial wall calcification": (0, 0, 1), "Coronary artery wall calcification": (1, 0, 0),
          "Atelectasis": (0, 0, 1), "Consolidation": (1, 0, 0)}
EXPECTED = {"Cardiomegaly": (1, 1, 1), "Pleural effusion": (1, 2 / 3, 0.8), "Lung nodule": (0.5, 0.5, 0.5),
            "Emphysema": (0, 0, 0), "Arterial wall calcification": (0, 0, 0),
            "Coronary artery wall calcification": (1, 1, 1), "Atelectasis": (0, 0, 0), "Consolidation": (1, 1, 1)}


def _labels(names: set[str]) -> np.ndarray:
  return np.array([n in names for n in ct_rate.ABNORMALITIES])


def _score(pairs=PAIRS) -> dict:
  refs, gens = [p[0] for p in pairs], [p[1] for p in pairs]
  predictions = evaluators.Predictions([str(i) for i in range(len(pairs))], refs, gens)
  return evaluators.evaluate(("ct_clinical_efficacy",), predictions, None)


def test_the_pairs_have_the_known_labels():
  for ref, gen, ref_names, gen_names in PAIRS:
    np.testing.assert_array_equal(ct_sentences.label_report(ref) == 1, _labels(ref_names), err_msg=ref)
    np.testing.assert_array_equal(ct_sentences.label_report(gen) == 1, _labels(gen_names), err_msg=gen)
  refs, gens = (np.stack([_labels(p[i]) for p in PAIRS]) for i in (2, 3))
  for name, (tp, fp, fn) in COUNTS.items():
    k = ct_rate.ABNORMALITIES.index(name)
    assert ((gens[:, k] & refs[:, k]).sum(), (gens[:, k] & ~refs[:, k]).sum(), (~gens[:, k] & refs[:, k]).sum()) \
        == (tp, fp, fn), name


def test_no_abnormalities_detected_is_all_negative():
  assert not ce.label_reports([ct_rate.NO_ABNORMALITY_REPORT, "", ct_rate.assemble_report({})]).any()


def test_exact_scores():
  s = _score()
  assert "ct_clinical_efficacy" in evaluators.names()
  for name in ct_rate.ABNORMALITIES:
    key = name.replace(" ", "_")
    got = (s[f"CE_precision_{key}"], s[f"CE_recall_{key}"], s[f"CE_f1_{key}"])
    if name in EXPECTED:
      assert got == pytest.approx(EXPECTED[name], abs=1e-12), name
      assert s[f"CE_support_{key}"] == COUNTS[name][0] + COUNTS[name][2]
    else:  # never positive in references or predictions
      assert got == (None, None, None) and s[f"CE_support_{key}"] == 0, name
  macro = np.mean(list(EXPECTED.values()), axis=0)  # over the 8 abnormalities stated somewhere
  assert (s["CE_macro_precision"], s["CE_macro_recall"], s["CE_macro_f1"]) == pytest.approx(
      (9 / 16, 25 / 48, 0.5375), abs=1e-12)
  assert macro == pytest.approx((9 / 16, 25 / 48, 0.5375), abs=1e-12)
  # micro: TP 7, FP 2, FN 4
  assert (s["CE_micro_precision"], s["CE_micro_recall"], s["CE_micro_f1"]) == pytest.approx(
      (7 / 9, 7 / 11, 0.7), abs=1e-12)
  assert len(s) == 6 + 4 * ct_rate.NUM_ABNORMALITIES


def test_nothing_stated_anywhere_is_undefined():
  s = _score([("", ct_rate.NO_ABNORMALITY_REPORT, set(), set())] * 2)
  assert all(s[f"CE_f1_{n.replace(' ', '_')}"] is None for n in ct_rate.ABNORMALITIES)
  assert math.isnan(s["CE_macro_f1"]) and math.isnan(s["CE_micro_f1"])
  written = json.loads(json.dumps(evaluators.json_row(s), allow_nan=False))
  assert written["CE_macro_f1"] is None and written["CE_micro_precision"] is None


def test_lengths_must_match():
  with pytest.raises(ValueError, match="2 generated vs 1 reference"):
    ce.ct_clinical_efficacy(evaluators.Predictions(["a"], ["x"], ["y", "z"]), None)
