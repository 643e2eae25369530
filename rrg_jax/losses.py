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
