"""layers.kv_cache.BeamKV: attention through the beam-indirection table == attention over a cache that is
physically reordered every step (the plain gather beam search used before), for random beam reorders."""

import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax.layers import kv_cache
from tests.numerics import check


def _softmax_visible(index, max_len):
  visible = jnp.arange(max_len) <= index
  return lambda s: jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)


def test_beam_indirection_equals_reordered_cache():
  b, k, h, d, max_len, steps = 2, 3, 2, 4, 7, 6
  n = b * k
  rng = np.random.default_rng(0)
  with jax.default_matmul_precision("highest"):
    cache = kv_cache.BeamKV.zeros(b, h, max_len, d, jnp.float32).expand(k)
    plain_k = jnp.zeros((n, h, max_len, d))
    plain_v = jnp.zeros((n, h, max_len, d))
    for t in range(steps):
      q, k_new, v_new = (jnp.asarray(rng.normal(size=(n, h, 1, d)), jnp.float32) for _ in range(3))
      out, cache = cache.attend(q, k_new, v_new, jnp.int32(t), _softmax_visible(t, max_len))
      plain_k = plain_k.at[:, :, t].set(k_new[:, :, 0])
      plain_v = plain_v.at[:, :, t].set(v_new[:, :, 0])
      probs = _softmax_visible(t, max_len)(jnp.einsum("nhqd,nhjd->nhqj", q, plain_k))
      want = jnp.einsum("nhqj,nhjd->nhqd", probs, plain_v)
      check(f"beam kv step {t}", out, want, rtol=1e-6)
      parent = jnp.asarray(rng.integers(0, k, size=(b, k)), jnp.int32)
      if t == 0:
        parent = parent.at[0].set(jnp.array([2, 2, 0]))  # a beam copied twice, one dropped
      cache = kv_cache.reorder_rows(cache, parent)
      rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
      plain_k, plain_v = plain_k[rows], plain_v[rows]


def test_expand_and_reorder_rows_leave_other_leaves_as_gathers():
  state = {"x": jnp.arange(4.0).reshape(2, 2), "cache": kv_cache.BeamKV.zeros(2, 1, 3, 1, jnp.float32)}
  grown = kv_cache.expand_rows(state, 2)
  np.testing.assert_array_equal(grown["x"], [[0, 1], [0, 1], [2, 3], [2, 3]])
  assert grown["cache"].num_beams == 2 and grown["cache"].src.shape == (4, 3)
  moved = kv_cache.reorder_rows(grown, jnp.array([[1, 1], [0, 1]]))
  np.testing.assert_array_equal(moved["x"], [[0, 1], [0, 1], [2, 3], [2, 3]])
  assert moved["cache"].k is grown["cache"].k  # keys/values are not moved, only the table
