"""Multi-head attention of R2Gen / the annotated transformer (spec §5.1), with a key/value path for caching.

Params ``linears_0..3`` = Q, K, V, output projections (D → D). Scores ``QKᵀ/√d_k`` with −1e9 where the mask is
False, softmax in float32, dropout on the probabilities. The post-dropout probabilities are returned (VTAC
consumes exactly those, spec §12.13).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear

MASK_FILL = -1e9


class MultiHeadedAttention(nn.Module):
  """Attributes: ``num_heads`` H, ``d_model`` D, ``dropout`` (probability dropout), compute ``dtype``."""
  num_heads: int
  d_model: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}.")
    self.linears = [Linear(self.d_model, dtype=self.dtype) for _ in range(4)]
    self.drop = nn.Dropout(self.dropout)

  def _split(self, x: jax.Array) -> jax.Array:
    """(B, S, D) → (B, H, S, d_k)."""
    b, s, _ = x.shape
    return x.reshape(b, s, self.num_heads, self.d_model // self.num_heads).transpose(0, 2, 1, 3)

  def project_kv(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """key, value (B, S, D) → projected heads K, V, each (B, H, S, d_k)."""
    return self._split(self.linears[1](key)), self._split(self.linears[2](value))

  def attend(self, query: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
             deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Attention over already projected keys/values.

    Args:
      query: (B, Lq, D).
      k, v: (B, H, S, d_k) from ``project_kv`` (or a cache).
      mask: bool, broadcastable to (B, Lq, S); False = not visible. None = all visible.
      deterministic: no dropout when True; otherwise needs the 'dropout' rng.

    Returns:
      out (B, Lq, D) and the post-dropout probabilities (B, H, Lq, S) in float32.
    """
    q = self._split(self.linears[0](query))
    d_k = self.d_model // self.num_heads
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.float32(d_k ** 0.5)
    if mask is not None:
      scores = jnp.where(mask[:, None], scores, MASK_FILL)
    probs = self.drop(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    x = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
    b, _, lq, _ = x.shape
    return self.linears[3](x.transpose(0, 2, 1, 3).reshape(b, lq, self.d_model)), probs

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """query (B, Lq, D), key/value (B, S, D), mask as in ``attend`` → (out (B, Lq, D), probs (B, H, Lq, S))."""
    return self.attend(query, *self.project_kv(key, value), mask, deterministic=deterministic)
