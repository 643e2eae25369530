"""R2Gen-layout datasets: ``annotation.json``, optional ``labels.json`` and ``images/``, with validation.

Layout (``DATA_DIR``; ``""`` means the embedded sample at ``input_pipeline/sample_data``)::

    DATA_DIR/annotation.json   {"train"|"val"|"test": [{"id", "report", "image_path": [..], ...}]}
    DATA_DIR/labels.json       {id_key: [C numbers]}  or  {"classes": [C names], "labels": {id_key: [C numbers]}}
    DATA_DIR/images/<image_path>

The label key of a record is its id (rule ``"id"``: MIMIC, sample) or its first two ``-``-separated pieces
(rule ``"iu"``: ``CXR2372_IM-0933-0001`` -> ``CXR2372_IM-0933``). A record gives ``num_views`` images:
the first ``num_views`` entries of ``image_path`` (IU: 2; MIMIC: ``image_path[0]``).

Validation. Structural problems always raise ``DataError`` naming the file and record: unreadable JSON, a missing
split or record key, duplicate ids, label vectors of the wrong length, records without labels. Per-record
problems — a missing, unreadable or corrupt image file, too few images, an empty report — raise too with
``on_bad_record="error"``; with ``"skip"`` each skipped record is logged (warning) together with the count.
Images are checked when the split is loaded by reading their header (and, for PNG, every chunk's CRC via
PIL ``verify``); damage that only full decoding reveals raises ``DataError`` at decoding time.

CSV layout (RadGen spec §2.1; ``read_csv``): one CSV with columns ``Image`` (file name relative to an image
folder, surrounding spaces stripped), ``Category`` (a class name of the class map), optional ``fold`` (0..K-1)
and ``Impression`` (the report). Rows without ``Image`` or ``Category`` are dropped (counted in the log); an
empty ``Impression`` becomes ``"no finding"``; runs of whitespace in the report become single spaces (and the
ends are stripped, as the code's ``" ".join(report.split())``). Record id = the ``Image`` value; duplicates are
an error. A missing or unreadable image is a per-record problem naming the CSV row (never a black image).

Single-label class ids (RadGen §2.4, §2.7). A class map ``((class name, (source names, ...)), ...)`` lists the
classes in class-id order, which is also their priority: a record gets the first class one of whose source
names it carries — for a CSV its ``Category``, for an R2Gen folder the labels.json ``classes`` whose value is
positive for it; the source name ``"*"`` takes any record. ``Record.label`` is that id (-1 without a class
map); a CSV record's ``labels`` is its one-hot vector (C,). The embedded sample's three-class map is
``SAMPLE_CLASS_MAP``.

Boxes. With ``load_split(..., box_format=...)`` (the loader passes it when a configured feature reads boxes,
``input_pipeline.features``) a record's optional ``boxes``/``scores``/``height``/``width`` are validated by
``input_pipeline.boxes.parse_box_fields`` (a bad box is a per-record problem) and kept as ``Record.boxes``.

Images. ``decode_image`` returns mode ``"L"`` (any grayscale) or ``"RGB"`` (anything else, via PIL
``convert("RGB")``). 16-bit grayscale (PIL modes ``I;16*``/``I``) is mapped linearly from the full 16-bit range
to 8 bits, ``round(v * 255 / 65535)`` — the PNG convention that samples of lower bit depths are scaled to the
full range (a plain PIL ``convert`` would instead clip everything above 255 to white). Downstream, an ``"L"``
image gives the same pixels as its ``convert("RGB")`` (every PIL operation used acts per band), at a third of
the cost.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import pathlib
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
from absl import logging

if TYPE_CHECKING:
  from input_pipeline.boxes import BoxSet

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sample_data"
SPLITS = ("train", "val", "test")
LABEL_KEY_RULES = ("id", "iu")
ON_BAD_RECORD = ("error", "skip")
IMAGES_DIR = "images"
_RECORD_KEYS = ("id", "report", "image_path")
CSV_COLUMNS = ("Image", "Category", "Impression")  # required; "fold" is optional
NO_FINDING_REPORT = "no finding"
ANY_RECORD = "*"
ClassMap = tuple[tuple[str, tuple[str, ...]], ...]
CSV_CLASS_MAP: ClassMap = (("Normal", ("Normal",)), ("Pneumonia", ("Pneumonia",)), ("TB", ("TB",)))
SAMPLE_CLASS_MAP: ClassMap = (("Normal", ("No Finding",)), ("COVID-19", ("COVID-19",)),
                              ("Other pneumonia", (ANY_RECORD,)))
# round(v * 255 / 65535) == (v + 128) // 257 for every 16-bit v (65535 = 255 * 257, no ties).
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


class DataError(ValueError):
  """A dataset file or record is malformed; the message names the file and the record."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One study. ``image_paths`` are absolute; ``labels`` float32 (C,) (C = 0 without labels.json); ``boxes``
  the annotation's box fields (``input_pipeline.boxes``), None when the record has none or they were not read;
  ``label`` the single-label class id of the class map (-1 without one); ``fold`` the cross-validation fold
  (-1 = none given or assigned, ``input_pipeline.sampling.assign_folds``)."""
  id: str
  report: str
  image_paths: tuple[str, ...]
  labels: np.ndarray
  boxes: BoxSet | None = None
  label: int = -1
  fold: int = -1


def resolve_data_dir(data_dir: str | pathlib.Path) -> pathlib.Path:
  """``""`` → the embedded sample (independent of the working directory); else the given folder."""
  return SAMPLE_DIR if not str(data_dir) else pathlib.Path(data_dir).expanduser().absolute()


def label_key(record_id: str, rule: str) -> str:
  """The labels.json key of a record id under ``rule`` (``"id"`` or ``"iu"``)."""
  if rule == "id":
    return record_id
  if rule == "iu":
    return "-".join(record_id.split("-")[:2])
  raise DataError(f"Unknown label key rule {rule!r}; choose one of {LABEL_KEY_RULES}.")


def _read_json(path: pathlib.Path, what: str) -> Any:
  if not path.is_file():
    raise DataError(f"{what} {path} not found.")
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{what} {path} is not readable JSON: {e}") from e


def read_annotation(path: str | pathlib.Path) -> dict[str, list[dict[str, Any]]]:
  """Reads and checks an R2Gen annotation.json: split lists of records with id/report/image_path, ids unique."""
  path = pathlib.Path(path)
  data = _read_json(path, "Annotation")
  if not isinstance(data, dict):
    raise DataError(f"Annotation {path}: expected a JSON object with split lists, got {type(data).__name__}.")
  seen: dict[str, str] = {}
  for split, records in data.items():
    if not isinstance(records, list):
      raise DataError(f"Annotation {path}: split {split!r} is not a list of records.")
    for i, r in enumerate(records):
      missing = [k for k in _RECORD_KEYS if not isinstance(r, dict) or k not in r]
      if missing:
        raise DataError(f"Annotation {path}: record {i} of split {split!r} "
                        f"({r.get('id', '?') if isinstance(r, dict) else r!r}) lacks key(s) {missing}.")
      rid = str(r["id"])
      if rid in seen:
        raise DataError(f"Annotation {path}: duplicate id {rid!r} (split {split!r} and split {seen[rid]!r}).")
      seen[rid] = split
      if not isinstance(r["image_path"], list) or not all(isinstance(p, str) for p in r["image_path"]):
        raise DataError(f"Annotation {path}: record {rid!r}: image_path must be a list of strings.")
      if not isinstance(r["report"], str):
        raise DataError(f"Annotation {path}: record {rid!r}: report must be a string.")
  return data


def read_labels(path: str | pathlib.Path, num_classes: int | None = None
                ) -> tuple[list[str] | None, dict[str, np.ndarray]]:
  """Reads labels.json in either form; returns ``(classes or None, {key: float32 (C,)})``.

  Every vector must have the same length C (= ``len(classes)`` when given, = ``num_classes`` when given).
  """
  path = pathlib.Path(path)
  data = _read_json(path, "Labels")
  classes = None
  if isinstance(data, dict) and "labels" in data and isinstance(data.get("labels"), dict):
    classes = data.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
      raise DataError(f"Labels {path}: 'classes' must be a list of names.")
    data = data["labels"]
  if not isinstance(data, dict):
    raise DataError(f"Labels {path}: expected {{id: [numbers]}} or {{'classes': [...], 'labels': {{...}}}}.")
  expected = len(classes) if classes is not None else num_classes
  if classes is not None and num_classes is not None and len(classes) != num_classes:
    raise DataError(f"Labels {path} has {len(classes)} classes but the config expects {num_classes} "
                    "(config.model.num_classes).")
  out = {}
  for key, vec in data.items():
    try:
      arr = np.asarray(vec, dtype=np.float32)
    except (TypeError, ValueError) as e:
      raise DataError(f"Labels {path}: entry {key!r} is not a list of numbers: {e}") from e
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
      raise DataError(f"Labels {path}: entry {key!r} must be a flat list of finite numbers.")
    if expected is None:
      expected = arr.shape[0]
    if arr.shape[0] != expected:
      raise DataError(f"Labels {path}: entry {key!r} has {arr.shape[0]} values, expected {expected}.")
    out[str(key)] = arr
  return classes, out


def parse_class_map(value: Any) -> ClassMap:
  """``config.data.class_map`` (pairs ``(name, (source names...))``, JSON lists accepted) → ``ClassMap``."""
  ok = isinstance(value, (list, tuple)) and all(
      isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], (list, tuple))
      and p[1] and all(isinstance(x, str) for x in p[1]) for p in value)
  out = tuple((name, tuple(sources)) for name, sources in value) if ok else ()
  if not ok or len({name for name, _ in out}) != len(out):
    raise DataError(f"config.data.class_map={value!r}: expected ((class name, (source names, ...)), ...) with "
                    "distinct class names and a non-empty list of source names each.")
  return out


def class_id(findings: Collection[str], class_map: ClassMap, where: str) -> int:
  """The first class (priority = class-id order) one of whose source names is in ``findings`` or is ``"*"``."""
  for c, (_, sources) in enumerate(class_map):
    if ANY_RECORD in sources or any(s in findings for s in sources):
      return c
  raise DataError(f"{where}: {sorted(findings)} match no class of config.data.class_map "
                  f"{[n for n, _ in class_map]}.")


def _check_sources(class_map: ClassMap, known: Collection[str], where: str) -> None:
  unknown = sorted({s for _, src in class_map for s in src if s != ANY_RECORD and s not in known})
  if unknown:
    raise DataError(f"config.data.class_map names {unknown}, which {where} does not have ({sorted(known)}).")


def image_problem(path: str | pathlib.Path) -> str | None:
  """Why the image file at ``path`` is unusable (missing, unreadable, corrupt), or None if it looks fine."""
  path = pathlib.Path(path)
  if not path.is_file():
    return "image file not found"
  try:
    with PIL.Image.open(path) as im:
      im.verify()
  except Exception as e:  # PIL raises many types for damaged files  # pylint: disable=broad-except
    return f"unreadable or corrupt image ({type(e).__name__}: {e})"
  return None


def decode_image(data: bytes, where: str) -> PIL.Image.Image:
  """Encoded PNG/JPEG/... bytes → PIL image in mode ``"L"`` (grayscale, 16-bit scaled) or ``"RGB"``."""
  try:
    im = PIL.Image.open(io.BytesIO(data))
    im.load()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"Cannot decode image {where}: {type(e).__name__}: {e}") from e
  if im.mode == "L":
    return im
  if im.mode.startswith("I"):
    a = np.asarray(im)
    if a.dtype != np.uint16:
      a = np.clip(a, 0, 65535).astype(np.uint16)
    return PIL.Image.fromarray(_SIXTEEN_TO_EIGHT[a], "L")
  if im.mode == "LA":
    return im.convert("L")
  return im.convert("RGB")


def _bad(on_bad_record: str, problems: list[str], where: str) -> None:
  if not problems:
    return
  if on_bad_record == "error":
    raise DataError(problems[0] + " Set config.data.on_bad_record='skip' to leave such records out.")
  for p in problems:
    logging.warning("Skipping record: %s", p)
  logging.warning("Skipped %d bad record(s) of %s.", len(problems), where)


def _usable(candidates: Sequence[tuple[Record, str]], problems: list[str], on_bad_record: str,
            what: str) -> list[Record]:
  """The ``(record, where)`` candidates whose image files are all usable (checked in parallel); the others and
  the earlier ``problems`` raise or are skipped per ``on_bad_record``; ``what`` names the data in messages."""
  flat = [p for rec, _ in candidates for p in rec.image_paths]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    status = dict(zip(flat, pool.map(image_problem, flat)))
  out = []
  for rec, where in candidates:
    bad = [f"{where}: {status[p]}: {p}" for p in rec.image_paths if status[p]]
    if bad:
      problems.append(bad[0])
    else:
      out.append(rec)
  _bad(on_bad_record, problems, what)
  if not out:
    raise DataError(f"{what[0].upper()}{what[1:]} has no usable records.")
  return out


def _check_on_bad_record(on_bad_record: str) -> None:
  if on_bad_record not in ON_BAD_RECORD:
    raise DataError(f"config.data.on_bad_record={on_bad_record!r}; choose one of {ON_BAD_RECORD}.")


def load_split(data_dir: str | pathlib.Path, split: str, *, annotation: str = "annotation.json",
               labels: str = "labels.json", label_key_rule: str = "id", num_views: int = 1,
               num_classes: int | None = None, on_bad_record: str = "error",
               box_format: str | None = None, class_map: ClassMap = ()) -> list[Record]:
  """The validated records of ``split`` (annotation order); see the module docstring for the rules.

  ``box_format`` (``input_pipeline.boxes.FORMATS``): read and validate the records' box fields in that layout (a
  bad box is a per-record problem); None leaves them unread. ``class_map``: set each ``Record.label`` from the
  labels.json findings (its ``classes`` form is then required).
  """
  from input_pipeline import boxes  # pylint: disable=g-import-not-at-top  (boxes imports this module)

  if box_format is not None:
    boxes.check_format(box_format)
  _check_on_bad_record(on_bad_record)
  root = resolve_data_dir(data_dir)
  ann_path = root / annotation
  ann = read_annotation(ann_path)
  if split not in ann:
    raise DataError(f"Annotation {ann_path} has no split {split!r} (it has {sorted(ann)}).")
  if labels:
    lab_path = root / labels
    classes, table = read_labels(lab_path, num_classes)
  else:
    lab_path, classes, table = None, None, {}
  if class_map:
    if classes is None:
      raise DataError("config.data.class_map maps finding names, which need a labels.json of the form "
                      f"{{'classes': [...], 'labels': {{...}}}} ({lab_path or 'config.data.labels is empty'}).")
    _check_sources(class_map, classes, f"labels {lab_path}")
  images = root / IMAGES_DIR
  problems: list[str] = []
  candidates: list[tuple[Record, str]] = []
  for r in ann[split]:
    rid = str(r["id"])
    where = f"record {rid!r} (split {split!r} of {ann_path})"
    if lab_path is not None:
      key = label_key(rid, label_key_rule)
      if key not in table:
        raise DataError(f"Labels {lab_path} have no entry {key!r} for {where} (label key rule "
                        f"{label_key_rule!r}).")
      vec = table[key]
    else:
      vec = np.zeros((num_classes or 0,), np.float32)
    if not r["report"].strip():
      problems.append(f"{where}: the report is empty.")
      continue
    if len(r["image_path"]) < num_views:
      problems.append(f"{where}: {len(r['image_path'])} image(s) listed, {num_views} view(s) needed.")
      continue
    box_set = None
    if box_format is not None:
      try:
        box_set = boxes.parse_box_fields(r, box_format=box_format, where=where)
      except DataError as e:
        problems.append(str(e))
        continue
    label = class_id({n for n, v in zip(classes, vec) if v > 0}, class_map, where) if class_map else -1
    paths = tuple(str(images / p) for p in r["image_path"][:num_views])
    candidates.append((Record(rid, r["report"], paths, vec, box_set, label), where))
  return _usable(candidates, problems, on_bad_record, f"split {split!r} of {ann_path}")


def read_csv(path: str | pathlib.Path, image_dir: str | pathlib.Path, *, class_map: ClassMap = CSV_CLASS_MAP,
             on_bad_record: str = "error") -> list[Record]:
  """The validated records of a RadGen CSV (spec §2.1, rules in the module docstring), in row order, with
  ``label`` (class map over ``Category``), one-hot ``labels`` float32 (C,) and ``fold`` (-1 without a ``fold``
  column). Structural problems (no such file, a missing column, an unknown category, a bad fold, a duplicate
  image) raise ``DataError`` naming the file and row; unusable images follow ``on_bad_record``."""
  _check_on_bad_record(on_bad_record)
  path, images = pathlib.Path(path), pathlib.Path(image_dir)
  if not path.is_file():
    raise DataError(f"CSV {path} not found.")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      rows = [(reader.line_num, row) for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"CSV {path} is not readable: {e}") from e
  columns = reader.fieldnames or []
  missing = [c for c in CSV_COLUMNS if c not in columns]
  if missing:
    raise DataError(f"CSV {path} lacks column(s) {missing} (it has {columns}).")
  one_hot = np.eye(len(class_map), dtype=np.float32)
  seen: dict[str, int] = {}
  dropped = 0
  candidates: list[tuple[Record, str]] = []
  for line, row in rows:
    image, category = (row["Image"] or "").strip(), (row["Category"] or "").strip()
    if not image or not category:
      dropped += 1
      continue
    where = f"row {line} of CSV {path} (image {image!r})"
    if image in seen:
      raise DataError(f"{where}: the image is listed again (first on row {seen[image]}).")
    seen[image] = line
    label = class_id({category}, class_map, where)
    fold = -1
    if "fold" in columns:
      text = (row["fold"] or "").strip()
      if not (text.isascii() and text.isdigit()):
        raise DataError(f"{where}: fold {row['fold']!r} is not a non-negative integer.")
      fold = int(text)
    report = " ".join((row["Impression"] or "").split()) or NO_FINDING_REPORT
    candidates.append((Record(image, report, (str(images / image),), one_hot[label], None, label, fold), where))
  if dropped:
    logging.warning("Dropped %d row(s) of CSV %s without Image or Category.", dropped, path)
  return _usable(candidates, [], on_bad_record, f"CSV {path}")


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


class FolderSource(Sequence):
  """Grain random-access source over records: item ``i`` is the raw example of ``records[i]``.

  Raw example: ``{"id": str, "report": str, "images": tuple[bytes] (V encoded files), "image_names":
  tuple[str], "labels": float32 (C,)}`` — the same dict the TFDS source yields — plus ``"boxes":
  boxes.BoxSet`` for records whose box fields were read and ``"label": int`` for records with a class id
  (folder and CSV sources only).
  """

  def __init__(self, records: Sequence[Record]):
    self.records = list(records)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    rec = self.records[i]
    raw = {"id": rec.id, "report": rec.report, "images": tuple(read_bytes(p) for p in rec.image_paths),
           "image_names": rec.image_paths, "labels": rec.labels}
    if rec.boxes is not None:
      raw["boxes"] = rec.boxes
    if rec.label >= 0:
      raw["label"] = rec.label
    return raw
