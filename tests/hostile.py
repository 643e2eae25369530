"""Hostile checkpoint files for the loaders' tests."""

from __future__ import annotations

import os
import pathlib


class RunsCode:
  """Unpickling this would call ``os.system`` (never executed: ``torch.load(weights_only=True)`` refuses the
  global); the file ``marker`` would appear if it ran."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)
