"""Subword tokenizers through the ``tokenizers`` library: the HF backend of reference spec §2.3.

Three families, read from the local files of a Hugging Face folder (nothing is ever downloaded):

* ``bert``: WordPiece. ``tokenizer.json``, else ``vocab.txt`` built as HF's ``BertTokenizer`` does
  (``BertNormalizer`` with ``do_lower_case`` / ``strip_accents`` / ``tokenize_chinese_chars`` from
  ``tokenizer_config.json``, defaults lower-casing on and accents following it; ``[CLS] … [SEP]``).
* ``bart``: byte-level BPE, ``tokenizer.json`` else ``vocab.json`` + ``merges.txt`` as HF's ``BartTokenizer``
  (= ``RobertaTokenizer``): no prefix space unless ``add_prefix_space``, ``<s> … </s>``.
* ``gpt2``: byte-level BPE as HF's ``GPT2Tokenizer``: no prefix space, no special tokens added, no pad token.

The family comes from ``family=``, else ``tokenizer_config.json``'s ``tokenizer_class``, else ``config.json``'s
``model_type``, else the files (``vocab.txt`` / WordPiece → bert; a BPE vocabulary with ``<s>`` and ``</s>`` →
bart, with ``<|endoftext|>`` → gpt2). Special-token names are the family's HF defaults, overridden by
``tokenizer_config.json`` / ``special_tokens_map.json``. A ``tokenizer.json`` is used as it is (normalizer,
pre-tokenizer, post-processor and added tokens from the file, as ``tokenizers`` and ``AutoTokenizer`` read it).

    tok = SubwordTokenizer.load("/models/bart-base")        # HF folder
    tok.encode("The heart is normal.")                       # [0, ..., 2]: with the model's special tokens
    tok.encode(report, max_length=64)                        # truncated keeping the specials (spec §2.3)
    ids, mask = tok.encode_padded(reports, 64)               # (B, 64) int32, padded with pad_id
    tok.decode(ids)                                          # special tokens skipped (HF skip_special_tokens)
    tok.save(workdir)                                        # workdir/tokenizer.json + workdir/vocab.json
    SubwordTokenizer.load(workdir)
    tok = train_subword(reports, "bpe", 2000, workdir=workdir)   # for users without tokenizer files
    tok = train_subword(sentences, "bpe", 2000, family="gpt2")   # GPT-2-style: <|endoftext|> the last id

A saved tokenizer is ``DIR/tokenizer.json`` (the whole ``tokenizers`` pipeline, special tokens included) plus
``DIR/vocab.json``, a small descriptor (``format`` ``rrg_jax.subword/1``, family, special-token roles, a checksum
of tokenizer.json) in the place where a checkpoint keeps the word vocabulary, so ``save(DIR / "vocab.json")``
works too and ``load_tokenizer(path)`` reads either kind. Every unreadable, missing or inconsistent file raises a
``TokenizerFileError`` (a ValueError) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from input_pipeline.tokenizer import FORMAT as _WORD_FORMAT
from input_pipeline.tokenizer import VocabularyMismatchError

FORMAT = "rrg_jax.subword/1"
DESCRIPTOR_FILE = "vocab.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MODEL_CONFIG = "config.json"
WORDPIECE_VOCAB = "vocab.txt"
BPE_VOCAB = "vocab.json"
BPE_MERGES = "merges.txt"

FAMILIES = ("bert", "bart", "gpt2")
KINDS = ("wordpiece", "bpe")
# HF's SPECIAL_TOKENS_ATTRIBUTES order (the order in which HF registers the special tokens).
ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
DEFAULT_SPECIALS: dict[str, dict[str, str | None]] = {
    "bert": {"bos": None, "eos": None, "unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]",
             "mask": "[MASK]"},
    "bart": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "sep": "</s>", "pad": "<pad>", "cls": "<s>",
             "mask": "<mask>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "sep": None, "pad": None,
             "cls": None, "mask": None},
}
# The special-token roles of the tokenizers trained by ``train_subword``, per family, in vocabulary order (BART's
# first four ids: <s> 0, <pad> 1, </s> 2, <unk> 3; BERT's [PAD] = 0; GPT-2's one token, which also plays bos and
# unk, comes last).
_TRAIN_ORDER = {"bert": ("pad", "unk", "cls", "sep", "mask"), "bart": ("bos", "pad", "eos", "unk", "mask"),
                "gpt2": ("eos",)}
_KIND_FAMILIES = {"wordpiece": ("bert",), "bpe": ("bart", "gpt2")}


class TokenizerFileError(ValueError):
  """A tokenizer file or folder is missing, unreadable or inconsistent; the message names the file."""


# --- small readers ----------------------------------------------------------------------------------------

def _read_json(path: pathlib.Path, what: str) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerFileError(f"{path} is not a readable {what} (JSON): {type(e).__name__}: {e}") from e


def _read_json_object(path: pathlib.Path, what: str) -> dict[str, Any]:
  data = _read_json(path, what)
  if not isinstance(data, dict):
    raise TokenizerFileError(f"{path} holds a {type(data).__name__}, expected a JSON object ({what}).")
  return data


def _optional_object(path: pathlib.Path, what: str) -> dict[str, Any]:
  return _read_json_object(path, what) if path.is_file() else {}


def _token_content(value: Any, path: pathlib.Path, key: str) -> str | None:
  """A special token as HF configs write it: a string, ``{"content": ...}`` (AddedToken) or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerFileError(f"{path}: {key!r} must be a token string, an AddedToken object or null, "
                           f"not {value!r}.")


def _family_from_name(name: Any) -> str | None:
  if not isinstance(name, str):
    return None
  n = name.lower()
  if "bert" in n and "roberta" not in n:
    return "bert"
  if "bart" in n or "roberta" in n:
    return "bart"
  if "gpt2" in n:
    return "gpt2"
  return None


def _check_family(family: str | None) -> None:
  if family is not None and family not in FAMILIES:
    raise ValueError(f"Unknown tokenizer family {family!r}; choose one of {FAMILIES}.")


def _family_from_vocab(vocab: Mapping[str, int], source: str) -> str:
  if "<s>" in vocab and "</s>" in vocab:
    return "bart"
  if "<|endoftext|>" in vocab:
    return "gpt2"
  raise TokenizerFileError(f"{source}: cannot tell BART from GPT-2 (the vocabulary has neither <s>/</s> nor "
                           "<|endoftext|>); pass family='bart' or 'gpt2', or add tokenizer_config.json.")


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the tokenizer ----------------------------------------------------------------------------------------

class SubwordTokenizer:
  """A ``tokenizers.Tokenizer`` with the word tokenizer's surface (``encode``, ``decode``, ``decode_batch``,
  ``vocab_size``, ``save`` / ``load``, ``check_matches``) and named special ids (None where the family has no
  such token, e.g. GPT-2's pad)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, family: str, special_tokens: Mapping[str, str | None], *,
               clean_up_tokenization_spaces: bool = False, source: str = "tokenizer"):
    """``special_tokens``: role (``ROLES``) → token string or None; every named token must be in the
    vocabulary (added tokens included)."""
    _check_family(family)
    unknown = set(special_tokens) - set(ROLES)
    if unknown:
      raise ValueError(f"Unknown special-token roles {sorted(unknown)}; roles are {ROLES}.")
    self.tokenizer = tokenizer
    self.family = family
    self.source = source
    self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
    self.special_tokens = {r: special_tokens.get(r) for r in ROLES}
    ids = {}
    for role, token in self.special_tokens.items():
      if token is None:
        ids[role] = None
        continue
      i = tokenizer.token_to_id(token)
      if i is None:
        raise TokenizerFileError(f"{source}: the {role} token {token!r} is not in the vocabulary.")
      ids[role] = i
    self._ids = ids

  # special ids
  @property
  def bos_id(self) -> int | None:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int | None:
    return self._ids["eos"]

  @property
  def pad_id(self) -> int | None:
    return self._ids["pad"]

  @property
  def unk_id(self) -> int | None:
    return self._ids["unk"]

  @property
  def cls_id(self) -> int | None:
    return self._ids["cls"]

  @property
  def sep_id(self) -> int | None:
    return self._ids["sep"]

  @property
  def mask_id(self) -> int | None:
    return self._ids["mask"]

  @property
  def special_ids(self) -> frozenset[int]:
    """Every id that ``decode`` skips: the roles' ids and all added tokens marked special."""
    added = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
    return frozenset(added | {i for i in self._ids.values() if i is not None})

  @property
  def vocab_size(self) -> int:
    """Number of ids (added tokens included; HF's ``len(tokenizer)``)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    return self.tokenizer.id_to_token(int(i))

  @property
  def num_special_tokens(self) -> int:
    """Special tokens ``encode`` adds to one text (2 for BERT/BART, 0 for GPT-2)."""
    return self.tokenizer.num_special_tokens_to_add(False)

  # encoding
  def _encoding(self, text: str, max_length: int | None) -> tokenizers.Encoding:
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, not {type(text).__name__}.")
    if max_length is None:
      return self.tokenizer.encode(text)
    max_length = int(max_length)
    if max_length < self.num_special_tokens:
      raise ValueError(f"max_length {max_length} leaves no room for the {self.num_special_tokens} special "
                       "tokens.")
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    enc.truncate(max_length - self.num_special_tokens)
    return self.tokenizer.post_process(enc, None, True)

  def encode(self, text: str, *, max_length: int | None = None) -> list[int]:
    """Ids with the model's special tokens (HF ``tokenizer(text)["input_ids"]``). ``max_length``: truncated to at
    most that many ids *keeping* the specials (HF ``truncation=True, max_length=...``)."""
    return list(self._encoding(text, max_length).ids)

  def encode_offsets(self, text: str, *, max_length: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """``encode`` plus each id's character span ``(start, end)`` in ``text`` (``(0, 0)`` for special tokens)."""
    enc = self._encoding(text, max_length)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def encode_batch(self, texts: Iterable[str], *, max_length: int | None = None) -> list[list[int]]:
    """``encode`` of each text (one parallel ``tokenizers`` call)."""
    texts = list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"encode_batch takes str texts, not {type(t).__name__}.")
    if max_length is None:
      return [list(e.ids) for e in self.tokenizer.encode_batch(texts)]
    return [self.encode(t, max_length=max_length) for t in texts]

  def encode_padded(self, texts: Iterable[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``, both int32 (B, length): truncated keeping the specials, right-padded with ``pad_id``;
    mask 1 on real tokens (specials included). HF ``truncation=True, max_length=length,
    padding="max_length"``."""
    if self.pad_id is None:
      raise ValueError(f"{self.source} has no pad token (family {self.family}); padding needs one.")
    rows = self.encode_batch(texts, max_length=length)
    ids = np.full((len(rows), int(length)), self.pad_id, np.int32)
    mask = np.zeros((len(rows), int(length)), np.int32)
    for b, row in enumerate(rows):
      ids[b, :len(row)] = row
      mask[b, :len(row)] = 1
    return ids, mask

  # decoding
  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True, stop_at_eos: bool = False) -> str:
    """Text of ``ids`` (HF ``decode(ids, skip_special_tokens=True)``; ids outside the vocabulary vanish).

    ``stop_at_eos``: drop everything from the first ``eos_id`` that follows a non-special id (so a leading
    decoder-start ``</s>`` of BART does not end the text); the ids after it (padding, junk after the end of a
    generated report) are ignored.
    """
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if arr.ndim > 1:
      raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}; use decode_batch.")
    ids = [int(i) for i in arr.tolist()]
    if any(i < 0 for i in ids):
      raise ValueError(f"Negative token id in {ids[:20]}.")
    if stop_at_eos and self.eos_id is not None:
      special, seen = self.special_ids, False
      for n, i in enumerate(ids):
        if i == self.eos_id and seen:
          ids = ids[:n]
          break
        seen = seen or i not in special
    text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if self.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
      text = clean_up_tokenization(text)
    return text

  def decode_batch(self, ids_batch: Iterable[Iterable[int]], **kwargs) -> list[str]:
    return [self.decode(ids, **kwargs) for ids in ids_batch]

  # persistence
  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    """Writes ``DIR/tokenizer.json`` and the descriptor ``DIR/vocab.json``; ``path`` is DIR or the descriptor's
    own path (a ``*.json`` file, tokenizer.json goes beside it). Returns the descriptor's path."""
    path = pathlib.Path(path)
    descriptor = path if path.suffix == ".json" else path / DESCRIPTOR_FILE
    if descriptor.name == TOKENIZER_FILE:
      raise ValueError(f"{descriptor}: the descriptor cannot be called {TOKENIZER_FILE}; pass the folder.")
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    tok_path = descriptor.parent / TOKENIZER_FILE
    self.tokenizer.save(str(tok_path), pretty=False)
    descriptor.write_text(json.dumps({
        "format": FORMAT, "family": self.family, "tokenizer_file": TOKENIZER_FILE,
        "special_tokens": self.special_tokens, "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        "vocab_size": self.vocab_size, "sha256": _sha256(tok_path)}, ensure_ascii=False, indent=1))
    return descriptor

  @classmethod
  def load(cls, path: str | pathlib.Path, *, family: str | None = None) -> SubwordTokenizer:
    """A saved tokenizer (its folder or its ``vocab.json`` descriptor), a ``tokenizer.json`` file, or an HF folder
    (see the module docstring). ``family`` forces the family of an HF folder or tokenizer.json."""
    _check_family(family)
    path = pathlib.Path(path)
    if not path.exists():
      raise TokenizerFileError(f"{path}: no such tokenizer file or folder (nothing is downloaded).")
    if path.is_dir():
      descriptor = path / DESCRIPTOR_FILE
      if descriptor.is_file() and _is_descriptor(descriptor):
        return cls._load_saved(descriptor)
      return cls._from_hf_folder(path, family)
    if path.name == TOKENIZER_FILE:
      return cls._from_tokenizer_json(path, family, {}, {}, str(path))
    if path.name == WORDPIECE_VOCAB:  # this file, with its folder's tokenizer_config.json
      return cls._from_wordpiece_vocab(path, _optional_object(path.parent / TOKENIZER_CONFIG, "tokenizer config"),
                                       _optional_object(path.parent / SPECIAL_TOKENS_MAP, "special tokens map"),
                                       str(path))
    data = _read_json(path, "tokenizer descriptor")
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == FORMAT:
      return cls._load_saved(path)
    if fmt == _WORD_FORMAT:
      raise TokenizerFileError(f"{path} is a word vocabulary ({_WORD_FORMAT}); read it with "
                               "input_pipeline.tokenizer.Tokenizer.load (or load_tokenizer).")
    raise TokenizerFileError(f"{path} is neither a saved subword tokenizer (format {FORMAT!r}) nor a "
                             f"{TOKENIZER_FILE}; pass an HF folder or a saved tokenizer's folder.")

  @classmethod
  def _load_saved(cls, descriptor: pathlib.Path) -> SubwordTokenizer:
    data = _read_json_object(descriptor, "tokenizer descriptor")
    try:
      family, specials = data["family"], data["special_tokens"]
      name = data.get("tokenizer_file", TOKENIZER_FILE)
      if not isinstance(specials, dict) or not isinstance(name, str):
        raise TypeError("special_tokens must be an object and tokenizer_file a string")
      _check_family(family)
    except (KeyError, TypeError, ValueError) as e:
      raise TokenizerFileError(f"{descriptor} is not a valid {FORMAT} descriptor: {type(e).__name__}: {e}") from e
    tok_path = descriptor.parent / name
    if not tok_path.is_file():
      raise TokenizerFileError(f"{tok_path} not found: {descriptor} describes a tokenizer stored there.")
    if data.get("sha256") is not None and _sha256(tok_path) != data["sha256"]:
      raise TokenizerFileError(f"{tok_path} does not match {descriptor} (checksum differs): the file was changed "
                               "or belongs to another tokenizer.")
    tok = cls(_tokenizer_from_file(tok_path), family, specials,
              clean_up_tokenization_spaces=bool(data.get("clean_up_tokenization_spaces", False)),
              source=str(descriptor.parent))
    if data.get("vocab_size") is not None and tok.vocab_size != data["vocab_size"]:
      raise TokenizerFileError(f"{tok_path} has {tok.vocab_size} ids but {descriptor} says {data['vocab_size']}.")
    return tok

  # HF folders
  @classmethod
  def _from_hf_folder(cls, folder: pathlib.Path, family: str | None) -> SubwordTokenizer:
    tok_config = _optional_object(folder / TOKENIZER_CONFIG, "tokenizer config")
    specials_map = _optional_object(folder / SPECIAL_TOKENS_MAP, "special tokens map")
    model_config = _optional_object(folder / MODEL_CONFIG, "model config")
    family = (family or _family_from_name(tok_config.get("tokenizer_class"))
              or _family_from_name(model_config.get("model_type")))
    if (folder / TOKENIZER_FILE).is_file():
      return cls._from_tokenizer_json(folder / TOKENIZER_FILE, family, tok_config, specials_map, str(folder))
    if (folder / WORDPIECE_VOCAB).is_file() and family in (None, "bert"):
      return cls._from_wordpiece_vocab(folder / WORDPIECE_VOCAB, tok_config, specials_map, str(folder))
    if (folder / BPE_VOCAB).is_file() and (folder / BPE_MERGES).is_file() and family != "bert":
      return cls._from_bpe_files(folder / BPE_VOCAB, folder / BPE_MERGES, family, tok_config, specials_map,
                                 str(folder))
    present = sorted(p.name for p in folder.iterdir())
    want = {"bert": f"{TOKENIZER_FILE} or {WORDPIECE_VOCAB}"}.get(
        family, f"{TOKENIZER_FILE}, {WORDPIECE_VOCAB}, or {BPE_VOCAB} + {BPE_MERGES}")
    raise TokenizerFileError(f"{folder}: no tokenizer files for family {family or '(any)'}: expected {want}; "
                             f"found {present[:20]}.")

  @classmethod
  def _from_tokenizer_json(cls, path: pathlib.Path, family: str | None, tok_config: Mapping[str, Any],
                           specials_map: Mapping[str, Any], source: str) -> SubwordTokenizer:
    tok = _tokenizer_from_file(path)
    model_type = type(tok.model).__name__
    if family is None:
      family = "bert" if model_type == "WordPiece" else _family_from_vocab(tok.get_vocab(), str(path))
    vocab = tok.get_vocab()
    configured = _configured_specials(tok_config, specials_map, path.parent)
    specials = _family_specials(family, configured, vocab)
    # Configured special tokens that the file lacks or does not mark special: HF registers them (a new id for an
    # absent one); the family's default names are only used where the file has them.
    marked = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    register = [t for t in dict.fromkeys(specials.values()) if t is not None and t not in marked
                and (t not in vocab or t in configured.values())]
    if register:
      tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in register])
    _warn_if_inconsistent(tok, tok_config, path)
    return cls(tok, family, specials, source=source,
               clean_up_tokenization_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)))

  @classmethod
  def _from_wordpiece_vocab(cls, path: pathlib.Path, tok_config: Mapping[str, Any],
                            specials_map: Mapping[str, Any], source: str) -> SubwordTokenizer:
    """As ``transformers.BertTokenizer(vocab_file)``."""
    vocab = read_wordpiece_vocab(path)
    specials = _family_specials("bert", _configured_specials(tok_config, specials_map, path.parent))
    lower = tok_config.get("do_lower_case", True)
    strip_accents = tok_config.get("strip_accents", None)
    chinese = tok_config.get("tokenize_chinese_chars", True)
    for key, value in (("do_lower_case", lower), ("tokenize_chinese_chars", chinese)):
      if not isinstance(value, bool):
        raise TokenizerFileError(f"{path.parent / TOKENIZER_CONFIG}: {key} must be true or false, not {value!r}.")
    if strip_accents is not None and not isinstance(strip_accents, bool):
      raise TokenizerFileError(f"{path.parent / TOKENIZER_CONFIG}: strip_accents must be true, false or null.")
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=specials["unk"] or "[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese,
                                                strip_accents=strip_accents, lowercase=lower)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    _register_specials(tok, specials)
    tok.post_processor = _bert_processor(tok, specials["cls"], specials["sep"], str(path))
    return cls(tok, "bert", specials, source=source,
               clean_up_tokenization_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)))

  @classmethod
  def _from_bpe_files(cls, vocab_path: pathlib.Path, merges_path: pathlib.Path, family: str | None,
                      tok_config: Mapping[str, Any], specials_map: Mapping[str, Any], source: str
                      ) -> SubwordTokenizer:
    """As ``transformers.GPT2Tokenizer`` / ``BartTokenizer`` (= ``RobertaTokenizer``) from vocab + merges."""
    vocab_data = _read_json_object(vocab_path, "BPE vocabulary")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab_data.values()):
      raise TokenizerFileError(f"{vocab_path}: a BPE vocabulary maps tokens to integer ids.")
    try:
      vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
      model = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False)
    except Exception as e:  # tokenizers raises plain Exception
      raise TokenizerFileError(f"{merges_path} (with {vocab_path}) is not a readable BPE merges file: {e}") from e
    family = family or _family_from_vocab(vocab, str(vocab_path))
    specials = _family_specials(family, _configured_specials(tok_config, specials_map, vocab_path.parent))
    add_prefix_space = tok_config.get("add_prefix_space", False)
    trim_offsets = tok_config.get("trim_offsets", True)
    if not isinstance(add_prefix_space, bool) or not isinstance(trim_offsets, bool):
      raise TokenizerFileError(f"{vocab_path.parent / TOKENIZER_CONFIG}: add_prefix_space / trim_offsets must be "
                               "true or false.")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    _register_specials(tok, specials)
    if family == "bart":
      for role in ("cls", "sep"):
        if specials[role] is None:
          raise TokenizerFileError(f"{source}: a BART tokenizer needs a {role} token.")
      tok.post_processor = processors.RobertaProcessing(
          (specials["sep"], tok.token_to_id(specials["sep"])), (specials["cls"], tok.token_to_id(specials["cls"])),
          trim_offsets=trim_offsets, add_prefix_space=add_prefix_space)
    return cls(tok, family, specials, source=source)

  # comparison
  def _signature(self) -> tuple:
    return (self.family, tuple(self.special_tokens.items()), self.clean_up_tokenization_spaces,
            json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, SubwordTokenizer) and self._signature() == other._signature()

  def __hash__(self) -> int:
    return hash(self._signature())

  def __repr__(self) -> str:
    return f"SubwordTokenizer(family={self.family!r}, vocab_size={self.vocab_size}, source={self.source!r})"

  def check_matches(self, other: Any, what: str) -> None:
    """Raises ``VocabularyMismatchError`` (naming ``what`` and the first differences) unless equal."""
    if self == other:
      return
    if not isinstance(other, SubwordTokenizer):
      raise VocabularyMismatchError(f"Tokenizer does not match {what}: a subword tokenizer vs a "
                                    f"{type(other).__name__}. A model only works with the vocabulary it was "
                                    "trained with.")
    problems = []
    if self.family != other.family:
      problems.append(f"family {self.family!r} vs {other.family!r}")
    if self.vocab_size != other.vocab_size:
      problems.append(f"vocab_size {self.vocab_size} vs {other.vocab_size}")
    diff = [r for r in ROLES if self.special_tokens[r] != other.special_tokens[r] or
            self._ids[r] != other._ids[r]]
    if diff:
      problems.append("special tokens " + ", ".join(
          f"{r}: {self.special_tokens[r]!r}={self._ids[r]} vs {other.special_tokens[r]!r}={other._ids[r]}"
          for r in diff))
    a, b = self.tokenizer.get_vocab(), other.tokenizer.get_vocab()
    ids = sorted(set(a.values()) | set(b.values()))
    inv_a, inv_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
    tokens = [(i, inv_a.get(i), inv_b.get(i)) for i in ids if inv_a.get(i) != inv_b.get(i)][:5]
    if tokens:
      problems.append("first differing ids: " + ", ".join(f"{i}: {x!r} vs {y!r}" for i, x, y in tokens))
    if not problems:
      sa, sb = json.loads(self.tokenizer.to_str()), json.loads(other.tokenizer.to_str())
      parts = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
      problems.append("pipeline differs in " + ", ".join(parts or ["decoding options"]))
    raise VocabularyMismatchError(f"Tokenizer does not match {what}: " + "; ".join(problems)
                                  + ". A model only works with the vocabulary it was trained with.")


def clean_up_tokenization(text: str) -> str:
  """HF's ``clean_up_tokenization`` (applied to WordPiece decodes when the folder's config asks for it)."""
  return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
          .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
          .replace(" 're", "'re"))


def _is_descriptor(path: pathlib.Path) -> bool:
  """True for a saved tokenizer's vocab.json (an HF BPE vocab.json maps tokens — possibly 'format' — to ints)."""
  data = _read_json(path, "tokenizer descriptor or BPE vocabulary")
  return isinstance(data, dict) and data.get("format") == FORMAT


def _tokenizer_from_file(path: pathlib.Path) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises plain Exception for unreadable / invalid files
    raise TokenizerFileError(f"{path} is not a readable tokenizers file (truncated or corrupt?): {e}") from e


def read_wordpiece_vocab(path: str | pathlib.Path) -> dict[str, int]:
  """``vocab.txt`` → token → id, line by line as HF's ``load_vocab`` (universal newlines, only the newline
  stripped); TokenizerFileError for an unreadable, empty or duplicate-holding file."""
  path = pathlib.Path(path)
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise TokenizerFileError(f"{path} is not a readable WordPiece vocabulary (UTF-8 text, one token a line): "
                             f"{type(e).__name__}: {e}") from e
  vocab: dict[str, int] = {}
  for i, line in enumerate(lines):
    token = line.rstrip("\n")
    if token in vocab:
      raise TokenizerFileError(f"{path}: token {token!r} on lines {vocab[token] + 1} and {i + 1} (duplicates "
                               "would leave unused ids).")
    vocab[token] = i
  if not vocab:
    raise TokenizerFileError(f"{path} is empty.")
  return vocab


def _configured_specials(tok_config: Mapping[str, Any], specials_map: Mapping[str, Any], folder: pathlib.Path
                         ) -> dict[str, str | None]:
  out: dict[str, str | None] = {}
  for source, name in ((specials_map, SPECIAL_TOKENS_MAP), (tok_config, TOKENIZER_CONFIG)):
    for role in ROLES:
      key = f"{role}_token"
      if key in source:
        out[role] = _token_content(source[key], folder / name, key)
  return out


def _family_specials(family: str, configured: Mapping[str, str | None],
                     vocab: Mapping[str, int] | None = None) -> dict[str, str | None]:
  """The family's default names (only those in ``vocab`` when given) updated with ``configured``; BERT's bos/eos
  are its cls/sep unless configured."""
  out = dict(DEFAULT_SPECIALS[family])
  if vocab is not None:
    out = {r: (t if t in vocab else None) for r, t in out.items()}
  out.update(configured)
  if family == "bert":
    if "bos" not in configured:
      out["bos"] = out["cls"]
    if "eos" not in configured:
      out["eos"] = out["sep"]
  return out


def _register_specials(tok: tokenizers.Tokenizer, specials: Mapping[str, str | None]) -> None:
  """HF registers every special token as an AddedToken(normalized=False, special=True), in ROLES order; a token
  absent from the vocabulary gets the next id."""
  names = [specials[r] for r in ROLES if specials.get(r) is not None]
  tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                          for t in dict.fromkeys(names)])


def _bert_processor(tok: tokenizers.Tokenizer, cls_token: str | None, sep_token: str | None, source: str):
  if cls_token is None or sep_token is None:
    raise TokenizerFileError(f"{source}: a BERT tokenizer needs cls and sep tokens.")
  return processors.TemplateProcessing(
      single=f"{cls_token}:0 $A:0 {sep_token}:0", pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
      special_tokens=[(cls_token, tok.token_to_id(cls_token)), (sep_token, tok.token_to_id(sep_token))])


def _warn_if_inconsistent(tok: tokenizers.Tokenizer, tok_config: Mapping[str, Any], path: pathlib.Path) -> None:
  """tokenizer.json is used as it is; transformers >= 5's model classes rebuild the normalizer from the config
  instead, so a disagreement between the two files is worth a warning."""
  norm = json.loads(tok.to_str()).get("normalizer") or {}
  if norm.get("type") == "BertNormalizer" and "do_lower_case" in tok_config \
      and bool(norm.get("lowercase")) != bool(tok_config["do_lower_case"]):
    warnings.warn(f"{path}: the normalizer has lowercase={norm.get('lowercase')} but {TOKENIZER_CONFIG} says "
                  f"do_lower_case={tok_config['do_lower_case']}; using {TOKENIZER_FILE} as it is.", stacklevel=3)


# --- training -----------------------------------------------------------------------------------------------

def _checked_texts(texts: Iterable[str]) -> Iterable[str]:
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"train_subword: text {i} is a {type(t).__name__}, not a str.")
    yield t


def _train_wordpiece(tok: tokenizers.Tokenizer, texts: Sequence[str], trainer, specials: Sequence[str],
                     unk: str, vocab_size: int, min_frequency: int) -> tokenizers.Tokenizer:
  """``WordPieceTrainer`` numbers the ``##c`` continuation symbols in hash-map order, and ties between equally
  frequent merges are broken by id, so two runs can differ. Listing the continuation symbols (sorted) right after
  the special tokens fixes their ids and makes training deterministic; the tokenizer is then rebuilt around the
  trained model so that only the real special tokens are registered as such."""
  prefix = "##"
  continuation = set()
  for text in texts:
    for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
      continuation.update(word[1:])
  seeded = list(specials) + [prefix + c for c in sorted(continuation)]
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=seeded,
                                      continuing_subword_prefix=prefix, show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  out = tokenizers.Tokenizer(models.WordPiece(tok.get_vocab(with_added_tokens=False), unk_token=unk,
                                              continuing_subword_prefix=prefix))
  out.normalizer, out.pre_tokenizer, out.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
  return out


def train_subword(texts: Iterable[str], kind: str, vocab_size: int,
                  special_tokens: Mapping[str, str] | None = None, *, family: str | None = None,
                  lowercase: bool = True, strip_accents: bool | None = None, add_prefix_space: bool = False,
                  min_frequency: int = 0, workdir: str | pathlib.Path | None = None) -> SubwordTokenizer:
  """A new tokenizer trained on ``texts`` with ``tokenizers``' trainers (deterministic for the same texts).

  ``kind`` ``"wordpiece"``: BERT-style (family bert; ``BertNormalizer(lowercase, strip_accents)``,
  ``[CLS] … [SEP]``), ids [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4. ``"bpe"``: byte-level BPE (the 256 byte
  symbols always present) of ``family`` ``"bart"`` (the default; ``<s> … </s>``, ids <s> 0, <pad> 1, </s> 2,
  <unk> 3, <mask> 4) or ``"gpt2"`` (as HF's ``GPT2Tokenizer``: one special token ``<|endoftext|>``, which is bos,
  eos and unk, is recognised inside a text and is the **last** id, ``vocab_size - 1`` like GPT-2's 50256; no pad;
  ``encode`` adds nothing, so ``"<|endoftext|>abc<|endoftext|>"`` → ``[eot, …, eot]``; the texts are split at
  ``<|endoftext|>`` for training). ``family`` None: the kind's first family (bert, bart). ``special_tokens``:
  role → name overrides (roles of ``ROLES`` that the family trains: bert pad/unk/cls/sep/mask, bart
  bos/pad/eos/unk/mask, gpt2 eos — its one token). ``vocab_size`` is the size reached when the texts have enough
  material (the trainers stop earlier otherwise); ValueError if the specials and the alphabet alone exceed it.
  ``workdir``: saved there (``tokenizer.json`` + ``vocab.json``).
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown subword kind {kind!r}; choose one of {KINDS}.")
  family = family or _KIND_FAMILIES[kind][0]
  if family not in _KIND_FAMILIES[kind]:
    raise ValueError(f"train_subword({kind!r}) trains the families {_KIND_FAMILIES[kind]}, not {family!r}.")
  order = _TRAIN_ORDER[family]
  names = {r: DEFAULT_SPECIALS[family][r] for r in order}
  for role, token in (special_tokens or {}).items():
    if role not in names:
      raise ValueError(f"train_subword({kind!r}, family={family!r}): special-token role {role!r} is not one of "
                       f"{order}.")
    if not isinstance(token, str) or not token:
      raise ValueError(f"train_subword: the {role} token must be a non-empty string, not {token!r}.")
    names[role] = token
  if len(set(names.values())) != len(names):
    raise ValueError(f"train_subword: special tokens must be distinct, got {names}.")
  vocab_size = int(vocab_size)
  specials = [names[r] for r in order]
  if kind == "wordpiece":
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token=names["unk"]))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, show_progress=False)
    minimum = len(specials) + 1
  else:
    tok = tokenizers.Tokenizer(models.BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                          fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    # GPT-2: the special token is registered after training, so that it gets the last id.
    last = family == "gpt2"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials) if last else vocab_size,
                                  min_frequency=min_frequency, special_tokens=[] if last else specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    minimum = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size < minimum:
    raise ValueError(f"train_subword({kind!r}): vocab_size {vocab_size} is below the minimum {minimum} "
                     f"(special tokens{' + 256 byte symbols' if kind == 'bpe' else ' + one symbol'}).")
  texts = list(_checked_texts(texts))
  if kind == "wordpiece":
    tok = _train_wordpiece(tok, texts, trainer, specials, names["unk"], vocab_size, min_frequency)
  elif family == "gpt2":
    tok.train_from_iterator([piece for t in texts for piece in t.split(names["eos"])], trainer=trainer)
  else:
    tok.train_from_iterator(texts, trainer=trainer)
  full = dict(DEFAULT_SPECIALS[family], **names)
  if family == "bert":
    full["bos"], full["eos"] = full["cls"], full["sep"]
    tok.post_processor = _bert_processor(tok, full["cls"], full["sep"], "train_subword")
  elif family == "bart":
    full["cls"], full["sep"] = full["bos"], full["eos"]
    tok.post_processor = processors.RobertaProcessing((full["sep"], tok.token_to_id(full["sep"])),
                                                      (full["cls"], tok.token_to_id(full["cls"])),
                                                      trim_offsets=True, add_prefix_space=add_prefix_space)
  else:
    full["bos"] = full["unk"] = full["eos"]
  _register_specials(tok, full)
  if tok.get_vocab_size() > vocab_size:
    raise ValueError(f"train_subword({kind!r}): the texts' alphabet and the special tokens already need "
                     f"{tok.get_vocab_size()} ids, more than vocab_size {vocab_size}.")
  out = SubwordTokenizer(tok, family, full, source=f"train_subword({kind}, {family})")
  if workdir is not None:
    out.save(workdir)
  return out


def load_tokenizer(path: str | pathlib.Path):
  """A checkpoint's vocabulary of either kind: ``input_pipeline.tokenizer.Tokenizer`` for a word vocabulary
  (``rrg_jax.tokenizer/1``), ``SubwordTokenizer`` for a saved subword tokenizer or an HF folder."""
  from input_pipeline.tokenizer import Tokenizer

  path = pathlib.Path(path)
  descriptor = path / DESCRIPTOR_FILE if path.is_dir() else path
  if descriptor.is_file() and descriptor.name != TOKENIZER_FILE:
    data = _read_json(descriptor, "vocabulary")
    if isinstance(data, dict) and data.get("format") == _WORD_FORMAT:
      return Tokenizer.load(descriptor)
  return SubwordTokenizer.load(path)
