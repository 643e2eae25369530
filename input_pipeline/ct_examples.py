"""CT-RATE examples for the Grain loader (``config.data.format = "ct_rate"``; ct_agrg_spec §2).

``data_root(config)``: ``config.data.data_dir``, or — when it is empty — the embedded **SYNTHETIC** chest-CT set
(``input_pipeline.synthetic_ct``), generated once (deterministically, ~20 s) into
``$RRG_JAX_DATA/synthetic_ct`` (default ``~/.cache/rrg_jax/synthetic_ct``) at ``config.data.volume_shape`` with
``config.data.synthetic_sizes`` (train, val, test) volumes (another shape or size regenerates it).
``config.data.splits`` names each split's files relative to that root: ``{split: {"volumes": folder, "labels":
CSV, "sentences": CSV or ""}}`` (CT-RATE has no test split: the configs use CT-RATE validation as test and carve
val out of train, §2.1).

``VolumeSource``: random-access raw examples ``{"id": file name, "path", "labels" float32 (K,), "texts": K slot
strings or None}`` of ``ct_rate.volume_records`` (sorted file order, only files listed in the split's labels CSV;
sentence slots when the split has a sentences CSV). ``PrepareVolume``: raw example → ``volumes`` float32
(D, H, W) (``volumes.load_contract_volume`` → ``volumes.preprocess`` to ``data.volume_shape``), ``labels``,
and with sentences ``targets`` int32 (K, T) / ``masks`` float32 (K, T) (``ct_rate.encode_slot`` of each slot,
T = ``data.max_seq_length``, padded with ``<|endoftext|>``, masks 1 on real ids). No augmentation (§2.1): train
and evaluation examples are the same.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from input_pipeline import ct_rate, records, subword, synthetic_ct, volumes

SYNTHETIC_DIR = "synthetic_ct"
TOKENIZER_DIR = "gpt2_tokenizer"  # the synthetic set's GPT-2-family tokenizer (trained on its sentences)


def synthetic_root() -> pathlib.Path:
  """Where the embedded synthetic set lives: ``$RRG_JAX_DATA/synthetic_ct`` (default ``~/.cache/rrg_jax``)."""
  return pathlib.Path(os.environ.get("RRG_JAX_DATA", "~/.cache/rrg_jax")).expanduser() / SYNTHETIC_DIR


def data_root(config: ml_collections.ConfigDict) -> pathlib.Path:
  """``config.data.data_dir``, or the synthetic set (generated if absent or of other parameters)."""
  d = config.data
  if d.data_dir:
    return records.resolve_data_dir(d.data_dir)
  num_train, num_val, num_test = (int(n) for n in d.synthetic_sizes)
  return synthetic_ct.ensure_dataset(synthetic_root(), shape=tuple(int(n) for n in d.volume_shape),
                                     num_train=num_train, num_val=num_val, num_test=num_test)


def report_tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """``config.data.report_tokenizer`` (the GPT-2 files, e.g. healx/gpt-2-pubmed-medium), or the synthetic set's."""
  if config.data.report_tokenizer:
    return str(config.data.report_tokenizer)
  if config.data.data_dir:
    raise ValueError("config.data.format='ct_rate' with config.data.data_dir set needs config.data.report_tokenizer "
                     "(a folder with GPT-2's vocab.json + merges.txt or tokenizer.json).")
  return str(data_root(config) / TOKENIZER_DIR)


def split_files(config: ml_collections.ConfigDict, split: str) -> dict[str, pathlib.Path | None]:
  """``{"volumes", "labels", "sentences"}`` of ``split`` (absolute; ``sentences`` None when not given)."""
  splits = config.data.splits
  if split not in splits:
    raise ValueError(f"config.data.splits has no split {split!r} (it has {sorted(splits)}).")
  root, entry = data_root(config), splits[split]
  return {"volumes": root / entry["volumes"], "labels": root / entry["labels"],
          "sentences": root / entry["sentences"] if entry.get("sentences") else None}


def has_sentences(config: ml_collections.ConfigDict) -> bool:
  """Whether the examples carry sentence slots (stage 2): every split of ``config.data.splits`` names a sentences
  CSV (ValueError when only some do)."""
  given = {split: bool(entry.get("sentences")) for split, entry in config.data.splits.items()}
  if len(set(given.values())) > 1:
    raise ValueError(f"config.data.splits: a sentences CSV for {sorted(s for s, g in given.items() if g)} only; give "
                     "one for every split (stage 2) or for none.")
  return all(given.values())


class VolumeSource(Sequence):
  """Grain random-access source over ``ct_rate.VolumeRecord`` s (module docstring)."""

  def __init__(self, volume_records: Sequence[ct_rate.VolumeRecord]):
    self.records = list(volume_records)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    r = self.records[i]
    return {"id": r.name, "path": r.path, "labels": r.labels, "texts": r.texts}


def volume_source(config: ml_collections.ConfigDict, split: str) -> VolumeSource:
  files = split_files(config, split)
  return VolumeSource(ct_rate.volume_records(files["volumes"], files["labels"], files["sentences"]))


class PrepareVolume:
  """Raw CT example → model example (module docstring). ``tokenizer``: the GPT-2-family report tokenizer (used
  only for examples that carry sentence slots)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, train: bool):
    del train  # no augmentation: the original preprocesses train and evaluation volumes alike (§2.3)
    self.shape = tuple(int(n) for n in config.data.volume_shape)
    self.max_len = int(config.data.max_seq_length)
    self.num_slots = len(ct_rate.ABNORMALITIES)
    self.texts = has_sentences(config)
    self.tokenizer = tokenizer
    if self.texts and not isinstance(tokenizer, subword.SubwordTokenizer):
      raise ValueError("CT-AGRG sentence slots need a GPT-2-family subword tokenizer (config.data.report_tokenizer).")
    self.pad = tokenizer.token_to_id(ct_rate.ENDOFTEXT) if self.texts else None

  def __call__(self, raw: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    del rng
    example = {"volumes": volumes.preprocess(volumes.load_contract_volume(raw["path"]), self.shape),
               "labels": np.asarray(raw["labels"], np.float32), "id": raw["id"]}
    if self.texts:
      if raw["texts"] is None:
        raise records.DataError(f"Volume {raw['path']}: its split has no sentences CSV (config.data.splits).")
      slots = [ct_rate.encode_slot(self.tokenizer, t, self.max_len) for t in raw["texts"]]
      targets, masks = ct_rate.collate_slots([slots], self.pad, self.max_len)
      example.update(targets=targets[0], masks=masks[0])
    return example

  def padding(self) -> dict[str, Any]:
    example = {"volumes": np.full(self.shape, volumes.AIR, np.float32),
               "labels": np.zeros((self.num_slots,), np.float32), "id": ""}
    if self.texts:
      example.update(targets=np.full((self.num_slots, self.max_len), self.pad, np.int32),
                     masks=np.zeros((self.num_slots, self.max_len), np.float32))
    return example
