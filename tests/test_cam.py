"""CAM / VDM / min-max against hand-computed values (spec §3, §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax.alignment.cam import cam, minmax_normalize, vdm_from_cams


def test_cam_hand_computed_and_without_gradient():
  feats = jnp.array([[[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]])  # (1, N=3, C=2)
  kernel = jnp.array([[1.0, -1.0, 0.0], [1.0, 2.0, 1.0]])  # (C=2, classes=3)
  want = np.array([[[3.0, 2.0, 1.0], [3.0, 0.0, 0.5], [2.0, 0.0, 0.5]]])  # relu, (classes, N)
  np.testing.assert_array_equal(np.asarray(cam(feats, kernel)), want)
  g_f, g_k = jax.grad(lambda f, k: jnp.sum(cam(f, k)), argnums=(0, 1))(feats, kernel)
  assert not np.any(np.asarray(g_f)) and not np.any(np.asarray(g_k))


def test_vdm_uses_predicted_labels_and_one_minmax():
  """Predicted classes {0, 2} (sigmoid(0) = 0.5 counts); max → [1, 3, 2]; min-max → [0, 1, 0.5]."""
  cams = jnp.array([[[1.0, 0.0, 2.0], [9.0, 9.0, 9.0], [0.0, 3.0, 1.0]]])
  d_v = vdm_from_cams(cams, jnp.array([[0.0, -0.1, 2.0]]))
  np.testing.assert_allclose(np.asarray(d_v), [[0.0, 1.0, 0.5]])


def test_vdm_no_predicted_class_is_zero():
  cams = jnp.ones((2, 3, 4)) * jnp.arange(4.0)
  np.testing.assert_array_equal(np.asarray(vdm_from_cams(cams, -jnp.ones((2, 3)))), 0.0)


def test_vdm_min_max_over_all_tokens_jointly():
  """Two views' tokens (N = 2·2) share one normalisation: the global max is 1, the global min 0."""
  cams = jnp.array([[[1.0, 2.0, 5.0, 3.0]]])
  np.testing.assert_allclose(np.asarray(vdm_from_cams(cams, jnp.ones((1, 1)))), [[0.0, 0.25, 1.0, 0.5]])


def test_minmax_clamp():
  x = jnp.array([[2.0, 2.0, 2.0], [0.0, 5e-13, 1e-13], [1.0, 3.0, 2.0]])
  y = np.asarray(minmax_normalize(x))
  np.testing.assert_array_equal(y[0], 0.0)
  np.testing.assert_allclose(y[1], [0.0, 0.5, 0.1], rtol=1e-5)  # den 5e-13 → 1e-12
  np.testing.assert_allclose(y[2], [0.0, 1.0, 0.5])
  g = jax.grad(lambda x: jnp.sum(minmax_normalize(x)[1] * jnp.array([0.0, 1.0, 0.0])))(x)
  np.testing.assert_allclose(np.asarray(g)[1], [-1e12, 1e12, 0.0], rtol=1e-6)  # no gradient via the clamp
