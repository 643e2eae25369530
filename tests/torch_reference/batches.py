"""Random image-report batches (CAMANet, R2Gen-family) shared by the parity tests and the benchmarks (numpy only; no torch, no JAX)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_batch(config, lengths: Sequence[int], seed: int) -> dict[str, np.ndarray]:
  """Numpy batch padded to ``max_seq_length``: images (B, V, H, W, 3) float32, targets (B, T) int32, masks (B, T)
  float32 and, for a config with ``model.num_classes``, labels (B, C) float32. ``lengths`` are len(ids) incl. BOS
  (and EOS unless truncated at T). Sample 0 has no positive label (excluded from the VTAC MSE), sample 1 (if any)
  has one."""
  rng = np.random.default_rng(seed)
  b, t, k = len(lengths), config.data.max_seq_length, config.model.vocab_size
  images = rng.normal(size=(b, config.data.num_views, config.data.image_size, config.data.image_size, 3))
  targets = np.zeros((b, t), np.int32)
  masks = np.zeros((b, t), np.float32)
  for i, n in enumerate(lengths):
    targets[i, 1:n] = rng.integers(1, k, size=n - 1)
    if n < t:
      targets[i, n - 1] = 0  # EOS
    masks[i, :n] = 1
  batch = dict(images=images.astype(np.float32), targets=targets, masks=masks)
  if "num_classes" in config.model:
    labels = (rng.random((b, config.model.num_classes)) < 0.3).astype(np.float32)
    labels[0] = 0
    if b > 1:
      labels[1, 0] = 1
    batch["labels"] = labels
  return batch
