"""VTAC textual discriminative map (``CamAttnCon``, method 'max', spec §6), as pure functions.

The top-k counts of the original depend on Python/float32 arithmetic and on the batch's true padded length
``T_b = max_b Σ_t masks[b, t]``. Both are tabulated in numpy (``topk_tables``) and indexed by traced integers,
so shapes stay static under jit and the counts equal the original's exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax.alignment.cam import minmax_normalize

COS_EPS = 1e-8


def topk_tables(topk: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Lookup tables for sequences of at most ``max_len`` ids (incl. BOS/EOS).

  Returns:
    k_batch (max_len + 1,) int32: ``k_batch[T] = int(topk · (T − 1))`` in float64 (T = batch pad length;
      ``T − 1`` decoder positions), 0 for T = 0.
    count (max_len + 1,) int32: ``count[n] = ceil(float32(n) · float32(topk))`` (n = valid decoder positions);
      float32 as in torch (int tensor × Python float), e.g. topk 0.3: n=50 → 16, n=90 → 28.
  """
  t = np.arange(max_len + 1)
  k_batch = np.array([int(topk * max(int(v) - 1, 0)) for v in t], np.int32)
  prod = np.arange(max_len + 1, dtype=np.float32) * np.float32(topk)
  count = np.array([math.ceil(float(v)) for v in prod], np.int32)
  return k_batch, count


def cosine_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
  """torch ``F.cosine_similarity(x, y, dim=-1, eps=1e-8)``: Σ (x/max(‖x‖, eps)) · (y/max(‖y‖, eps))."""
  nx = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), COS_EPS)
  ny = jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), COS_EPS)
  return jnp.sum((x / nx) * (y / ny), axis=-1)


def descending_rank(s: jax.Array) -> jax.Array:
  """(B, L) → rank (B, L) int: 0 for the largest value; ties ranked by position (stable)."""
  order = jnp.argsort(-s, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def textual_discriminative_map(anchor: jax.Array, target_embed: jax.Array, attn: jax.Array, seq: jax.Array,
                               batch_length: jax.Array, topk: float) -> jax.Array:
  """Textual discriminative map ``total_attn`` (B, N) in [0, 1] (differentiable).

  Args:
    anchor: (B, D) encoded visual anchor r (official code: the first patch token ``Henc[:, 1]``).
    target_embed: (B, L, D) decoder input embeddings E (after PE and dropout).
    attn: (B, H, L, N) post-dropout cross-attention probabilities of the chosen decoder layer.
    seq: (B, L) int decoder input ``targets[:, :-1]``.
    batch_length: () int, the batch's true padded length ``T_b = max_b Σ masks[b]`` (≤ L + 1).
    topk: fraction k of words.

  Steps: valid positions ``seq > 0`` or position 0; ``s = cos(E_j, r)``, −1 where invalid; per sample the
  ``min(ceil(float32(len)·topk), int(topk·(T_b − 1)))`` highest-s positions (stable descending); rows
  ``ReLU(s · mean_h attn)``; max over the selected rows; min-max over N with the 1e-12 clamp.
  """
  length = seq.shape[1]
  k_batch, count = (jnp.asarray(t) for t in topk_tables(topk, length + 1))
  valid = (seq > 0) | (jnp.arange(length) == 0)[None]
  lens = jnp.sum(valid, axis=-1)
  m = jnp.minimum(count[lens], k_batch[batch_length])
  a = jnp.mean(attn.astype(jnp.float32), axis=1)
  s = cosine_similarity(target_embed.astype(jnp.float32), anchor.astype(jnp.float32)[:, None, :])
  s = jnp.where(valid, s, -1.0)
  selected = descending_rank(s) < m[:, None]
  w = jax.nn.relu(s[:, :, None] * a)
  pooled = jnp.max(jnp.where(selected[:, :, None], w, 0.0), axis=1)
  return minmax_normalize(pooled)
