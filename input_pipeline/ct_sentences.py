"""Rule-based per-abnormality sentence extractor and report labeler for CT-RATE (ct_agrg_spec.md §8, §9.2, §9.3).

A **reconstruction**: CT-AGRG's code contains no extractor and no labeler (§9.1; its README points to CT-RATE's
RadBERT classifier). This module follows the rules of §9.3:

1. Sentences: the text is split after a run of ``.`` followed by whitespace or the end of the text, and at ``;``
   (so a decimal point, ``4.5 mm``, never splits); pieces are stripped, empty ones dropped, the original text kept.
2. Lexicons: one case-insensitive, word-bounded regex per abnormality, exactly the keywords §9.3 lists
   (``LEXICONS``). Arterial wall calcification needs a calcification term (calcif*, atheroma*, atheroscler*)
   *and*, in the same clause, a vessel word (aort*, arter*, carotid, subclavian, brachiocephalic, iliac, vascular)
   other than "coronary arter*", so a sentence naming only coronary arteries does not count; coronary artery wall
   calcification needs "coronary" and calcif*/atheroma*/atheroscler*/plaque in the same clause.
3. Negation per clause (a sentence split at ``;``, ``, but``, `` however``): a keyword match is negated when a
   leading cue (no, not, without, absence of, free of, negative for) occurs before it in its clause, or a trailing
   cue ((was|were|is|are) not (observed|detected|seen|present|identified|noted), not (enlarged|increased), within
   normal limits; for cardiomegaly also "normal") occurs at or after it. Hedges (possible, suspicious for,
   compatible with) are not cues, so hedged findings count as positive. Known limit of clause-level scope: a cue
   also reaches a second finding joined by a comma ("No effusion, and atelectasis" negates the atelectasis).
4. ``extract_sentences``: for each label-positive abnormality, its non-negated matching sentences of Findings_EN in
   report order, else of Impressions_EN, else none; several are joined with ``". "`` and end with ``"."``. One
   sentence may serve several abnormalities ("Calcific plaques in the aorta and coronary arteries." → k = 1, 4).
5. ``coverage``: per abnormality, label-positive volumes that received a sentence.

``label_report(text)`` is the same lexicon and negation as a report labeler (the fallback clinical-efficacy labeler
of §8): an abnormality is positive iff some sentence has a non-negated match.

Command line (writes the §9.2 sentences CSV — ``VolumeName, AbnormalityName, Findings_EN``, one row per
label-positive abnormality with a sentence, for the first volume of each accession in the labels CSV — and prints
the coverage per abnormality)::

    python -m input_pipeline.ct_sentences --reports train_reports.csv --labels train_labels.csv \\
        --out train_sentences.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from input_pipeline import ct_rate
from input_pipeline.records import DataError

_FLAGS = re.IGNORECASE
_CALCIFICATION = r"\b(?:calcif\w*|atheroma\w*|atheroscler\w*)"
# One regex per abnormality, in ct_rate.ABNORMALITIES order (k = 1 and 4: the finding term; the vessel word each
# also needs is in _CONTEXT).
LEXICONS = (
    # 0 Medical material
    r"\b(?:catheters?|stents?|pacemakers?|ports?|cannula[es]?|(?:chest|endotracheal|nasogastric)\s+tubes?|drains?"
    r"|prosthe(?:sis|ses|tic)|(?:sternotomy|sternal)\s+wires?|surgical\s+(?:clips?|sutures?|materials?)|grafts?"
    r"|valve\s+replacements?|implants?|coils?|metallic\s+(?:materials?|densit(?:y|ies))|mesh|electrodes?)\b",
    # 1 Arterial wall calcification (+ a non-coronary vessel word)
    _CALCIFICATION,
    # 2 Cardiomegaly
    r"\bcardiomegaly\b|\bheart\s+(?:size|contours?|dimensions?)\b[^,;]*?\b(?:increased|enlarged)\b"
    r"|\benlarged\s+heart\b|\bincreased\s+cardiothoracic\s+ratio\b",
    # 3 Pericardial effusion
    r"\bpericardial\s+(?:effusions?|fluid)\b|\beffusions?\s+in\s+the\s+pericardi\w*",
    # 4 Coronary artery wall calcification (+ "coronary")
    _CALCIFICATION + r"|\bplaques?\b",
    # 5 Hiatal hernia
    r"\bhiat(?:al|us)\s+hernias?\b",
    # 6 Lymphadenopathy
    r"\blymphadenopath\w*|\b(?:enlarged|pathologic(?:al)?(?:[- ]sized)?|conglomerate)\s+lymph\s+nodes?\b"
    r"|\blymph\s+nodes?\b.*?(?:\bshort\s+axis\b|\bmeasuring\b.*?\bmm\b)",
    # 7 Emphysema
    r"\bemphysema\w*|\bbull(?:a|ae|ous)\b",
    # 8 Atelectasis (subsegmental atelectasis, fibroatelectasis, ...)
    r"\b\w*atelecta\w*",
    # 9 Lung nodule
    r"\b(?:micro)?nodule\w*|\bnodular\s+(?:lesions?|densit(?:y|ies))\b",
    # 10 Lung opacity
    r"\bopacit\w*|\bground[- ]glass\b|\bdensity\s+increases?\b|\binfiltrat\w*",
    # 11 Pulmonary fibrotic sequela
    r"\bfibro(?:sis|tic)\b|\bsequela\w*|\bparenchymal\s+bands?\b|\bscar\w*",
    # 12 Pleural effusion
    r"\bpleural\s+(?:effusions?|fluid)\b",
    # 13 Mosaic attenuation pattern
    r"\bmosaic\s+(?:attenuation|perfusion|pattern)\b",
    # 14 Peribronchial thickening
    r"\bperibronchial\s+(?:wall\s+)?thickening\b|\bbronchial\s+wall\s+thickening\b",
    # 15 Consolidation
    r"\bconsolidat\w*",
    # 16 Bronchiectasis
    r"\bbronchiectas\w*|\bbronchiectatic\b",
    # 17 Interlobular septal thickening
    r"\b(?:interlobular\s+)?septal\s+thickening\b|\bthickening\s+of\s+the\s+interlobular\s+septa\b",
)
_TERMS = tuple(re.compile(p, _FLAGS) for p in LEXICONS)
# k → (a word that must also occur in the clause, a phrase removed from the clause before looking for it).
_CONTEXT = {
    1: (re.compile(r"\b(?:aort\w*|arter\w*|carotid|subclavian|brachiocephalic|iliac|vascular)\b", _FLAGS),
        re.compile(r"\bcoronary\s+arter\w*", _FLAGS)),
    4: (re.compile(r"\bcoronary\b", _FLAGS), None),
}
_LEADING_CUE = re.compile(r"\b(?:no|not|without|absence\s+of|free\s+of|negative\s+for)\b", _FLAGS)
_TRAILING = (r"\b(?:(?:was|were|is|are)\s+not\s+(?:observed|detected|seen|present|identified|noted)"
             r"|not\s+(?:enlarged|increased)|within\s+normal\s+limits)\b")
_TRAILING_CUE = re.compile(_TRAILING, _FLAGS)
_TRAILING_CUES = {2: re.compile(_TRAILING + r"|\bnormal\b", _FLAGS)}  # k → its own trailing cues (heart size)
_SENTENCE_END = re.compile(r"\.+(?=\s|$)|;")
_CLAUSE_END = re.compile(r";|,\s*but\b|\s+however\b", _FLAGS)


def split_sentences(text: str) -> list[str]:
  """Step 1: the stripped, non-empty pieces of ``text`` between sentence ends (``.``-runs before whitespace or the
  end, and ``;``), original text without the ending punctuation."""
  return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _clause_has(k: int, clause: str) -> bool:
  """Whether ``clause`` has a non-negated match of abnormality ``k``."""
  if k in _CONTEXT:
    word, masked = _CONTEXT[k]
    if not word.search(masked.sub(" ", clause) if masked else clause):
      return False
  trailing = _TRAILING_CUES.get(k, _TRAILING_CUE)
  for m in _TERMS[k].finditer(clause):
    if not _LEADING_CUE.search(clause, 0, m.start()) and not trailing.search(clause, m.start()):
      return True
  return False


def sentence_labels(sentence: str) -> np.ndarray:
  """bool (18,): the abnormalities with a non-negated match in some clause of ``sentence``."""
  clauses = _CLAUSE_END.split(sentence)
  return np.array([any(_clause_has(k, c) for c in clauses) for k in range(ct_rate.NUM_ABNORMALITIES)])


def label_report(text: str) -> np.ndarray:
  """float32 (18,): 1 for every abnormality some sentence of ``text`` states (non-negated), else 0."""
  out = np.zeros(ct_rate.NUM_ABNORMALITIES, np.float32)
  for sentence in split_sentences(text):
    out[sentence_labels(sentence)] = 1.0
  return out


def extract_sentences(findings: str, impressions: str, labels: np.ndarray | Sequence[float]) -> dict[int, str]:
  """k → the raw sentence text for every label-positive k (``labels`` 0/1 (18,)) with a matching sentence: the
  non-negated matches in ``findings`` (report order), else in ``impressions``, joined with ``". "`` plus ``"."``."""
  y = np.asarray(labels)
  if y.shape != (ct_rate.NUM_ABNORMALITIES,) or not np.all((y == 0) | (y == 1)):
    raise ValueError(f"labels must be 0/1 of shape ({ct_rate.NUM_ABNORMALITIES},), got {y!r}.")
  sources = [[(s, sentence_labels(s)) for s in split_sentences(text)] for text in (findings, impressions)]
  out = {}
  for k in np.flatnonzero(y == 1).tolist():
    for sentences in sources:
      chosen = [s for s, found in sentences if found[k]]
      if chosen:
        out[k] = ". ".join(chosen) + "."
        break
  return out


@dataclasses.dataclass(frozen=True)
class Coverage:
  """Over ``volumes`` volumes, per abnormality (int64 (18,)): ``positives`` label-positive volumes, ``covered``
  those that received a sentence."""
  volumes: int
  positives: np.ndarray
  covered: np.ndarray

  def fractions(self) -> np.ndarray:
    """float64 (18,): covered / positives, NaN without positives."""
    return np.where(self.positives > 0, self.covered / np.maximum(self.positives, 1), np.nan)

  def table(self) -> str:
    """One line per abnormality: name, positives, covered, percentage."""
    lines = [f"{'abnormality':36s} {'positives':>9s} {'covered':>9s} {'coverage':>9s}"]
    for name, p, c, f in zip(ct_rate.ABNORMALITIES, self.positives, self.covered, self.fractions()):
      lines.append(f"{name:36s} {p:9d} {c:9d} {'-' if np.isnan(f) else f'{100 * f:.1f}%':>9s}")
    return "\n".join(lines)


def coverage(labels: np.ndarray, extracted: Sequence[Mapping[int, str]]) -> Coverage:
  """``labels`` 0/1 (N, 18) and the N ``extract_sentences`` results → ``Coverage``."""
  y = np.asarray(labels) == 1
  if y.shape != (len(extracted), ct_rate.NUM_ABNORMALITIES):
    raise ValueError(f"labels {y.shape} do not match {len(extracted)} extractions of "
                     f"{ct_rate.NUM_ABNORMALITIES} abnormalities.")
  found = np.zeros(y.shape, bool)
  for i, sentences in enumerate(extracted):
    found[i, list(sentences)] = True
  return Coverage(len(extracted), y.sum(0).astype(np.int64), (y & found).sum(0).astype(np.int64))


def build_sentences_csv(reports_csv: str | os.PathLike[str], labels_csv: str | os.PathLike[str],
                        out_csv: str | os.PathLike[str]) -> tuple[int, Coverage]:
  """Writes the §9.2 sentences CSV for the first volume of each accession of ``labels_csv`` (its labels and its
  report); returns (rows written, coverage over those volumes). A volume without a report → DataError."""
  labels = ct_rate.read_labels(labels_csv)
  reports = ct_rate.read_reports(reports_csv)
  firsts: dict[str, str] = {}
  for name in labels:
    firsts.setdefault(ct_rate.accession_from_label_name(name), name)
  rows, extracted = [], []
  for name in firsts.values():
    if name not in reports:
      raise DataError(f"Labels CSV {labels_csv} lists {name}, which has no row in reports CSV {reports_csv}.")
    report = reports[name]
    found = extract_sentences(report["Findings_EN"], report.get("Impressions_EN", ""), labels[name])
    extracted.append(found)
    rows.extend((name, ct_rate.ABNORMALITIES[k], text) for k, text in sorted(found.items()))
  out = pathlib.Path(out_csv)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(ct_rate.SENTENCE_COLUMNS)
    writer.writerows(rows)
  volume_labels = np.array([labels[n] for n in firsts.values()], np.float32).reshape(-1, ct_rate.NUM_ABNORMALITIES)
  return len(rows), coverage(volume_labels, extracted)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m input_pipeline.ct_sentences",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--reports", required=True, help="CT-RATE reports CSV (VolumeName, Findings_EN, "
                                                       "optional Impressions_EN)")
  parser.add_argument("--labels", required=True, help="CT-RATE multi-abnormality labels CSV of the same split")
  parser.add_argument("--out", required=True, help="sentences CSV to write (VolumeName, AbnormalityName, Findings_EN)")
  args = parser.parse_args(argv)
  from rrg_jax import cli  # pylint: disable=g-import-not-at-top

  def run() -> None:
    num_rows, stats = build_sentences_csv(args.reports, args.labels, args.out)
    print(f"wrote {num_rows} sentence rows for {stats.volumes} accessions to {args.out}")
    print(stats.table())

  return cli.run_main(run)


if __name__ == "__main__":
  sys.exit(main())
