"""Tokenizer: spec §2.2 numbers on the real IU annotation, cleaning quirks, save/load."""

from __future__ import annotations

import json

import pytest

from input_pipeline.tokenizer import (Tokenizer, VocabularyMismatchError, clean_report_iu_xray,
                                      clean_report_mimic_cxr)

SPEC_IDS = [0, 684, 314, 624, 49, 550, 725, 62, 752, 451, 388, 1, 19, 375, 319, 318, 364, 455, 1, 684, 406, 68,
            293, 467, 284, 40, 225, 1, 445, 521, 475, 517, 239, 364, 604, 1, 198, 143, 68, 534, 341, 684, 639, 1, 0]
SPEC_CLEAN = ("the heart size and pulmonary vascularity appear within normal limits . a large hiatal hernia is "
              "noted . the lungs are free of focal airspace disease . no pneumothorax or pleural effusion is seen . "
              "degenerative changes are present in the spine .")


@pytest.fixture(scope="module")
def iu_annotation():
  from conftest import SHARED
  path = SHARED / "data" / "iu_xray" / "annotation.json"
  if not path.is_file():
    pytest.skip(f"{path} not present")
  return json.loads(path.read_text())


@pytest.fixture(scope="module")
def iu_tokenizer(iu_annotation):
  return Tokenizer.build([r["report"] for r in iu_annotation["train"]], threshold=3, clean="iu")


def test_iu_vocabulary_matches_spec(iu_tokenizer):
  assert len(iu_tokenizer.tokens) == 760
  assert iu_tokenizer.vocab_size == 761
  assert iu_tokenizer.unk_id == 18
  assert iu_tokenizer.tokens[:11] == (".", "1", "10", "10th", "12", "13", "17", "2", "3", "5", "5th")


def test_iu_spec_test_vector(iu_annotation, iu_tokenizer):
  record = iu_annotation["train"][0]
  assert record["id"] == "CXR2384_IM-0942"
  assert iu_tokenizer.clean(record["report"]) == SPEC_CLEAN
  assert iu_tokenizer.encode(record["report"]) == SPEC_IDS
  assert iu_tokenizer.decode(SPEC_IDS[1:]) == SPEC_CLEAN


def test_cleaning_quirks():
  # '-' and digits kept; the ':-[' range deletes '<=>?@' and capitals (lower-cased first, so only symbols).
  assert clean_report_iu_xray("X-ray <ok>=@ #1 $5|~`.") == "x-ray ok #1 $5|~` ."
  # Empty sentences are kept: two consecutive '.' tokens.
  assert clean_report_iu_xray("a.  . b") == "a .  . b ."
  assert clean_report_iu_xray("a.  . b").split() == ["a", ".", ".", "b", "."]
  # '1. ' is removed anywhere; ' 2. ' becomes '. '.
  assert clean_report_iu_xray("1. Heart ok 2. Lungs clear") == "heart ok . lungs clear ."
  # Quotes and slashes go; '..' collapses.
  assert clean_report_iu_xray('The "heart"/size\'s fine..') == "the heartsizes fine ."
  # MIMIC: newlines, runs of spaces and underscores; IU keeps the newline inside a token run.
  # (the '_' is deleted after the strip, so its space survives).
  assert clean_report_mimic_cxr("Heart\n\nnormal.   ___ Lungs clear.") == "heart normal .  lungs clear ."
  assert clean_report_iu_xray("Heart\nnormal") == "heart\nnormal ."


def test_build_encode_decode_unknown_words():
  tok = Tokenizer.build(["b a a.", "a b c"], threshold=2, clean="mimic")
  # counts: b 2, a 3, '.' 2, c 1 -> vocab sorted by code point: '.', '<unk>', 'a', 'b'
  assert tok.tokens == (".", "<unk>", "a", "b")
  assert tok.vocab_size == 5
  assert tok.encode("A c b.") == [0, 3, 2, 4, 1, 0]
  assert tok.decode([3, 2, 0, 4]) == "a <unk>"
  assert tok.decode([]) == ""


def test_save_load_round_trip(tmp_path, iu_tokenizer):
  path = tmp_path / "sub" / "vocab.json"
  iu_tokenizer.save(path)
  loaded = Tokenizer.load(path)
  assert loaded == iu_tokenizer
  assert loaded.encode("heart size normal") == iu_tokenizer.encode("heart size normal")
  loaded.check_matches(iu_tokenizer, "the original")


def test_load_rejects_bad_files(tmp_path):
  bad = tmp_path / "vocab.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="vocab.json"):
    Tokenizer.load(bad)
  bad.write_text(json.dumps({"format": "other"}))
  with pytest.raises(ValueError, match="format"):
    Tokenizer.load(bad)


def test_vocabulary_mismatch_names_differences():
  a = Tokenizer.build(["a b c"], threshold=1, clean="iu")
  b = Tokenizer.build(["a b d"], threshold=1, clean="iu")
  with pytest.raises(VocabularyMismatchError, match=r"checkpoint X.*'c' vs 'd'"):
    a.check_matches(b, "checkpoint X")


def test_unknown_clean_mode():
  with pytest.raises(ValueError, match="cleaning"):
    Tokenizer.build(["a"], threshold=1, clean="chexpert")
