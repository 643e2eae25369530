"""Grain input pipeline: source → decode + transforms → static-shape batches → global sharded ``jax.Array``s.

Public API::

    build_tokenizer(config) -> Tokenizer                    # vocabulary of the train split (spec §2.2), or the
                                                             # subword tokenizer of config.data.report_tokenizer
    check_tokenizer(config, tokenizer, what) -> None         # VocabularyMismatchError if it differs from the data's
    load_records(config, split) -> list[records.Record]     # validated records (folder source)
    raw_source(config, split) -> Sequence[dict]              # raw examples, folder or TFDS (config.data.source)
    data_option(config, key) -> Any                          # config.data.<key>, or its configs/common.py default
    class_map(config) -> records.ClassMap                    # the single-label class map (CSV default if unset)
    single_label(config) -> bool                             # config.data.label_mode == "single" (checked)
    steps_per_epoch(config) -> int                           # len(train) // batch (ceil with data.drop_last=False)
    train_dataset(config, tokenizer, *, seed) -> ResumableBatches    # endless train batches (a grain.IterDataset)
    eval_batches(config, tokenizer, split) -> Iterator[dict]          # one pass, in order, padded last batch
    to_global_batch(batch, mesh) -> dict[str, jax.Array]     # host-local numpy batch → global P('data') arrays

Batches (host-local numpy; ``Bl = config.train.batch_size // jax.process_count()``, ``V`` =
``config.data.num_views``, ``S`` = ``config.data.image_size``, ``T`` = ``config.data.max_seq_length``,
``C`` = ``config.model.num_classes``, 0 for systems without a classifier)::

    images   float32 (Bl, V, S, S, 3)  ImageNet-normalised, NHWC
    targets  int32   (Bl, T)           encode(report)[:T] = [0, w1..wn, 0] truncated, zero padded; with a subword
                                       report tokenizer its ids with specials, truncated keeping them (HF
                                       truncation), padded with its pad id (BART: <s> w.. </s> <pad>..)
    masks    float32 (Bl, T)           1 on the first len(ids) positions
    labels   float32 (Bl, C)           multi-hot; int32 (Bl,) class ids with config.data.label_mode = "single"
    valid    bool    (Bl,)             eval only: False on the padding rows of the last batch
    sample_weight float32 (Bl,)        only with config.data.sample_weights: 1 on real rows, 0 on padding rows
    ids      list[str] (Bl)            host-only record ids ("" on padding rows); never pass it to jit

plus the arrays of each feature in ``config.data.features`` (``input_pipeline.features``, default none), e.g.
``lesion_regions``: ``regions`` float32 (Bl, M, R, R, 3) and ``region_valid`` bool (Bl, M).

Sources. ``config.data.source = "folder"`` reads the R2Gen folder ``config.data.data_dir`` directly
(``""`` = the embedded sample); ``"tfds"`` reads the ArrayRecord files of the TFDS builder
``config.data.name`` (``input_pipeline.tfds_builders``) from ``config.data.tfds_dir`` (``""`` =
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), preparing it from ``config.data.data_dir`` on first use (single
process; multi-host runs prepare first with ``python -m input_pipeline.tfds_builders``). Both give identical
examples in annotation order. No TensorFlow is needed.

Records. ``config.data.format = "ct_rate"`` reads CT-RATE volumes with their labels and sentence slots
(``input_pipeline.ct_examples``: batches ``volumes`` float32 (Bl, D, H, W), ``labels`` (Bl, 18), stage 2
``targets`` int32 / ``masks`` float32 (Bl, 18, T)). ``"r2gen"`` reads the R2Gen folder; ``"csv"`` reads the RadGen CSV
``config.data.csv`` with images under ``config.data.image_dir`` (both relative to ``data_dir``; spec §2.1).
``config.data.class_map`` gives every record a single-label class id (``records`` module docstring; a CSV's
default is Normal/Pneumonia/TB). With ``config.data.fold = k >= 0`` the splits are cross-validation folds
(``sampling.fold_split``: train = folds ≠ k, val = test = fold k) of all records: the CSV's ``fold`` column,
or the §2.5 stratified folds (``config.data.num_folds``, ``fold_seed``, ``group_key``); a CSV needs a fold.
Single labels, CSV data, folds and the weighted sampler read records, so they need ``data.source = "folder"``.

Determinism. Epoch ``e`` of training visits ``order_e = default_rng([seed, e]).permutation(N)`` — with
``config.data.weighted_sampler`` the sampler's draws ``sampling.weighted_draws(ω, seed, e)`` (N indices with
replacement, ``P(i) ∝ ω_i = N / (C n_{y_i})``, spec §2.6) — and the global batch ``b`` is
``order_e[b * B:(b + 1) * B]``: the last partial batch is dropped, or with ``config.data.drop_last = False``
kept and padded to ``B`` with rows of ``sample_weight`` 0 (``ceil(N / B)`` batches). Process ``i`` takes its rows
``[i * Bl, (i + 1) * Bl)``. The random transforms of epoch position ``p`` use
``default_rng([seed, e, p])``. A batch is therefore a pure function of its index: the same seed gives the same
batches for any ``config.data.num_workers`` (Grain ``mp_prefetch`` processes) and process count, and the
iterator's state (``{"next_batch": n}`` via ``get_state``/``set_state``, saved by ``grain.checkpoint``) resumes at
the exact next batch, also with a different worker count.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from input_pipeline import ct_examples, features, records, sampling, subword, transforms
from input_pipeline.tokenizer import Tokenizer

ReportTokenizer = Tokenizer | subword.SubwordTokenizer

SOURCES = ("folder", "tfds")
FORMATS = ("r2gen", "csv", "ct_rate")
LABEL_MODES = ("multi", "single")
_DATA_DEFAULTS = common.base_config("").data
DATA_AXIS = "data"
_ENDLESS = sys.maxsize // 2


# --- records, sources and vocabulary ------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _load_split_cached(data_dir: str, split: str, annotation: str, labels: str, label_key_rule: str,
                       num_views: int, num_classes: int | None, on_bad_record: str, box_format: str | None,
                       class_map: records.ClassMap) -> tuple[records.Record, ...]:
  return tuple(records.load_split(data_dir, split, annotation=annotation, labels=labels,
                                  label_key_rule=label_key_rule, num_views=num_views, num_classes=num_classes,
                                  on_bad_record=on_bad_record, box_format=box_format, class_map=class_map))


@functools.lru_cache(maxsize=4)
def _read_csv_cached(path: str, image_dir: str, class_map: records.ClassMap,
                     on_bad_record: str) -> tuple[records.Record, ...]:
  return tuple(records.read_csv(path, image_dir, class_map=class_map, on_bad_record=on_bad_record))


def data_option(config: ml_collections.ConfigDict, key: str) -> Any:
  """``config.data.<key>``, or its ``configs/common.py`` default when the config (e.g. a run's saved
  ``config.json`` from before the key existed) does not define it."""
  return config.data.get(key, _DATA_DEFAULTS[key])


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The label-vector length the model reads: ``config.model.num_classes`` (0 when the system has none)."""
  return int(config.model.get("num_classes", 0))


def _choice(config: ml_collections.ConfigDict, key: str, allowed: tuple[str, ...]) -> str:
  value = data_option(config, key)
  if value not in allowed:
    raise ValueError(f"config.data.{key}={value!r}; choose one of {allowed}.")
  return value


def class_map(config: ml_collections.ConfigDict) -> records.ClassMap:
  """The single-label class map: ``config.data.class_map``; when empty, ``records.CSV_CLASS_MAP`` for CSV data
  and none (``()``) for an R2Gen folder."""
  value = records.parse_class_map(data_option(config, "class_map"))
  return value or (records.CSV_CLASS_MAP if _choice(config, "format", FORMATS) == "csv" else ())


def single_label(config: ml_collections.ConfigDict) -> bool:
  """Whether batches carry int32 class ids (``config.data.label_mode = "single"``); the class map must then
  have ``config.model.num_classes`` classes."""
  if _choice(config, "label_mode", LABEL_MODES) == "multi":
    return False
  size = len(class_map(config))
  if size != num_classes(config):
    raise ValueError(f"config.data.label_mode='single' needs a config.data.class_map of config.model.num_classes="
                     f"{num_classes(config)} classes; it has {size}.")
  return True


def load_records(config: ml_collections.ConfigDict, split: str) -> list[records.Record]:
  """The validated records of ``split`` (cached per process): the annotation's split of the R2Gen folder
  ``config.data.data_dir``, or with ``config.data.fold >= 0`` that fold split of all records (module docstring)."""
  d = config.data
  cmap = class_map(config)
  root = records.resolve_data_dir(d.data_dir)

  def annotation_split(name: str) -> list[records.Record]:
    return list(_load_split_cached(str(root), name, d.annotation, d.labels, d.label_key, int(d.num_views),
                                   None if single_label(config) else num_classes(config), d.on_bad_record,
                                   features.box_format(config), cmap))

  fold, csv = int(data_option(config, "fold")), _choice(config, "format", FORMATS) == "csv"
  if fold < 0:
    if csv:
      raise ValueError("config.data.format='csv' has no splits of its own: set config.data.fold.")
    return annotation_split(split)
  num_folds = int(data_option(config, "num_folds"))
  if not 0 <= fold < num_folds:
    raise ValueError(f"config.data.fold={fold} is not in 0..{num_folds - 1} (config.data.num_folds={num_folds}).")
  if csv:
    if not data_option(config, "csv"):
      raise ValueError("config.data.format='csv' needs config.data.csv (the CSV file, relative to data_dir).")
    pool = list(_read_csv_cached(str(root / data_option(config, "csv")), str(root / data_option(config, "image_dir")),
                                 cmap, d.on_bad_record))
  else:
    pool = [r for name in records.SPLITS for r in annotation_split(name)]
  pool = sampling.assign_folds(pool, num_folds, int(data_option(config, "fold_seed")),
                               data_option(config, "group_key"))
  return sampling.fold_split(pool, fold, split, num_folds, bool(data_option(config, "inner_val")))


def default_tfds_dir() -> pathlib.Path:
  """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (TFDS's own default)."""
  return pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser().absolute()


def tfds_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path(config.data.tfds_dir).expanduser().absolute() if config.data.tfds_dir else default_tfds_dir()


def _check_source(config: ml_collections.ConfigDict) -> str:
  if config.data.source not in SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}; choose one of {SOURCES}.")
  if config.data.source == "tfds" and (_choice(config, "format", FORMATS) != "r2gen" or single_label(config)
                                       or int(data_option(config, "fold")) >= 0
                                       or data_option(config, "weighted_sampler")):
    raise ValueError("config.data.source='tfds' gives the annotation's splits with multi-hot labels; CSV data, "
                     "folds, label_mode='single' and the weighted sampler need config.data.source='folder'.")
  return config.data.source


def _tfds_builder(config: ml_collections.ConfigDict):
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top

  return tfds_builders.prepared_builder(config.data.name, data_dir=tfds_dir(config),
                                        manual_dir=(records.resolve_data_dir(config.data.data_dir)
                                                    if config.data.data_dir else None),
                                        on_bad_record=config.data.on_bad_record,
                                        prepare=jax.process_count() == 1)


class TfdsSource(Sequence):
  """Raw examples (the ``records.FolderSource`` dict) from a TFDS ArrayRecord split (``as_data_source``, the
  object ``tfds.data_source`` returns)."""

  def __init__(self, data_source):
    self._ds = data_source

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._ds[i]
    return {"id": _text(ex["id"]), "report": _text(ex["report"]), "images": tuple(bytes(b) for b in ex["images"]),
            "image_names": tuple(_text(n) for n in ex["image_names"]),
            "labels": np.asarray(ex["labels"], np.float32)}


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def raw_source(config: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, Any]]:
  """Random-access raw examples of ``split`` (see ``records.FolderSource``; CT volumes: ``ct_examples``), from the
  configured source."""
  if _check_source(config) == "folder" and _choice(config, "format", FORMATS) == "ct_rate":
    return ct_examples.volume_source(config, split)
  if _check_source(config) == "folder":
    return records.FolderSource(load_records(config, split))
  builder = _tfds_builder(config)
  if split not in builder.info.splits:
    raise records.DataError(f"TFDS dataset {builder.data_dir} has no split {split!r} "
                            f"(it has {sorted(builder.info.splits)}).")
  return TfdsSource(builder.as_data_source(split=split))


def build_tokenizer(config: ml_collections.ConfigDict) -> ReportTokenizer:
  """The report tokenizer: the subword tokenizer of ``config.data.report_tokenizer`` (an HF folder, or a saved
  one, ``input_pipeline.subword``), else the vocabulary of the train split (threshold ``config.data.threshold``,
  cleaning ``config.data.clean``)."""
  d = config.data
  if _choice(config, "format", FORMATS) == "ct_rate":
    return subword.load_tokenizer(ct_examples.report_tokenizer_path(config))
  if data_option(config, "report_tokenizer"):
    return subword.load_tokenizer(d.report_tokenizer)
  if _check_source(config) == "folder":
    return Tokenizer.build((r.report for r in load_records(config, "train")), d.threshold, d.clean)
  counts = _tfds_builder(config).info.metadata["word_counts"][d.clean]
  return Tokenizer.from_counts(counts, d.threshold, d.clean)


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer: ReportTokenizer, what: str) -> None:
  """Raises ``VocabularyMismatchError`` unless ``tokenizer`` (e.g. a checkpoint's, described by ``what``) equals
  the report tokenizer of the configured data."""
  build_tokenizer(config).check_matches(tokenizer, what)


def report_pad_id(tokenizer: ReportTokenizer) -> int:
  """The id that pads report targets: 0 for the word vocabulary, a subword tokenizer's pad id."""
  if not isinstance(tokenizer, subword.SubwordTokenizer):
    return 0
  if tokenizer.pad_id is None:
    raise ValueError(f"The report tokenizer {tokenizer.source} has no pad token; report targets need one.")
  return tokenizer.pad_id


def encode_report(tokenizer: ReportTokenizer, report: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``(targets int32 (max_len,), masks float32 (max_len,))`` of one report: the word vocabulary's
  ``[0, w1..wn, 0]`` cut at ``max_len`` and zero padded, or a subword tokenizer's ids with its specials, truncated
  keeping them and padded with its pad id; masks 1 on the ids."""
  if isinstance(tokenizer, subword.SubwordTokenizer):
    ids = tokenizer.encode(report, max_length=max_len)
  else:
    ids = tokenizer.encode(report)[:max_len]
  targets = np.full((max_len,), report_pad_id(tokenizer), np.int32)
  targets[:len(ids)] = ids
  masks = np.zeros((max_len,), np.float32)
  masks[:len(ids)] = 1.0
  return targets, masks


def _drop_last(config: ml_collections.ConfigDict) -> bool:
  drop = bool(data_option(config, "drop_last"))
  if not drop and not data_option(config, "sample_weights"):
    raise ValueError("config.data.drop_last=False pads the last train batch: set config.data.sample_weights=True "
                     "so that its padding rows carry sample_weight 0.")
  return drop


def _num_steps(n: int, global_batch: int, drop_last: bool) -> int:
  return n // global_batch if drop_last else -(-n // global_batch)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Train batches per epoch: ``len(train) // config.train.batch_size`` (last partial batch dropped), or
  ``ceil(len(train) / batch_size)`` with ``config.data.drop_last = False``."""
  n = len(raw_source(config, "train"))
  steps = _num_steps(n, int(config.train.batch_size), _drop_last(config))
  if steps == 0:
    raise ValueError(f"The train split has {n} records, fewer than config.train.batch_size="
                     f"{config.train.batch_size}.")
  return steps


# --- examples and batches -----------------------------------------------------------------------------------

class _Prepare:
  """Raw example → model example: decoded, transformed views, encoded and padded report, label vector (or class
  id), sample weight when configured, and the configured features (computed from the untransformed first view,
  after the transforms' random draws)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: ReportTokenizer, train: bool):
    d = config.data
    self.tokenizer = tokenizer
    self.train = train
    self.num_views = int(d.num_views)
    self.max_len = int(d.max_seq_length)
    self.num_classes = num_classes(config)
    self.single_label = single_label(config)
    self.sample_weights = bool(data_option(config, "sample_weights"))
    self.augment, self.resize, self.image_size = d.augment, int(d.resize), int(d.image_size)
    self.hflip = bool(data_option(config, "hflip"))
    self.features = features.build(config, tokenizer, train)

  def _labels(self, raw: Mapping[str, Any]) -> np.ndarray:
    rid = raw["id"]
    if self.single_label:
      label = raw.get("label", -1)
      if not 0 <= label < self.num_classes:
        raise records.DataError(f"Record {rid!r} has no class id in 0..{self.num_classes - 1} "
                                "(config.data.label_mode='single' reads config.data.class_map).")
      return np.asarray(label, np.int32)
    labels = np.asarray(raw["labels"], np.float32)
    if labels.size == 0:
      labels = np.zeros((self.num_classes,), np.float32)
    if labels.shape != (self.num_classes,):
      raise records.DataError(f"Record {rid!r}: label vector of length {labels.size}, config.model.num_classes="
                              f"{self.num_classes}.")
    return labels

  def __call__(self, raw: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    rid = raw["id"]
    if len(raw["images"]) < self.num_views:
      raise records.DataError(f"Record {rid!r} has {len(raw['images'])} image(s), config.data.num_views="
                              f"{self.num_views}.")
    views = [records.decode_image(data, f"{name} (record {rid!r})")
             for data, name in zip(raw["images"][:self.num_views], raw["image_names"])]
    images = transforms.transform_views(views, rng, train=self.train, augment=self.augment, resize=self.resize,
                                        image_size=self.image_size, hflip=self.hflip)
    targets, masks = encode_report(self.tokenizer, raw["report"], self.max_len)
    example = {"images": images, "targets": targets, "masks": masks, "labels": self._labels(raw), "id": rid}
    if self.sample_weights:
      example["sample_weight"] = np.float32(1.0)
    for feature in self.features:
      example.update(feature(raw, views[0], rng, example))
    return example

  def padding(self) -> dict[str, Any]:
    s = self.image_size
    example = {"images": np.zeros((self.num_views, s, s, 3), np.float32),
               "targets": np.full((self.max_len,), report_pad_id(self.tokenizer), np.int32),
               "masks": np.zeros((self.max_len,), np.float32),
               "labels": (np.zeros((), np.int32) if self.single_label else np.zeros((self.num_classes,), np.float32)),
               "id": ""}
    if self.sample_weights:
      example["sample_weight"] = np.float32(0.0)
    for feature in self.features:
      example.update(feature.padding())
    return example


def _prepare(config: ml_collections.ConfigDict, tokenizer: ReportTokenizer, train: bool):
  """The example preparation of the configured format: images + report (``_Prepare``) or a CT volume with its
  labels and sentence slots (``ct_examples.PrepareVolume``)."""
  if _choice(config, "format", FORMATS) == "ct_rate":
    return ct_examples.PrepareVolume(config, tokenizer, train)
  return _Prepare(config, tokenizer, train)


def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Stacks examples into a batch dict; ``id`` fields become the host-side ``ids`` list."""
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "id"}
  batch["ids"] = [e["id"] for e in examples]
  return batch


def _local_batch_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(local batch size, this process's index) for the global ``config.train.batch_size``."""
  gbs, count = int(config.train.batch_size), jax.process_count()
  if gbs % count:
    raise ValueError(f"config.train.batch_size={gbs} is not divisible by the {count} processes.")
  return gbs // count, jax.process_index()


def _read_options() -> grain.ReadOptions:
  threads = max(1, min(4, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def _maybe_mp(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside absl.app use their defaults
      flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
  return ds


class ResumableBatches(grain.IterDataset):
  """Iterates a ``MapDataset`` of batches through Grain (threads + ``mp_prefetch`` workers); the iterator state
  is ``{"next_batch": n}``, valid for any worker count: ``set_state`` restarts the pipeline at batch ``n``."""

  def __init__(self, batches: grain.MapDataset, num_workers: int):
    super().__init__()
    self.batches, self.num_workers = batches, num_workers

  def __iter__(self) -> _ResumableIterator:
    return _ResumableIterator(self.batches, self.num_workers)


class _ResumableIterator(grain.DatasetIterator):

  def __init__(self, batches: grain.MapDataset, num_workers: int):
    super().__init__()
    self._batches, self._num_workers = batches, num_workers
    self._next_batch = 0
    self._it = None

  def _start(self):
    ds = self._batches[self._next_batch:].to_iter_dataset(_read_options())
    self._it = iter(_maybe_mp(ds, self._num_workers))

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    if self._it is None:
      self._start()
    batch = next(self._it)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stop()
    self._next_batch = int(state["next_batch"])

  def _stop(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    self._stop()
    super().close()


class _TrainExample:
  """Local stream position → prepared example of (epoch, epoch position), or a padding row past the epoch's
  ``N`` examples; see the module docstring. ``weights`` float (N,): the weighted sampler's (None = permutation,
  or annotation order without ``shuffle``)."""

  def __init__(self, source: Sequence[dict[str, Any]], prepare: Any, seed: int, global_batch: int,
               local_batch: int, process_index: int, shuffle: bool = True, weights: np.ndarray | None = None,
               drop_last: bool = True):
    self.source, self.prepare, self.seed, self.shuffle, self.weights = source, prepare, int(seed), shuffle, weights
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index
    self.steps = _num_steps(len(source), global_batch, drop_last)
    self._order: tuple[int, np.ndarray] | None = None

  def epoch_position(self, j: int) -> tuple[int, int]:
    epoch, r = divmod(int(j), self.steps * self.local_batch)
    b, k = divmod(r, self.local_batch)
    return epoch, b * self.global_batch + self.process_index * self.local_batch + k

  def order(self, epoch: int) -> np.ndarray:
    """int (N,): the source indices epoch ``epoch`` visits."""
    if self._order is None or self._order[0] != epoch:
      n = len(self.source)
      if self.weights is not None:
        order = sampling.weighted_draws(self.weights, self.seed, epoch)
      else:
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      self._order = (epoch, order)
    return self._order[1]

  def __call__(self, j: int) -> dict[str, Any]:
    epoch, p = self.epoch_position(j)
    if p >= len(self.source):
      return self.prepare.padding()
    raw = self.source[int(self.order(epoch)[p])]
    return self.prepare(raw, np.random.default_rng([self.seed, epoch, p]))


def _sampler_weights(config: ml_collections.ConfigDict, source: records.FolderSource) -> np.ndarray | None:
  """The weighted sampler's ω (float64 (N,), spec §2.6) over the train records' class ids, or None when
  ``config.data.weighted_sampler`` is off."""
  if not data_option(config, "weighted_sampler"):
    return None
  unlabelled = next((r for r in source.records if r.label < 0), None)
  if unlabelled is not None:
    raise records.DataError(f"config.data.weighted_sampler needs class ids, but record {unlabelled.id!r} has "
                            "none: set config.data.class_map.")
  return sampling.class_sampling_weights([r.label for r in source.records], len(class_map(config)))


def train_dataset(config: ml_collections.ConfigDict, tokenizer: ReportTokenizer, *, seed: int) -> grain.IterDataset:
  """Endless train batches (epochs repeat, ``steps_per_epoch(config)`` batches each), in a new random order every
  epoch, or in the annotation order every epoch with ``config.data.shuffle = False`` (Align2Gen's loader), or
  the weighted sampler's draws with ``config.data.weighted_sampler`` (RadGen)."""
  source = raw_source(config, "train")
  lbs, pi = _local_batch_size(config)
  fn = _TrainExample(source, _prepare(config, tokenizer, train=True), seed, int(config.train.batch_size), lbs, pi,
                     bool(data_option(config, "shuffle")), _sampler_weights(config, source), _drop_last(config))
  if fn.steps == 0:
    raise ValueError(f"The train split has {len(source)} records, fewer than config.train.batch_size="
                     f"{config.train.batch_size}.")
  ds = grain.MapDataset.range(_ENDLESS - _ENDLESS % lbs).map(fn).batch(lbs, drop_remainder=True,
                                                                          batch_fn=collate)
  return ResumableBatches(ds, int(config.data.num_workers))


class _EvalExample:
  """Local stream position → prepared example (or a padding row) of the in-order evaluation pass."""

  def __init__(self, source: Sequence[dict[str, Any]], prepare: Any, size: int, global_batch: int,
               local_batch: int, process_index: int):
    self.source, self.prepare, self.size = source, prepare, size
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index

  def __call__(self, j: int) -> dict[str, Any]:
    b, k = divmod(int(j), self.local_batch)
    p = b * self.global_batch + self.process_index * self.local_batch + k
    if p >= self.size:
      return {**self.prepare.padding(), "valid": False}
    return {**self.prepare(self.source[p], None), "valid": True}


def eval_batches(config: ml_collections.ConfigDict, tokenizer: ReportTokenizer, split: str) -> Iterator[dict[str, Any]]:
  """One in-order pass over ``split`` (the first ``config.train.max_eval_examples`` records when >= 0); the
  last batch is padded to full size with ``valid=False`` rows so every record is scored exactly once."""
  source = raw_source(config, split)
  size = len(source)
  if int(config.train.max_eval_examples) >= 0:
    size = min(size, int(config.train.max_eval_examples))
  gbs = int(config.train.batch_size)
  lbs, pi = _local_batch_size(config)
  num_batches = -(-size // gbs)
  fn = _EvalExample(source, _prepare(config, tokenizer, train=False), size, gbs, lbs, pi)
  ds = grain.MapDataset.range(num_batches * lbs).map(fn).batch(lbs, batch_fn=collate)
  logging.info("Evaluating %d records of split %r in %d batches of %d.", size, split, num_batches, gbs)
  return iter(_maybe_mp(ds.to_iter_dataset(_read_options()), int(config.data.num_workers)))


# --- device placement ---------------------------------------------------------------------------------------

def to_global_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local numpy arrays → global ``jax.Array``s split over the mesh's ``"data"`` axis.

  Every process passes its own rows (``Bl``); the global leading dimension is ``Bl * process_count``.
  Non-array entries (``ids``) are left out.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if isinstance(v, np.ndarray)}
