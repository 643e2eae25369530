"""VTAC textual discriminative map: top-k count tables (spec §6.4 edge cases), hand-computed map, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrg_jax.alignment.vtac import descending_rank, textual_discriminative_map, topk_tables


def test_topk_count_table_float32_edge_cases():
  _, c25 = topk_tables(0.25, 100)
  _, c30 = topk_tables(0.3, 100)
  assert (c25[50], c25[90], c25[4], c25[1]) == (13, 23, 1, 1)
  assert (c30[50], c30[90]) == (16, 28)  # float32: exact math would give 15 and 27
  assert c30[10] == 3 and c30[0] == 0  # float32(10)·float32(0.3) is a tie that rounds to 3.0 exactly


def test_topk_batch_table_float64_floor():
  k25, _ = topk_tables(0.25, 100)
  k30, _ = topk_tables(0.3, 100)
  assert (k25[100], k25[51], k25[2], k25[1]) == (24, 12, 0, 0)
  assert (k30[100], k30[91], k30[11]) == (29, 27, 3)  # int(0.3·90) = 27, int(0.3·10) = 3


def test_descending_rank_is_stable():
  s = jnp.array([[0.5, 0.9, 0.5, -1.0, 0.9]])
  np.testing.assert_array_equal(np.asarray(descending_rank(s)), [[2, 0, 3, 4, 1]])


def test_hand_computed_map():
  """s = cos(E_j, r) = [1, 0, 0.7071, −1]; top-2 rows {0, 2}; t = max(relu(s·a)); min-max over n."""
  r = jnp.array([[1.0, 0.0]])
  emb = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
  attn = jnp.array([[[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]]]])
  seq = jnp.array([[0, 3, 4, 5]])
  t = np.array([0.5, 0.3, 0.8 / np.sqrt(2)])
  got = textual_discriminative_map(r, emb, attn, seq, jnp.int32(5), 0.5)
  np.testing.assert_allclose(np.asarray(got)[0], (t - 0.3) / (t.max() - 0.3), rtol=1e-6)


def crafted(len_b: int, l_batch: int, pad_to: int):
  """Row j attends only to patch j and cos(E_j, r) decreases with j: the selected rows are 0..m−1, so the map
  has exactly m non-zeros. Padded to ``pad_to`` decoder positions (static shape > the batch's own length)."""
  theta = np.linspace(0.0, 1.4, pad_to)
  emb = np.stack([np.cos(theta), np.sin(theta)], -1)[None].astype(np.float32)
  seq = np.zeros((1, pad_to), np.int32)
  seq[0, 1:len_b] = 5
  attn = np.eye(pad_to, l_batch, dtype=np.float32)[None, None]
  return jnp.array([[1.0, 0.0]]), jnp.asarray(emb), jnp.asarray(attn), jnp.asarray(seq)


@pytest.mark.parametrize("topk,len_b,l_batch,m", [
    (0.25, 50, 99, 13), (0.25, 90, 99, 23), (0.3, 50, 99, 16), (0.3, 90, 99, 28), (0.3, 90, 90, 27),
    (0.25, 50, 50, 12)])
def test_selected_row_counts_with_static_padding(topk, len_b, l_batch, m):
  r, emb, attn, seq = crafted(len_b, l_batch, pad_to=120)
  fn = jax.jit(textual_discriminative_map, static_argnums=5)
  tdm = fn(r, emb, attn, seq, jnp.int32(l_batch + 1), topk)  # T_b = L_batch + 1, traced
  assert int(jnp.sum(tdm[0] > 0)) == m


def test_invalid_positions_never_selected():
  """A padded position whose embedding equals the anchor (cos 1) gets s = −1 and contributes nothing."""
  r = jnp.array([[1.0, 0.0]])
  emb = jnp.array([[[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]]])
  attn = jnp.array([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
  seq = jnp.array([[0, 7, 0]])  # position 2 is padding
  got = np.asarray(textual_discriminative_map(r, emb, attn, seq, jnp.int32(4), 1.0))
  np.testing.assert_allclose(got[0], [0.75, 1.0, 0.0], rtol=1e-6)  # relu(s·a): [0.6, 0.8, 0] → min-max


def test_zero_top_k_budget_gives_zero_map_and_finite_gradient():
  r, emb, attn, seq = crafted(3, 3, pad_to=3)
  f = lambda r, e: jnp.sum(textual_discriminative_map(r, e, attn, seq, jnp.int32(4), 0.25))  # int(0.25·3) = 0
  assert float(f(r, emb)) == 0.0
  g = jax.grad(f, argnums=(0, 1))(r, emb)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def test_gradient_reaches_anchor_and_embeddings():
  rng = np.random.default_rng(0)
  r = jnp.asarray(rng.normal(size=(2, 8)).astype(np.float32))
  emb = jnp.asarray(rng.normal(size=(2, 6, 8)).astype(np.float32))
  attn = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 2, 6, 5)).astype(np.float32)), -1)
  seq = jnp.array([[0, 1, 2, 3, 4, 0], [0, 5, 6, 0, 0, 0]])
  target = jnp.asarray(rng.random((2, 5)).astype(np.float32))
  f = lambda r, e, a: jnp.sum((textual_discriminative_map(r, e, a, seq, jnp.int32(7), 0.5) - target) ** 2)
  g = jax.grad(f, argnums=(0, 1, 2))(r, emb, attn)
  assert all(np.abs(np.asarray(x)).max() > 0 for x in g)
