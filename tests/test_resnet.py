"""ResNet-18/34/50/101/152 vs an independent torch reference (torchvision layout): eval / train forward, BN running
statistics, gradients, parameter counts, key mapping, ``pretrained.load_resnet``, bf16 and remat.

float32, highest matmul precision (tests/conftest.py). Every comparison prints ``PARITY <name> ...`` (pytest -s).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from numerics import residual_bytes, residuals
from rrg_jax import convert, pretrained
from rrg_jax.layers.resnet import RESNET_LAYERS, ResNet, resnet_channels, resnet_layers
from torch_reference import resnet as ref

TINY = (8, 16, 32, 64)
RESIDUAL_BN_SCALE = 0.3  # keeps random networks out of the chaotic regime (torch_reference.resnet.scale_residual_bns_)
# torchvision's published parameter counts (with the 1000-way fc).
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


def fc_params(depth: int) -> int:
  c = resnet_channels(depth)
  return c * 1000 + 1000


# --- helpers --------------------------------------------------------------------------------------------------

def rel_max(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def rel_norm(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def expected_shapes(model: ResNet, size: int = 64):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, False), x)


def to_numpy(sd) -> dict[str, np.ndarray]:
  """torch state_dict → numpy, without ``fc.*`` (the Flax ResNet ends at layer4)."""
  return {k: v.detach().numpy() for k, v in sd.items() if not k.startswith("fc.")}


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def make_pair(depth: int, widths=TINY, seed: int = 0):
  """(torch reference with randomised BN, its feature extractor, Flax ResNet, converted variables)."""
  torch.manual_seed(seed)
  tmodel = ref.ResNet(depth, widths)
  ref.randomize_norms_(tmodel, torch.Generator().manual_seed(seed))
  ref.scale_residual_bns_(tmodel, RESIDUAL_BN_SCALE)
  fnet = ResNet(depth, widths)
  variables = convert.state_dict_to_variables(to_numpy(tmodel.state_dict()), expected_shapes(fnet))
  return tmodel, ref.features(tmodel), fnet, variables


def images(seed: int, batch: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


# --- tiny parity ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 50])
def test_tiny_eval_forward_matches_torch(depth):
  _, feats, fnet, variables = make_pair(depth)
  x = images(depth, 2, 64)
  feats.eval()
  with torch.no_grad():
    want = feats(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(lambda v, x: fnet.apply(v, x, False))(variables, nhwc(x))
  assert got.shape == want.shape == (2, 2, 2, resnet_channels(depth, TINY))
  err = rel_max(got, want)
  print(f"PARITY resnet{depth} tiny eval forward: rel max diff {err:.3e}")
  assert err <= 1e-5


@pytest.mark.parametrize("depth", [18, 50])
def test_tiny_train_forward_stats_and_gradients_match_torch(depth):
  tmodel, feats, fnet, variables = make_pair(depth, seed=1)
  x = images(depth + 1, 2, 64)
  feats.train()
  xt = torch.from_numpy(x).requires_grad_(True)
  yt = feats(xt)
  g = np.random.default_rng(7).normal(size=yt.shape).astype(np.float32)
  yt.backward(torch.from_numpy(g))
  want_y = yt.detach().numpy().transpose(0, 2, 3, 1)
  after = convert.state_dict_to_variables(to_numpy(tmodel.state_dict()), variables)
  want_grads = convert.state_dict_to_variables(
      {k: p.grad.numpy() for k, p in tmodel.named_parameters() if not k.startswith("fc.")},
      {"params": variables["params"]})["params"]

  def f(params, x):
    y, state = fnet.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True,
                          mutable=["batch_stats"])
    return y, state["batch_stats"]

  @jax.jit
  def run(params, x, g):
    y, vjp, stats = jax.vjp(f, params, x, has_aux=True)
    return y, stats, vjp(g)

  y, stats, (dparams, dx) = run(variables["params"], nhwc(x), jnp.asarray(g.transpose(0, 2, 3, 1)))
  err_y = rel_max(y, want_y)
  err_stats = {k: rel_max(a, flat(after["batch_stats"])[k]) for k, a in flat(stats).items()}
  err_grads = {k: rel_norm(a, flat(want_grads)[k]) for k, a in flat(dparams).items()}
  err_grads["input"] = rel_norm(dx, xt.grad.numpy().transpose(0, 2, 3, 1))
  worst_stat, worst_grad = max(err_stats, key=err_stats.get), max(err_grads, key=err_grads.get)
  print(f"PARITY resnet{depth} tiny train forward: rel max diff {err_y:.3e}; BN stats worst {worst_stat} "
        f"{err_stats[worst_stat]:.3e}; grads ({len(err_grads)} leaves incl. input) worst {worst_grad} "
        f"{err_grads[worst_grad]:.3e}, input {err_grads['input']:.3e}")
  assert set(err_stats) == set(flat(after["batch_stats"])) and set(err_grads) - {"input"} == set(flat(want_grads))
  assert err_y <= 1e-5
  assert err_stats[worst_stat] <= 1e-5
  assert err_grads[worst_grad] <= 1e-4


# --- real size ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 101])
def test_real_size_eval_forward_matches_torch(depth):
  torch.manual_seed(depth)
  tmodel = ref.ResNet(depth)
  assert sum(p.numel() for p in tmodel.parameters()) == TORCHVISION_PARAMS[depth]
  gen = torch.Generator().manual_seed(depth)
  ref.randomize_norms_(tmodel, gen)
  ref.scale_residual_bns_(tmodel, RESIDUAL_BN_SCALE)
  ref.calibrate_bn_(tmodel, torch.from_numpy(images(100 + depth, 2, 224)), gen)  # eval activations O(1)
  feats = ref.features(tmodel).eval()
  fnet = ResNet(depth)
  variables = convert.state_dict_to_variables(to_numpy(tmodel.state_dict()), expected_shapes(fnet))
  x = images(depth, 1, 224)
  with torch.no_grad():
    want = feats(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(lambda v, x: fnet.apply(v, x, False))(variables, nhwc(x))
  assert got.shape == (1, 7, 7, 2048 if depth >= 50 else 512)
  err = rel_max(got, want)
  msg = f"PARITY resnet{depth} 224² eval forward: rel max diff {err:.3e} (max|ref| {np.abs(want).max():.3e})"
  if err > 1e-5:  # the float32 noise floor: JAX no further from torch float64 than 1.5× torch float32 is
    with torch.no_grad():
      exact = copy.deepcopy(feats).double()(torch.from_numpy(x).double()).numpy().transpose(0, 2, 3, 1)
    jax_err, torch_err = rel_max(got, exact), rel_max(want, exact)
    msg += f"; vs float64: jax {jax_err:.3e}, torch32 {torch_err:.3e}"
    print(msg)
    assert jax_err <= 1.5 * torch_err, msg
  else:
    print(msg)


# --- structure ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", sorted(RESNET_LAYERS))
def test_parameter_counts_and_shapes(depth):
  fnet = ResNet(depth)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out, v = jax.eval_shape(lambda x: fnet.init_with_output(jax.random.key(0), x, False), x)
  assert out.shape == (2, 7, 7, resnet_channels(depth))
  assert sum(p.size for p in jax.tree.leaves(v["params"])) == TORCHVISION_PARAMS[depth] - fc_params(depth)
  n_bn = 1 + sum(resnet_layers(depth)) * (3 if depth >= 50 else 2) + 4 - (depth < 50)  # + downsample BNs
  assert len(jax.tree.leaves(v["batch_stats"])) == 2 * n_bn
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))


@pytest.mark.parametrize("depth", sorted(RESNET_LAYERS))
def test_flax_keys_map_one_to_one_to_torch_keys_and_depth_is_inferred(depth):
  tmodel = ref.ResNet(depth, TINY)
  sd = {k: v for k, v in to_numpy(tmodel.state_dict()).items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  expected = expected_shapes(ResNet(depth, TINY))
  leaf = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"), "bias": ("params", "bias")}
  mapped = []
  for key, value in sd.items():
    mods, name = convert.flax_path(key)
    col, new = leaf.get(name, ("params", "kernel" if value.ndim == 4 else "scale"))
    mapped.append("/".join((col, *mods, new)))
  flax_keys = set(flat({"params": expected["params"], "batch_stats": expected["batch_stats"]}))
  assert len(mapped) == len(set(mapped)) == len(flax_keys) and set(mapped) == flax_keys
  convert.state_dict_to_variables(sd, expected)  # shapes agree too
  assert pretrained.infer_resnet_depth(tmodel.state_dict()) == depth


def test_unknown_depth_raises():
  with pytest.raises(ValueError, match="Unknown ResNet depth 42"):
    expected_shapes(ResNet(42))
  with pytest.raises(ValueError, match="Unknown ResNet depth"):
    resnet_channels(26)


# --- pretrained.load_resnet -----------------------------------------------------------------------------------

def test_load_resnet_round_trip_and_errors(tmp_path):
  tmodel, feats, fnet, variables = make_pair(50, seed=3)
  path = tmp_path / "resnet50-tiny.pth"
  torch.save(tmodel.state_dict(), path)  # with fc.* and num_batches_tracked, as torchvision's files
  model, loaded = pretrained.load_resnet(path)
  assert (model.depth, tuple(model.widths)) == (50, TINY)
  x = images(3, 2, 64)
  apply = jax.jit(lambda v, x: model.apply(v, x, False))
  got = apply(loaded, nhwc(x))
  np.testing.assert_array_equal(got, jax.jit(lambda v, x: fnet.apply(v, x, False))(variables, nhwc(x)))
  with torch.no_grad():
    want = feats.eval()(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  assert rel_max(got, want) <= 1e-5

  sd = tmodel.state_dict()
  broken = {k: v for k, v in sd.items() if k not in ("layer3.1.bn2.running_var", "layer4.0.downsample.0.weight")}
  broken["layer2.1.conv2.weight"] = torch.zeros(16, 16, 1, 3)
  torch.save(broken, tmp_path / "broken.pth")
  with pytest.raises(convert.ConversionError) as e:
    pretrained.load_resnet(tmp_path / "broken.pth")
  msg = str(e.value)
  assert "2 missing" in msg and "layer3_1/bn2/var" in msg and "layer4_0/downsample_0/kernel" in msg, msg
  assert "1 mis-shaped" in msg and "layer2.1.conv2.weight" in msg, msg

  no_depth = {k: v for k, v in sd.items() if not k.startswith("layer3.5.")}  # (3, 4, 5, 3) Bottlenecks
  torch.save(no_depth, tmp_path / "no_depth.pth")
  with pytest.raises(convert.ConversionError, match="matches no torchvision ResNet depth"):
    pretrained.load_resnet(tmp_path / "no_depth.pth")

  data = path.read_bytes()
  (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(convert.ConversionError, match="truncated or corrupt"):
    pretrained.load_resnet(tmp_path / "truncated.pth")


# --- bf16 and remat -------------------------------------------------------------------------------------------

def test_bfloat16_forward_close_to_float32():
  _, _, fnet, variables = make_pair(50, seed=4)
  x = nhwc(images(4, 2, 64))
  y32 = jax.jit(lambda v: fnet.apply(v, x, False))(variables)
  y16 = jax.jit(lambda v: ResNet(50, TINY, dtype=jnp.bfloat16).apply(v, x, False))(variables)
  assert y16.dtype == jnp.bfloat16
  err = rel_max(np.asarray(y16, np.float32), y32)
  print(f"PARITY resnet50 tiny bf16 vs fp32 eval forward: rel max diff {err:.3e}")
  assert err < 0.05, err


def test_remat_same_values_and_gradients():
  _, _, fnet, variables = make_pair(18, seed=5)
  remat = ResNet(18, TINY, remat=True)
  x = nhwc(images(5, 2, 64))

  def loss(net, params):
    y, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True, mutable=["batch_stats"])
    return jnp.sum(y ** 2)

  kept = {k: residual_bytes(lambda q, n=n: loss(n, q), variables["params"]) for k, n in (("remat", remat),
                                                                                         ("plain", fnet))}
  assert kept["remat"] < 0.8 * kept["plain"]
  # The stem is rematerialised too: nothing at conv1's full resolution (32 × 32 for 64-pixel images) is kept.
  full_resolution = {k: [r.shape for r in residuals(lambda q, n=n: loss(n, q), variables["params"])
                         if r.ndim == 4 and r.shape[1:3] == (32, 32)] for k, n in (("remat", remat), ("plain", fnet))}
  assert not full_resolution["remat"] and full_resolution["plain"]
  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(fnet, p)))(variables["params"])
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  worst = max(rel_norm(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
  print(f"PARITY resnet18 tiny remat vs no remat: worst gradient leaf {worst:.3e}")
  assert worst <= 5e-5, worst
