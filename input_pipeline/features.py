"""Extra per-example features that a system's config asks for, computed in the input pipeline (outside jit).

``config.data.features`` (tuple of names, default ``()``) selects classes of ``FEATURES``; the loader builds each
once from the config and merges its arrays into every prepared example (so into the batches, stacked to a leading
``Bl`` axis)::

    feature = FEATURES[name](config, tokenizer)            # tokenizer: the run's report vocabulary
    feature(raw, image, rng, example) -> dict[str, np.ndarray]
        raw: the raw example (``records.FolderSource``); image: its decoded, untransformed first view (PIL "L" or
        "RGB"); rng: the example's generator after the global transforms drew from it (None in evaluation);
        example: the arrays prepared so far (``targets`` …)
    feature.padding() -> dict[str, np.ndarray]   # the same keys, shapes and dtypes, for the padding rows of the
                                                 # last evaluation batch
    feature.uses_boxes: bool                     # the raw example must carry the annotation's boxes
    feature.train_only: bool                     # computed for training batches only
    FEATURES[name].prepare(config, workdir, tokenizer, is_writer)   # optional, once per training run, before
                                                 # the pipeline is built (e.g. train and save a tokenizer)

Features:

    lesion_regions   regions       float32 (M, R, R, 3)  Align2Gen's lesion crops (``input_pipeline.boxes``),
                     region_valid  bool    (M,)          NHWC, placeholders 1e-8; padding rows 0 / False
                     (M = data.max_boxes, R = data.region_size; the other box keys: ``input_pipeline.boxes``)
    report_texts     text_ids, text_mask, sentence_ids, sentence_mask   Align2Gen's BERT inputs, training only
                     (``input_pipeline.report_texts``)
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
import PIL.Image

from input_pipeline import boxes, records, report_texts


class Feature(Protocol):
  uses_boxes: bool
  train_only: bool

  def __call__(self, raw: Mapping[str, Any], image: PIL.Image.Image, rng: np.random.Generator | None,
               example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ...

  def padding(self) -> dict[str, np.ndarray]:
    ...


class LesionRegions:
  """``regions`` (M, R, R, 3) and ``region_valid`` (M,) from the record's boxes; deterministic (``rng`` unused)."""

  uses_boxes = True
  train_only = False

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any = None):
    del tokenizer
    self.max_boxes = int(boxes.option(config, "max_boxes"))
    self.min_box_score = float(boxes.option(config, "min_box_score"))
    self.box_crop = boxes.option(config, "box_crop")
    self.pad_fix = bool(boxes.option(config, "pad_fix"))
    self.region_size = int(boxes.option(config, "region_size"))
    self.global_size = int(config.data.image_size)
    if self.box_crop not in boxes.BOX_CROPS:
      raise ValueError(f"config.data.box_crop={self.box_crop!r}; choose one of {boxes.BOX_CROPS}.")
    if self.max_boxes < 1 or self.region_size < 1:
      raise ValueError(f"config.data.max_boxes={self.max_boxes} and config.data.region_size={self.region_size} "
                       "must be positive.")

  def __call__(self, raw: Mapping[str, Any], image: PIL.Image.Image, rng: np.random.Generator | None,
               example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    del rng, example
    box_set = raw.get("boxes")
    if box_set is None:
      raise records.DataError(
          f"Record {raw['id']!r} has no box fields (boxes, height, width) in its annotation; "
          "config.data.features 'lesion_regions' needs them (only config.data.source='folder' carries boxes).")
    xyxy, valid = boxes.select_boxes(box_set, max_boxes=self.max_boxes, min_box_score=self.min_box_score)
    regions, region_valid = boxes.region_crops(image, xyxy, valid, width=box_set.width, height=box_set.height,
                                               out_size=self.region_size, global_size=self.global_size,
                                               box_crop=self.box_crop, pad_fix=self.pad_fix)
    return {"regions": regions, "region_valid": region_valid}

  def padding(self) -> dict[str, np.ndarray]:
    r = self.region_size
    return {"regions": np.zeros((self.max_boxes, r, r, 3), np.float32),
            "region_valid": np.zeros((self.max_boxes,), bool)}


FEATURES: dict[str, type[Feature]] = {"lesion_regions": LesionRegions, "report_texts": report_texts.ReportTexts}


def names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``config.data.features`` checked against ``FEATURES``."""
  selected = tuple(config.data.get("features", ()))
  unknown = [n for n in selected if n not in FEATURES]
  if unknown or len(set(selected)) != len(selected):
    raise ValueError(f"config.data.features={selected!r}: unknown or repeated name(s); choose from "
                     f"{sorted(FEATURES)}.")
  return selected


def build(config: ml_collections.ConfigDict, tokenizer: Any, train: bool) -> list[Feature]:
  """The configured features for training or evaluation batches, in ``config.data.features`` order."""
  return [FEATURES[n](config, tokenizer) for n in names(config) if train or not FEATURES[n].train_only]


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path, tokenizer: Any) -> None:
  """Runs each configured feature's ``prepare`` (process 0 writes, the others wait for it) before a training run
  builds its pipeline; may fill config keys (e.g. ``data.text_tokenizer``)."""
  for name in names(config):
    prep = getattr(FEATURES[name], "prepare", None)
    if prep is not None:
      prep(config, workdir, tokenizer, jax.process_index() == 0)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("input_pipeline.features.prepare")


def box_format(config: ml_collections.ConfigDict) -> str | None:
  """The layout to read the annotation's boxes in (``data.box_format``), None when no configured feature uses
  them (their fields are then left unread and unchecked)."""
  if any(FEATURES[n].uses_boxes for n in names(config)):
    return boxes.check_format(boxes.option(config, "box_format"))
  return None
