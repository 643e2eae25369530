"""input_pipeline.subword against transformers' BERT / GPT-2 / BART tokenizers built from the same local files.

Every tokenizer file is made here: a small WordPiece and byte-level BPE are trained with ``tokenizers`` on a few
report sentences and written as vocab.txt / vocab.json + merges.txt, and as tokenizer.json through the HF
tokenizers' own ``save_pretrained``. Nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from input_pipeline import subword  # noqa: E402
from input_pipeline.subword import SubwordTokenizer, TokenizerFileError, load_tokenizer, train_subword  # noqa: E402
from input_pipeline.tokenizer import Tokenizer, VocabularyMismatchError  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import (AutoTokenizer, BartTokenizerFast, BertTokenizer, BertTokenizerFast,  # noqa: E402
                          GPT2TokenizerFast, PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
try:  # the pure-Python BERT tokenizer (transformers >= 5 keeps it as BertTokenizerLegacy)
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
except ImportError:  # transformers 4: BertTokenizer is the slow one
  BertTokenizerLegacy = BertTokenizer

CORPUS = [
    "The heart size is normal. The lungs are clear.",
    "No acute cardiopulmonary process. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly with small bilateral pleural effusions, left greater than right.",
    "Café-au-lait résumé: naïve patient, Ångström-level detail; déjà vu.",
    "Stable 3.5 cm nodule in the right upper lobe (series 2, image 45), unchanged since 2019-05-01.",
    "Heart: NORMAL. Mediastinum: unremarkable!! Lungs? Clear.",
    "Interval placement of an endotracheal tube, tip 4 cm above the carina.",
    "Degenerative changes of the thoracic spine. Osseous structures are intact.",
    "There is no focal consolidation, pleural effusion, or pneumothorax.",
    "Left basilar atelectasis versus consolidation; clinical correlation recommended.",
    "PA and lateral views of the chest were obtained at 10:45 a.m.",
    "Tracheostomy tube in standard position. Right PICC terminates in the SVC.",
] * 3

TEXTS = [
    "The heart is normal.",
    "THE HEART IS NORMAL.",
    "tHe HeArT iS nOrMaL",
    "Café résumé naïve Ångström déjà",
    "Cafe resume naive",
    "(1) left-sided effusion; 2) right: ok!! [sic] {x} <y> a/b \\ c 'quoted' \"double\"",
    "3.5 cm nodule at T12, 2019-05-01, 10:45, 1/2, 45%, $100, #3",
    "zyxwvut qqqq xylophonist",
    "日本語 中文 한국어 emoji 😀 ✓ ∞",
    "",
    "   ",
    "\t tabs\tand\nnew\nlines \r\n and  double  spaces ",
    " leading space",
    "control\x00chars\x07 and \ufffd replacement",
    "a" * 120 + " pneumothorax",
    "isn't it? no, it's fine. we've seen they're ok",
    "The [MASK] is normal [SEP] more",
    "<s>heart</s> <pad> <mask> <|endoftext|> text",
]


# --- file fixtures ----------------------------------------------------------------------------------------

def _train_wordpiece(vocab_size=150) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=False)  # cased material: also serves the cased vocab
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.train_from_iterator(CORPUS + [t.lower() for t in CORPUS], trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
  return tok


def _train_bpe(specials, vocab_size=400) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tok


def _write_vocab_txt(tok: tokenizers.Tokenizer, folder: pathlib.Path, drop=()) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda x: x[1]) if t not in drop]
  (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
  return folder


def _write_json(path: pathlib.Path, data) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  wp = _train_wordpiece()
  f = {}
  f["bert_uncased"] = _write_vocab_txt(wp, root / "bert_uncased")  # vocab.txt only: HF lower-cases
  f["bert_clinical"] = _write_vocab_txt(wp, root / "bert_clinical")  # Bio_ClinicalBERT's layout
  _write_json(f["bert_clinical"] / "config.json", {"model_type": "bert", "vocab_size": wp.get_vocab_size()})
  f["bert_cased"] = _write_vocab_txt(wp, root / "bert_cased")
  _write_json(f["bert_cased"] / "tokenizer_config.json", {"do_lower_case": False})
  f["bert_cased_strip"] = _write_vocab_txt(wp, root / "bert_cased_strip")
  _write_json(f["bert_cased_strip"] / "tokenizer_config.json", {"do_lower_case": False, "strip_accents": True})
  f["bert_lower_keep_accents"] = _write_vocab_txt(wp, root / "bert_lower_keep_accents")
  _write_json(f["bert_lower_keep_accents"] / "tokenizer_config.json", {"strip_accents": False,
                                                                       "tokenize_chinese_chars": False})
  f["bert_no_mask"] = _write_vocab_txt(wp, root / "bert_no_mask", drop=("[MASK]",))  # appended by HF
  for src in ("bert_uncased", "bert_cased"):  # tokenizer.json (+ tokenizer_config.json) as HF writes them
    BertTokenizer.from_pretrained(str(f[src])).save_pretrained(str(root / f"{src}_json"))
    f[f"{src}_json"] = root / f"{src}_json"

  bart = _train_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  f["bart"] = root / "bart"
  f["bart"].mkdir()
  bart.model.save(str(f["bart"]))  # vocab.json + merges.txt (with the "#version" header)
  f["bart_prefix"] = root / "bart_prefix"
  f["bart_prefix"].mkdir()
  bart.model.save(str(f["bart_prefix"]))
  _write_json(f["bart_prefix"] / "tokenizer_config.json", {"add_prefix_space": True})
  BartTokenizerFast.from_pretrained(str(f["bart"])).save_pretrained(str(root / "bart_json"))
  f["bart_json"] = root / "bart_json"

  gpt2 = _train_bpe(["<|endoftext|>"])
  f["gpt2"] = root / "gpt2"
  f["gpt2"].mkdir()
  gpt2.model.save(str(f["gpt2"]))
  GPT2TokenizerFast.from_pretrained(str(f["gpt2"])).save_pretrained(str(root / "gpt2_json"))
  f["gpt2_json"] = root / "gpt2_json"
  # A BPE vocabulary holding both <s> and <|endoftext|>: its family comes from config.json.
  both = _train_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"])
  f["gpt2_by_config"] = root / "gpt2_by_config"
  f["gpt2_by_config"].mkdir()
  both.model.save(str(f["gpt2_by_config"]))
  _write_json(f["gpt2_by_config"] / "config.json", {"model_type": "gpt2"})
  return f


# (folder, reference class, family)
CASES = [
    ("bert_uncased", BertTokenizer, "bert"),
    ("bert_uncased", BertTokenizerFast, "bert"),
    ("bert_clinical", BertTokenizer, "bert"),
    ("bert_cased", BertTokenizer, "bert"),
    ("bert_cased_strip", BertTokenizer, "bert"),
    ("bert_lower_keep_accents", BertTokenizer, "bert"),
    ("bert_no_mask", BertTokenizer, "bert"),
    ("bert_uncased_json", BertTokenizerFast, "bert"),
    ("bert_cased_json", BertTokenizerFast, "bert"),
    ("bart", BartTokenizerFast, "bart"),
    ("bart_prefix", BartTokenizerFast, "bart"),
    ("bart_json", BartTokenizerFast, "bart"),
    ("gpt2", GPT2TokenizerFast, "gpt2"),
    ("gpt2_json", GPT2TokenizerFast, "gpt2"),
    ("gpt2_by_config", GPT2TokenizerFast, "gpt2"),
]
_ids = [f"{name}-{cls.__name__}" for name, cls, _ in CASES]


def _pair(folders, name, cls):
  return SubwordTokenizer.load(folders[name]), cls.from_pretrained(str(folders[name]))


def _random_ids(n_vocab: int, seed: int) -> list[list[int]]:
  """Id sequences with specials anywhere and ids past the vocabulary (which both must drop)."""
  rng = np.random.default_rng(seed)
  out = [rng.integers(0, n_vocab, size=int(rng.integers(0, 30))).tolist() for _ in range(20)]
  out.append([0, 1, 2, 3, 4, 5, n_vocab, n_vocab + 100, 7])
  return out


# --- identity with transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls,family", CASES, ids=_ids)
def test_ids_and_text_match_transformers(folders, name, cls, family):
  ours, ref = _pair(folders, name, cls)
  assert ours.family == family
  assert ours.vocab_size == len(ref)
  for role in ("bos", "eos", "pad", "unk", "cls", "sep", "mask"):
    ref_role = {"bos": "cls", "eos": "sep"}.get(role, role) if family == "bert" else role  # BERT: [CLS] … [SEP]
    assert getattr(ours, f"{role}_id") == getattr(ref, f"{ref_role}_token_id", None), role
  assert ours.special_ids == frozenset(ref.all_special_ids)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"], text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
  for ids in _random_ids(ours.vocab_size, 0):
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
  assert ours.decode_batch([ours.encode(t) for t in TEXTS]) == ref.batch_decode(
      ref(TEXTS)["input_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("name,cls,family", [c for c in CASES if c[2] != "gpt2"],
                         ids=[i for i, c in zip(_ids, CASES) if c[2] != "gpt2"])
def test_truncation_and_padding_match_transformers(folders, name, cls, family):
  ours, ref = _pair(folders, name, cls)
  for length in (2, 5, 16):
    want = ref(TEXTS, truncation=True, max_length=length, padding="max_length")
    ids, mask = ours.encode_padded(TEXTS, length)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), length)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    for text in TEXTS:
      assert ours.encode(text, max_length=length) == ref(text, truncation=True, max_length=length)["input_ids"]
  assert ours.encode("The heart is normal.", max_length=4)[-1] == ours.eos_id  # the specials are kept
  with pytest.raises(ValueError, match="max_length 1"):
    ours.encode("heart", max_length=1)


@pytest.mark.parametrize("name", ["bert_uncased", "bert_cased", "bert_cased_strip", "bert_no_mask"])
def test_wordpiece_ids_match_pure_python_bert(folders, name):
  """The pure-Python WordPiece of transformers (an implementation independent of ``tokenizers``)."""
  ours, ref = SubwordTokenizer.load(folders[name]), BertTokenizerLegacy.from_pretrained(str(folders[name]))
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"], text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True), text


def test_tokenizer_json_as_autotokenizer_reads_it(folders, tmp_path):
  """A tokenizer.json is used as it is, like AutoTokenizer / PreTrainedTokenizerFast(tokenizer_file=...)."""
  src = json.loads((folders["bert_uncased_json"] / "tokenizer.json").read_text())
  src["normalizer"]["lowercase"] = False  # a cased pipeline, no tokenizer_config.json
  (tmp_path / "tokenizer.json").write_text(json.dumps(src))
  ours = SubwordTokenizer.load(tmp_path)
  ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  auto = AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.family == "bert" and ours.cls_id == 2 and ours.sep_id == 3
  for text in TEXTS:
    assert ours.encode(text) == ref(text)["input_ids"] == auto(text)["input_ids"], text
  assert ours.encode("The heart") != SubwordTokenizer.load(folders["bert_uncased"]).encode("The heart")
  # The same file read directly (not through its folder).
  assert SubwordTokenizer.load(tmp_path / "tokenizer.json") == ours


def test_inconsistent_folder_warns(folders, tmp_path):
  src = json.loads((folders["bert_uncased_json"] / "tokenizer.json").read_text())
  src["normalizer"]["lowercase"] = False
  (tmp_path / "tokenizer.json").write_text(json.dumps(src))
  _write_json(tmp_path / "tokenizer_config.json", {"do_lower_case": True})
  with pytest.warns(UserWarning, match="do_lower_case"):
    SubwordTokenizer.load(tmp_path)


def test_clinical_bert_layout_lower_cases(folders):
  """spec §2.3: a checkpoint shipping only vocab.txt gets HF's BERT default, lower-casing (and accent stripping)."""
  tok = SubwordTokenizer.load(folders["bert_clinical"])
  assert tok.encode("The HEART, Café") == tok.encode("the heart, cafe")
  cased = SubwordTokenizer.load(folders["bert_cased"])
  assert cased.encode("The HEART") != cased.encode("the heart")


def test_decode_stop_at_eos(folders):
  bart = SubwordTokenizer.load(folders["bart"])
  words = bart.encode("The heart is normal.")[1:-1]
  generated = [bart.eos_id, bart.bos_id] + words + [bart.eos_id] + [bart.pad_id] * 3 + words[:2]
  assert bart.decode(generated, stop_at_eos=True) == "The heart is normal."
  assert bart.decode(generated).startswith("The heart is normal.The")  # HF semantics: everything but specials
  assert bart.decode(np.asarray(generated), stop_at_eos=True) == "The heart is normal."
  bert = SubwordTokenizer.load(folders["bert_uncased"])
  ids = bert.encode("the heart") + bert.encode("lungs")[1:-1]
  assert bert.decode(ids, stop_at_eos=True) == "the heart"
  with pytest.raises(ValueError, match="decode_batch"):
    bart.decode(np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="Negative"):
    bart.decode([3, -1])


def test_gpt2_has_no_pad(folders):
  gpt2 = SubwordTokenizer.load(folders["gpt2"])
  assert gpt2.pad_id is None and gpt2.bos_id == gpt2.eos_id == gpt2.unk_id
  assert gpt2.num_special_tokens == 0
  assert gpt2.encode("heart") == gpt2.encode("heart", max_length=50)
  with pytest.raises(ValueError, match="no pad token"):
    gpt2.encode_padded(["heart"], 8)


def test_family_override(folders):
  forced = SubwordTokenizer.load(folders["gpt2_by_config"], family="bart")
  assert forced.family == "bart" and forced.encode("heart")[0] == forced.bos_id
  assert SubwordTokenizer.load(folders["gpt2_by_config"]).family == "gpt2"
  with pytest.raises(ValueError, match="family"):
    SubwordTokenizer.load(folders["bart"], family="t5")


# --- save / load --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert_uncased", "bert_cased_json", "bart", "bart_prefix", "gpt2",
                                  "bert_no_mask"])
def test_save_load_round_trip(folders, name, tmp_path):
  tok = SubwordTokenizer.load(folders[name])
  descriptor = tok.save(tmp_path / "work")
  assert descriptor == tmp_path / "work" / "vocab.json"
  assert (tmp_path / "work" / "tokenizer.json").is_file()
  for path in (tmp_path / "work", descriptor):
    loaded = SubwordTokenizer.load(path)
    assert loaded == tok and loaded.family == tok.family and loaded.special_tokens == tok.special_tokens
    assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert loaded.decode_batch([tok.encode(t) for t in TEXTS]) == tok.decode_batch([tok.encode(t) for t in TEXTS])
  tok.check_matches(SubwordTokenizer.load(tmp_path / "work"), "the checkpoint")
  # The checkpoint layout: save(DIR / "vocab.json"), as checkpointing.save_inference calls it.
  tok.save(tmp_path / "ckpt" / "vocab.json")
  assert load_tokenizer(tmp_path / "ckpt") == tok
  # The saved tokenizer.json is a standard one.
  ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "work" / "tokenizer.json"))
  assert [ref(t)["input_ids"] for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_load_tokenizer_dispatches_word_vocabularies(tmp_path):
  word = Tokenizer.build(["The heart is normal.", "The lungs are clear."], threshold=1, clean="iu")
  word.save(tmp_path / "vocab.json")
  assert load_tokenizer(tmp_path) == word
  assert load_tokenizer(tmp_path / "vocab.json") == word
  with pytest.raises(TokenizerFileError, match="Tokenizer.load"):
    SubwordTokenizer.load(tmp_path / "vocab.json")


def test_word_tokenizer_refuses_a_subword_descriptor(folders, tmp_path):
  SubwordTokenizer.load(folders["bart"]).save(tmp_path)
  with pytest.raises(ValueError, match="vocab.json"):
    Tokenizer.load(tmp_path / "vocab.json")


def test_check_matches_reports_differences(folders):
  bert, cased, bart = (SubwordTokenizer.load(folders[n]) for n in ("bert_uncased", "bert_cased", "bart"))
  with pytest.raises(VocabularyMismatchError, match="family 'bert' vs 'bart'.*vocab_size"):
    bert.check_matches(bart, "the checkpoint")
  with pytest.raises(VocabularyMismatchError, match="normalizer"):
    bert.check_matches(cased, "the checkpoint")
  with pytest.raises(VocabularyMismatchError, match="word"):
    bert.check_matches(Tokenizer(["<unk>", "a"], "iu"), "the word vocabulary")


# --- training -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,size", [("wordpiece", 200), ("bpe", 330)])
def test_train_subword_reproducible_and_sized(kind, size, tmp_path):
  a = train_subword(CORPUS, kind, size, workdir=tmp_path / "a")
  b = train_subword(iter(CORPUS), kind, size, workdir=tmp_path / "b")
  assert a == b
  assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
  assert a.vocab_size == size
  if kind == "wordpiece":
    assert (a.pad_id, a.unk_id, a.cls_id, a.sep_id, a.mask_id) == (0, 1, 2, 3, 4)
    assert (a.bos_id, a.eos_id) == (a.cls_id, a.sep_id)
    assert a.decode(a.encode("The Heart is NORMAL.")) == "the heart is normal."
  else:
    assert (a.bos_id, a.pad_id, a.eos_id, a.unk_id, a.mask_id) == (0, 1, 2, 3, 4)
    for text in TEXTS:  # byte-level: lossless
      if "<" not in text:
        assert a.decode(a.encode(text)) == text
  ids = a.encode("The heart is normal.")
  assert ids[0] == a.bos_id and ids[-1] == a.eos_id
  assert SubwordTokenizer.load(tmp_path / "a") == a
  assert (tmp_path / "a" / "vocab.json").is_file()
  smaller = train_subword(CORPUS, kind, size - 20)
  assert smaller.vocab_size == size - 20


def test_trained_tokenizers_match_transformers(tmp_path):
  """A trained tokenizer written as HF files behaves as the HF tokenizer of its family."""
  wp = train_subword(CORPUS, "wordpiece", 200)
  _write_vocab_txt(wp.tokenizer, tmp_path / "bert")
  ref = BertTokenizer.from_pretrained(str(tmp_path / "bert"))
  bpe = train_subword(CORPUS, "bpe", 330)
  (tmp_path / "bart").mkdir()
  bpe.tokenizer.model.save(str(tmp_path / "bart"))
  ref_bart = BartTokenizerFast.from_pretrained(str(tmp_path / "bart"))
  for text in TEXTS:
    assert wp.encode(text) == ref(text)["input_ids"], text
    assert bpe.encode(text) == ref_bart(text)["input_ids"], text


def test_train_subword_options_and_errors():
  custom = train_subword(CORPUS, "wordpiece", 200, {"cls": "[BOS]", "sep": "[EOS]"}, lowercase=False)
  assert custom.id_to_token(custom.bos_id) == "[BOS]" and custom.encode("Heart")[-1] == custom.eos_id
  assert custom.encode("Heart") != custom.encode("heart")
  with pytest.raises(ValueError, match="kind"):
    train_subword(CORPUS, "unigram", 100)
  with pytest.raises(ValueError, match="minimum 261"):
    train_subword(CORPUS, "bpe", 200)
  with pytest.raises(ValueError, match="alphabet"):
    train_subword(CORPUS, "wordpiece", 20)
  with pytest.raises(ValueError, match="role"):
    train_subword(CORPUS, "bpe", 300, {"cls": "<cls>"})
  with pytest.raises(ValueError, match="distinct"):
    train_subword(CORPUS, "bpe", 300, {"bos": "<s>", "eos": "<s>"})
  with pytest.raises(TypeError, match="text 1"):
    train_subword(["heart", 3], "bpe", 300)


# --- errors -------------------------------------------------------------------------------------------------

def test_missing_files(folders, tmp_path):
  with pytest.raises(TokenizerFileError, match="nope"):
    SubwordTokenizer.load(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(TokenizerFileError, match="vocab.txt"):
    SubwordTokenizer.load(tmp_path / "empty")
  (tmp_path / "merges_only").mkdir()
  (tmp_path / "merges_only" / "vocab.json").write_text((folders["bart"] / "vocab.json").read_text())
  with pytest.raises(TokenizerFileError, match="merges.txt"):
    SubwordTokenizer.load(tmp_path / "merges_only")
  _write_json(tmp_path / "bert_only" / "config.json", {"model_type": "bert"})
  (tmp_path / "bert_only" / "vocab.json").write_text((folders["bart"] / "vocab.json").read_text())
  (tmp_path / "bert_only" / "merges.txt").write_text((folders["bart"] / "merges.txt").read_text())
  with pytest.raises(TokenizerFileError, match="family bert"):
    SubwordTokenizer.load(tmp_path / "bert_only")


def test_corrupt_files(folders, tmp_path):
  def folder(name, **files):
    d = tmp_path / name
    d.mkdir()
    for fname, content in files.items():
      (d / ".".join(fname.rsplit("_", 1))).write_bytes(
          content if isinstance(content, bytes) else content.encode())
    return d

  good_json = (folders["bart_json"] / "tokenizer.json").read_text()
  with pytest.raises(TokenizerFileError, match="tokenizer.json"):
    SubwordTokenizer.load(folder("truncated", tokenizer_json=good_json[:len(good_json) // 2]))
  with pytest.raises(TokenizerFileError, match="vocab.txt.*empty"):
    SubwordTokenizer.load(folder("empty_vocab", vocab_txt=""))
  with pytest.raises(TokenizerFileError, match="vocab.txt.*UTF-8"):
    SubwordTokenizer.load(folder("binary_vocab", vocab_txt=b"\xff\xfe[PAD]\n\x80\n"))
  with pytest.raises(TokenizerFileError, match="vocab.txt.*lines 1 and 3"):
    SubwordTokenizer.load(folder("dup_vocab", vocab_txt="[PAD]\n[UNK]\n[PAD]\n"))
  merges = (folders["bart"] / "merges.txt").read_text()
  with pytest.raises(TokenizerFileError, match="vocab.json.*JSON"):
    SubwordTokenizer.load(folder("bad_vocab_json", vocab_json="{not json", merges_txt=merges))
  with pytest.raises(TokenizerFileError, match="vocab.json.*integer"):
    SubwordTokenizer.load(folder("str_vocab_json", vocab_json='{"a": "b"}', merges_txt=merges))
  vocab = (folders["bart"] / "vocab.json").read_text()
  with pytest.raises(TokenizerFileError, match="merges.txt"):
    SubwordTokenizer.load(folder("bad_merges", vocab_json=vocab, merges_txt="#version: 0.2\na b c\n"))
  with pytest.raises(TokenizerFileError, match="merges.txt"):
    SubwordTokenizer.load(folder("oov_merges", vocab_json=vocab, merges_txt="#version: 0.2\nzzz qqq\n"))
  with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
    SubwordTokenizer.load(folder("bad_config", vocab_txt="[PAD]\n[UNK]\n[CLS]\n[SEP]\n",
                                 tokenizer_config_json="[1, 2]"))
  with pytest.raises(TokenizerFileError, match="neither <s>"):
    SubwordTokenizer.load(folder("ambiguous", vocab_json='{"a": 0, "b": 1}', merges_txt="#version: 0.2\n"))


def test_corrupt_saved_tokenizer(folders, tmp_path):
  tok = SubwordTokenizer.load(folders["bart"])
  tok.save(tmp_path)
  other = SubwordTokenizer.load(folders["gpt2"])
  other.tokenizer.save(str(tmp_path / "tokenizer.json"))  # swapped behind the descriptor's back
  with pytest.raises(TokenizerFileError, match="checksum"):
    SubwordTokenizer.load(tmp_path)
  (tmp_path / "tokenizer.json").unlink()
  with pytest.raises(TokenizerFileError, match="tokenizer.json not found"):
    SubwordTokenizer.load(tmp_path)
  (tmp_path / "vocab.json").write_text(json.dumps({"format": subword.FORMAT}))
  with pytest.raises(TokenizerFileError, match="descriptor"):
    SubwordTokenizer.load(tmp_path / "vocab.json")
  (tmp_path / "other.json").write_text(json.dumps({"x": 1}))
  with pytest.raises(TokenizerFileError, match="other.json"):
    SubwordTokenizer.load(tmp_path / "other.json")


def test_encode_rejects_non_text(folders):
  with pytest.raises(TypeError, match="str"):
    SubwordTokenizer.load(folders["bart"]).encode(b"heart")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    SubwordTokenizer.load(folders["bart_json"])  # a consistent folder: no warning


def test_configured_special_token_missing_from_tokenizer_json(folders, tmp_path):
  """tokenizer_config.json names a pad token the file lacks: registered with a new id, as transformers does."""
  (tmp_path / "tokenizer.json").write_text((folders["bert_uncased_json"] / "tokenizer.json").read_text())
  _write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                    "pad_token": "<newpad>", "cls_token": "[CLS]",
                                                    "sep_token": "[SEP]", "unk_token": "[UNK]"})
  ours, ref = SubwordTokenizer.load(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.family == "bert"
  assert ours.pad_id == ref.pad_token_id == ours.vocab_size - 1 and ours.vocab_size == len(ref)
  for text in TEXTS + ["the <newpad> heart"]:
    assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)


def test_batch_pickle_and_file_paths(folders):
  import pickle

  bert = SubwordTokenizer.load(folders["bert_cased"])
  assert bert.encode_batch(TEXTS) == [bert.encode(t) for t in TEXTS]
  assert bert.encode_batch(TEXTS, max_length=6) == [bert.encode(t, max_length=6) for t in TEXTS]
  copy = pickle.loads(pickle.dumps(bert))  # grain workers may pickle the tokenizer
  assert copy == bert and copy.encode_batch(TEXTS) == bert.encode_batch(TEXTS)
  # vocab.txt named directly: read with its folder's tokenizer_config.json (cased here).
  assert SubwordTokenizer.load(folders["bert_cased"] / "vocab.txt") == bert
  with pytest.raises(TypeError, match="str"):
    bert.encode_batch(["heart", None])


# --- GPT-2 family -------------------------------------------------------------------------------------------

EOT = "<|endoftext|>"


def _write_gpt2_files(tok: SubwordTokenizer, folder: pathlib.Path) -> pathlib.Path:
  """vocab.json (``<|endoftext|>`` included, as OpenAI's file) + merges.txt of a trained GPT-2-family tokenizer."""
  folder.mkdir(parents=True, exist_ok=True)
  vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
  _write_json(folder / "vocab.json", dict(sorted(vocab.items(), key=lambda x: x[1])))
  merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
  lines = [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers < 0.20 writes "a b" strings
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in lines), encoding="utf-8")
  return folder


def test_train_gpt2_family_matches_transformers_gpt2(tmp_path):
  """train_subword(..., family="gpt2"): <|endoftext|> is the last id, one special token inside a text, nothing
  added by encode; equal to transformers' GPT2Tokenizer built from the exported vocab.json + merges.txt and to
  GPT2TokenizerFast reading the saved tokenizer.json; a CT-AGRG slot encodes as [eot, …, eot]."""
  from input_pipeline import ct_rate  # pylint: disable=g-import-not-at-top

  tok = train_subword(CORPUS, "bpe", 330, family="gpt2", workdir=tmp_path / "ours")
  assert tok == train_subword(iter(CORPUS), "bpe", 330, family="gpt2")  # deterministic
  assert tok.family == "gpt2" and tok.vocab_size == 330 and tok.num_special_tokens == 0
  eot = tok.token_to_id(EOT)
  assert eot == tok.vocab_size - 1 == tok.bos_id == tok.eos_id == tok.unk_id and tok.pad_id is None
  assert tok.special_ids == {eot}
  ids = tok.encode(EOT + "abc" + EOT)
  assert ids[0] == ids[-1] == eot and ids[1:-1] == tok.encode("abc") and eot not in ids[1:-1]
  assert tok.encode("") == []
  loaded = load_tokenizer(tmp_path / "ours")
  assert loaded == tok and loaded.family == "gpt2" and loaded.eos_id == eot
  assert json.loads((tmp_path / "ours" / "vocab.json").read_text())["family"] == "gpt2"

  ref = transformers.GPT2Tokenizer.from_pretrained(str(_write_gpt2_files(tok, tmp_path / "hf")))
  from_file = GPT2TokenizerFast(tokenizer_file=str(tmp_path / "ours" / "tokenizer.json"))
  assert len(ref) == len(from_file) == tok.vocab_size and ref.eos_token_id == from_file.eos_token_id == eot
  slot = EOT + ct_rate.clean_sentence_text("Bilateral pleural effusion, 4.5 mm (series 3).") + EOT
  for text in TEXTS + [slot, "a" + EOT + "b " + EOT + " c", EOT, EOT + EOT]:
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"] == from_file(text)["input_ids"], text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
  ids = ct_rate.encode_slot(tok, slot)
  assert ids[0] == ids[-1] == eot and eot not in ids[1:-1] and len(ids) > 3
  assert ids == ref(slot, truncation=True, max_length=ct_rate.MAX_TOKENS)["input_ids"]
  assert ct_rate.encode_slot(tok, slot, max_length=4)[-1] != eot  # cut at the end, as HF's truncation


def test_train_gpt2_family_errors():
  with pytest.raises(ValueError, match="families"):
    train_subword(CORPUS, "wordpiece", 200, family="gpt2")
  with pytest.raises(ValueError, match="role 'pad'"):
    train_subword(CORPUS, "bpe", 300, {"pad": "<pad>"}, family="gpt2")
  with pytest.raises(ValueError, match="minimum 257"):
    train_subword(CORPUS, "bpe", 256, family="gpt2")
  renamed = train_subword(CORPUS, "bpe", 300, {"eos": "<|eot|>"}, family="gpt2")
  assert renamed.id_to_token(renamed.vocab_size - 1) == "<|eot|>" == renamed.special_tokens["bos"]
