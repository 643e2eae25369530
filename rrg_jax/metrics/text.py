"""Natural-language generation metrics of the official code (reference spec §10), plus sacreBLEU.

``compute_scores(gts, res)`` calls the pycocoevalcap scorers directly (no PTB tokenizer; texts are the cleaned,
space-joined token strings of ``Tokenizer.decode``), one reference per id:

* ``BLEU_1`` … ``BLEU_4``: coco-caption ``Bleu(4)``, corpus level, ``option='closest'``;
* ``METEOR``: ``meteor-1.5.jar -l en -norm`` through Java (skipped with one warning when ``java`` is missing);
* ``ROUGE_L``: per-sample LCS F-score (beta 1.2), averaged;
* ``Cider``: CIDEr-D (n = 4, sigma 6, ×10), IDF from the evaluated references;
* ``sacreBLEU``: ``sacrebleu.corpus_bleu`` with its defaults (13a tokenization), on sacreBLEU's 0–100 scale.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import unicodedata
import warnings
from collections.abc import Mapping

import sacrebleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

_warned_no_java = False


def java_available() -> bool:
  return shutil.which("java") is not None


def meteor_line_safe(text: str) -> str:
  """``text`` as one line the METEOR jar's line protocol reads: control characters dropped (a newline would end
  the request early — a generated report decoded from byte-level BPE can hold any byte), whitespace runs → one
  space. Leaves the project's cleaned, single-spaced reports unchanged."""
  return " ".join("".join(c for c in text if unicodedata.category(c) != "Cc" or c.isspace()).split())


def _meteor(gts: dict, res: dict) -> float | None:
  global _warned_no_java
  if not java_available():
    if not _warned_no_java:
      warnings.warn("Java not found: METEOR (meteor-1.5.jar) is not computed; the other metrics are.",
                    stacklevel=3)
      _warned_no_java = True
    return None
  scorer = Meteor()
  safe = lambda texts: {k: [meteor_line_safe(t) for t in v] for k, v in texts.items()}  # noqa: E731
  try:
    return float(scorer.compute_score(safe(gts), safe(res))[0])
  finally:
    del scorer  # closes the Java process


def compute_scores(gts: Mapping[str, str], res: Mapping[str, str]) -> dict[str, float]:
  """References ``gts`` and generated reports ``res`` ({id: text}, same ids) → {metric: value}."""
  if set(gts) != set(res):
    missing, extra = sorted(set(gts) - set(res))[:5], sorted(set(res) - set(gts))[:5]
    raise ValueError(f"compute_scores: ids differ (no report for {missing}, no reference for {extra}).")
  if not gts:
    raise ValueError("compute_scores: no reports to score.")
  ids = sorted(gts)
  g = {i: [gts[i]] for i in ids}
  r = {i: [res[i]] for i in ids}
  with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its counts
    bleu = Bleu(4).compute_score(g, r, verbose=0)[0]
  scores = {f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)}
  meteor = _meteor(g, r)
  if meteor is not None:
    scores["METEOR"] = meteor
  scores["ROUGE_L"] = float(Rouge().compute_score(g, r)[0])
  scores["Cider"] = float(Cider().compute_score(g, r)[0])
  scores["sacreBLEU"] = float(sacrebleu.corpus_bleu([res[i] for i in ids], [[gts[i] for i in ids]]).score)
  return scores
