"""Class-balanced sampling, class weights and stratified cross-validation folds (RadGen spec §2.5, §2.6, §4).

Public API (``N`` records, ``C`` classes, integer class ids ``y`` in ``0..C-1``)::

    class_counts(labels, num_classes) -> int64 (C,)                  n_c
    class_sampling_weights(labels, num_classes) -> float64 (N,)      ω_i = N / (C · n_{y_i})          (§2.6)
    class_weights_auto(counts) -> float64 (C,)                       w_c = max_k n_k / n_c            (§4 auto)
    weighted_draws(weights, seed, epoch) -> int64 (N,)               one epoch of the weighted sampler (§2.6)
    stratified_folds(labels, num_folds, seed, groups) -> int64 (N,)  the fold of each record          (§2.5)
    assign_folds(records, num_folds, seed, group_key) -> records     given folds kept, else §2.5 folds
    fold_split(records, fold, split, ...) -> records                 train = folds ≠ k, val = test = fold k
                                                                     (inner_val: val = fold k + 1, test = fold k)

Weighted sampler. Epoch ``e`` draws ``N`` indices i.i.d. with replacement, ``P(i) = ω_i / Σ_j ω_j``, from
``default_rng([seed, e])`` — the same per-epoch index array the shuffled loader takes from a permutation, so
the draw at (epoch, position) is a pure function of them (any worker count, exact resume). Under ω every class
present in the split is drawn with probability 1/C per draw. The stream of ``torch.multinomial`` is not
reproduced, only the distribution.

Folds. ``stratified_folds``: within each class shuffle the (unit) indices with ``default_rng([seed, c])``,
concatenate the classes in class-id order and send position ``p`` of the concatenation to fold ``p mod K``. The
per-class fold sizes are scikit-learn's ``StratifiedKFold(K, shuffle=True)`` allocation whenever the classes
first occur in class-id order (scikit-learn orders classes by first occurrence). With ``groups`` the unit is a
group (e.g. a patient) and its class is that of its first record; ``assign_folds`` passes the records sorted by
id, so that is the group's first record by id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from input_pipeline import records

GROUP_KEYS = ("", "id_prefix")


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
  """int64 ``(C,)``: how many of ``labels`` (int ``(N,)``, each in ``0..C-1``) fall in each class."""
  y = np.asarray(labels, np.int64)
  if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= num_classes)):
    raise ValueError(f"Class ids must be a flat array of integers in 0..{num_classes - 1}.")
  return np.bincount(y, minlength=num_classes)


def class_sampling_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
  """Per-sample sampler weights float64 ``(N,)``: ``ω_i = N / (C · n_{y_i})`` (spec §2.6, §15.3)."""
  y = np.asarray(labels, np.int64)
  counts = class_counts(y, num_classes)
  return y.size / (num_classes * counts[y].astype(np.float64))


def class_weights_auto(counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """Majority-normalised inverse class frequency float64 ``(C,)``: ``w_c = max_k n_k / n_c`` (spec §4
  ``class_weights = auto``); every class must occur."""
  n = np.asarray(counts, np.float64)
  if n.ndim != 1 or not (n > 0).all():
    raise ValueError(f"Automatic class weights need every class in the training split; counts {n.tolist()}.")
  return n.max() / n


def weighted_draws(weights: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """Epoch ``epoch`` of the weighted random sampler: int64 ``(N,)`` record indices drawn i.i.d. with
  replacement, ``P(i) ∝ weights[i]`` (float ``(N,)``, non-negative), from ``default_rng([seed, epoch])``."""
  w = np.asarray(weights, np.float64)
  return np.random.default_rng([int(seed), int(epoch)]).choice(w.size, size=w.size, replace=True, p=w / w.sum())


def stratified_folds(labels: Sequence[int] | np.ndarray, num_folds: int = 5, seed: int = 0,
                     groups: Sequence[Hashable] | None = None) -> np.ndarray:
  """The §2.5 fold of each record, int64 ``(N,)`` in ``0..num_folds-1``.

  Args:
    labels: int ``(N,)`` class ids (``>= 0``).
    num_folds: ``K``.
    seed: the shuffling seed (``config.data.fold_seed``).
    groups: optional ``(N,)`` group keys; records of a group share its fold, and the group counts as one unit
      of the class of its first record (in the given order).
  """
  y = np.asarray(labels, np.int64)
  if y.ndim != 1 or not y.size or y.min() < 0:
    raise ValueError("Class ids must be a non-empty flat array of non-negative integers.")
  if groups is None:
    unit_of, unit_labels = np.arange(y.size), y
  else:
    keys = np.asarray([str(g) for g in groups])
    _, first, unit_of = np.unique(keys, return_index=True, return_inverse=True)
    unit_labels = y[first]
  order = np.concatenate([np.random.default_rng([int(seed), c]).permutation(np.flatnonzero(unit_labels == c))
                          for c in range(int(unit_labels.max()) + 1)])
  unit_fold = np.empty(unit_labels.size, np.int64)
  unit_fold[order] = np.arange(order.size) % num_folds
  return unit_fold[unit_of]


def assign_folds(recs: Sequence[records.Record], num_folds: int, seed: int,
                 group_key: str = "") -> list[records.Record]:
  """``recs`` with their ``fold``: the records' own folds when all carry one (checked to lie in
  ``0..num_folds-1``), else the §2.5 folds of ``stratified_folds`` over the records sorted by id, stratified by
  their class ids (``Record.label``), the unit being the record (``group_key=""``) or the id prefix before the
  first ``"_"`` (``"id_prefix"``, the sample's patient)."""
  if group_key not in GROUP_KEYS:
    raise ValueError(f"config.data.group_key={group_key!r}; choose one of {GROUP_KEYS}.")
  given = [r.fold >= 0 for r in recs]
  if all(given):
    bad = next((r for r in recs if r.fold >= num_folds), None)
    if bad is not None:
      raise records.DataError(f"Record {bad.id!r} has fold {bad.fold}; config.data.num_folds={num_folds}.")
    return list(recs)
  if any(given):
    missing = recs[given.index(False)]
    raise records.DataError(f"Record {missing.id!r} has no fold while other records have one.")
  unlabelled = next((r for r in recs if r.label < 0), None)
  if unlabelled is not None:
    raise records.DataError(f"Folds are stratified by class, but record {unlabelled.id!r} has no class id: "
                            "set config.data.class_map.")
  by_id = sorted(range(len(recs)), key=lambda i: recs[i].id)
  groups = [recs[i].id.split("_", 1)[0] for i in by_id] if group_key == "id_prefix" else None
  folds = stratified_folds([recs[i].label for i in by_id], num_folds, seed, groups)
  out = list(recs)
  for i, k in zip(by_id, folds):
    out[i] = dataclasses.replace(recs[i], fold=int(k))
  return out


def fold_split(recs: Sequence[records.Record], fold: int, split: str, num_folds: int = 5,
               inner_val: bool = False) -> list[records.Record]:
  """Cross-validation split of records with folds (spec §7): ``"train"`` = folds ≠ ``fold``, ``"val"`` and
  ``"test"`` = fold ``fold`` (under ``cv`` / ``single_fold`` the reported fold is the early-stopping fold); with
  ``inner_val`` (``cv_inner_val``) ``"val"`` = fold ``(fold + 1) mod num_folds``, ``"train"`` = the other
  ``num_folds − 2`` folds and ``"test"`` = fold ``fold``, so the reported fold never selects the model."""
  if split not in records.SPLITS:
    raise records.DataError(f"Unknown split {split!r} with config.data.fold={fold}; choose one of {records.SPLITS}.")
  held = {"val": (fold + 1) % num_folds if inner_val else fold, "test": fold}
  if split == "train":
    out = [r for r in recs if r.fold not in set(held.values())]
  else:
    out = [r for r in recs if r.fold == held[split]]
  if not out:
    raise records.DataError(f"Split {split!r} of fold {fold} has no records.")
  return out
