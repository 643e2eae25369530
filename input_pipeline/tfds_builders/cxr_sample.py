"""``cxr_sample``: the embedded CXR sample (``input_pipeline/sample_data``), or a manual dir of the same layout."""

from __future__ import annotations

import pathlib

from input_pipeline import records
from input_pipeline.tfds_builders.r2gen import R2GenBuilder


class CxrSample(R2GenBuilder):
  """219 real chest X-rays with clinical notes (COVID-19 image data collection; see ATTRIBUTION.csv)."""

  LABEL_KEY = "id"
  NUM_VIEWS = 1
  DESCRIPTION = "Embedded CXR sample: one view per record, 15 finding labels, split by patient."

  def _source_dir(self, dl_manager) -> pathlib.Path:
    """The manual dir when one is given and not empty, else the embedded sample."""
    try:
      return pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS: manual dir absent or empty
      return records.SAMPLE_DIR
