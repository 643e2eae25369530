"""DenseNet / torch-exact BatchNorm: hand-computed BN statistics, torch parity (train + eval), shapes, counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from numerics import residual_bytes
from rrg_jax.layers.conv import PointwiseConv
from rrg_jax.layers.densenet import DenseNet, densenet_channels
from rrg_jax.layers.norms import BatchNorm
from torch_reference import camanet as ref

TINY = dict(growth_rate=8, block_config=(1, 2, 1, 1), num_init_features=16, bn_size=2)


def test_batch_norm_train_uses_biased_var_and_stores_unbiased():
  x = jnp.array([1.0, 2.0, 4.0, 9.0]).reshape(2, 2, 1, 1)  # n = 4 values of one channel
  bn = BatchNorm()
  v = bn.init(jax.random.key(0), x, False)
  y, state = bn.apply(v, x, True, mutable=["batch_stats"])
  mean, var_biased, var_unbiased = 4.0, 9.5, 38.0 / 3.0  # Σ(x−4)² = 9+4+0+25 = 38
  np.testing.assert_allclose(np.asarray(y).ravel(), (np.array([1, 2, 4, 9]) - mean) / np.sqrt(var_biased + 1e-5),
                             rtol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["mean"], [0.9 * 0 + 0.1 * mean], rtol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"], [0.9 * 1 + 0.1 * var_unbiased], rtol=1e-6)
  # eval mode normalises with the running statistics, not the batch's
  y_eval = bn.apply({"params": v["params"], "batch_stats": state["batch_stats"]}, x, False)
  np.testing.assert_allclose(np.asarray(y_eval).ravel(),
                             (np.array([1, 2, 4, 9]) - 0.4) / np.sqrt(0.9 + 0.1 * var_unbiased + 1e-5), rtol=1e-6)


def test_batch_norm_init_does_not_touch_running_stats():
  v = BatchNorm().init(jax.random.key(0), jnp.full((2, 3, 3, 4), 7.0), True)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(v["batch_stats"]["var"], 1.0)


def test_pointwise_conv_is_a_1x1_convolution_with_its_gradients():
  """PointwiseConv (a matmul) against torch's conv2d 1×1 on the same kernel: output, input and weight gradients."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6, 7), np.float32)
  layer = PointwiseConv(3)
  v = layer.init(jax.random.key(0), x)
  assert v["params"]["kernel"].shape == (1, 1, 7, 3)
  y, vjp = jax.vjp(lambda p, x_: layer.apply({"params": p}, x_), v["params"], x)
  g = rng.standard_normal(y.shape, np.float32)
  dp, dx = vjp(jnp.asarray(g))
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  wt = torch.tensor(np.asarray(v["params"]["kernel"]).transpose(3, 2, 0, 1), requires_grad=True)  # (O, I, 1, 1)
  yt = torch.nn.functional.conv2d(xt, wt)
  yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dp["kernel"], wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)


def test_densenet121_shapes_and_parameter_count():
  model = DenseNet()
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out, v = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, False), x)
  assert out.shape == (2, 7, 7, 1024) and densenet_channels(32, (6, 12, 24, 16), 64) == 1024
  assert sum(p.size for p in jax.tree.leaves(v["params"])) == 6_953_856
  assert len(jax.tree.leaves(v["batch_stats"])) == 2 * 121  # 121 BatchNorms
  p = v["params"]
  assert p["denseblock3"]["denselayer24"]["conv1"]["kernel"].shape == (1, 1, 992, 128)
  assert p["transition2"]["conv"]["kernel"].shape == (1, 1, 512, 256)


def torch_to_flax(sd: dict[str, torch.Tensor]) -> dict:
  """torchvision-named DenseNet state_dict → {'params', 'batch_stats'} (test-local mapping)."""
  out: dict = {"params": {}, "batch_stats": {}}
  for key, t in sd.items():
    *mods, leaf = key.split(".")
    a = t.detach().numpy()
    if leaf == "num_batches_tracked":
      continue
    col, name = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
                 "bias": ("params", "bias")}.get(leaf, ("params", "kernel" if a.ndim == 4 else "scale"))
    if name == "kernel":
      a = a.transpose(2, 3, 1, 0)
    node = out[col]
    for m in mods:
      node = node.setdefault(m, {})
    node[name] = jnp.asarray(a)
  return out


def make_pair(seed: int, **kw):
  torch.manual_seed(seed)
  tnet, channels = ref.densenet_features(**TINY)
  gen = torch.Generator().manual_seed(seed)
  ref.randomize_norms_(tnet, gen)
  return tnet, channels, DenseNet(**TINY, **kw), torch_to_flax(tnet.state_dict())


@pytest.mark.parametrize("size", [64, 50])
def test_densenet_matches_torch_train_and_eval(size):
  tnet, channels, fnet, variables = make_pair(0)
  x = np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  tnet.eval()
  with torch.no_grad():
    want = torch.relu(tnet(torch.from_numpy(x))).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(lambda v, x: fnet.apply(v, x, False))(variables, xj)
  assert got.shape == want.shape and got.shape[-1] == channels
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  tnet.train()
  with torch.no_grad():
    want = torch.relu(tnet(torch.from_numpy(x))).numpy().transpose(0, 2, 3, 1)
  got, state = jax.jit(lambda v, x: fnet.apply(v, x, True, mutable=["batch_stats"]))(variables, xj)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  want_stats = torch_to_flax(tnet.state_dict())["batch_stats"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
               state["batch_stats"], want_stats)


def test_remat_same_values_and_gradients():
  _, _, fnet, variables = make_pair(1)
  remat = DenseNet(**TINY, remat=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32))

  def loss(net, params):
    y, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True, mutable=["batch_stats"])
    return jnp.sum(y ** 2)

  # what the backward pass keeps: rematerialisation saves only each dense layer's input (0.74× here, 0.29× for
  # DenseNet-121 at 224²), counted from the arrays jax.vjp closes over (shapes only, nothing is computed)
  kept = {k: residual_bytes(lambda q, n=n: loss(n, q), variables["params"]) for k, n in (("remat", remat),
                                                                                         ("plain", fnet))}
  assert kept["remat"] < 0.8 * kept["plain"]
  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(fnet, p)))(variables["params"])
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
  np.testing.assert_allclose(l1, l0, rtol=5e-6)  # two programs (remat recomputes), float32 rounding: ~10 ulp
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))
  # remat changes how the recomputed convolutions' weight gradients are fused and summed (float32 order)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5 * scale), g1, g0)


def test_bfloat16_forward_close_to_float32():
  _, _, fnet, variables = make_pair(2)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32))
  y32 = jax.jit(lambda v: fnet.apply(v, x, False))(variables)
  y16 = jax.jit(lambda v: DenseNet(**TINY, dtype=jnp.bfloat16).apply(v, x, False))(variables)
  assert y16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() / np.abs(np.asarray(y32)).max()
  assert err < 0.05, err
