"""The ``classification`` evaluator: single-label (radgen_spec §6.1) against the spec's §15.9 example, hand-computed
values and the spec's pairwise AUC formula; multi-label (ct_agrg_spec §8, ``p > τ``) against a hand-computed example
and scikit-learn; its pictures; undefined scores as JSON null."""

from __future__ import annotations

import json
import logging
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from rrg_jax import evaluate, evaluators, train
from rrg_jax.models.system import System


def _config(names=("Normal", "Pneumonia", "TB")) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": {"num_classes": len(names)}, "data": {"class_names": tuple(names)}})


def _predictions(probs, labels) -> evaluators.Predictions:
  n = len(labels)
  return evaluators.Predictions([str(i) for i in range(n)], [""] * n, [""] * n,
                                {"probs": np.asarray(probs, np.float32)}, {"labels": np.asarray(labels, np.int32)})


def _score(probs, labels, names=("Normal", "Pneumonia", "TB")) -> dict:
  return evaluators.evaluate(("classification",), _predictions(probs, labels), _config(names))


SPEC_PROBS = [(0.7, 0.2, 0.1), (0.4, 0.5, 0.1), (0.3, 0.6, 0.1), (0.4, 0.3, 0.3)]  # §15.9: class 2 absent
SPEC_LABELS = [0, 0, 1, 1]


def test_spec_example(caplog):
  with caplog.at_level(logging.WARNING):
    s = _score(SPEC_PROBS, SPEC_LABELS)
  approx = lambda v: pytest.approx(v, abs=1e-12)  # noqa: E731
  assert s["auc_Normal"] == approx(0.875) and s["auc_Pneumonia"] == approx(0.75) and s["auc_TB"] is None
  assert s["macro_auc"] == approx(0.8125) and s["auc_classes_used"] == 2
  assert "AUC of class TB is undefined" in caplog.text
  confusion = [[s[f"confusion_{i}_{j}"] for j in range(3)] for i in range(3)]
  assert confusion == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
  assert (s["sensitivity_Normal"], s["sensitivity_Pneumonia"], s["sensitivity_TB"]) == (0.5, 0.5, None)
  assert (s["specificity_Normal"], s["specificity_Pneumonia"], s["specificity_TB"]) == (0.5, 0.5, 1.0)
  assert (s["f1_Normal"], s["f1_Pneumonia"], s["f1_TB"]) == (0.5, 0.5, None)
  assert (s["precision_Normal"], s["precision_Pneumonia"], s["precision_TB"]) == (0.5, 0.5, 0.0)
  assert s["macro_f1"] == approx(0.5) and s["accuracy"] == approx(0.5)
  assert s["macro_sensitivity"] == approx(0.5) and s["macro_specificity"] == approx(2 / 3)


def test_ties_hand_computed():
  """argmax ties go to the lowest index (rows 0, 1), AUC ties count ½ (class 1: 0.375 vs 0.375)."""
  probs = [(0.375, 0.375, 0.25), (0.25, 0.375, 0.375), (0.5, 0.25, 0.25), (0.125, 0.125, 0.75), (0.25, 0.5, 0.25)]
  labels = [1, 2, 0, 2, 1]  # ŷ = (0, 1, 0, 2, 1)
  s = _score(probs, labels, ("a", "b c", "d"))
  assert [[s[f"confusion_{i}_{j}"] for j in range(3)] for i in range(3)] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
  want = {"accuracy": 0.6, "auc_a": 1.0, "auc_b_c": 5.5 / 6, "auc_d": 1.0, "macro_auc": 35 / 36,
          "auc_classes_used": 3, "sensitivity_a": 1.0, "sensitivity_b_c": 0.5, "sensitivity_d": 0.5,
          "specificity_a": 0.75, "specificity_b_c": 2 / 3, "specificity_d": 1.0, "precision_a": 0.5,
          "precision_b_c": 0.5, "precision_d": 1.0, "f1_a": 2 / 3, "f1_b_c": 0.5, "f1_d": 2 / 3,
          "macro_f1": 11 / 18, "macro_sensitivity": 2 / 3, "macro_specificity": 29 / 36}
  for k, v in want.items():
    assert s[k] == pytest.approx(v, abs=1e-12), k
  assert len(s) == len(want) + 9


def test_auc_is_the_spec_pairwise_formula_with_half_ties():
  rng = np.random.default_rng(0)
  probs = np.round(rng.dirichlet(np.ones(4), size=60), 1)  # coarse: many ties within a class column
  labels = rng.integers(0, 4, size=60)
  s = _score(probs, labels, ("w", "x", "y", "z"))
  probs = probs.astype(np.float32)
  aucs = []
  for c, name in enumerate("wxyz"):
    pos, neg = probs[labels == c, c], probs[labels != c, c]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    aucs.append(pairs.mean())
    assert s[f"auc_{name}"] == pytest.approx(aucs[-1], abs=1e-12), name
  assert s["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
  assert s["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))


def test_one_class_split_has_no_auc_and_writes_null(tmp_path):
  s = _score([(0.6, 0.3, 0.1), (0.2, 0.5, 0.3)], [1, 1])
  assert math.isnan(s["macro_auc"]) and s["auc_classes_used"] == 0
  assert s["sensitivity_Normal"] is None and s["specificity_Pneumonia"] is None and s["f1_TB"] is None
  assert s["macro_f1"] == pytest.approx(1 / 3)  # classes 0 (ŷ only) and 1: F1 0 and 2/3
  written = json.loads(json.dumps(evaluators.json_row(s), allow_nan=False))  # strict JSON: NaN and None → null
  assert written["macro_auc"] is None and written["auc_Normal"] is None and written["accuracy"] == 0.5
  # metrics.jsonl rows (train.MetricsLogger): null too; TensorBoard gets the numbers only.
  logger = train.MetricsLogger(tmp_path, enabled=True)
  logger.write(3, {"epoch": 1, **{f"val_{k}": v for k, v in s.items()}, "score": math.nan}, "epoch")
  logger.close()
  row = json.loads((tmp_path / train.METRICS_FILE).read_text())
  assert row["val_macro_auc"] is None and row["score"] is None and row["val_auc_TB"] is None
  assert row["val_accuracy"] == 0.5 and row["val_confusion_1_1"] == 1


def test_inputs_are_checked():
  with pytest.raises(ValueError, match="single-label class ids labels"):  # (N, C) labels are multi-label
    evaluators.evaluate(("classification",), evaluators.Predictions(
        ["a"], [""], [""], {"probs": np.ones((1, 3), np.float32)}, {"labels": np.ones((1, 2), np.float32)}),
        _config())
  with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
    _score(SPEC_PROBS, [0, 1, 3, 1])
  with pytest.raises(ValueError, match="probs has 3 classes but the config names 2"):
    _score(SPEC_PROBS, SPEC_LABELS, ("a", "b"))
  with pytest.raises(ValueError, match="classification needs the system's 'probs'"):
    evaluators.evaluate(("classification",), evaluators.Predictions(["a"], [""], [""]), _config())


def test_plots_are_written_as_png_images(tmp_path):
  paths = evaluators.write_plots(("report_text", "classification"), _predictions(SPEC_PROBS, SPEC_LABELS),
                                 _config(), tmp_path / "plots", "val_epoch001_")
  assert [p.name for p in paths] == ["val_epoch001_roc.png", "val_epoch001_confusion.png"]
  for p in paths:
    with Image.open(p) as im:
      assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 400, im.size
      pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # drawn, not blank
  # Evaluators without pictures write nothing, not even the folder.
  assert evaluators.write_plots(("report_text",), _predictions(SPEC_PROBS, SPEC_LABELS), _config(),
                                tmp_path / "none", "") == []
  assert not (tmp_path / "none").exists()



class _StubSystem:
  """What ``evaluate_split`` uses of a system: a classifier whose generate gives fixed probabilities."""
  report_outputs = ("probs",)

  def __init__(self, config: ml_collections.ConfigDict, probs: np.ndarray):
    self.config, self._probs = config, probs

  def batch_fields(self, train: bool) -> dict[str, None]:
    del train
    return {"images": None, "labels": None}

  def device_batch(self, batch: dict, train: bool) -> dict:
    del train
    return {"images": batch["images"]}

  def generate(self, variables, inputs: dict) -> dict:
    del variables
    return {"tokens": np.zeros((len(self._probs), 1), np.int32), "probs": self._probs}

  decode_reports = System.decode_reports


class _StubTokenizer:
  def decode_batch(self, ids: list) -> list[str]:
    return ["x"] * len(ids)


def test_evaluate_split_writes_the_evaluators_plots(tmp_path):
  """evaluate_split(plot_dir=..., plot_prefix=...) — the train loop's per-epoch call and the evaluate CLI's —
  draws the configured evaluators' pictures from the split's valid records (padding rows dropped)."""
  config = _config()
  config.eval = ml_collections.ConfigDict({"evaluators": ("classification",)})
  config.mesh_shape = (1,)
  probs = np.asarray(SPEC_PROBS + [(0.1, 0.1, 0.8)], np.float32)
  batch = {"images": np.zeros((5, 1), np.float32), "targets": np.ones((5, 2), np.int32),
           "labels": np.array(SPEC_LABELS + [2], np.int32), "valid": np.array([True] * 4 + [False]),
           "ids": list("abcde")}
  scores, reports = evaluate.evaluate_split(_StubSystem(config, probs), {}, _StubTokenizer(), [batch],
                                            progress=False, plot_dir=tmp_path / "plots", plot_prefix="val_epoch002_")
  assert len(reports) == 4 and scores["macro_auc"] == pytest.approx(0.8125)  # the §15.9 records only
  assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["val_epoch002_confusion.png",
                                                                    "val_epoch002_roc.png"]


# --- multi-label (ct_agrg_spec §8: the detector's p > τ against multi-hot labels) ----------------------------------

def _multi(probs, labels) -> evaluators.Predictions:
  n = len(labels)
  return evaluators.Predictions([str(i) for i in range(n)], [""] * n, [""] * n,
                                {"probs": np.asarray(probs, np.float32)}, {"labels": np.asarray(labels, np.float32)})


def _multi_config(names, thresholds=None) -> ml_collections.ConfigDict:
  config = _config(names)
  if thresholds is not None:
    config.model.thresholds = tuple(thresholds)
  return config


# Columns a (τ 0.5), "b c" (τ 0.25), d (τ 0.75; no positive label). Ties p = τ are negative (strict p > τ).
MULTI_PROBS = [(0.75, 0.25, 0.875), (0.5, 0.375, 0.5), (0.25, 0.125, 0.25), (0.625, 0.5, 0.75), (0.125, 0.25, 0.125),
               (0.875, 0.0625, 0.375)]
MULTI_LABELS = [(1, 0, 0), (1, 1, 0), (0, 0, 0), (0, 1, 0), (0, 1, 0), (1, 0, 0)]


def test_multi_label_hand_computed(caplog):
  """a: ŷ = (1,0,0,1,0,1) → TP 2, FP 1, FN 1; b c: ŷ = (0,1,0,1,0,0) → TP 2, FN 1; d: ŷ = (1,0,0,0,0,0) → FP 1.
  AUC a: 8 of 9 pairs; b c: 8.5 of 9 (one tie 0.25 = 0.25); d: no positive → None, logged, left out."""
  with caplog.at_level(logging.WARNING):
    s = evaluators.evaluate(("classification",), _multi(MULTI_PROBS, MULTI_LABELS),
                            _multi_config(("a", "b c", "d"), (0.5, 0.25, 0.75)))
  assert "AUC of class d is undefined (0 of 6 records are positive)" in caplog.text
  want = {"precision_a": 2 / 3, "recall_a": 2 / 3, "f1_a": 2 / 3, "precision_b_c": 1.0, "recall_b_c": 2 / 3,
          "f1_b_c": 0.8, "precision_d": 0.0, "recall_d": 0.0, "f1_d": 0.0, "auc_a": 8 / 9, "auc_b_c": 8.5 / 9,
          "macro_precision": 5 / 9, "macro_recall": 4 / 9, "macro_f1": 22 / 45, "micro_precision": 2 / 3,
          "micro_recall": 2 / 3, "micro_f1": 2 / 3, "macro_auc": 11 / 12}
  for k, v in want.items():
    assert s[k] == pytest.approx(v, abs=1e-12), k
  assert s["auc_d"] is None and s["auc_classes_used"] == 2
  assert (s["support_a"], s["support_b_c"], s["support_d"]) == (3, 3, 0)
  assert len(s) == len(want) + 5
  # Without config.model.thresholds every τ is 0.5: "b c" has no p > 0.5 (0.5 itself is a tie) → P = R = F1 = 0.
  s = evaluators.evaluate(("classification",), _multi(MULTI_PROBS, MULTI_LABELS), _multi_config(("a", "b c", "d")))
  assert (s["precision_b_c"], s["recall_b_c"], s["f1_b_c"]) == (0.0, 0.0, 0.0) and s["f1_a"] == pytest.approx(2 / 3)
  assert (s["precision_d"], s["recall_d"]) == (0.0, 0.0)  # 0.875 and 0.75 > 0.5: two false positives


def test_multi_label_class_positive_nowhere_is_none():
  """d: no positive label and no p > τ → precision / recall / F1 None, left out of the macro means."""
  probs = [row[:2] + (0.5,) for row in MULTI_PROBS]  # d's p = τ everywhere: never decided positive
  s = evaluators.evaluate(("classification",), _multi(probs, MULTI_LABELS),
                          _multi_config(("a", "b c", "d"), (0.5, 0.25, 0.5)))
  assert (s["precision_d"], s["recall_d"], s["f1_d"], s["auc_d"], s["support_d"]) == (None, None, None, None, 0)
  assert s["macro_precision"] == pytest.approx((2 / 3 + 1) / 2) and s["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
  assert (s["micro_precision"], s["micro_recall"], s["micro_f1"]) == pytest.approx((4 / 5, 4 / 6, 8 / 11))
  written = json.loads(json.dumps(evaluators.json_row(s), allow_nan=False))
  assert written["f1_d"] is None and written["auc_d"] is None
  nothing = evaluators.evaluate(("classification",), _multi(np.zeros((2, 3)), np.zeros((2, 3))),
                                _multi_config(("a", "b c", "d")))
  assert math.isnan(nothing["macro_f1"]) and math.isnan(nothing["micro_f1"]) and math.isnan(nothing["macro_auc"])


def _random_multi(seed: int, n: int, num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, num)) < rng.uniform(0.1, 0.6, num)).astype(np.float32)
  labels[:, 2] = 0  # a class without positives
  probs = np.round(np.clip(0.35 * labels + rng.random((n, num)) * 0.7, 0, 1), 2).astype(np.float32)
  return probs, labels, np.round(rng.uniform(0.2, 0.8, num), 2)


def test_multi_label_agrees_with_sklearn():
  from sklearn import metrics

  probs, labels, tau = _random_multi(1, 80, 6)
  names = [f"c{i}" for i in range(6)]
  s = evaluators.evaluate(("classification",), _multi(probs, labels), _multi_config(names, tau))
  pred = probs > tau.astype(np.float32)
  precision, recall, f1, support = metrics.precision_recall_fscore_support(labels, pred, average=None,
                                                                           zero_division=0)
  defined = [c for c in range(6) if labels[:, c].any() or pred[:, c].any()]
  for c, name in enumerate(names):
    assert s[f"support_{name}"] == support[c]
    if c not in defined:
      assert s[f"f1_{name}"] is None
      continue
    assert (s[f"precision_{name}"], s[f"recall_{name}"], s[f"f1_{name}"]) == pytest.approx(
        (precision[c], recall[c], f1[c]), abs=1e-12), name
    if 0 < labels[:, c].sum() < len(labels):
      assert s[f"auc_{name}"] == pytest.approx(metrics.roc_auc_score(labels[:, c], probs[:, c]), abs=1e-12)
  assert s["macro_f1"] == pytest.approx(np.mean(f1[defined]), abs=1e-12)
  assert s["macro_precision"] == pytest.approx(np.mean(precision[defined]), abs=1e-12)
  micro = metrics.precision_recall_fscore_support(labels, pred, average="micro", zero_division=0)[:3]
  assert (s["micro_precision"], s["micro_recall"], s["micro_f1"]) == pytest.approx(micro, abs=1e-12)


def test_multi_label_inputs_are_checked():
  with pytest.raises(ValueError, match="must be 0/1"):
    evaluators.evaluate(("classification",), _multi(MULTI_PROBS, np.full((6, 3), 0.5)), _multi_config("abd"))
  with pytest.raises(ValueError, match="thresholds must be 3 finite numbers"):
    evaluators.evaluate(("classification",), _multi(MULTI_PROBS, MULTI_LABELS), _multi_config("abd", (0.5, 0.5)))
  with pytest.raises(ValueError, match="probs has 3 classes but the config names 2"):
    evaluators.evaluate(("classification",), _multi(MULTI_PROBS, MULTI_LABELS), _multi_config("ab"))


def test_multi_label_roc_png(tmp_path):
  probs, labels, tau = _random_multi(2, 60, 12)  # > 10 classes: dashed curves, legend beside the axes
  names = [f"finding {i}" for i in range(12)]
  paths = evaluators.write_plots(("classification",), _multi(probs, labels), _multi_config(names, tau),
                                 tmp_path / "plots", "test_")
  assert [p.name for p in paths] == ["test_roc.png"]
  with Image.open(paths[0]) as im:
    assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 500, im.size
    assert np.asarray(im.convert("L")).std() > 5
