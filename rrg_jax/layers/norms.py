"""Norms: R2Gen layer norms (spec §5.1, §5.3: unbiased std with eps added to the std, statistics in float32) and
the torch-exact ``BatchNorm`` (torch ``BatchNorm2d``: unbiased running variance, torch's CPU kernel form)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear


def _std(var: jax.Array) -> jax.Array:
  """``sqrt(var)`` whose gradient is 0 where ``var == 0``, as torch's ``std`` backward (which masks the
  ``1 / (2·std)`` factor there); a plain ``jnp.sqrt`` gives NaN gradients for a constant row, e.g. the VDMAE
  token of an image with no predicted finding (VDM = 0, so Σ d·f = 0)."""
  positive = var > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def _normalize(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float) -> jax.Array:
  """``gamma · (x − mean) / (std_unbiased + eps) + beta`` over the last axis in float32, torch's op order."""
  x = x.astype(jnp.float32)
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  std = _std(jnp.sum(xc * xc, axis=-1, keepdims=True) / (x.shape[-1] - 1))
  return gamma * xc / (std + eps) + beta


class LayerNorm(nn.Module):
  """``gamma · (x − mean) / (std_unbiased + eps) + beta``; (..., D) → (..., D) in ``dtype``.

  Params ``gamma`` (D,) init 1, ``beta`` (D,) init 0. Not ``flax.linen.LayerNorm`` (biased var, eps inside sqrt).
  """
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (d,), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (d,), jnp.float32)
    return _normalize(x, gamma, beta, self.eps).astype(self.dtype)


class ConditionalLayerNorm(nn.Module):
  """Memory-driven conditional LayerNorm (MCLN) of R2Gen.

  ``(gamma + mlp_gamma(r)) · (x − mean) / (std_unbiased + eps) + (beta + mlp_beta(r))`` where
  ``mlp_* = Linear(S·Dm → D) → ReLU → Linear(D → D)`` (params ``mlp_gamma_0``, ``mlp_gamma_2``, ``mlp_beta_0``,
  ``mlp_beta_2``: Xavier-uniform kernels, biases 0.1).

  Call: x (..., L, D), memory r (..., L, S·Dm) → (..., L, D).
  """
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array) -> jax.Array:
    d = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (d,), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (d,), jnp.float32)
    bias_init = nn.initializers.constant(0.1)

    def mlp(prefix: str) -> jax.Array:
      h = Linear(d, bias_init=bias_init, dtype=self.dtype, name=f"{prefix}_0")(memory)
      return Linear(d, bias_init=bias_init, dtype=self.dtype, name=f"{prefix}_2")(nn.relu(h))

    delta_gamma = mlp("mlp_gamma").astype(jnp.float32)
    delta_beta = mlp("mlp_beta").astype(jnp.float32)
    return _normalize(x, gamma + delta_gamma, beta + delta_beta, self.eps).astype(self.dtype)


class BatchNorm(nn.Module):
  """torch ``BatchNorm2d`` over the last (channel) axis: (..., C) → (..., C) in ``dtype``.

  Params ``scale`` (1) / ``bias`` (0); collection ``batch_stats``: ``mean`` (0) / ``var`` (1).
  train: normalise with the batch mean and biased batch variance; update (unless initialising)
  ``mean ← (1−m)·mean + m·batch_mean`` and ``var ← (1−m)·var + m·batch_var·n/(n−1)`` (unbiased, as torch; Flax's
  BatchNorm stores the biased one). eval: running statistics. Statistics are float32.
  ``mask`` (N,) bool over the leading axis (train only): the statistics come from the kept samples alone
  (n = their element count) and are applied to every sample; no update when none is kept.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      if mask is None:
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        n, update = x.size // c, True
      else:
        w = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        n = jnp.sum(w) * (x.size // (c * x.shape[0]))
        mean = jnp.sum(w * x, axis=axes) / jnp.maximum(n, 1.0)
        var = jnp.sum(w * jnp.square(x - mean), axis=axes) / jnp.maximum(n, 1.0)
        update = n > 0
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = jnp.where(update, (1 - m) * ra_mean.value + m * mean, ra_mean.value)
        ra_var.value = jnp.where(update, (1 - m) * ra_var.value + m * var * (n / jnp.maximum(n - 1, 1)),
                                 ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    # torch's CPU kernel form: alpha = weight / sqrt(var + eps), beta = bias − mean · alpha, y = x · alpha + beta.
    alpha = scale * (1.0 / jnp.sqrt(var + self.epsilon))
    return (x * alpha + (bias - mean * alpha)).astype(self.dtype)
