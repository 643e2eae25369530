"""Multi-head attention against a numpy reference: mask fill, post-dropout probabilities, K/V path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax.layers.attention import MultiHeadedAttention


def np_attention(p, q, k, v, mask, h):
  lin = lambda x, i: x @ np.asarray(p[f"linears_{i}"]["kernel"]) + np.asarray(p[f"linears_{i}"]["bias"])  # noqa
  def split(x):
    b, s, d = x.shape
    return x.reshape(b, s, h, d // h).transpose(0, 2, 1, 3)
  qh, kh, vh = split(lin(q, 0)), split(lin(k, 1)), split(lin(v, 2))
  scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
  scores = np.where(mask[:, None], scores, -1e9)
  e = np.exp(scores - scores.max(-1, keepdims=True))
  probs = e / e.sum(-1, keepdims=True)
  x = (probs @ vh).transpose(0, 2, 1, 3).reshape(q.shape)
  return lin(x, 3), probs


def setup_case(seed=0, b=2, lq=5, s=7, d=16, h=4):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(b, n, d)).astype(np.float32) for n in (lq, s, s))
  mask = rng.random((b, lq, s)) < 0.7
  mask[1, 2] = False  # a fully masked row: −1e9 everywhere → uniform, as in torch
  mod = MultiHeadedAttention(h, d, dropout=0.5)
  params = mod.init(jax.random.key(seed), q, k, v)["params"]
  return mod, params, q, k, v, mask


def test_attention_matches_numpy_with_mask():
  mod, params, q, k, v, mask = setup_case()
  out, probs = mod.apply({"params": params}, q, k, v, jnp.asarray(mask))
  want_out, want_probs = np_attention(params, q, k, v, mask, 4)
  np.testing.assert_allclose(np.asarray(probs), want_probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(probs)[1, :, 2], 1 / 7, rtol=1e-6)
  assert probs.dtype == jnp.float32 and set(params) == {f"linears_{i}" for i in range(4)}


def test_attention_returns_post_dropout_probabilities():
  mod, params, q, k, v, mask = setup_case(1)
  out, probs = mod.apply({"params": params}, q, k, v, jnp.asarray(mask), deterministic=False,
                         rngs={"dropout": jax.random.key(3)})
  _, clean = np_attention(params, q, k, v, mask, 4)
  probs = np.asarray(probs)
  kept = probs != 0
  assert 0.3 < kept.mean() < 0.7  # rate 0.5
  np.testing.assert_allclose(probs[kept], 2 * clean[kept], rtol=1e-5)  # kept ones scaled by 1/(1−p)
  # The output is computed from the same dropped probabilities.
  p = jax.tree.map(np.asarray, params)
  vh = (v @ p["linears_2"]["kernel"] + p["linears_2"]["bias"]).reshape(2, 7, 4, 4).transpose(0, 2, 1, 3)
  x = (probs @ vh).transpose(0, 2, 1, 3).reshape(2, 5, 16)
  np.testing.assert_allclose(np.asarray(out), x @ p["linears_3"]["kernel"] + p["linears_3"]["bias"], rtol=1e-5,
                             atol=1e-5)


def test_projected_kv_path_equals_call():
  mod, params, q, k, v, mask = setup_case(2)
  full = mod.apply({"params": params}, q, k, v, jnp.asarray(mask))
  kh, vh = mod.apply({"params": params}, k, v, method=mod.project_kv)
  assert kh.shape == (2, 4, 7, 4)
  split = mod.apply({"params": params}, q, kh, vh, jnp.asarray(mask), method=mod.attend)
  for a, b in zip(full, split):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
