"""CT-RATE's label and text side for CT-AGRG: tables, keys, sentence slots, collate, thresholds, reports.

Pure Python / numpy (ct_agrg_spec.md §2.1, §2.2, §2.5, §2.6, §7, §12.1–12.2, §13.7–13.9, §13.15).

* ``ABNORMALITIES``: the 18 label names in the order used everywhere (§2.5).
* Keys (§2.2, §2.6, §13.8). A CT-RATE volume is ``<split>_<patient>_<scan>_<recon>.nii.gz`` (``train_12_b_2.nii.gz``;
  patient and reconstruction are numbers). ``label_key``: a volume file's basename minus ``.npz``
  (``train_12_b_2.nii.gz.npz`` → ``train_12_b_2.nii.gz``); ``accession_from_sentence_name``: drop the last ``_``
  piece; ``accession_from_label_name``: cut at the first ``.``, then drop the last ``_`` piece (both →
  ``train_12_b``). Any other name is a ``DataError`` naming it (a bare accession ``train_12_b`` would silently
  become ``train_12`` in the original code).
* CSV readers (stdlib ``csv``): labels (first row of a VolumeName wins, as the code's lookup; the 18 columns by
  name; values 0/1), reports, metadata (raw strings), sentences (§9.2 format). Errors are ``records.DataError``
  naming the file, the row (its line number, the header being line 1) and the column or value.
* ``text_slots``: the 18 per-accession target strings of §2.6, ``"<|endoftext|>" + clean(Findings_EN) +
  "<|endoftext|>"`` at the abnormality's slot, ``""`` elsewhere; later rows overwrite earlier ones. An unknown
  ``AbnormalityName`` is an error (the code would grow a 19th slot and break every tensor shape).
* ``clean_sentence_text``: the CT-AGRG report cleaner (§2.6, §13.7). It is R2Gen's MIMIC-CXR cleaner
  (``input_pipeline.tokenizer.clean_report_mimic_cxr``) with one extra step: every ``"`` is deleted *before* the
  whole text is stripped and split on ``". "``. R2Gen deletes ``"`` only inside each piece, after the split, so the
  two differ on texts with a ``"``: ``Nodule." Next`` → ``nodule . next .`` here, ``nodule next .`` in R2Gen;
  ``Effusion. "`` → ``effusion .`` here, ``effusion .  .`` in R2Gen. No deletion placed before or after
  ``clean_report_mimic_cxr`` reproduces that step at its position (deleting ``"`` first changes what the
  space/underscore/dot collapsing sees: ``a " b`` → ``a  b .`` in both cleaners but ``a b .`` after a
  pre-deletion), so the chain is written out here.
* ``volume_records``: the samples, ``<volume_dir>/*/*/*.npz`` in **sorted** path order (the port's parity setting,
  §12.2; the code uses unsorted ``glob`` order), restricted to files whose label key is in the split's labels CSV
  (the §12.1 fix; the code takes every file and dies on one without a row). With a sentences CSV (stage 2) each
  record carries its accession's 18 slots; the accession is the volume's parent folder, which must be named
  exactly like the file's accession (``train_1_a`` for ``train_1_a_1.nii.gz.npz``): CT-CLIP's converter writes
  ``train_1a``, which the code silently turns into an empty stage-2 dataset — here it is an error naming the file.
* Tokens (§2.6, §13.9): ``encode_slot`` (GPT-2 byte-level BPE of ``input_pipeline.subword``, ``<|endoftext|>``
  recognised inside the text, truncated at 60 ids from the end), ``collate_slots`` → ``targets`` int32 (B, 18, T)
  filled with 50256, ``masks`` float32 (B, 18, T) one exactly over real tokens; ``T`` = the longest slot of the
  batch (0 when all are empty), or a fixed ``max_len`` for static shapes.
* Reports (§7 step 4, §7.2, §13.15): ``decode_sentence`` (ids → text as the code's ``batch_decode(...,
  skip_special_tokens=True, clean_up_tokenization_spaces=True)`` with transformers 4.53), ``assemble_report``
  (generated sentences in label order, single spaces, ``"`` removed, ``No abnormalities detected.`` when nothing is
  detected) and ``reference_report`` (the trainer's ground truth: the non-empty decoded target rows joined by single
  spaces).
* Thresholds (§7.4): ``read_thresholds`` / ``write_thresholds`` for ``{"thresholds": {name: value, ...}}`` with the
  names in label order (the code takes the values in the file's key order, so another order would silently
  permute them — refused here). ``best_f1_thresholds`` is a **reconstruction** (the code never computes
  thresholds, the paper's rule is unknown): per label, the threshold maximising the F1 of the strict rule
  ``p > τ`` on validation probabilities, see its docstring for the candidates and ties.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from input_pipeline import subword
from input_pipeline.records import DataError

ABNORMALITIES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
NUM_ABNORMALITIES = len(ABNORMALITIES)
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256  # GPT-2's <|endoftext|>: BOS = EOS = PAD of the targets
MAX_TOKENS = 60  # max_seq_length: truncation of each slot, decoding length
NO_ABNORMALITY_REPORT = "No abnormalities detected."
DEFAULT_THRESHOLD = 0.5
VOLUME_COLUMN = "VolumeName"
SENTENCE_COLUMNS = (VOLUME_COLUMN, "AbnormalityName", "Findings_EN")
REPORT_COLUMNS = (VOLUME_COLUMN, "Findings_EN")  # Impressions_EN, ClinicalInformation_EN, ... optional
NPZ_SUFFIX = ".npz"

_VOLUME_NAME = re.compile(r"[A-Za-z]+_\d+_[A-Za-z0-9]+_\d+\.nii\.gz")
_NAME_HINT = "expected a CT-RATE volume name <split>_<patient>_<scan>_<recon>.nii.gz such as train_1_a_1.nii.gz"

# The cleaner's whole-text replacements, in order: (old, new, times).
_CLEAN_REPLACEMENTS = (
    ("\n", " ", 1), ("__", "_", 7), ("  ", " ", 6), ("..", ".", 8), ("1. ", "", 1),
    (". 2. ", ". ", 1), (". 3. ", ". ", 1), (". 4. ", ". ", 1), (". 5. ", ". ", 1),
    (" 2. ", ". ", 1), (" 3. ", ". ", 1), (" 4. ", ". ", 1), (" 5. ", ". ", 1),
    ('"', "", 1),  # CT-AGRG's addition to R2Gen's chain
)
# R2Gen's per-sentence class ``[.,?;*!%^&_+():-\[\]{}]``: ``:-\[`` is a range, so ``<=>?@A-Z`` go and ``-`` stays.
_PIECE_DELETE = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_PIECE_QUOTES = re.compile(r"""["/\\']""")


# --- names and keys ------------------------------------------------------------------------------------------

def check_volume_name(name: str, where: str = "") -> str:
  """``name`` if it is a CT-RATE volume name (``train_1_a_1.nii.gz``), else ``DataError`` naming it."""
  if not isinstance(name, str) or not _VOLUME_NAME.fullmatch(name):
    raise DataError(f"{where + ': ' if where else ''}volume name {name!r}: {_NAME_HINT}.")
  return name


def label_key(npz_file_name: str | os.PathLike[str]) -> str:
  """The labels-CSV key of a volume file: its basename minus ``.npz`` (``train_12_b_2.nii.gz.npz`` →
  ``train_12_b_2.nii.gz``, §2.2)."""
  base = os.path.basename(os.fspath(npz_file_name))
  if not base.endswith(NPZ_SUFFIX):
    raise DataError(f"Volume file {npz_file_name}: expected <VolumeName>{NPZ_SUFFIX}, e.g. train_1_a_1.nii.gz.npz "
                    "(what np.savez('.../train_1_a_1.nii.gz', volume) writes).")
  return check_volume_name(base[:-len(NPZ_SUFFIX)], f"volume file {npz_file_name}")


def accession_from_sentence_name(name: str, where: str = "") -> str:
  """Sentences-CSV rule: drop the last ``_`` piece (``train_12_b_2.nii.gz`` → ``train_12_b``)."""
  return "_".join(check_volume_name(name, where).split("_")[:-1])


def accession_from_label_name(name: str, where: str = "") -> str:
  """Labels-CSV rule: cut at the first ``.``, drop the last ``_`` piece (``train_12_b_2.nii.gz`` → ``train_12_b``)."""
  return "_".join(check_volume_name(name, where).split(".")[0].split("_")[:-1])


# --- CSV tables ----------------------------------------------------------------------------------------------

def _read_csv(path: str | os.PathLike[str], required: Sequence[str], what: str
              ) -> tuple[list[str], list[tuple[str, dict[str, str | None]]]]:
  """``(header, [(where, row)])``; ``where`` = ``row N of <what> CSV <path>`` (N = the record's first line), a
  short row's missing fields are None. A missing file or column, a duplicate column, an over-long row → DataError."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{what} CSV {path} not found.")
  rows = []
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise DataError(f"{what} CSV {path} is empty (no header row).")
      while True:
        line = reader.line_num + 1
        values = next(reader, None)
        if values is None:
          break
        if not values:  # blank line
          continue
        where = f"row {line} of {what} CSV {path}"
        if len(values) > len(header):
          raise DataError(f"{where}: {len(values)} fields, but the header has {len(header)}.")
        rows.append((where, dict(itertools.zip_longest(header, values))))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{what} CSV {path} is not readable: {e}") from e
  duplicates = sorted({c for c in header if header.count(c) > 1})
  if duplicates:
    raise DataError(f"{what} CSV {path} has duplicate column(s) {duplicates}.")
  missing = [c for c in required if c not in header]
  if missing:
    raise DataError(f"{what} CSV {path} lacks column(s) {missing} (it has {header}).")
  return header, rows


def _text(value: str | None) -> str:
  """A text cell: an empty or missing one (pandas' NaN) → ``""``."""
  return "" if value is None or not value.strip() else value


def read_labels(csv_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """VolumeName → float32 (18,) in ``ABNORMALITIES`` order (columns taken by name), in file order; the first row
  of a repeated VolumeName wins (the code's lookup). A value other than 0/1 (``1.0`` is 1) → DataError naming the
  row and column."""
  _, rows = _read_csv(csv_path, (VOLUME_COLUMN, *ABNORMALITIES), "labels")
  out: dict[str, np.ndarray] = {}
  for where, row in rows:
    name = check_volume_name(row[VOLUME_COLUMN], where)
    values = np.zeros(NUM_ABNORMALITIES, np.float32)
    for k, column in enumerate(ABNORMALITIES):
      raw = row[column]
      try:
        value = float(raw)
      except (TypeError, ValueError):
        value = math.nan
      if value not in (0.0, 1.0):
        raise DataError(f"{where} ({name}): column {column!r} has {raw!r}, expected 0 or 1.")
      values[k] = value
    out.setdefault(name, values)
  return out


def read_reports(csv_path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
  """VolumeName → {column: text} for every other column (``Findings_EN``, ``Impressions_EN``,
  ``ClinicalInformation_EN``, ...; an empty cell → ``""``); first row wins."""
  header, rows = _read_csv(csv_path, REPORT_COLUMNS, "reports")
  out: dict[str, dict[str, str]] = {}
  for where, row in rows:
    name = check_volume_name(row[VOLUME_COLUMN], where)
    out.setdefault(name, {c: _text(row[c]) for c in header if c != VOLUME_COLUMN})
  return out


def read_metadata(csv_path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
  """VolumeName → {column: raw string} (``XYSpacing`` stays ``"[0.75, 0.75]"``; a missing cell → ``""``); first
  row wins."""
  header, rows = _read_csv(csv_path, (VOLUME_COLUMN,), "metadata")
  out: dict[str, dict[str, str]] = {}
  for where, row in rows:
    name = check_volume_name(row[VOLUME_COLUMN], where)
    out.setdefault(name, {c: row[c] or "" for c in header if c != VOLUME_COLUMN})
  return out


@dataclasses.dataclass(frozen=True)
class SentenceRow:
  """One row of a sentences CSV (§9.2): raw (uncleaned) ``text``; ``where`` names the file and row."""
  volume_name: str
  abnormality: str
  text: str
  where: str


def read_sentences(csv_path: str | os.PathLike[str]) -> list[SentenceRow]:
  """The rows of a sentences CSV (``VolumeName``, ``AbnormalityName``, ``Findings_EN``) in file order. The
  abnormality name is checked by ``text_slots``; an empty ``Findings_EN`` → DataError (the code crashes on it)."""
  _, rows = _read_csv(csv_path, SENTENCE_COLUMNS, "sentences")
  out = []
  for where, row in rows:
    name = check_volume_name(row[VOLUME_COLUMN], where)
    text = _text(row["Findings_EN"])
    if not text:
      raise DataError(f"{where} ({name}, {row['AbnormalityName']!r}): Findings_EN is empty.")
    out.append(SentenceRow(name, row["AbnormalityName"] or "", text, where))
  return out


def clean_sentence_text(text: str) -> str:
  """CT-AGRG's ``clean_report`` (§2.6): R2Gen's MIMIC-CXR chain with ``"`` deleted before the strip/split (module
  docstring), then per ``". "`` piece: delete ``"/\\'``, strip, lowercase, delete R2Gen's character class; pieces
  (empty ones kept) joined by ``" . "`` plus ``" ."``."""
  for old, new, times in _CLEAN_REPLACEMENTS:
    for _ in range(times):
      text = text.replace(old, new)
  pieces = text.strip().lower().split(". ")
  return " . ".join(_PIECE_DELETE.sub("", _PIECE_QUOTES.sub("", p).strip().lower()) for p in pieces) + " ."


def text_slots(sentences_rows: Iterable[SentenceRow], label_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
  """Accession → 18 target strings in label order (§2.6), for every accession of either CSV: ``""``, or
  ``"<|endoftext|>" + clean_sentence_text(text) + "<|endoftext|>"`` for the abnormality of a sentence row (a later
  row of the same accession and abnormality wins). ``label_names``: the labels CSV's VolumeNames. An unknown
  AbnormalityName → DataError naming the row and the value."""
  index = {name: k for k, name in enumerate(ABNORMALITIES)}
  slots: dict[str, list[str]] = {}
  for row in sentences_rows:
    k = index.get(row.abnormality)
    if k is None:
      raise DataError(f"{row.where}: AbnormalityName {row.abnormality!r} is not one of the 18 CT-RATE names "
                      f"{list(ABNORMALITIES)} (case and spelling exact).")
    accession = accession_from_sentence_name(row.volume_name, row.where)
    slots.setdefault(accession, [""] * NUM_ABNORMALITIES)[k] = ENDOFTEXT + clean_sentence_text(row.text) + ENDOFTEXT
  for name in label_names:
    slots.setdefault(accession_from_label_name(name), [""] * NUM_ABNORMALITIES)
  return {accession: tuple(texts) for accession, texts in slots.items()}


# --- samples -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VolumeRecord:
  """One volume file: absolute ``path``; ``name`` its basename (the id the trainer writes); ``labels`` float32
  (18,); ``texts`` its accession's 18 slot strings (stage 2) or None (stages 0/1)."""
  path: str
  name: str
  labels: np.ndarray
  texts: tuple[str, ...] | None = None


def volume_records(volume_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str],
                   sentences_csv: str | os.PathLike[str] | None = None) -> list[VolumeRecord]:
  """The split's samples: ``<volume_dir>/*/*/*.npz`` in sorted path order whose label key is in ``labels_csv``;
  with ``sentences_csv``, each with its accession's slots (``text_slots``; 18 ``""`` for an accession without
  sentence rows). Errors name the folder, file or row: a missing folder, a file name that is not
  ``<VolumeName>.npz``, (stage 2) a volume whose folder is not its accession."""
  folder = pathlib.Path(volume_dir).expanduser().absolute()
  if not folder.is_dir():
    raise DataError(f"Volume folder {folder} not found.")
  labels = read_labels(labels_csv)
  slots = None if sentences_csv is None else text_slots(read_sentences(sentences_csv), labels)
  out = []
  for path in sorted(glob.glob(os.path.join(glob.escape(str(folder)), "*", "*", "*" + NPZ_SUFFIX))):
    key = label_key(path)
    if key not in labels:
      continue
    texts = None
    if slots is not None:
      accession, parent = accession_from_label_name(key), os.path.basename(os.path.dirname(path))
      if parent != accession:
        raise DataError(f"Volume file {path} lies in folder {parent!r}, but stage 2 reads its sentences from the "
                        f"accession folder, which must be named {accession!r} (<split>_<patient>_<scan>; "
                        "CT-CLIP's converter writes e.g. train_1a, which the original code silently skips).")
      texts = slots[accession]
    out.append(VolumeRecord(path, os.path.basename(path), labels[key], texts))
  return out


# --- tokens --------------------------------------------------------------------------------------------------

def encode_slot(tokenizer: subword.SubwordTokenizer, text: str, max_length: int = MAX_TOKENS) -> list[int]:
  """Ids of one slot string (§2.6): GPT-2 byte-level BPE with ``<|endoftext|>`` as one special token inside the
  text, no other special added, cut to the first ``max_length`` ids (HF ``truncation=True``: a truncated slot
  loses its final ``<|endoftext|>``). A ``text_slots`` string gives ``[50256, BPE(cleaned), 50256]``, ``""``
  gives ``[]``. ``tokenizer``: ``input_pipeline.subword.load_tokenizer`` of the GPT-2 files."""
  if getattr(tokenizer, "family", None) != "gpt2" or tokenizer.token_to_id(ENDOFTEXT) is None:
    raise ValueError(f"encode_slot needs a GPT-2 byte-level BPE tokenizer with {ENDOFTEXT}, got {tokenizer!r}.")
  return tokenizer.encode(text, max_length=max_length)


def collate_slots(token_lists: Sequence[Sequence[Sequence[int]]], pad_id: int = ENDOFTEXT_ID,
                  max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``token_lists[b][k]``: the ids of slot k of example b (K = 18 slots each) →
  ``(targets int32 (B, K, T), masks float32 (B, K, T))``: ids left-aligned, the rest ``pad_id``; mask 1 exactly on
  real ids (BOS/EOS included). ``T`` = the longest slot of the batch (0 if every slot is empty), or ``max_len``
  (static shapes) — a longer slot is then a ValueError."""
  if not token_lists:
    raise ValueError("collate_slots needs at least one example.")
  num_slots = len(token_lists[0])
  for b, example in enumerate(token_lists):
    if len(example) != num_slots:
      raise ValueError(f"Example {b} has {len(example)} slots, example 0 has {num_slots}.")
  longest = max((len(s) for example in token_lists for s in example), default=0)
  if max_len is not None and longest > max_len:
    raise ValueError(f"A slot has {longest} tokens, more than max_len={max_len}.")
  length = longest if max_len is None else int(max_len)
  targets = np.full((len(token_lists), num_slots, length), pad_id, np.int32)
  masks = np.zeros((len(token_lists), num_slots, length), np.float32)
  for b, example in enumerate(token_lists):
    for k, ids in enumerate(example):
      targets[b, k, :len(ids)] = ids
      masks[b, k, :len(ids)] = 1.0
  return targets, masks


# --- reports -------------------------------------------------------------------------------------------------

def decode_sentence(tokenizer: subword.SubwordTokenizer, ids: Iterable[int]) -> str:
  """Text of one generated sentence or target row as the code decodes it (transformers 4.53 ``batch_decode`` with
  ``skip_special_tokens=True, clean_up_tokenization_spaces=True``): every special id dropped, then HF's
  ``clean_up_tokenization`` (``" ."`` → ``"."``, ...; transformers 5 no longer applies it to BPE tokenizers)."""
  return subword.clean_up_tokenization(tokenizer.decode(ids, skip_special_tokens=True))


def assemble_report(sentences_by_k: Mapping[int, str]) -> str:
  """The generated report (§7 step 4): the sentences of the detected abnormalities in label order joined by single
  spaces (an empty sentence still adds its space), every ``"`` removed; ``No abnormalities detected.`` when
  nothing is detected (empty mapping)."""
  bad = [k for k in sentences_by_k if not 0 <= k < NUM_ABNORMALITIES]
  if bad:
    raise ValueError(f"Abnormality indices {bad} are outside 0..{NUM_ABNORMALITIES - 1}.")
  if not sentences_by_k:
    return NO_ABNORMALITY_REPORT
  return " ".join(sentences_by_k[k] for k in sorted(sentences_by_k)).replace('"', "")


def reference_report(target_rows_decoded: Iterable[str]) -> str:
  """The trainer's ground truth of one volume (§7.2): its 18 decoded target rows (``decode_sentence``), non-empty
  ones joined by single spaces (``""`` for a healthy volume)."""
  return " ".join(s for s in target_rows_decoded if s)


# --- thresholds ----------------------------------------------------------------------------------------------

def _pairs_without_duplicates(path: pathlib.Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
  """A ``json`` object hook that refuses a repeated key (``json`` would keep the last one silently)."""
  def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
      raise DataError(f"Thresholds {path}: key(s) {repeated} appear more than once.")
    return dict(pairs)
  return hook


def read_thresholds(json_path: str | os.PathLike[str]) -> np.ndarray:
  """float32 (18,) from ``{"thresholds": {name: value, ...}}`` (§7.4). The names must be exactly the 18 of
  ``ABNORMALITIES`` in that order (the code takes values in file order), the values numbers in [0, 1]; anything
  else → DataError naming the file and the names or value."""
  path = pathlib.Path(json_path)
  if not path.is_file():
    raise DataError(f"Thresholds {path} not found.")
  try:
    data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_pairs_without_duplicates(path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"Thresholds {path} is not readable JSON: {e}") from e
  table = data.get("thresholds") if isinstance(data, dict) else None
  if not isinstance(table, dict):
    raise DataError(f"Thresholds {path}: expected {{\"thresholds\": {{abnormality name: value, ...}}}}.")
  missing = [n for n in ABNORMALITIES if n not in table]
  unknown = [n for n in table if n not in ABNORMALITIES]
  if missing or unknown:
    raise DataError(f"Thresholds {path}: missing name(s) {missing}, unknown name(s) {unknown}; the 18 names are "
                    f"{list(ABNORMALITIES)}.")
  order = list(table)
  if order != list(ABNORMALITIES):
    k = next(i for i, (a, b) in enumerate(zip(order, ABNORMALITIES)) if a != b)
    raise DataError(f"Thresholds {path}: names are in another order than the labels (position {k} holds "
                    f"{order[k]!r}, expected {ABNORMALITIES[k]!r}); the values are read in file order, so the "
                    "file must list them in label order.")
  for name, value in table.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise DataError(f"Thresholds {path}: {name!r} has {value!r}, expected a number in [0, 1].")
  return np.asarray([table[n] for n in ABNORMALITIES], np.float32)


def write_thresholds(path: str | os.PathLike[str], values: Sequence[float] | np.ndarray) -> pathlib.Path:
  """Writes float (18,) thresholds as ``{"thresholds": {name: value}}`` in label order; returns the path."""
  arr = np.asarray(values, np.float32)
  if arr.shape != (NUM_ABNORMALITIES,) or not np.all((arr >= 0) & (arr <= 1)):
    raise ValueError(f"Thresholds must be {NUM_ABNORMALITIES} numbers in [0, 1], got shape {arr.shape}: {arr}.")
  path = pathlib.Path(path)
  path.write_text(json.dumps({"thresholds": {n: float(v) for n, v in zip(ABNORMALITIES, arr)}}, indent=2) + "\n",
                  encoding="utf-8")
  return path


def best_f1_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per label, the threshold maximising the F1 of ``p > τ`` on (validation) probabilities — a reconstruction (the
  code and paper give no rule). ``probs`` float (N, K) in [0, 1], ``labels`` 0/1 (N, K) → float32 (K,).

  Probabilities are compared in float32, as at inference. Candidates for a label: the midpoints between consecutive
  distinct values of its probabilities together with 0 and 1 (every split of the sorted probabilities a
  threshold in [0, 1) can make, each once; a float32 midpoint that rounds up onto the upper value is replaced by the
  lower value, which makes the same split). The first (smallest) candidate with the largest F1 = 2TP / (2TP + FP +
  FN) wins; a label whose best F1 is 0 (no positives, or no positive above 0) gets ``DEFAULT_THRESHOLD`` (0.5).
  """
  p = np.asarray(probs, np.float32)
  y = np.asarray(labels)
  if p.ndim != 2 or y.shape != p.shape or p.shape[0] == 0:
    raise ValueError(f"probs and labels must be (N, K) with N > 0 and equal shapes, got {p.shape} and {y.shape}.")
  if not np.all(np.isfinite(p) & (p >= 0) & (p <= 1)):
    raise ValueError("probs must be finite probabilities in [0, 1].")
  if not np.all((y == 0) | (y == 1)):
    raise ValueError("labels must be 0 or 1.")
  out = np.full(p.shape[1], DEFAULT_THRESHOLD, np.float32)
  for k in range(p.shape[1]):
    column, positive = p[:, k], y[:, k] == 1
    pos, neg = np.sort(column[positive]), np.sort(column[~positive])
    values = np.unique(np.concatenate([column, np.float32([0.0, 1.0])]))
    middle = values[:-1] + (values[1:] - values[:-1]) / np.float32(2)
    candidates = np.where(middle < values[1:], middle, values[:-1])
    tp = pos.size - np.searchsorted(pos, candidates, side="right")
    fp = neg.size - np.searchsorted(neg, candidates, side="right")
    f1 = 2.0 * tp / np.maximum(tp + fp + pos.size, 1)
    best = int(np.argmax(f1))
    if f1[best] > 0:
      out[k] = candidates[best]
  return out
