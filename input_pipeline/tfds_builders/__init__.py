"""TFDS builders (ArrayRecord, no TensorFlow): ``iu_xray``, ``mimic_cxr``, ``cxr_sample``.

Importing this package registers them with TFDS. ``prepared_builder`` prepares on first use and returns the
builder; ``tfds.data_source(name, split=..., data_dir=...)`` then reads a split. Command line::

    python -m input_pipeline.tfds_builders --name=iu_xray --manual_dir=/data/iu_xray --data_dir=~/tensorflow_datasets
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from input_pipeline.tfds_builders.cxr_sample import CxrSample
from input_pipeline.tfds_builders.iu_xray import IuXray
from input_pipeline.tfds_builders.mimic_cxr import MimicCxr

BUILDERS = {"iu_xray": IuXray, "mimic_cxr": MimicCxr, "cxr_sample": CxrSample}


def prepared_builder(name: str, *, data_dir: str | pathlib.Path, manual_dir: str | pathlib.Path | None = None,
                     on_bad_record: str = "error", prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The builder ``name`` over ``data_dir``, prepared from ``manual_dir`` if its files are not there yet."""
  if name not in BUILDERS:
    raise ValueError(f"Unknown TFDS dataset {name!r} (config.data.name); choose one of {sorted(BUILDERS)}.")
  builder = BUILDERS[name](data_dir=str(pathlib.Path(data_dir).expanduser()), on_bad_record=on_bad_record)
  if not builder.is_prepared():
    if not prepare:
      raise FileNotFoundError(
          f"TFDS dataset {name} is not prepared in {builder.data_dir}; prepare it once with "
          f"`python -m input_pipeline.tfds_builders --name={name} --manual_dir=DATA --data_dir={data_dir}`.")
    if manual_dir is None and name != "cxr_sample":
      raise FileNotFoundError(f"TFDS dataset {name} is not prepared in {builder.data_dir} and no source folder "
                              "(config.data.data_dir) was given to prepare it from.")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
  return builder
