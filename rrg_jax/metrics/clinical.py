"""Offline rule-based CheXpert-style labeler and clinical-efficacy (CE) metrics.

Observations (``OBSERVATIONS``, the alphabetical CheXpert order of labels.json, spec §2.4): Atelectasis,
Cardiomegaly, Consolidation, Edema, Enlarged Cardiomediastinum, Fracture, Lung Lesion, Lung Opacity, No Finding,
Pleural Effusion, Pleural Other, Pneumonia, Pneumothorax, Support Devices.

``label_report(text)`` → float32 (14,) with CheXpert's values: 1 positive, 0 negative, -1 uncertain, NaN not
mentioned. Rules:

1. *Sentences*: the lowercased report is split on ``.``, ``;``, ``?``, ``!`` and newlines; punctuation other than
   hyphens becomes spaces; each sentence is padded with one space on both sides.
2. *Mentions*: every phrase of ``chexpert_phrases/mention/<observation>.txt`` (stanfordmlgroup/chexpert-labeler,
   MIT), ``_`` read as a space, is searched as a substring (so ``"opaci"`` matches "opacity", ``"_line_"`` only
   the word "line"). A match overlapping an *unmention* phrase of the same observation is dropped: the files in
   ``chexpert_phrases/unmention/``, the labeler's positional unmentions for Cardiomegaly and Enlarged
   Cardiomediastinum (``"over the heart"``, ``"in the left mediastinum"``, ...) and our additions in
   ``EXTRA_UNMENTIONS`` (``"platelike"`` is no support-device *plate*, ...). Phrases of ``no_finding.txt`` are
   other findings: they only decide No Finding (rule 5).
3. *Scope*: a mention's clause is the text between the nearest clause breakers around it (``but``, ``however``,
   ``although``, ``though``, ``which``, ``except``, ``with``, ``and there``, ``there is``/``are``/``has``/``have``,
   ``:``; commas are not breakers, cleaned reports have none).
4. *Classification*, first rule that fires:
   a. Cardiomegaly / Enlarged Cardiomediastinum phrases that only name anatomy (``ANATOMY``: "the heart",
      "heart size", "cardiac silhouette", "contour", " mediastinum", ...) count only when the clause also holds an
      abnormality cue (``enlarg``, ``widen``, ``promin``, ``large``, ``increas``, ``cardiomegaly``, "upper
      limits of normal", "borderline"); without one they are negative when negated (rule c) and ignored
      otherwise ("the mediastinum is stable" is no finding).
   b. uncertain if a *negated uncertainty* cue is in the clause (``cannot be excluded``, ``not excluded``,
      ``cannot exclude``, ``not ruled out``, ``cannot rule out``, ``may not``);
   c. negative if a negation cue precedes the mention in its clause (``no``, ``not``, ``without``, ``negative
      for``, ``free of``, ``clear of``, ``absence of``, ``resolution of``, ``resolved``, ``removal of``,
      ``normal``, ``unremarkable``, ``nor``, ``none``, ``rather than``), or one follows it within 8 words
      (``normal``, ``unremarkable``, ``within normal limits``, ``not enlarged``, ``not seen``, ``not present``,
      ``not identified``, ``absent``, ``resolved``, ``removed``, ``negative``, ``no longer``);
   d. uncertain if an uncertainty cue precedes it in the clause (``may``, ``might``, ``could``, ``possible``,
      ``possibly``, ``probable``, ``likely``, ``suspicious``, ``suspected``, ``suggest...``, ``concerning``,
      ``question...``, ``equivocal``, ``borderline``, ``versus``, ``differential``, ``consider...``,
      ``compatible with``, ``cannot``, ``indeterminate``, ...) or follows it within 8 words (``versus``,
      ``suspected``, ``possible``, ``may``, ``likely``, ``questionable``, ...);
   e. otherwise positive.
5. *Aggregation* (as the labeler): several mentions of one observation → 1 if any is 1, else -1 if any is -1,
   else 0; a positive or uncertain "chf" / "heart failure" also adds an uncertain Cardiomegaly; No Finding is 1
   when no observation other than Support Devices is positive or uncertain, else NaN. (The labeler also lets the
   other findings of ``no_finding.txt`` — scoliosis, degenerative changes, granuloma, ... — block No Finding;
   ``other_findings_block_no_finding=True`` does that, but the IU pseudo-labels do not: F1 0.74 vs 0.90.)

CE metrics (``clinical_efficacy``): generated and reference reports are both labeled here and binarized with
positive = 1, uncertain = ``UNCERTAIN_AS`` = 1 (counted as positive, "U-Ones": it agrees better with the IU
pseudo-labels, mean F1 0.526 vs 0.482 with uncertain = 0) and NaN = 0; precision / recall / F1 are reported
micro-averaged over all (report, observation) pairs and macro-averaged over the 14 observations (zero division
→ 0, as scikit-learn with ``zero_division=0``).

Agreement with the IU pseudo-labels (``python -m rrg_jax.metrics.clinical DATA_DIR``: all 2955 records of
/work/shared/data/iu_xray, label key rule of spec §2.4; the pseudo-labels come from another labeler and are
noisy, e.g. "negative for pneumothorax" is labeled positive), accuracy / F1 of the positive class:

    Atelectasis 0.946 / 0.519        Cardiomegaly 0.962 / 0.746       Consolidation 0.993 / 0.512
    Edema 0.982 / 0.534              Enl. Cardiomediastinum 0.986 / 0.281   Fracture 0.972 / 0.178
    Lung Lesion 0.983 / 0.750        Lung Opacity 0.907 / 0.641       No Finding 0.862 / 0.902
    Pleural Effusion 0.985 / 0.762   Pleural Other 0.991 / 0.536      Pneumonia 0.962 / 0.307
    Pneumothorax 0.985 / 0.328       Support Devices 0.971 / 0.368
    mean accuracy 0.963, mean F1 0.526; micro precision 0.746, recall 0.812, F1 0.778.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np

OBSERVATIONS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices")
NO_FINDING = OBSERVATIONS.index("No Finding")
SUPPORT_DEVICES = OBSERVATIONS.index("Support Devices")
CARDIOMEGALY = OBSERVATIONS.index("Cardiomegaly")
ENLARGED_CM = OBSERVATIONS.index("Enlarged Cardiomediastinum")
UNCERTAIN_AS = 1.0
PHRASES_DIR = pathlib.Path(__file__).with_name("chexpert_phrases")

EXTRA_UNMENTIONS = {
    "Support Devices": ("platelike", "plate-like", "plate like", "endplate", "end plate", "support of", "supportive", "lines of",
                        "interstitial lines", "kerley", "septal lines", "linear", "coiled"),
    "Lung Opacity": ("opacified hemithorax",),
    "Enlarged Cardiomediastinum": ("bony contour", "diaphragm contour", "diaphragmatic contour"),
}

_BREAKERS = re.compile(r"\b(?:but|however|although|though|which|except|with|and there|there is|there are|"
                       r"there has|there have|there was|there were)\b|:")
_NEG_UNCERTAIN = re.compile(r"\b(?:cannot be excluded|can not be excluded|not be excluded|not excluded|"
                            r"cannot exclude|can not exclude|not ruled out|not be ruled out|cannot rule out|"
                            r"can not rule out|may not)\b")
_PRE_NEG = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|"
                      r"resolved|removal of|removed|normal|unremarkable|nor|never|none|rather than)\b")
_POST_NEG = re.compile(r"\b(?:normal|unremarkable|within normal limits|not enlarged|not seen|not present|"
                       r"not identified|not visualized|not demonstrated|absent|resolved|removed|negative|"
                       r"no longer)\b")
_PRE_UNC = re.compile(r"\b(?:may|might|could|possible|possibly|probable|probably|likely|suspicious|suspected|"
                      r"suspect|suggest\w*|concerning|question\w*|equivocal|borderline|versus|vs|differential|"
                      r"consider\w*|compatible with|cannot|uncertain|indeterminate|atypical)\b")
_POST_UNC = re.compile(r"\b(?:versus|vs|suspected|possible|may|might|could|likely|not excluded|is questioned|"
                       r"questionable|uncertain)\b")
_POST_WINDOW = 8
# Cardiomegaly / Enlarged Cardiomediastinum phrases that name anatomy, not a finding (rule 4e).
ANATOMY = frozenset({"the heart", "heart size", "cardiac size", "cardiac shadow", "cardiac contour",
                     "cardiac silhouette", " mediastinum", "cardiomediastinum", "contour", "mediastinal configuration",
                     "mediastinal silhouette", "pericardial silhouette", "cardiac silhouette and vascularity"})
_ABNORMAL = re.compile(r"(?:enlarg|widen|promin|large|increas|big|cardiomegaly|upper limits? of normal|"
                       r"top normal|top-normal|borderline)")


def _read_phrases(kind: str) -> dict[str, list[str]]:
  out = {}
  for name in OBSERVATIONS:
    path = PHRASES_DIR / kind / (name.lower().replace(" ", "_") + ".txt")
    lines = path.read_text().splitlines() if path.is_file() else []
    out[name] = [ln.strip().replace("_", " ") for ln in lines if ln.strip()]
  return out


@functools.lru_cache(maxsize=1)
def _phrases() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """(mention, unmention) phrases per observation, with the labeler's positional unmentions and ours."""
  mention, unmention = _read_phrases("mention"), _read_phrases("unmention")
  positions = [a + b for a in ("over the", "overly the", "in the") for b in ("", " superior", " left", " right")]
  unmention["Cardiomegaly"] += [p + " " + m.replace("the ", "") for p in positions for m in mention["Cardiomegaly"]
                                if m not in ("cardiomegaly", "cardiac enlargement")]
  unmention["Enlarged Cardiomediastinum"] += [p + " " + m for p in positions
                                             for m in mention["Enlarged Cardiomediastinum"]]
  for name, extra in EXTRA_UNMENTIONS.items():
    unmention[name] += list(extra)
  return mention, unmention


def sentences(text: str) -> list[str]:
  """Lowercased sentences, punctuation except ``-`` replaced by spaces, padded with one space each side."""
  out = []
  for s in re.split(r"[.;?!\n]", text.lower()):
    s = re.sub(r"[^a-z0-9\- ]+", " ", s)
    s = re.sub(r" +", " ", s).strip()
    if s:
      out.append(f" {s} ")
  return out


def _classify(sentence: str, start: int, end: int, anatomy: bool = False) -> float | None:
  """1 / 0 / -1 (None: not a mention) for ``sentence[start:end]`` (rules 3 and 4 of the module docstring)."""
  before, after = sentence[:start], sentence[end:]
  cut = [m.end() for m in _BREAKERS.finditer(before)]
  pre = before[cut[-1]:] if cut else before
  nxt = _BREAKERS.search(after)
  post_clause = after[:nxt.start()] if nxt else after
  post = " ".join(post_clause.split()[:_POST_WINDOW])
  clause = f"{pre} {sentence[start:end]} {post_clause}"
  if anatomy and not _ABNORMAL.search(clause):
    return 0.0 if (_PRE_NEG.search(pre) or _POST_NEG.search(post)) else None
  if _NEG_UNCERTAIN.search(clause):
    return -1.0
  if _PRE_NEG.search(pre) or _POST_NEG.search(post):
    return 0.0
  if _PRE_UNC.search(pre) or _POST_UNC.search(post):
    return -1.0
  return 1.0


def _mentions(sentence: str, phrases: Sequence[str], unmentions: Sequence[str]) -> list[tuple[int, int, str]]:
  spans = [m.span() for u in unmentions for m in re.finditer(re.escape(u), sentence)]
  out = []
  for phrase in phrases:
    for m in re.finditer(re.escape(phrase), sentence):
      s, e = m.span()
      if not any(s < ue and e > us for us, ue in spans):
        out.append((s, e, phrase))
  return out


def label_report(text: str, *, other_findings_block_no_finding: bool = False) -> np.ndarray:
  """CheXpert-style labels of one report: float32 (14,) in {1, 0, -1, NaN} (see the module docstring)."""
  mention, unmention = _phrases()
  found: dict[int, list[float]] = {}
  no_finding = True
  for sent in sentences(text):
    for c, name in enumerate(OBSERVATIONS):
      for s, e, phrase in _mentions(sent, mention[name], unmention[name]):
        label = _classify(sent, s, e, anatomy=c in (CARDIOMEGALY, ENLARGED_CM) and phrase in ANATOMY)
        if label is None:
          continue
        if label != 0.0 and c != SUPPORT_DEVICES and (c != NO_FINDING or other_findings_block_no_finding):
          no_finding = False
        if c == NO_FINDING:
          continue
        if label != 0.0 and sent[s:e].strip() in ("chf", "heart failure"):
          found.setdefault(CARDIOMEGALY, []).append(-1.0)
        found.setdefault(c, []).append(label)
  out = np.full((len(OBSERVATIONS),), np.nan, np.float32)
  for c, labels in found.items():
    out[c] = 1.0 if 1.0 in labels else -1.0 if -1.0 in labels else 0.0
  if no_finding:
    out[NO_FINDING] = 1.0
  return out


def binarize(labels: np.ndarray, uncertain_as: float = UNCERTAIN_AS) -> np.ndarray:
  """{1, 0, -1, NaN} → {1, 0}: positive = 1, uncertain → ``uncertain_as``, NaN → 0."""
  labels = np.where(labels == -1.0, uncertain_as, labels)
  return np.nan_to_num(labels, nan=0.0).astype(np.float32)


def precision_recall_f1(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """Binary (N, C) predictions vs references → micro and macro precision / recall / F1 (zero division → 0)."""
  pred, true = pred.astype(bool), true.astype(bool)

  def prf(tp, fp, fn):
    p = np.divide(tp, tp + fp, out=np.zeros_like(tp, float), where=(tp + fp) > 0)
    r = np.divide(tp, tp + fn, out=np.zeros_like(tp, float), where=(tp + fn) > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return p, r, f

  tp = (pred & true).sum(0).astype(float)
  fp = (pred & ~true).sum(0).astype(float)
  fn = (~pred & true).sum(0).astype(float)
  mp, mr, mf = prf(tp.sum(), fp.sum(), fn.sum())
  p, r, f = prf(tp, fp, fn)
  return {"CE_precision_micro": float(mp), "CE_recall_micro": float(mr), "CE_F1_micro": float(mf),
          "CE_precision_macro": float(p.mean()), "CE_recall_macro": float(r.mean()), "CE_F1_macro": float(f.mean())}


def clinical_efficacy(gen_texts: Sequence[str], ref_texts: Sequence[str]) -> dict[str, float]:
  """CE precision / recall / F1 (micro and macro) of generated vs reference reports, both labeled here."""
  if len(gen_texts) != len(ref_texts):
    raise ValueError(f"clinical_efficacy: {len(gen_texts)} generated vs {len(ref_texts)} reference reports.")
  pred = np.stack([binarize(label_report(t)) for t in gen_texts])
  true = np.stack([binarize(label_report(t)) for t in ref_texts])
  return precision_recall_f1(pred, true)


def iu_agreement(annotation: str | pathlib.Path, labels: str | pathlib.Path, **label_kwargs) -> dict[str, float]:
  """Per-observation accuracy and F1 (positive = 1) of ``label_report`` on every IU report vs the labels.json
  pseudo-labels (key: the record id cut to its first two ``-`` pieces, spec §2.4), plus their means."""
  ann = json.loads(pathlib.Path(annotation).read_text())
  lab = json.loads(pathlib.Path(labels).read_text())
  records = [r for split in ("train", "val", "test") for r in ann.get(split, [])]
  true = np.asarray([lab["-".join(r["id"].split("-")[:2])] for r in records], np.float32)
  pred = np.stack([binarize(label_report(r["report"], **label_kwargs)) for r in records])
  out = {}
  for c, name in enumerate(OBSERVATIONS):
    out[f"acc/{name}"] = float((pred[:, c] == true[:, c]).mean())
    out[f"F1/{name}"] = precision_recall_f1(pred[:, c:c + 1], true[:, c:c + 1])["CE_F1_micro"]
  out["acc/mean"] = float(np.mean([out[f"acc/{n}"] for n in OBSERVATIONS]))
  out["F1/mean"] = float(np.mean([out[f"F1/{n}"] for n in OBSERVATIONS]))
  out.update({k: v for k, v in precision_recall_f1(pred, true).items() if "micro" in k})
  return out


if __name__ == "__main__":
  import sys

  data = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "data/iu_xray")
  print(json.dumps(iu_agreement(data / "annotation.json", data / "labels.json"), indent=1))
