"""Losses against hand-computed values and torch: token-mean CE, BCE-with-logits, VTAC MSE (0 if none kept)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import camanet as camanet_config
from rrg_jax import losses, models
from rrg_jax.models import camanet


def test_cross_entropy_token_mean_over_batch():
  logp = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
                          [[0.3, 0.3, 0.4], [0.9, 0.05, 0.05], [0.2, 0.2, 0.6]]], np.float32))
  targets = np.array([[0, 1, 0, 0], [0, 2, 0, 0]], np.int32)
  masks = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  # predicted positions: sample 0 → [1, 0] (pos 2 masked), sample 1 → [2, 0, 0]
  want = -(np.log(0.25) + np.log(0.1) + np.log(0.4) + np.log(0.9) + np.log(0.2)) / 5
  np.testing.assert_allclose(float(losses.cross_entropy(logp, targets, masks)), want, rtol=1e-6)


def test_bce_with_logits_matches_torch():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 14)) * 30).astype(np.float32)  # large logits: stable form
  y = (rng.random((4, 14)) < 0.3).astype(np.float32)
  want = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(x), torch.from_numpy(y)).item()
  np.testing.assert_allclose(float(losses.bce_with_logits(x, y)), want, rtol=1e-6)


def test_vtac_mse_only_samples_with_positive_labels():
  tdm = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
  vdm = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # sample 1 has no positive: excluded
  np.testing.assert_allclose(float(losses.vtac_mse(tdm, vdm, labels)), (1 + 0 + 1 + 1) / 4)


def test_vtac_mse_is_zero_not_nan_when_no_sample_qualifies():
  tdm = jnp.array([[1.0, 0.0]])
  f = lambda t: losses.vtac_mse(t, jnp.zeros((1, 2)), jnp.zeros((1, 3)))
  assert float(f(tdm)) == 0.0
  np.testing.assert_array_equal(np.asarray(jax.grad(f)(tdm)), 0.0)


def test_camanet_loss_total_and_parts():
  rng = np.random.default_rng(1)
  out = {"logprobs": jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 5)).astype(np.float32))),
         "logits": jnp.asarray(rng.normal(size=(2, 4)).astype(np.float32)),
         "tdm": jnp.asarray(rng.random((2, 6)).astype(np.float32)),
         "vdm": jnp.asarray(rng.random((2, 6)).astype(np.float32))}
  batch = {"targets": jnp.array([[0, 1, 2, 0], [0, 3, 0, 0]]), "masks": jnp.array([[1.0, 1, 1, 1], [1, 1, 1, 0]]),
           "labels": jnp.array([[1.0, 0, 0, 0], [0, 0, 1, 1]])}
  total, parts = camanet.camanet_loss(out, batch, cls_w=1.0, mse_w=0.15, use_vtac=True)
  ce = losses.cross_entropy(out["logprobs"], batch["targets"], batch["masks"])
  bce = losses.bce_with_logits(out["logits"], batch["labels"])
  mse = jnp.mean((out["tdm"] - out["vdm"]) ** 2)
  np.testing.assert_allclose([parts[k] for k in ("ce", "bce", "mse")], [ce, bce, mse], rtol=1e-6)
  np.testing.assert_allclose(float(total), float(ce + bce + 0.15 * mse), rtol=1e-6)
  assert parts["loss"] is total
  no_vtac = {k: v for k, v in out.items() if k != "tdm"}
  total, parts = camanet.camanet_loss(no_vtac, batch, cls_w=0.5, mse_w=0.15, use_vtac=False)
  assert float(parts["mse"]) == 0.0
  np.testing.assert_allclose(float(total), float(ce + 0.5 * bce), rtol=1e-6)
  # The system's loss reads the weights and the VTAC switch from its config ("mimic_cxr": cls_w 1, mse_w 0.5).
  config = camanet_config.get_config("mimic_cxr")
  total, _ = models.get_system(config).loss(out, batch)
  np.testing.assert_allclose(float(total), float(ce + bce + 0.5 * mse), rtol=1e-6)
  config.model.use_vtac = False
  total, parts = models.get_system(config).loss(no_vtac, batch)
  assert float(parts["mse"]) == 0.0 and abs(float(total) - float(ce + bce)) < 1e-5


def test_weighted_cross_entropy_spec_example_15_4():
  """Logits (0, 0, 0) with y 0 (CE ln 3) and (0, ln 2, 0) with y 1 (CE ln 2), w = (8, 1, 3.2)."""
  logits = jnp.array([[0.0, 0.0, 0.0], [0.0, np.log(2.0), 0.0]])
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(float(losses.weighted_cross_entropy(logits, labels, jnp.array([8.0, 1.0, 3.2]))),
                             1.0535606, rtol=1e-6)
  np.testing.assert_allclose(float(losses.weighted_cross_entropy(logits, labels, jnp.ones(3))), 0.8958797,
                             rtol=1e-6)


def test_weighted_cross_entropy_matches_torch_and_ignores_padding_rows():
  rng = np.random.default_rng(2)
  logits = (rng.normal(size=(6, 3)) * 4).astype(np.float32)
  labels = np.array([0, 1, 2, 1, 1, 0])
  w = np.array([8.0, 1.0, 3.2], np.float32)
  want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                           weight=torch.from_numpy(w)).item()
  f = jax.jit(losses.weighted_cross_entropy)
  np.testing.assert_allclose(float(f(logits, labels, w, None)), want, rtol=1e-6)
  # Two padding rows (sample weight 0) with garbage logits change neither the loss nor the real rows' gradient.
  padded = np.concatenate([logits, np.array([[1e4, -1e4, 0.0], [-50.0, 7.0, 3.0]], np.float32)])
  padded_labels = np.concatenate([labels, [2, 0]])
  s = np.array([1.0] * 6 + [0.0, 0.0], np.float32)
  np.testing.assert_allclose(float(f(padded, padded_labels, w, s)), want, rtol=1e-6)
  g = jax.grad(losses.weighted_cross_entropy)(jnp.asarray(padded), padded_labels, w, s)
  np.testing.assert_allclose(np.asarray(g[:6]), np.asarray(jax.grad(losses.weighted_cross_entropy)(
      jnp.asarray(logits), labels, w)), rtol=1e-6, atol=1e-8)
  np.testing.assert_array_equal(np.asarray(g[6:]), 0.0)
  # A batch of padding rows only: 0, not NaN.
  assert float(f(padded[6:], padded_labels[6:], w, s[6:])) == 0.0


def test_token_cross_entropy_masked_and_all_positions_match_torch():
  """Unshifted decoder logits (B, T, K) vs labels: pads ignored (torch ignore_index) or counted (mask None)."""
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(2, 5, 11)) * 3).astype(np.float32)
  labels = rng.integers(0, 11, size=(2, 5))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.float32)
  flat = torch.from_numpy(logits).reshape(-1, 11)
  ignored = torch.from_numpy(np.where(mask > 0, labels, -100)).reshape(-1)
  want_masked = torch.nn.functional.cross_entropy(flat, ignored).item()
  want_all = torch.nn.functional.cross_entropy(flat, torch.from_numpy(labels).reshape(-1)).item()
  np.testing.assert_allclose(float(losses.token_cross_entropy(logits, labels, mask)), want_masked, rtol=1e-6)
  np.testing.assert_allclose(float(losses.token_cross_entropy(logits, labels)), want_all, rtol=1e-6)
  assert abs(want_masked - want_all) > 1e-3  # the two conventions differ on this batch
