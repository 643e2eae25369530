"""Align2Gen's report texts for its text (alignment) branches, as subword ids (align2gen_spec.md §2.3, §2.7, §5).

The texts come from the example's padded ``targets`` — the cleaned, truncated, ``<unk>``-ified ground truth, not
the raw report — through the official ``decode`` quirk (``align2gen_decode``: the first 0 is skipped, the second
stops, a space precedes every token at position ≥ 1, so a target row gives a leading space), then split into
sentences (``split_sentences``: closed at each ``.`` token, the fragment after the last ``.`` dropped). BERT's
WordPiece tokenizer encodes both (``[CLS] … [SEP]``, truncated keeping the specials, padded with ``[PAD]``).

Feature ``report_texts`` (``input_pipeline.features``), training batches only::

    text_ids       int32 (Tw,)     the report; Tw = data.text_max_tokens (spec §14.29: 256)
    text_mask      int32 (Tw,)     1 on its tokens ([CLS] and [SEP] included)
    sentence_ids   int32 (S, Ts)   its sentences, S = data.max_sentences (32), Ts = data.sentence_max_tokens (128)
    sentence_mask  int32 (S, Ts)   all-zero rows for absent sentences

The original truncates only at 512 tokens and keeps every sentence; a text cut here is counted and logged once per
pipeline (``truncated``) as a deviation.

Tokenizer (``data.text_tokenizer``): an HF folder with BERT's files (``vocab.txt`` / ``tokenizer.json``, e.g. a
local ``bert-base-uncased``) or a tokenizer saved by rrg_jax. Left empty, ``prepare`` trains a WordPiece tokenizer
of ``data.text_tokenizer_vocab_size`` ids on the train split's decoded target texts (``input_pipeline.subword.
train_subword``, deterministic), saves it to ``WORKDIR/text_tokenizer/`` beside the run's ``vocab.json`` and
points ``data.text_tokenizer`` there, so a resumed run or a checkpoint never re-reads the data for it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from input_pipeline import subword
from input_pipeline.tokenizer import Tokenizer

TOKENIZER_DIR = "text_tokenizer"
DEFAULTS = {"text_tokenizer": "", "text_tokenizer_vocab_size": 2000, "text_max_tokens": 256,
            "sentence_max_tokens": 128, "max_sentences": 32}


def option(config: ml_collections.ConfigDict, key: str) -> Any:
  return config.data.get(key, DEFAULTS[key])


def align2gen_decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
  """The official ``decode`` (spec §2.3): skips the first 0, stops at the second; a space before each token whose
  position is ≥ 1. ``[0, a, b, 0, 0]`` → ``" a b"``; ``[a, b, 0]`` → ``"a b"``; ``[a, 0, b, 0]`` → ``"a b"``."""
  out, zeros = [], 0
  for position, i in enumerate(int(i) for i in ids):
    if i == 0:
      zeros += 1
      if zeros == 2:
        break
      continue
    out.append((" " if position >= 1 else "") + tokenizer.tokens[i - 1])
  return "".join(out)


def split_sentences(text: str) -> list[str]:
  """Sentences closed by a ``.`` token, each ending in ``" ."``; the fragment after the last ``.`` is dropped
  (spec §2.7)."""
  sentences, current = [], []
  for token in text.split():
    current.append(token)
    if token == ".":
      sentences.append(" ".join(current))
      current = []
  return sentences


def train_texts(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list[str]:
  """The report texts BERT sees, for every train record (the feature's own derivation of the targets)."""
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top  (loader imports the features)

  if config.data.source == "folder":
    reports = [r.report for r in loader.load_records(config, "train")]
  else:
    source = loader.raw_source(config, "train")
    reports = [str(source[i]["report"]) for i in range(len(source))]
  max_len = int(config.data.max_seq_length)
  return [align2gen_decode(tokenizer, tokenizer.encode(r)[:max_len]) for r in reports]


class ReportTexts:
  """The ``report_texts`` feature (module docstring); needs ``prepare`` (or a given tokenizer) first."""

  uses_boxes = False
  train_only = True

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    path = option(config, "text_tokenizer")
    if not path:
      raise ValueError("config.data.text_tokenizer is empty: give a BERT tokenizer folder, or let the training "
                       "command train one (report_texts.prepare).")
    self.word_tokenizer = tokenizer
    self.text_tokenizer = subword.SubwordTokenizer.load(path)
    self.max_len = int(config.data.max_seq_length)
    self.text_len = int(option(config, "text_max_tokens"))
    self.sentence_len = int(option(config, "sentence_max_tokens"))
    self.max_sentences = int(option(config, "max_sentences"))
    self.warned = False

  @staticmethod
  def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path, tokenizer: Tokenizer,
              is_writer: bool) -> None:
    """Points ``data.text_tokenizer`` at a usable tokenizer: the configured one, else ``workdir/text_tokenizer``
    (saved by an earlier run of this workdir), else one trained now and saved there by the writing process (the
    caller waits for it before any other process builds the feature)."""
    if option(config, "text_tokenizer"):
      return
    directory = workdir / TOKENIZER_DIR
    if is_writer and not (directory / subword.DESCRIPTOR_FILE).is_file():
      trained = subword.train_subword(train_texts(config, tokenizer), "wordpiece",
                                      int(option(config, "text_tokenizer_vocab_size")))
      trained.save(directory)
      logging.info("Trained a WordPiece text tokenizer of %d ids on the train split → %s", trained.vocab_size,
                   directory)
    with config.unlocked():
      config.data.text_tokenizer = str(directory)

  def _encode(self, texts: list[str], length: int, what: str, rid: str) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self.text_tokenizer.encode_padded(texts, length)
    if not self.warned:  # only a row that fills every slot can have been cut: encode just those again, whole
      full_rows = [t for t, m in zip(texts, mask) if m.all()]
      if any(len(row) > length for row in self.text_tokenizer.encode_batch(full_rows)):
        logging.warning("report_texts: record %r has a %s longer than %d tokens; truncated (the original keeps "
                        "up to 512).", rid, what, length)
        self.warned = True
    return ids, mask

  def __call__(self, raw: Mapping[str, Any], image, rng, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    del image, rng
    text = align2gen_decode(self.word_tokenizer, example["targets"])
    ids, mask = self._encode([text], self.text_len, "report", raw["id"])
    sentences = split_sentences(text)
    if len(sentences) > self.max_sentences and not self.warned:
      logging.warning("report_texts: record %r has %d sentences; only the first %d are kept.", raw["id"],
                      len(sentences), self.max_sentences)
      self.warned = True
    sentences = sentences[:self.max_sentences]
    out = self.padding()
    out["text_ids"], out["text_mask"] = ids[0], mask[0]
    if sentences:
      s_ids, s_mask = self._encode(sentences, self.sentence_len, "sentence", raw["id"])
      out["sentence_ids"][:len(sentences)], out["sentence_mask"][:len(sentences)] = s_ids, s_mask
    return out

  def padding(self) -> dict[str, np.ndarray]:
    pad = self.text_tokenizer.pad_id or 0
    return {"text_ids": np.full((self.text_len,), pad, np.int32), "text_mask": np.zeros((self.text_len,), np.int32),
            "sentence_ids": np.full((self.max_sentences, self.sentence_len), pad, np.int32),
            "sentence_mask": np.zeros((self.max_sentences, self.sentence_len), np.int32)}
