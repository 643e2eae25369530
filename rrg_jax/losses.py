"""CAMANet losses (spec §7), pure functions on float32."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Mapping

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


def camanet_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, Any], *, cls_w: float, mse_w: float,
                 use_vtac: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``L = CE + cls_w · BCE + mse_w · MSE`` (MSE only when ``use_vtac``; reported as 0 otherwise).

  Args:
    outputs: model outputs with ``logprobs`` (B, T−1, K), ``logits`` (B, C), ``vdm``/``tdm`` (B, N).
    batch: ``targets`` (B, T) int, ``masks`` (B, T), ``labels`` (B, C).

  Returns:
    (total, {"ce", "bce", "mse", "loss"}) scalars.
  """
  ce = cross_entropy(outputs["logprobs"], batch["targets"], batch["masks"])
  bce = bce_with_logits(outputs["logits"], batch["labels"])
  mse = vtac_mse(outputs["tdm"], outputs["vdm"], batch["labels"]) if use_vtac else jnp.zeros((), jnp.float32)
  total = ce + cls_w * bce + mse_w * mse
  return total, {"ce": ce, "bce": bce, "mse": mse, "loss": total}


def make_loss_fn(config) -> Callable[[Mapping[str, jax.Array], Mapping[str, Any]], tuple[jax.Array, dict]]:
  """``loss_fn(outputs, batch) → (total, parts)``: ``camanet_loss`` with ``config.loss.cls_w``/``mse_w`` and
  ``config.model.use_vtac`` (the ``loss_fn`` of ``train_state.make_train_step``)."""
  def loss_fn(outputs, batch):
    return camanet_loss(outputs, batch, cls_w=config.loss.cls_w, mse_w=config.loss.mse_w,
                        use_vtac=config.model.use_vtac)
  return loss_fn
