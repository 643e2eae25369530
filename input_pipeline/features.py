"""Extra per-example features that a system's config asks for, computed in the input pipeline (outside jit).

``config.data.features`` (tuple of names, default ``()``) selects classes of ``FEATURES``; the loader builds each
once from the config and merges its arrays into every prepared example (so into the batches, stacked to a leading
``Bl`` axis)::

    feature = FEATURES[name](config)
    feature(raw, image, rng) -> dict[str, np.ndarray]
        raw: the raw example (``records.FolderSource``); image: its decoded, untransformed first view (PIL "L" or
        "RGB"); rng: the example's generator after the global transforms drew from it (None in evaluation)
    feature.padding() -> dict[str, np.ndarray]   # the same keys, shapes and dtypes, for the padding rows of the
                                                 # last evaluation batch
    feature.uses_boxes: bool                     # the raw example must carry the annotation's boxes

Features:

    lesion_regions   regions       float32 (M, R, R, 3)  Align2Gen's lesion crops (``input_pipeline.boxes``),
                     region_valid  bool    (M,)          NHWC, placeholders 1e-8; padding rows 0 / False
                     (M = data.max_boxes, R = data.region_size; the other box keys: ``input_pipeline.boxes``)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import ml_collections
import numpy as np
import PIL.Image

from input_pipeline import boxes, records


class Feature(Protocol):
  uses_boxes: bool

  def __call__(self, raw: Mapping[str, Any], image: PIL.Image.Image,
               rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    ...

  def padding(self) -> dict[str, np.ndarray]:
    ...


class LesionRegions:
  """``regions`` (M, R, R, 3) and ``region_valid`` (M,) from the record's boxes; deterministic (``rng`` unused)."""

  uses_boxes = True

  def __init__(self, config: ml_collections.ConfigDict):
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

  def __call__(self, raw: Mapping[str, Any], image: PIL.Image.Image,
               rng: np.random.Generator | None) -> dict[str, np.ndarray]:
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


FEATURES: dict[str, type[Feature]] = {"lesion_regions": LesionRegions}


def names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``config.data.features`` checked against ``FEATURES``."""
  selected = tuple(config.data.get("features", ()))
  unknown = [n for n in selected if n not in FEATURES]
  if unknown or len(set(selected)) != len(selected):
    raise ValueError(f"config.data.features={selected!r}: unknown or repeated name(s); choose from "
                     f"{sorted(FEATURES)}.")
  return selected


def build(config: ml_collections.ConfigDict) -> list[Feature]:
  """The configured features, in ``config.data.features`` order."""
  return [FEATURES[n](config) for n in names(config)]


def box_format(config: ml_collections.ConfigDict) -> str | None:
  """The layout to read the annotation's boxes in (``data.box_format``), None when no configured feature uses
  them (their fields are then left unread and unchecked)."""
  if any(FEATURES[n].uses_boxes for n in names(config)):
    return boxes.check_format(boxes.option(config, "box_format"))
  return None
