"""Losses shared by the systems, pure functions on float32 (composed by each system's ``System.loss``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logprobs: jax.Array, targets: jax.Array, masks: jax.Array) -> jax.Array:
  """Token-level mean NLL over the whole batch.

  logprobs (B, T−1, K) predict ``targets[:, 1:]`` (B, T) int, weighted by ``masks[:, 1:]`` (B, T):
  ``−Σ m·logp[target] / Σ m`` (EOS included, pads excluded).
  """
  tgt, m = targets[:, 1:], masks[:, 1:].astype(jnp.float32)
  nll = -jnp.take_along_axis(logprobs.astype(jnp.float32), tgt[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * m) / jnp.sum(m)


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """torch ``BCEWithLogitsLoss`` mean over (B, C): ``max(x, 0) − x·y + log(1 + exp(−|x|))``."""
  x, y = logits.astype(jnp.float32), labels.astype(jnp.float32)
  return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))))


def vtac_mse(tdm: jax.Array, vdm: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean of ``(tdm − vdm)²`` over the samples with ≥1 positive label × N tokens.

  tdm, vdm (B, N); labels (B, C). Deviation from the original: when no sample qualifies the original returns
  NaN (mean of an empty tensor); this returns 0, so such a batch contributes no VTAC gradient.
  """
  keep = (jnp.sum(labels, axis=-1) != 0).astype(jnp.float32)
  err = jnp.square(tdm.astype(jnp.float32) - vdm.astype(jnp.float32))
  count = jnp.sum(keep) * tdm.shape[-1]
  return jnp.sum(err * keep[:, None]) / jnp.maximum(count, 1.0)


def _nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``−log softmax(logits)[label]`` in float32: logits (..., K), labels (...) int → (...)."""
  x = logits.astype(jnp.float32)
  return jax.nn.logsumexp(x, axis=-1) - jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """``Σ w·v / Σ w`` (0, not NaN, when every weight is 0, e.g. a batch of padding rows only)."""
  w = weights.astype(jnp.float32)
  total = jnp.sum(w)
  return jnp.sum(values * w) / jnp.where(total > 0, total, 1.0)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: jax.Array,
                           sample_weight: jax.Array | None = None) -> jax.Array:
  """Class-weighted CE, PyTorch's weighted-mean semantics (radgen_spec §4, ``L_cls``).

  logits (B, C), labels (B,) int, class_weights (C,) w, sample_weight (B,) s (1 per real row, 0 per padding row;
  None = all 1): ``Σ_i s_i w_{y_i} CE_i / Σ_i s_i w_{y_i}`` with ``CE_i = −log softmax(logits_i)[y_i]`` (the
  denominator is the sum of the weights, not B: torch ``cross_entropy(weight=w)``).
  """
  w = jnp.asarray(class_weights, jnp.float32)[labels]
  if sample_weight is not None:
    w = w * sample_weight.astype(jnp.float32)
  return _weighted_mean(_nll(logits, labels), w)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Token CE of unshifted decoder logits (B, T, K) against labels (B, T) int, mean over the counted positions
  (radgen_spec §4, ``L_report``): ``mask`` (B, T) 1 = counted (pads ignored, torch ``ignore_index``); None =
  every position counts, pads included (the public code passes the pad id, not −100, as label)."""
  nll = _nll(logits, labels)
  return _weighted_mean(nll, jnp.ones_like(nll) if mask is None else mask)
