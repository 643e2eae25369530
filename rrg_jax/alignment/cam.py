"""Class activation maps and the visual discriminative map (spec §3 CAM, §4 steps 1–3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLAMP = 1e-12


def minmax_normalize(x: jax.Array) -> jax.Array:
  """(B, N) → ``(x − min_n x) / max_n(x − min_n x)``, the denominator set to 1e-12 where below it (no gradient
  flows through a clamped denominator); all-equal rows become 0."""
  x = x - jnp.min(x, axis=-1, keepdims=True)
  den = jnp.max(x, axis=-1, keepdims=True)
  return x / jnp.where(den < CLAMP, jnp.float32(CLAMP), den)


def cam(patch_feats: jax.Array, head_kernel: jax.Array) -> jax.Array:
  """``ReLU(Σ_k W[c, k] · f[b, n, k])`` without gradient (no bias, no normalisation).

  Args:
    patch_feats: (B, N, C_feat) visual tokens.
    head_kernel: (C_feat, num_classes) classifier kernel (Flax layout, = torch weightᵀ).

  Returns:
    cams (B, num_classes, N) float32.
  """
  f = jax.lax.stop_gradient(patch_feats.astype(jnp.float32))
  w = jax.lax.stop_gradient(head_kernel.astype(jnp.float32))
  return jax.nn.relu(jnp.einsum("bnk,kc->bcn", f, w))


def vdm_from_cams(cams: jax.Array, logits: jax.Array) -> jax.Array:
  """Visual discriminative map ``d_v`` (B, N) in [0, 1], without gradient.

  Classes predicted by the model itself (``sigmoid(logits) >= 0.5``) keep their CAM, others are zeroed; max over
  classes; one min-max normalisation over all N tokens. No predicted class → all zeros.

  Args:
    cams: (B, num_classes, N), ≥ 0.
    logits: (B, num_classes) classifier logits.
  """
  pred = jax.nn.sigmoid(logits.astype(jnp.float32)) >= 0.5
  pooled = jnp.max(jnp.where(pred[:, :, None], cams, 0.0), axis=1)
  return jax.lax.stop_gradient(minmax_normalize(pooled))
