"""The ``classification`` evaluator (radgen_spec §6.1) against the spec's §15.9 example, hand-computed values and the
spec's pairwise AUC formula; its pictures; undefined scores as JSON null."""

from __future__ import annotations

import json
import logging
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from rrg_jax import evaluate, evaluators, train


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
  with pytest.raises(ValueError, match="single-label class ids labels"):
    evaluators.evaluate(("classification",), evaluators.Predictions(
        ["a"], [""], [""], {"probs": np.ones((1, 3), np.float32)}, {"labels": np.ones((1, 3), np.float32)}),
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
