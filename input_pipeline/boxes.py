"""Align2Gen's lesion boxes (reference align2gen_spec.md §2.1, §2.2, §2.6, §14 items 1-5): the per-record box
fields of annotation.json, a VinDr-CXR CSV converter, and the lesion-region crops.

Annotation fields (per record, all optional; a record with any of them needs ``boxes``, ``height`` and ``width``)::

    boxes    [[4 numbers]] * K   in pixels of the image the boxes refer to; [-1, -1, -1, -1] = empty slot
    scores   [K numbers]         detector confidences (absent: 1.0 each); only ``data.min_box_score`` reads them
    height, width  positive ints the size of that image (the "annotation frame"; intended: the original image)

Box formats (``data.box_format``): ``coco_xywh`` ``[x, y, w, h]`` (top-left corner and size, the detector's
output, §2.2) or ``xyxy`` ``[x0, y0, x1, y1]``. A box must have a positive size and lie inside the annotation frame
(touching the border is allowed, with a 1e-6 px tolerance for float rounding). ``parse_box_fields`` turns them into
a ``BoxSet``: ``xyxy`` float64 (K, 4) (left, top, right, bottom; ``x + w`` computed as the original code does) and
``valid`` bool (K,) (False on empty slots). Every problem raises ``records.DataError`` naming the annotation file,
the record and the field (``boxes[i]``, ``scores``, ``height``, ``width``).

``select_boxes`` fixes the count to ``M = data.max_boxes``: boxes scoring below ``data.min_box_score`` become empty
slots in place; K <= M pads with empty slots at the end (K = M is the original code's case and keeps every slot
where it is); K > M keeps the M highest-scoring valid boxes (ties: earlier first) in file order.

``region_crops`` is the collate step of §2.6 (the crops come from the untransformed image, so the global
augmentation never reaches them, quirk 5). Per slot, ``(R, R, 3)`` NHWC float32:
  1. empty slot → placeholder filled with 1e-8 (``region_valid`` False);
  2. crop box: ``box_crop="code"`` scales to the global tensor frame, ``int(x * global_size / width)`` etc., but
     crops the original-resolution image (quirk 1); ``"corrected"`` crops ``(x0, y0, x1, y1)`` itself (mapped from
     the annotation frame to the image's pixels when their sizes differ, then rounded as PIL does). Unless
     ``x1 > x0`` and ``y1 > y0`` the slot is a placeholder too. PIL crop, zero fill outside the image;
  3. per-channel ``μ = mean / 255``, ``σ = max(std / 255, 0.01)`` of the crop before padding; if every
     ``μ <= 0.01`` (``np.allclose(μ, 0, atol=1e-2)``) the ImageNet mean/std instead (quirk 3);
  4. zero padding: ``"code"`` with ``pad_fix=False`` reads (width, height) swapped (quirk 2: a w × h crop becomes
     ``(w + m - h) × (h + m - w)``, ``m = max(w, h)``); ``pad_fix=True`` or ``"corrected"`` pads the shorter side,
     centred, to an ``m × m`` square (``"corrected"`` includes the padding fix, spec §2.6 [RECON]);
  5. PIL bilinear (antialiased) resize to ``R × R`` — torchvision ``Resize((R, R))`` on a PIL image — then
     ``(x / 255 - μ) / σ`` in float32 like ``ToTensor`` + ``Normalize`` (padded pixels become ``-μ / σ``).

Config keys (read as ``config.data.get(key, DEFAULTS[key])``; ``configs/`` need not define them)::

    data.box_format     "coco_xywh"  "coco_xywh" | "xyxy", the annotation's box layout
    data.max_boxes      8            M, regions per image (not stated by the code; spec §15 suggests 8)
    data.min_box_score  0.0          boxes scoring below become empty slots
    data.box_crop       "code"       "code" (parity, quirk 1) | "corrected" (unscaled box, square padding)
    data.pad_fix        False        False: the swapped-width/height padding of the code (quirk 2); True: square
    data.region_size    384          R, the side of each region crop
    data.image_size     (existing)   the global tensor size that ``"code"`` scales boxes to (384 in the spec)

VinDr-CXR → annotation boxes (command line)::

    python -m input_pipeline.boxes vindr --csv train.csv --annotation DIR/annotation.json --out OUT.json \
        [--max-boxes M] [--images DIR/images]

The CSV has columns ``image_id, class_name, x_min, y_min, x_max, y_max`` (others ignored; optional ``width`` and
``height`` give the image size, else it is read from the image header with PIL). Rows of class ``No finding`` or
with all four coordinates empty give no box. A record matches the CSV ``image_id`` equal to the file stem of its
``image_path[0]`` (``images/<image_id>.png``), else the one equal to its ``id``. Each matched record gets its
boxes (CSV order, ``coco_xywh``, score 1.0); unmatched records get all-empty slots; every record is padded to M
slots (``--max-boxes``, default the largest count; records with more keep their first M). A summary line is
printed; bad input prints one ``error: ...`` line naming the file and row and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import PIL.Image

from input_pipeline import records, transforms

FORMATS = ("coco_xywh", "xyxy")
BOX_CROPS = ("code", "corrected")
BOX_FIELDS = ("boxes", "scores", "height", "width")
EMPTY_SLOT = (-1, -1, -1, -1)
PLACEHOLDER = 1e-8
DEFAULTS = {"box_format": "coco_xywh", "max_boxes": 8, "min_box_score": 0.0, "box_crop": "code", "pad_fix": False,
            "region_size": 384}
_LAYOUTS = {"coco_xywh": "[x, y, w, h]", "xyxy": "[x0, y0, x1, y1]"}
_TOLERANCE = 1e-6  # px; x + w of a converted box may exceed the border by float rounding
_STD_FLOOR = 0.01
_VINDR_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
_NO_FINDING = "no finding"


def option(config: ml_collections.ConfigDict, key: str) -> Any:
  """``config.data.<key>``, or its default (``DEFAULTS``) when the config does not define it."""
  return config.data.get(key, DEFAULTS[key])


@dataclasses.dataclass(frozen=True)
class BoxSet:
  """The validated boxes of one record: ``xyxy`` float64 (K, 4) in the ``width`` × ``height`` annotation frame
  (rows of empty slots are -1), ``valid`` bool (K,), ``scores`` float64 (K,)."""
  xyxy: np.ndarray
  valid: np.ndarray
  scores: np.ndarray
  height: int
  width: int


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _frame_side(record: Mapping[str, Any], key: str, where: str) -> int:
  v = record[key]
  if not (_is_number(v) and v == int(v) and v > 0):
    raise records.DataError(f"{where}: {key} = {v!r} is not a positive integer.")
  return int(v)


def check_format(box_format: str) -> str:
  if box_format not in FORMATS:
    raise ValueError(f"config.data.box_format={box_format!r}; choose one of {FORMATS}.")
  return box_format


def parse_box_fields(record: Mapping[str, Any], *, box_format: str, where: str) -> BoxSet | None:
  """The box fields of an annotation record (None when it has none of them); ``where`` names the record and
  the annotation file in error messages."""
  check_format(box_format)
  present = [k for k in BOX_FIELDS if k in record]
  if not present:
    return None
  missing = [k for k in ("boxes", "height", "width") if k not in record]
  if missing:
    raise records.DataError(f"{where}: has box field(s) {present} but lacks {missing}.")
  height, width = _frame_side(record, "height", where), _frame_side(record, "width", where)
  entries = record["boxes"]
  layout = _LAYOUTS[box_format]
  if not isinstance(entries, list):
    raise records.DataError(f"{where}: boxes must be a list of {layout} entries, got {type(entries).__name__}.")
  xyxy = np.full((len(entries), 4), -1.0)
  valid = np.zeros((len(entries),), bool)
  for i, e in enumerate(entries):
    if not (isinstance(e, list) and len(e) == 4 and all(_is_number(v) for v in e)):
      raise records.DataError(f"{where}: boxes[{i}] = {e!r} is not a list of 4 finite numbers {layout} "
                              f"(data.box_format={box_format!r}).")
    if tuple(e) == EMPTY_SLOT:
      continue
    a, b, c, d = (float(v) for v in e)
    box = (a, b, a + c, b + d) if box_format == "coco_xywh" else (a, b, c, d)
    if not (box[2] > box[0] and box[3] > box[1]):
      raise records.DataError(f"{where}: boxes[{i}] = {e!r} {layout} has no positive width and height "
                              f"(data.box_format={box_format!r}; {list(EMPTY_SLOT)} marks an empty slot).")
    if box[0] < 0 or box[1] < 0 or box[2] > width + _TOLERANCE or box[3] > height + _TOLERANCE:
      raise records.DataError(f"{where}: boxes[{i}] = {e!r} {layout} is not inside the {width} x {height} "
                              "(width x height) image.")
    xyxy[i], valid[i] = box, True
  scores = np.ones((len(entries),))
  if "scores" in record:
    s = record["scores"]
    if not isinstance(s, list) or len(s) != len(entries):
      raise records.DataError(f"{where}: scores must be a list of {len(entries)} numbers (one per box), got "
                              f"{len(s) if isinstance(s, list) else type(s).__name__}.")
    bad = [j for j, v in enumerate(s) if not _is_number(v)]
    if bad:
      raise records.DataError(f"{where}: scores[{bad[0]}] = {s[bad[0]]!r} is not a finite number.")
    scores = np.asarray(s, np.float64)
  return BoxSet(xyxy, valid, scores, height, width)


def select_boxes(boxes: BoxSet, *, max_boxes: int, min_box_score: float) -> tuple[np.ndarray, np.ndarray]:
  """Exactly ``max_boxes`` slots: (xyxy float64 (M, 4), valid bool (M,)); see the module docstring."""
  valid = boxes.valid & (boxes.scores >= min_box_score)
  keep = np.arange(len(valid))
  if len(keep) > max_boxes:
    idx = np.flatnonzero(valid)
    keep = np.sort(idx[np.argsort(-boxes.scores[idx], kind="stable")[:max_boxes]])
  xyxy = np.full((max_boxes, 4), -1.0)
  out_valid = np.zeros((max_boxes,), bool)
  xyxy[:len(keep)], out_valid[:len(keep)] = boxes.xyxy[keep], valid[keep]
  return xyxy, out_valid


# --- region crops (spec §2.6) -------------------------------------------------------------------------------

def crop_box(box: Sequence[float], *, width: int, height: int, image_size: tuple[int, int], global_size: int,
             box_crop: str) -> tuple[int, int, int, int]:
  """The PIL crop box (left, upper, right, lower) of an ``xyxy`` box of the ``width`` × ``height`` frame on an
  image of ``image_size`` = (width, height) pixels (step 2)."""
  x0, y0, x1, y1 = (float(v) for v in box)
  if box_crop == "code":
    sx, sy = global_size / width, global_size / height
    return int(x0 * sx), int(y0 * sy), int(x1 * sx), int(y1 * sy)
  if box_crop != "corrected":
    raise ValueError(f"config.data.box_crop={box_crop!r}; choose one of {BOX_CROPS}.")
  iw, ih = image_size
  if (iw, ih) != (width, height):
    x0, x1, y0, y1 = x0 * iw / width, x1 * iw / width, y0 * ih / height, y1 * ih / height
  return round(x0), round(y0), round(x1), round(y1)


def square_padding(w: int, h: int, *, fix: bool) -> tuple[int, int, int, int]:
  """Zero padding (left, top, right, bottom) of a ``w`` × ``h`` crop (step 4): centred to an ``m × m`` square
  with ``fix``, else the code's helper that reads (w, h) as (h, w)."""
  m = max(w, h)
  dw, dh = (m - w, m - h) if fix else (m - h, m - w)
  return dw // 2, dh // 2, dw - dw // 2, dh - dh // 2


def crop_statistics(crop: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
  """(μ, σ) float64 (3,) of a crop (step 3)."""
  a = np.asarray(crop)
  mean = np.broadcast_to(a.mean(axis=(0, 1)) / 255, (3,))
  std = np.maximum(np.broadcast_to(a.std(axis=(0, 1)) / 255, (3,)), _STD_FLOOR)
  if np.allclose(mean, 0, atol=1e-2):
    return np.asarray(transforms.MEAN), np.asarray(transforms.STD)
  return mean, std


def region_crops(image: PIL.Image.Image, boxes: np.ndarray, valid: np.ndarray, *, width: int, height: int,
                 out_size: int = 384, global_size: int = 384, box_crop: str = "code", pad_fix: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Lesion regions of one image: (regions float32 (M, out_size, out_size, 3), valid bool (M,)).

  ``image``: the untransformed image (PIL ``"L"`` or ``"RGB"``); ``boxes``: float64 (M, 4) ``xyxy`` in the
  ``width`` × ``height`` annotation frame; ``valid``: bool (M,), False on empty slots.
  """
  if image.mode not in ("L", "RGB"):
    image = image.convert("RGB")
  regions = np.full((len(boxes), out_size, out_size, 3), PLACEHOLDER, np.float32)
  out_valid = np.zeros((len(boxes),), bool)
  for i in np.flatnonzero(valid):
    x0, y0, x1, y1 = crop_box(boxes[i], width=width, height=height, image_size=image.size,
                              global_size=global_size, box_crop=box_crop)
    if not (x1 > x0 and y1 > y0):
      continue
    crop = image.crop((x0, y0, x1, y1))
    mean, std = crop_statistics(crop)
    left, top, right, bottom = square_padding(*crop.size, fix=pad_fix or box_crop == "corrected")
    padded = PIL.Image.new(crop.mode, (crop.width + left + right, crop.height + top + bottom), 0)
    padded.paste(crop, (left, top))
    if padded.size != (out_size, out_size):
      padded = padded.resize((out_size, out_size), PIL.Image.BILINEAR)
    x = np.asarray(padded).astype(np.float32) / np.float32(255)
    regions[i] = (x.reshape(out_size, out_size, -1) - mean.astype(np.float32)) / std.astype(np.float32)
    out_valid[i] = True
  return regions, out_valid


# --- VinDr-CXR CSV → annotation boxes -----------------------------------------------------------------------

def _vindr_number(row: Mapping[str, str], key: str, where: str) -> float:
  try:
    v = float(row[key])
  except (TypeError, ValueError):
    raise records.DataError(f"{where}: {key} = {row[key]!r} is not a number.") from None
  if not math.isfinite(v):
    raise records.DataError(f"{where}: {key} = {row[key]!r} is not finite.")
  return v


def read_vindr_csv(path: str | pathlib.Path) -> dict[str, dict[str, Any]]:
  """``{image_id: {"boxes": [(x0, y0, x1, y1, row)], "size": (width, height) | None}}`` of a VinDr CSV."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise records.DataError(f"VinDr CSV {path} not found.")
  images: dict[str, dict[str, Any]] = {}
  with path.open(newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in _VINDR_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise records.DataError(f"VinDr CSV {path}: missing column(s) {missing} (has {reader.fieldnames}).")
    sized = {"width", "height"} <= set(reader.fieldnames)
    for row in reader:
      where = f"VinDr CSV {path}, row {reader.line_num}"
      if None in row or any(row[c] is None for c in _VINDR_COLUMNS):
        raise records.DataError(f"{where}: expected {len(reader.fieldnames)} fields.")
      image_id = row["image_id"].strip()
      if not image_id:
        raise records.DataError(f"{where}: empty image_id.")
      entry = images.setdefault(image_id, {"boxes": [], "size": None})
      if sized:
        size = (int(_vindr_number(row, "width", where)), int(_vindr_number(row, "height", where)))
        if min(size) <= 0 or entry["size"] not in (None, size):
          raise records.DataError(f"{where}: image size {size} (width, height) is not positive or differs from "
                                  f"an earlier row's {entry['size']} for image {image_id!r}.")
        entry["size"] = size
      coords = [row[c].strip() for c in _VINDR_COLUMNS[2:]]
      if row["class_name"].strip().lower() == _NO_FINDING or not any(coords):
        continue
      x0, y0, x1, y1 = (_vindr_number(row, c, where) for c in _VINDR_COLUMNS[2:])
      if not (x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0):
        raise records.DataError(f"{where}: box ({x0}, {y0}, {x1}, {y1}) needs 0 <= x_min < x_max and "
                                "0 <= y_min < y_max.")
      entry["boxes"].append((x0, y0, x1, y1, reader.line_num))
  return images


def _image_size(path: pathlib.Path, where: str) -> tuple[int, int]:
  try:
    with PIL.Image.open(path) as im:
      return im.size
  except Exception as e:  # PIL raises many types for damaged files  # pylint: disable=broad-except
    raise records.DataError(f"{where}: cannot read the image size of {path} ({type(e).__name__}: {e}).") from e


def vindr_boxes(csv_path: str | pathlib.Path, annotation: str | pathlib.Path, out: str | pathlib.Path, *,
                max_boxes: int | None = None, images_dir: str | pathlib.Path | None = None) -> dict[str, int]:
  """Writes ``out``: ``annotation`` with every record's box fields filled from the VinDr CSV (module docstring);
  returns the summary counts."""
  annotation = pathlib.Path(annotation)
  images_dir = pathlib.Path(images_dir) if images_dir else annotation.parent / records.IMAGES_DIR
  if max_boxes is not None and max_boxes < 1:
    raise records.DataError(f"--max-boxes={max_boxes}: must be at least 1.")
  ann = records.read_annotation(annotation)
  table = read_vindr_csv(csv_path)
  matched: dict[str, str] = {}
  for recs in ann.values():
    for r in recs:
      stem = pathlib.PurePosixPath(r["image_path"][0]).stem if r["image_path"] else None
      key = stem if stem in table else str(r["id"]) if str(r["id"]) in table else None
      if key is not None:
        matched[str(r["id"])] = key
  m = max_boxes or max([len(table[k]["boxes"]) for k in matched.values()] + [1])
  counts = {"records": 0, "with_boxes": 0, "no_finding": 0, "unmatched": 0, "truncated": 0,
            "csv_images_without_record": len(set(table) - set(matched.values())), "max_boxes": m}
  for split, recs in ann.items():
    for r in recs:
      rid = str(r["id"])
      where = f"record {rid!r} (split {split!r} of {annotation})"
      entry = table.get(matched.get(rid, ""), {"boxes": [], "size": None})
      if entry["size"] is not None:
        width, height = entry["size"]
      elif r["image_path"]:
        width, height = _image_size(images_dir / r["image_path"][0], where)
      else:
        raise records.DataError(f"{where}: no image_path to read the image size from.")
      for x0, y0, x1, y1, row in entry["boxes"]:
        if x1 > width + _TOLERANCE or y1 > height + _TOLERANCE:
          raise records.DataError(f"VinDr CSV {csv_path}, row {row}: box ({x0}, {y0}, {x1}, {y1}) is not inside "
                                  f"the {width} x {height} (width x height) image of {where}.")
      kept = entry["boxes"][:m]
      r["boxes"] = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1, _ in kept] + [list(EMPTY_SLOT)] * (m - len(kept))
      r["scores"] = [1.0] * len(kept) + [0.0] * (m - len(kept))
      r["height"], r["width"] = height, width
      counts["records"] += 1
      counts["with_boxes"] += bool(kept)
      counts["no_finding"] += rid in matched and not kept
      counts["unmatched"] += rid not in matched
      counts["truncated"] += len(entry["boxes"]) > m
  pathlib.Path(out).write_text(json.dumps(ann))
  return counts


def main(argv: Sequence[str] | None = None) -> int:
  from rrg_jax import cli  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m input_pipeline.boxes",
                                   description="Fill annotation.json box fields (Align2Gen).")
  sub = parser.add_subparsers(dest="command", required=True)
  vindr = sub.add_parser("vindr", help="boxes from a VinDr-CXR CSV")
  vindr.add_argument("--csv", required=True, help="CSV: image_id, class_name, x_min, y_min, x_max, y_max")
  vindr.add_argument("--annotation", required=True, help="R2Gen annotation.json to copy")
  vindr.add_argument("--out", required=True, help="annotation copy to write, with boxes/scores/height/width")
  vindr.add_argument("--max-boxes", type=int, default=None, help="slots per record (default: the largest count)")
  vindr.add_argument("--images", default=None, help="image folder for sizes (default: images/ next to it)")
  args = parser.parse_args(argv)

  def run():
    c = vindr_boxes(args.csv, args.annotation, args.out, max_boxes=args.max_boxes, images_dir=args.images)
    print(f"{args.out}: {c['records']} records, {c['max_boxes']} box slots each; {c['with_boxes']} with boxes, "
          f"{c['no_finding']} matched without boxes, {c['unmatched']} unmatched (all slots empty), "
          f"{c['truncated']} truncated to {c['max_boxes']} boxes; {c['csv_images_without_record']} CSV image(s) "
          "without a record.")

  return cli.run_main(run)


if __name__ == "__main__":
  raise SystemExit(main())
