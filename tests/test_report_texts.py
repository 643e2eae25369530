"""input_pipeline.report_texts: the official decode quirk and sentence split (align2gen_spec §16.5), the
report_texts feature in the Grain pipeline, and the WordPiece tokenizer trained on the train split when the user
has none (saved in the workdir, reused on resume, identical ids to transformers' tokenizer of the same files)."""

import json

import numpy as np
import pytest
import transformers

from input_pipeline import features, loader, report_texts, subword
from input_pipeline.tokenizer import Tokenizer
from tests.conftest import tiny_r2gen_config
from tests.test_records import make_r2gen_folder


def test_decode_quirk_and_sentences():
  tok = Tokenizer(["a", "b", "<unk>"], "iu")  # ids a=1, b=2
  assert report_texts.align2gen_decode(tok, [0, 1, 2, 0, 0]) == " a b"
  assert report_texts.align2gen_decode(tok, [1, 2, 0, 0]) == "a b"
  assert report_texts.align2gen_decode(tok, [0, 0, 1]) == ""
  assert report_texts.align2gen_decode(tok, [1, 0, 2, 0]) == "a b"  # R2Gen's decode gives "a"
  assert report_texts.split_sentences(" the heart is normal . no effusion . mild") == [
      "the heart is normal .", "no effusion ."]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  root = make_r2gen_folder(tmp_path_factory.mktemp("texts"), {"train": 6, "val": 3, "test": 2})
  c = tiny_r2gen_config()
  c.data.data_dir, c.data.threshold, c.data.image_size, c.data.resize = str(root), 1, 32, 36
  c.data.labels = ""
  c.data.features = ("report_texts",)
  c.data.text_tokenizer_vocab_size, c.data.text_max_tokens = 60, 16
  c.data.sentence_max_tokens, c.data.max_sentences = 8, 3
  c.train.batch_size = 2
  workdir = tmp_path_factory.mktemp("workdir")
  tokenizer = loader.build_tokenizer(c)
  features.prepare(c, workdir, tokenizer)
  return c, workdir, tokenizer


def test_prepare_trains_saves_and_reuses(text_run):
  c, workdir, tokenizer = text_run
  saved = workdir / report_texts.TOKENIZER_DIR
  assert c.data.text_tokenizer == str(saved) and (saved / subword.DESCRIPTOR_FILE).is_file()
  again = tiny_r2gen_config()
  again.data = c.data.copy_and_resolve_references()
  again.data.text_tokenizer = ""
  before = (saved / subword.TOKENIZER_FILE).stat().st_mtime_ns
  features.prepare(again, workdir, tokenizer)  # a resumed run: the saved tokenizer, not a new one
  assert again.data.text_tokenizer == str(saved)
  assert (saved / subword.TOKENIZER_FILE).stat().st_mtime_ns == before
  trained = subword.SubwordTokenizer.load(saved)
  assert trained == subword.train_subword(report_texts.train_texts(c, tokenizer), "wordpiece", 60)


def test_feature_batches(text_run):
  c, _, tokenizer = text_run
  text_tok = subword.SubwordTokenizer.load(c.data.text_tokenizer)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(
      __import__("pathlib").Path(c.data.text_tokenizer) / subword.TOKENIZER_FILE))
  batch = next(iter(loader.train_dataset(c, tokenizer, seed=0)))
  assert batch["text_ids"].shape == (2, 16) and batch["sentence_ids"].shape == (2, 3, 8)
  for row in range(2):
    text = report_texts.align2gen_decode(tokenizer, batch["targets"][row])
    n = int(batch["text_mask"][row].sum())
    want = hf(text, truncation=True, max_length=16)["input_ids"]
    assert batch["text_ids"][row, :n].tolist() == want == text_tok.encode(text, max_length=16)
    sentences = report_texts.split_sentences(text)
    assert sentences and text.startswith(" ")
    for s in range(3):
      k = int(batch["sentence_mask"][row, s].sum())
      if s < len(sentences):
        assert batch["sentence_ids"][row, s, :k].tolist() == text_tok.encode(sentences[s], max_length=8)
      else:
        assert k == 0
  evaluation = next(loader.eval_batches(c, tokenizer, "val"))
  assert "text_ids" not in evaluation  # training only


def test_feature_needs_a_tokenizer(text_run):
  c, _, tokenizer = text_run
  bare = tiny_r2gen_config()
  bare.data = c.data.copy_and_resolve_references()
  bare.data.text_tokenizer = ""
  with pytest.raises(ValueError, match="text_tokenizer is empty"):
    features.build(bare, tokenizer, True)
  assert json.loads(json.dumps(features.names(bare))) == ["report_texts"]
