"""sampling: sampler weights and auto class weights (spec §15.3), weighted draws, the §2.5 fold rule (§15.6 vector,
scikit-learn's allocation, groups), given folds, fold splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from input_pipeline import records, sampling
from input_pipeline.records import DataError

PAPER_COUNTS = (519, 4202, 1312)


def _labels(counts, seed=None):
  """Class ids with the given counts; classes first occur in class-id order (then shuffled after the first
  occurrences when ``seed`` is given)."""
  y = np.repeat(np.arange(len(counts)), counts)
  if seed is None:
    return y
  first = np.searchsorted(y, np.arange(len(counts)))
  rest = np.delete(y, first)
  return np.concatenate([np.arange(len(counts)), np.random.default_rng(seed).permutation(rest)])


def _fold_class_counts(folds, y, num_folds=5):
  return np.array([np.bincount(y[folds == k], minlength=y.max() + 1) for k in range(num_folds)])


def test_sampler_and_auto_class_weights_spec_vector():
  y = _labels(PAPER_COUNTS, seed=0)
  w = sampling.class_sampling_weights(y, 3)
  assert w.shape == (6033,) and w.dtype == np.float64
  for c, expected in enumerate((3.874759, 0.478582, 1.532774)):
    np.testing.assert_allclose(w[y == c], expected, atol=5e-7)
  np.testing.assert_allclose([w[y == c].sum() / w.sum() for c in range(3)], [1 / 3] * 3, rtol=1e-12)
  np.testing.assert_array_equal(sampling.class_counts(y, 3), PAPER_COUNTS)
  np.testing.assert_allclose(sampling.class_weights_auto(PAPER_COUNTS), [8.096339, 1.0, 3.202744], atol=5e-7)
  with pytest.raises(ValueError, match="every class"):
    sampling.class_weights_auto([3, 0, 2])
  with pytest.raises(ValueError, match="0..2"):
    sampling.class_sampling_weights([0, 3], 3)


def test_folds_spec_vector_and_fold4_training_split():
  y = _labels(PAPER_COUNTS)
  folds = sampling.stratified_folds(y, 5, seed=42)
  expected = [(104, 841, 262), (104, 840, 263), (104, 840, 263), (104, 840, 262), (103, 841, 262)]
  np.testing.assert_array_equal(_fold_class_counts(folds, y), expected)
  for k in range(5):
    train = y[folds != k]
    assert len(train) == (4826, 4826, 4826, 4827, 4827)[k]
    assert math.ceil(len(train) / 8) == 604
  train4 = y[folds != 4]
  np.testing.assert_array_equal(sampling.class_counts(train4, 3), (416, 3361, 1050))
  w = sampling.class_sampling_weights(train4, 3)
  np.testing.assert_allclose([w[train4 == c][0] for c in range(3)], [3.867788, 0.478727, 1.532381], atol=5e-7)


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_folds_match_scikit_learn_allocation(seed):
  for counts in (PAPER_COUNTS, (7, 23, 11, 4), (3, 87, 57)):
    y = _labels(counts, seed=seed)
    ours = _fold_class_counts(sampling.stratified_folds(y, 5, seed=seed), y)
    skf = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    theirs = np.array([np.bincount(y[test], minlength=len(counts)) for _, test in skf.split(np.zeros(len(y)), y)])
    np.testing.assert_array_equal(ours, theirs)


def test_folds_are_a_seeded_shuffle_of_each_class():
  y = _labels((40, 60), seed=3)
  a = sampling.stratified_folds(y, 5, seed=1)
  np.testing.assert_array_equal(a, sampling.stratified_folds(y, 5, seed=1))
  assert not np.array_equal(a, sampling.stratified_folds(y, 5, seed=2))
  # Class 0 fills positions 0..39 (8 per fold), class 1 positions 40..99 (12 per fold).
  np.testing.assert_array_equal(_fold_class_counts(a, y), [[8, 12]] * 5)


def test_group_folds_hand_example():
  # Units: a (first record class 1), b (0), c (1), d (0). Class 0 units {b, d} take positions 0, 1 -> folds
  # {0, 1}; class 1 units {a, c} take positions 2, 3 -> folds {2, 3}. Records share their group's fold.
  groups = ["a", "a", "b", "c", "c", "c", "d"]
  y = [1, 0, 0, 1, 0, 0, 0]
  folds = sampling.stratified_folds(y, 5, seed=0, groups=groups)
  by_group = {}
  for g, k in zip(groups, folds):
    assert by_group.setdefault(g, k) == k
  assert {by_group["b"], by_group["d"]} == {0, 1} and {by_group["a"], by_group["c"]} == {2, 3}


def test_weighted_draws_deterministic_and_balanced():
  y = _labels(PAPER_COUNTS, seed=5)
  w = sampling.class_sampling_weights(y, 3)
  d0 = sampling.weighted_draws(w, seed=3, epoch=0)
  assert d0.shape == (6033,) and d0.min() >= 0 and d0.max() < 6033
  np.testing.assert_array_equal(d0, sampling.weighted_draws(w, seed=3, epoch=0))
  assert not np.array_equal(d0, sampling.weighted_draws(w, seed=3, epoch=1))
  assert not np.array_equal(d0, sampling.weighted_draws(w, seed=4, epoch=0))
  assert len(np.unique(d0)) < 6033  # with replacement
  drawn = np.concatenate([y[sampling.weighted_draws(w, 3, e)] for e in range(10)])
  freq = np.bincount(drawn, minlength=3) / drawn.size
  np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.01)  # natural frequencies: 0.086 / 0.697 / 0.217
  # Within a class the draw is uniform: every Normal record has the same probability.
  normal = np.bincount(np.concatenate([sampling.weighted_draws(w, 3, e) for e in range(10)]),
                       minlength=6033)[y == 0]
  assert normal.mean() == pytest.approx(6033 * 10 / 3 / 519, rel=0.02)


def _rec(rid, label, fold=-1):
  return records.Record(rid, "r", (f"/x/{rid}.png",), np.zeros(0, np.float32), label=label, fold=fold)


def test_assign_folds_given_assigned_and_errors():
  given = [_rec(f"r{i}", i % 2, fold=i % 3) for i in range(6)]
  assert sampling.assign_folds(given, 5, seed=0) == given
  with pytest.raises(DataError, match=r"'r4' has fold 4; config.data.num_folds=3"):
    sampling.assign_folds([_rec("r4", 0, fold=4)], 3, seed=0)
  with pytest.raises(DataError, match="'r1' has no fold while other records have one"):
    sampling.assign_folds([_rec("r0", 0, fold=1), _rec("r1", 0)], 5, seed=0)
  with pytest.raises(DataError, match="record 'r1' has no class id"):
    sampling.assign_folds([_rec("r0", 0), _rec("r1", -1)], 5, seed=0)
  with pytest.raises(ValueError, match="group_key"):
    sampling.assign_folds(given, 5, seed=0, group_key="patient")
  # Assigned: the rule runs over the records sorted by id, whatever their order; patients stay together.
  recs = [_rec(f"p{i // 3}_{i % 3}", (i // 3) % 3) for i in range(30)]
  shuffled = [recs[i] for i in np.random.default_rng(0).permutation(30)]
  out = sampling.assign_folds(shuffled, 5, seed=9, group_key="id_prefix")
  assert [r.id for r in out] == [r.id for r in shuffled]
  fold_of = {r.id: r.fold for r in out}
  assert fold_of == {r.id: r.fold for r in sampling.assign_folds(recs, 5, seed=9, group_key="id_prefix")}
  for p in range(10):
    assert len({fold_of[f"p{p}_{j}"] for j in range(3)}) == 1
  expected = sampling.stratified_folds([(p % 3) for p in range(10)], 5, seed=9, groups=[f"p{p}" for p in range(10)])
  assert [fold_of[f"p{p}_0"] for p in range(10)] == list(expected)


def test_fold_split():
  recs = [_rec(f"r{i}", 0, fold=i % 5) for i in range(12)]
  train, val, test = (sampling.fold_split(recs, 2, s) for s in ("train", "val", "test"))
  assert [r.id for r in val] == [r.id for r in test] == ["r2", "r7"]
  assert [r.id for r in train] == [f"r{i}" for i in range(12) if i % 5 != 2]
  inner = {s: [r.id for r in sampling.fold_split(recs, 4, s, 5, inner_val=True)] for s in ("train", "val", "test")}
  assert inner == {"val": ["r0", "r5", "r10"], "test": ["r4", "r9"],
                   "train": [f"r{i}" for i in range(12) if i % 5 in (1, 2, 3)]}
  with pytest.raises(DataError, match="Unknown split 'dev'"):
    sampling.fold_split(recs, 2, "dev")
  with pytest.raises(DataError, match="Split 'val' of fold 3 has no records"):
    sampling.fold_split(recs[:3], 3, "val")
