"""R2Gen LayerNorm / MCLN against hand-computed numpy values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrg_jax.layers.norms import ConditionalLayerNorm, LayerNorm


def ref_norm(x, gamma, beta):
  x = np.asarray(x, np.float64)
  return gamma * (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-6) + beta


def test_layer_norm_hand_computed():
  x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  params = {"gamma": jnp.array([1.0, 2.0, 0.5, 1.0]), "beta": jnp.array([0.0, 1.0, 0.0, -1.0])}
  y = LayerNorm().apply({"params": params}, x)
  std = np.sqrt(5.0 / 3.0)  # unbiased: Σ(x−2.5)² = 5, /(4−1)
  want = np.array([-1.5 / (std + 1e-6), 2 * -0.5 / (std + 1e-6) + 1, 0.5 * 0.5 / (std + 1e-6),
                   1.5 / (std + 1e-6) - 1])
  np.testing.assert_allclose(np.asarray(y)[0], want, rtol=1e-6)


def test_layer_norm_eps_is_added_to_the_std():
  """A constant row: std 0 → (x − mean)/(0 + 1e-6) = 0 exactly; a tiny spread is divided by std + 1e-6."""
  x = jnp.array([[5.0, 5.0, 5.0], [0.0, 1e-6, 2e-6]])
  y = np.asarray(LayerNorm().apply({"params": {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}}, x))
  np.testing.assert_array_equal(y[0], 0.0)
  np.testing.assert_allclose(y[1], ref_norm(np.array([0.0, 1e-6, 2e-6]), 1, 0), atol=1e-6)
  assert abs(y[1, 2]) < 0.6  # flax.linen.LayerNorm would give ≈1.22 here


def test_layer_norm_init_and_names():
  v = LayerNorm().init(jax.random.key(0), jnp.zeros((2, 7)))
  np.testing.assert_array_equal(v["params"]["gamma"], np.ones(7))
  np.testing.assert_array_equal(v["params"]["beta"], np.zeros(7))


def test_conditional_layer_norm_matches_numpy():
  rng = np.random.default_rng(0)
  d, s = 6, 2
  x = rng.normal(size=(2, 3, d)).astype(np.float32)
  mem = rng.normal(size=(2, 3, s * d)).astype(np.float32)
  mod = ConditionalLayerNorm()
  params = mod.init(jax.random.key(1), x, mem)["params"]
  assert set(params) == {"gamma", "beta", "mlp_gamma_0", "mlp_gamma_2", "mlp_beta_0", "mlp_beta_2"}
  for name in ("mlp_gamma_0", "mlp_gamma_2", "mlp_beta_0", "mlp_beta_2"):
    np.testing.assert_array_equal(params[name]["bias"], np.float32(0.1))
  k = params["mlp_gamma_0"]["kernel"]
  assert k.shape == (s * d, d) and np.abs(k).max() <= np.sqrt(6 / (s * d + d))
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  p = jax.tree.map(np.asarray, params)

  def mlp(name):
    h = np.maximum(mem @ p[f"{name}_0"]["kernel"] + p[f"{name}_0"]["bias"], 0)
    return h @ p[f"{name}_2"]["kernel"] + p[f"{name}_2"]["bias"]

  want = ref_norm(x, p["gamma"] + mlp("mlp_gamma"), p["beta"] + mlp("mlp_beta"))
  got = mod.apply({"params": params}, x, mem)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_norms_bfloat16_output_fp32_stats():
  x = jnp.arange(8.0).reshape(1, 8) * 1000 + 1
  y32 = LayerNorm().apply({"params": {"gamma": jnp.ones(8), "beta": jnp.zeros(8)}}, x)
  y16 = LayerNorm(dtype=jnp.bfloat16).apply({"params": {"gamma": jnp.ones(8), "beta": jnp.zeros(8)}},
                                            x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=2e-2)


def test_constant_row_gradient_is_finite_like_torch():
  """A constant row (std 0, e.g. the VDMAE token when no finding is predicted) has torch's finite gradient
  (std's backward is masked to 0 there, leaving (x − mean)'s path divided by eps), not NaN."""
  torch = pytest.importorskip("torch")
  w = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]], np.float32)
  x = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, -2.0, 0.5]], np.float32)  # row 0 constant, row 1 not
  norm = LayerNorm()
  params = norm.init(jax.random.key(0), jnp.asarray(x))
  got = jax.grad(lambda v: jnp.sum(norm.apply(params, v) * w))(jnp.asarray(x))
  tx = torch.tensor(x, requires_grad=True)
  xc = tx - tx.mean(-1, keepdim=True)
  (torch.sum(xc / (tx.std(-1, keepdim=True) + 1e-6) * torch.tensor(w))).backward()
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(np.asarray(got), tx.grad.numpy(), rtol=1e-5)
  assert abs(float(got[0, 3])) > 1e5  # (w − mean w)/eps: the row's huge, finite torch gradient
