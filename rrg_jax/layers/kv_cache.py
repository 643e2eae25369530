"""Key/value cache of one attention layer for one-token decoding steps, with beam indirection.

A ``BeamKV`` holds N = B·K rows (K = ``num_beams`` beams of each of B images, rows ``b·K + k``; K = 1 outside
beam search) of keys and values ``k``, ``v`` (stored (B, H, K, L, d)) and a table ``src`` (N, L) int32: the key/value of
slot j of row ``b·K + k``'s history is stored in row ``b·K + src[b·K + k, j]`` (a beam of the same image).

Beam search reorders its beams every step. Gathering the whole cache to follow them costs a read and a write of
every K/V of every layer per step — on a CPU that pass over memory costs more than the attention itself. With the
table only ``src`` is gathered (``reorder``); each step writes its new K/V once, in place, at the step's slot in
its own row (``write``, which also records ``src[row, slot] = own beam``), and attention reads the K/V of all K
beams of the image once, choosing per (query beam, slot) the one ``src`` names (``scores`` / ``mix``: the K-fold
score computation is tiny next to the projections). The result is the same attention as over a physically
reordered cache: the unchosen terms are exact zeros.

All rows of a cache advance together: ``index`` is one slot for every row (beam search and left-padded prompts
both keep it so). Leaves of a freshly built cache have leading dim B (= N with K = 1); ``expand(K)`` repeats
every row K times and switches on the indirection, as beam search expands its state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BeamKV:
  """``k`` stored transposed (B, H, d, K, L) and ``v`` (B, H, K, L, d) — the layouts the two attention matmuls
  read without a relayout copy; ``src`` (N, L) int32 (beam of the same image holding each slot); ``num_beams`` K
  (static)."""
  k: jax.Array
  v: jax.Array
  src: jax.Array
  num_beams: int = 1

  @classmethod
  def zeros(cls, rows: int, heads: int, max_len: int, head_dim: int, dtype) -> "BeamKV":
    """An empty cache of ``rows`` rows (K = 1)."""
    return cls(jnp.zeros((rows, heads, head_dim, 1, max_len), dtype),
               jnp.zeros((rows, heads, 1, max_len, head_dim), dtype), jnp.zeros((rows, max_len), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.src.shape[1]

  def expand(self, num_beams: int) -> "BeamKV":
    """Every row repeated ``num_beams`` times (rows ``b·K + k``); the copies are identical, so every slot
    written so far may be read from beam 0 of its image."""
    if self.num_beams != 1:
      raise ValueError(f"cache already expanded to {self.num_beams} beams")
    return BeamKV(jnp.repeat(self.k, num_beams, axis=3), jnp.repeat(self.v, num_beams, axis=2),
                  jnp.zeros((self.src.shape[0] * num_beams, self.max_len), jnp.int32), num_beams)

  def reorder(self, parent: jax.Array) -> "BeamKV":
    """parent (B, K): new beam k of image b continues beam ``parent[b, k]`` → only ``src`` is gathered."""
    b, k = parent.shape
    src = jnp.take_along_axis(self.src.reshape(b, k, -1), parent[:, :, None], axis=1)
    return dataclasses.replace(self, src=src.reshape(b * k, -1))

  def _per_image(self, x: jax.Array) -> jax.Array:
    """(N, H, ...) → (B, H, K, ...)."""
    x = x.reshape((x.shape[0] // self.num_beams, self.num_beams) + x.shape[1:])
    return jnp.swapaxes(x, 1, 2)

  def write(self, k_new: jax.Array, v_new: jax.Array, index: jax.Array) -> "BeamKV":
    """k_new, v_new (N, H, 1, d) of the token at slot ``index`` (a scalar, the same for every row)."""
    k_col = jnp.moveaxis(self._per_image(k_new[:, :, 0]), -1, 2)[..., None]  # (B, H, d, K, 1)
    v_row = self._per_image(v_new)  # (B, H, K, 1, d)
    slot = jnp.arange(self.max_len) == index
    own = jnp.arange(self.src.shape[0], dtype=jnp.int32) % self.num_beams
    return BeamKV(jnp.where(slot, k_col.astype(self.k.dtype), self.k),
                  jnp.where(slot[:, None], v_row.astype(self.v.dtype), self.v),
                  jnp.where(slot, own[:, None], self.src), self.num_beams)

  def _chosen(self) -> jax.Array:
    """(B, 1, K, K', L) one-hot: slot j of query beam k is read from beam k'."""
    n, length = self.src.shape
    src = self.src.reshape(n // self.num_beams, 1, self.num_beams, 1, length)
    return src == jnp.arange(self.num_beams)[:, None]

  def scores(self, q: jax.Array) -> jax.Array:
    """q (N, H, 1, d) → float32 scores ``q·kᵀ`` (N, H, 1, L) over each row's own history (unscaled)."""
    every = jnp.einsum("bhkd,bhdgj->bhkgj", self._per_image(q[:, :, 0]), self.k,
                       preferred_element_type=jnp.float32)  # (B, H, K, K', L)
    chosen = jnp.sum(jnp.where(self._chosen(), every, 0.0), axis=3)  # (B, H, K, L)
    return jnp.swapaxes(chosen, 1, 2).reshape(q.shape[0], q.shape[1], 1, -1)

  def mix(self, probs: jax.Array) -> jax.Array:
    """probs (N, H, 1, L) over each row's own history → ``probs·v`` (N, H, 1, d) in the cache dtype."""
    p = self._per_image(probs[:, :, 0].astype(self.v.dtype))  # (B, H, K, L)
    spread = jnp.where(self._chosen(), p[:, :, :, None], 0).astype(self.v.dtype)  # (B, H, K, K', L)
    out = jnp.einsum("bhkgj,bhgjd->bhkd", spread, self.v)
    return jnp.swapaxes(out, 1, 2).reshape(probs.shape[0], probs.shape[1], 1, -1)

  def attend(self, q: jax.Array, k_new: jax.Array, v_new: jax.Array, index: jax.Array,
             probabilities: Callable[[jax.Array], jax.Array],
             prefix: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, "BeamKV"]:
    """One query step: writes k_new, v_new (N, H, 1, d) of the token at slot ``index``, then attends with q
    (N, H, 1, d) over the cache; ``probabilities`` maps the float32 scores (N, H, 1, P + L) — P prefix slots, then
    the cache's L slots (those after ``index`` stale) — to attention probabilities (the caller scales and masks);
    ``prefix``: scores (N, H, 1, P) float32 and values (N, H, P, d) of extra slots placed first (pseudo
    self-attention) → (``probs·v`` (N, H, 1, d), the cache with the token written).

    Write first, read after: XLA (CPU) then updates the loop-carried cache in place; reading the old cache
    before the write makes it copy every layer's cache every step."""
    slot = jnp.arange(self.max_len) == index
    own = jnp.einsum("nhqd,nhqd->nhq", q, k_new, preferred_element_type=jnp.float32)[..., None]  # (N, H, 1, 1)
    scores = jnp.where(slot, own, self.scores(q))
    n_prefix = 0 if prefix is None else prefix[0].shape[-1]
    if prefix is not None:
      scores = jnp.concatenate([prefix[0], scores], axis=-1)
    probs = probabilities(scores)
    out = 0.0
    if prefix is not None:
      out = jnp.einsum("nhqk,nhkd->nhqd", probs[..., :n_prefix].astype(self.v.dtype), prefix[1])
    probs = probs[..., n_prefix:]
    p_own = jnp.sum(jnp.where(slot, probs, 0.0), axis=-1, keepdims=True)  # (N, H, 1, 1)
    out = out + self.mix(jnp.where(slot, 0.0, probs)) + (p_own * v_new).astype(self.v.dtype)
    return out, self.write(k_new, v_new, index)


jax.tree_util.register_dataclass(BeamKV, data_fields=["k", "v", "src"], meta_fields=["num_beams"])


def is_cache(x) -> bool:
  return isinstance(x, BeamKV)


def expand_rows(state, num_beams: int):
  """Every leaf (leading dim B) repeated ``num_beams`` times along axis 0; ``BeamKV`` caches expanded."""
  return jax.tree.map(lambda x: x.expand(num_beams) if is_cache(x) else jnp.repeat(x, num_beams, axis=0),
                      state, is_leaf=is_cache)


def reorder_rows(state, parent: jax.Array):
  """Rows ``b·K + k`` of every leaf (B·K, ...) ← rows ``b·K + parent[b, k]``; ``BeamKV`` caches reorder their
  table only."""
  b, w = parent.shape

  def gather(x):
    if is_cache(x):
      return x.reorder(parent)
    x = x.reshape((b, w) + x.shape[1:])
    idx = parent.reshape((b, w) + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1).reshape((b * w,) + x.shape[2:])

  return jax.tree.map(gather, state, is_leaf=is_cache)
