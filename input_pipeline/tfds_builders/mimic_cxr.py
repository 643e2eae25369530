"""``mimic_cxr``: MIMIC-CXR in the R2Gen layout, one view per record (``image_path[0]``), labels keyed by id."""

from __future__ import annotations

from input_pipeline.tfds_builders.r2gen import R2GenBuilder


class MimicCxr(R2GenBuilder):
  """MIMIC-CXR (R2Gen release); bring the PhysioNet-credentialed files as the manual dir."""

  LABEL_KEY = "id"
  NUM_VIEWS = 1
  DESCRIPTION = "MIMIC-CXR chest X-rays with findings, R2Gen split (credentialed access, PhysioNet)."
