"""``iu_xray``: IU X-Ray (Open-i) in the R2Gen layout, two views per study, labels keyed by ``"iu"``."""

from __future__ import annotations

from input_pipeline.tfds_builders.r2gen import R2GenBuilder


class IuXray(R2GenBuilder):
  """IU X-Ray, R2Gen split (train 2069 / val 296 / test 590); images ``images/<id>/{0,1}.png``."""

  LABEL_KEY = "iu"
  NUM_VIEWS = 2
  DESCRIPTION = "IU X-Ray (Open-i) frontal + lateral chest X-rays with findings, R2Gen split."
