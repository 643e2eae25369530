"""Base TFDS builder for R2Gen-layout folders (``records``): ArrayRecord files, no TensorFlow needed.

Each example: ``id`` (text), ``report`` (raw text), ``images`` (the encoded files, PNG/JPEG bytes as found,
one per view), ``image_names`` (their source paths, for error messages) and ``labels`` (float32 (C,), empty
without labels.json). Splits keep the annotation order (``disable_shuffling``). ``info.metadata["word_counts"]``
holds the cleaned-token counts of the train split for both cleaning rules, so a vocabulary is built without
reading the images.

Preparing needs the user's folder as the manual dir::

    builder = IuXray(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/iu_xray"))
    tfds.data_source("iu_xray", split="train", data_dir="~/tensorflow_datasets")
"""

from __future__ import annotations

import inspect
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from input_pipeline import records
from input_pipeline.tokenizer import CLEAN_MODES, count_words

ANNOTATION = "annotation.json"
LABELS = "labels.json"


class R2GenBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """An R2Gen-layout folder (``annotation.json``, optional ``labels.json``, ``images/``) as ArrayRecord."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  LABEL_KEY = "id"
  NUM_VIEWS = 1
  DESCRIPTION = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the R2Gen-layout folder in the manual dir: annotation.json, labels.json (optional) and images/<image_path>.
  """

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file's path (TFDS's own lookup needs the optional ``importlib_resources`` for package modules)."""
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, on_bad_record: str = "error", file_format: str = "array_record", **kwargs):
    self._on_bad_record = on_bad_record
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "report": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "image_names": tfds.features.Sequence(tfds.features.Text()),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _source_dir(self, dl_manager) -> pathlib.Path:
    return pathlib.Path(dl_manager.manual_dir)

  def _split_generators(self, dl_manager):
    root = self._source_dir(dl_manager)
    splits = list(records.read_annotation(root / ANNOTATION))
    labels = LABELS if (root / LABELS).is_file() else ""
    recs = {s: records.load_split(root, s, annotation=ANNOTATION, labels=labels, label_key_rule=self.LABEL_KEY,
                                  num_views=self.NUM_VIEWS, on_bad_record=self._on_bad_record) for s in splits}
    train = [r.report for r in recs.get("train", [])]
    self.info.metadata["word_counts"] = {mode: dict(count_words(train, mode)) for mode in CLEAN_MODES}
    return {s: self._generate_examples(r) for s, r in recs.items()}

  def _generate_examples(self, recs):
    for r in recs:
      yield r.id, {"id": r.id, "report": r.report, "images": [records.read_bytes(p) for p in r.image_paths],
                   "image_names": list(r.image_paths), "labels": r.labels}
