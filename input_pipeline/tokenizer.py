"""The R2Gen / CAMANet tokenizer, quirks included (reference spec §2.2).

Id 0 is BOS = EOS = PAD and has no string; words have ids ``1..|vocab|`` in code-point order of the vocabulary
(which includes ``<unk>``); ``vocab_size`` is ``K = |vocab| + 1``.

    tok = Tokenizer.build(train_reports, threshold=3, clean="iu")
    tok.encode("The heart is normal.")   # [0, id('the'), id('heart'), id('is'), id('normal'), id('.'), 0]
    tok.decode([684, 314, 0, 5])          # 'the heart' (stops at the first 0)
    tok.save("vocab.json"); Tokenizer.load("vocab.json")
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

UNK = "<unk>"
CLEAN_MODES = ("iu", "mimic")
FORMAT = "rrg_jax.tokenizer/1"

# The official class ``[.,?;*!%^&_+():-\[\]{}]``: ``:-\[`` is a range, so ``-`` survives and ``<=>?@A-Z`` go.
_STRIP_CHARS = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_QUOTES = re.compile(r'["/\\\']')


class VocabularyMismatchError(ValueError):
  """Two vocabularies that must be identical (e.g. data vs. a checkpoint's) differ."""


def _sentence(s: str) -> str:
  return _STRIP_CHARS.sub("", _QUOTES.sub("", s).strip().lower())


def _clean_common(report: str) -> str:
  """Steps 2-6 of the official cleaning (after the dataset-specific first step)."""
  report = report.replace("1. ", "")
  for n in "2345":
    report = report.replace(f". {n}. ", ". ")
  for n in "2345":
    report = report.replace(f" {n}. ", ". ")
  sentences = report.strip().lower().split(". ")
  # The official filter compares each string with [] and so never drops an empty sentence.
  return " . ".join(_sentence(s) for s in sentences) + " ."


def clean_report_iu_xray(report: str) -> str:
  """``clean_report_iu_xray`` of R2Gen (newlines are not touched)."""
  for _ in range(3):
    report = report.replace("..", ".")
  return _clean_common(report)


def clean_report_mimic_cxr(report: str) -> str:
  """``clean_report_mimic_cxr`` of R2Gen."""
  report = report.replace("\n", " ")
  for _ in range(7):
    report = report.replace("__", "_")
  for _ in range(6):
    report = report.replace("  ", " ")
  for _ in range(8):
    report = report.replace("..", ".")
  return _clean_common(report)


_CLEANERS = {"iu": clean_report_iu_xray, "mimic": clean_report_mimic_cxr}


def count_words(reports: Iterable[str], clean: str) -> collections.Counter[str]:
  """Whitespace-token counts of the cleaned reports (the vocabulary statistics)."""
  cleaner = _cleaner(clean)
  counts: collections.Counter[str] = collections.Counter()
  for report in reports:
    counts.update(cleaner(report).split())
  return counts


def _cleaner(clean: str):
  if clean not in _CLEANERS:
    raise ValueError(f"Unknown report cleaning {clean!r}; choose one of {CLEAN_MODES}.")
  return _CLEANERS[clean]


class Tokenizer:
  """Word-level vocabulary with id 0 reserved for BOS/EOS/PAD."""

  def __init__(self, tokens: Sequence[str], clean: str):
    """``tokens``: the vocabulary in id order (``tokens[i]`` has id ``i + 1``), including ``<unk>``."""
    self._clean = _cleaner(clean)
    self.clean_mode = clean
    self.tokens = tuple(tokens)
    if UNK not in self.tokens:
      raise ValueError(f"A vocabulary must contain {UNK!r}.")
    if len(set(self.tokens)) != len(self.tokens):
      raise ValueError("A vocabulary must not contain duplicate tokens.")
    self.token_to_id = {t: i + 1 for i, t in enumerate(self.tokens)}
    self.unk_id = self.token_to_id[UNK]

  @classmethod
  def from_counts(cls, counts: Mapping[str, int], threshold: int, clean: str) -> Tokenizer:
    """Keeps words with ``count >= threshold``, adds ``<unk>``, sorts by code point."""
    words = [w for w, c in counts.items() if c >= threshold] + [UNK]
    return cls(sorted(words), clean)

  @classmethod
  def build(cls, reports: Iterable[str], threshold: int, clean: str) -> Tokenizer:
    """The vocabulary of the official code, from the (train) ``reports``."""
    return cls.from_counts(count_words(reports, clean), threshold, clean)

  @property
  def vocab_size(self) -> int:
    """``K = |vocab| + 1`` (the output classes, id 0 included)."""
    return len(self.tokens) + 1

  def clean(self, report: str) -> str:
    return self._clean(report)

  def encode(self, report: str) -> list[int]:
    """``[0] + ids(clean(report).split()) + [0]``, untruncated."""
    get = self.token_to_id.get
    return [0] + [get(w, self.unk_id) for w in self._clean(report).split()] + [0]

  def decode(self, ids: Iterable[int]) -> str:
    """Joins the words up to (excluding) the first 0."""
    words = []
    for i in ids:
      i = int(i)
      if i == 0:
        break
      words.append(self.tokens[i - 1])
    return " ".join(words)

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]

  def save(self, path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "clean": self.clean_mode, "tokens": list(self.tokens)},
                               ensure_ascii=False, indent=0))

  @classmethod
  def load(cls, path: str | pathlib.Path) -> Tokenizer:
    path = pathlib.Path(path)
    try:
      data = json.loads(path.read_text())
      if data.get("format") != FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
      return cls(data["tokens"], data["clean"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
      raise ValueError(f"{path} is not a readable rrg_jax vocabulary file: {e}") from e

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, Tokenizer) and self.tokens == other.tokens
            and self.clean_mode == other.clean_mode)

  def __hash__(self) -> int:
    return hash((self.tokens, self.clean_mode))

  def check_matches(self, other: Tokenizer, what: str) -> None:
    """Raises ``VocabularyMismatchError`` (naming ``what`` and the first differences) unless equal."""
    if self == other:
      return
    problems = []
    if self.clean_mode != other.clean_mode:
      problems.append(f"cleaning {self.clean_mode!r} vs {other.clean_mode!r}")
    if self.vocab_size != other.vocab_size:
      problems.append(f"vocab_size {self.vocab_size} vs {other.vocab_size}")
    diff = [(i + 1, a, b) for i, (a, b) in enumerate(zip(self.tokens, other.tokens)) if a != b][:5]
    if diff:
      problems.append("first differing ids: " + ", ".join(f"{i}: {a!r} vs {b!r}" for i, a, b in diff))
    raise VocabularyMismatchError(f"Vocabulary does not match {what}: " + "; ".join(problems)
                                  + ". A model only works with the vocabulary it was trained with.")
