"""CT-AGRG's vision and conditioning blocks (rrg_jax.layers.ctnet) against the independent torch reference
``torch_reference.ct_agrg`` (ct_agrg_spec §3, §5, §6.2, §10, §13.1, §13.2, §13.11, §13.18).

Tiny parity: volumes (2, 15, 256, 224) → 5 slice triplets per volume through a narrow ResNet-18 (widths
8..64) → reducing convs (64, 21, 6, 5) → (32, 7, 4, 3) → (16, 2, 2, 1) → 64 flat features (non-square and
odd-sized so that transposed or mis-ordered axes fail). Random weights with BN affine parameters and running
statistics moved off their init, torch state_dict → ``TORCH_KEY_RENAMES`` → ``convert.state_dict_to_variables``.
Eval mode, and train mode with dropout 0 (BN batch statistics and their running-stat update). Full size only
through ``jax.eval_shape`` and torch's meta device: counts, state_dict entries, key mapping and shapes, no compute.

float32, highest matmul precision (tests/conftest.py). Every comparison prints ``PARITY <name> ...`` (pytest -s).
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from numerics import check
from rrg_jax import convert, losses
from rrg_jax.layers import ctnet
from torch_reference import ct_agrg as ref
from torch_reference import resnet as ref_resnet

WIDTHS = (8, 16, 32, 64)
VOLUME = (15, 256, 224)  # (D, H, W)
BATCH = 2
HIDDEN = (32, 16, 8)     # classifier widths (full: 2048, 512, 128)
CLASSES = 4
K, D, HEAD_HIDDEN = 3, 8, 6  # abnormalities, abnormality-vector width, heads_out width (full: 18, 1024, 128)
RESIDUAL_BN_SCALE = 0.3  # keeps the random trunk out of the chaotic regime (torch_reference.resnet)


# --- helpers --------------------------------------------------------------------------------------------------

def to_variables(state_dict, expected, prefix: str = ""):
  """torch tensors (or numpy arrays) keyed as the original → variables shaped as ``expected``; ``prefix`` is
  prepended to every key first (e.g. the fst's attribute name)."""
  out = {}
  for key, value in state_dict.items():
    value = value.detach().numpy() if isinstance(value, torch.Tensor) else value
    key = prefix + key
    for pattern, repl in ctnet.TORCH_KEY_RENAMES:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return convert.state_dict_to_variables(out, expected)


def abstract_variables(module, *inputs, **static):
  """The variables ``module.init(key, *inputs, **static)`` would give, as ShapeDtypeStructs (nothing computed)."""
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **static), *inputs)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def volumes(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH,) + VOLUME).astype(np.float32)


def prepare_trunk_(model: torch.nn.Module, trunk: torch.nn.Module, x: np.ndarray, seed: int) -> None:
  """BN affine params off init, residual BNs scaled down, running stats := perturbed batch statistics of the
  volumes' triplets (eval-mode activations O(1), eval ≠ train)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    ref_resnet.randomize_norms_(model, gen)
  ref_resnet.scale_residual_bns_(trunk, RESIDUAL_BN_SCALE)
  images = torch.from_numpy(x).reshape(-1, 3, *VOLUME[1:])
  ref_resnet.calibrate_bn_(trunk, images, gen)


def torch_ctnet(seed: int) -> ref.CTNet:
  torch.manual_seed(seed)
  shapes = ctnet.ctnet_shapes(VOLUME, WIDTHS)
  model = ref.CTNet(shapes.triplets, shapes.flat_size, CLASSES, WIDTHS, HIDDEN, dropout=0.0)
  prepare_trunk_(model, model.features, volumes(seed + 100), seed)
  return model


def torch_ctnet_step(seed: int) -> ref.CTNetStep:
  torch.manual_seed(seed)
  shapes = ctnet.ctnet_shapes(VOLUME, WIDTHS)
  model = ref.CTNetStep(shapes.triplets, shapes.flat_size, K, D, HEAD_HIDDEN, WIDTHS, HIDDEN, dropout=0.0)
  prepare_trunk_(model, model.encoder.features, volumes(seed + 100), seed)
  return model


def torch_forward(model: torch.nn.Module, x: np.ndarray, train: bool, dtype=torch.float32):
  """Outputs of a copy of ``model`` in ``dtype`` (numpy, as a tuple) and that copy's state_dict afterwards."""
  model = copy.deepcopy(model).to(dtype).train(train)
  with torch.no_grad():
    out = model(torch.from_numpy(x).to(dtype)[:, None])
  out = out if isinstance(out, tuple) else (out,)
  return tuple(o.numpy() for o in out), model.state_dict()


FLAX_CTNET = ctnet.CTNet(CLASSES, "full", WIDTHS, HIDDEN, dropout_rate=0.0)
FLAX_STEP = ctnet.CTNetStep(K, D, HEAD_HIDDEN, WIDTHS, HIDDEN[0], dropout_rate=0.0)
X_SPEC = jax.ShapeDtypeStruct((BATCH,) + VOLUME, jnp.float32)


def flax_forward(module, variables, x, train: bool):
  """(outputs as a tuple, updated batch_stats or None)."""
  if not train:
    out = jax.jit(lambda v, x: module.apply(v, x, False))(variables, x)
    return (out if isinstance(out, tuple) else (out,)), None
  out, state = jax.jit(lambda v, x: module.apply(v, x, True, mutable=["batch_stats"]))(variables, x)
  return (out if isinstance(out, tuple) else (out,)), state["batch_stats"]


def check_stats(name: str, got, want_state_dict, expected, rtol=1e-5) -> None:
  want = to_variables(want_state_dict, expected)["batch_stats"]
  worst = max(((check(f"{name} {jax.tree_util.keystr(p)}", g, w, rtol=rtol), jax.tree_util.keystr(p))
               for (p, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want))))
  print(f"PARITY {name}: worst BN running stat {worst[1]} max_abs {worst[0]:.3e}")


# --- tiny parity ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ctnet_full_head_matches_torch(train):
  model = torch_ctnet(0)
  expected = abstract_variables(FLAX_CTNET, X_SPEC, train=False)
  variables = to_variables(model.state_dict(), expected)
  x = volumes(1)
  (want,), after = torch_forward(model, x, train)
  (exact,), _ = torch_forward(model, x, train, torch.float64)
  (got,), stats = flax_forward(FLAX_CTNET, variables, jnp.asarray(x), train)
  assert got.shape == (BATCH, CLASSES) and got.dtype == jnp.float32
  check(f"ctnet full logits ({'train' if train else 'eval'})", got, want, rtol=1e-5, exact=exact)
  if train:
    check_stats("ctnet train BN stats", stats, after, expected)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ctnet_step_matches_torch(train):
  model = torch_ctnet_step(2)
  expected = abstract_variables(FLAX_STEP, X_SPEC, train=False)
  variables = to_variables(model.state_dict(), expected)
  x = volumes(3)
  (want_h, want_s), after = torch_forward(model, x, train)
  (exact_h, exact_s), _ = torch_forward(model, x, train, torch.float64)
  (h, s), stats = flax_forward(FLAX_STEP, variables, jnp.asarray(x), train)
  assert h.shape == (BATCH, K, D) and s.shape == (BATCH, K)
  mode = "train" if train else "eval"
  check(f"ctnet_step H ({mode})", h, want_h, rtol=1e-5, exact=exact_h)
  check(f"ctnet_step logits ({mode})", s, want_s, rtol=1e-5, exact=exact_s)
  if train:
    check_stats("ctnet_step train BN stats", stats, after, expected)


def rel_norm(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def test_stage1_gradients_double_the_heads_and_match_flax():
  """§13.18: torch's stage-1 backward leaves 2·∇Σ_k L_k on heads_in/heads_out and ∇Σ_k L_k on the encoder; the
  Flax gradient of Σ_k L_k (train mode, dropout 0) matches the encoder's and half the heads'.

  torch float32's own trunk gradients are ~1e-3 (relative norm) from torch float64's here while JAX's are ~1e-6:
  per leaf, JAX must be within 1e-5 of float64 and within 1e-4 of float32 unless (float32 noise floor) at most
  1.5× as far from float64 as torch float32 is."""
  model = torch_ctnet_step(4)
  expected = abstract_variables(FLAX_STEP, X_SPEC, train=False)
  variables = to_variables(model.state_dict(), expected)
  x = volumes(5)
  labels = (np.random.default_rng(6).random((BATCH, K)) < 0.5).astype(np.float32)

  coded = {}
  for dtype in (torch.float32, torch.float64):
    m = copy.deepcopy(model).to(dtype).train()
    ref.stage1_backward(m, torch.from_numpy(x).to(dtype)[:, None], torch.from_numpy(labels).to(dtype))
    coded[dtype] = {n: p.grad for n, p in m.named_parameters()}
  plain = copy.deepcopy(model).train()
  _, logits = plain(torch.from_numpy(x)[:, None])
  sum_grads = torch.autograd.grad(ref.abnormality_losses(logits, torch.from_numpy(labels)).sum(),
                                  list(plain.parameters()))
  factors = {n: 1.0 if n.startswith("encoder.") else 2.0 for n, _ in plain.named_parameters()}
  assert set(factors.values()) == {1.0, 2.0}
  for (name, p), g in zip(plain.named_parameters(), sum_grads):
    np.testing.assert_allclose(coded[torch.float32][name].numpy(), factors[name] * g.numpy(), rtol=1e-6,
                               atol=1e-7 * float(g.abs().max()), err_msg=name)

  def loss(params):
    (_, s), _ = FLAX_STEP.apply({"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(x),
                                True, mutable=["batch_stats"])
    return K * losses.bce_with_logits(s, jnp.asarray(labels))  # Σ_k mean_b ℓ_bk

  got = jax.jit(jax.grad(loss))(variables["params"])
  want32, want64 = ({"params": to_variables({n: g / factors[n] for n, g in coded[dtype].items()},
                                            {"params": expected["params"]})["params"]}
                    for dtype in (torch.float32, torch.float64))
  rows = []
  for (path, g), w32, w64 in zip(jax.tree_util.tree_leaves_with_path({"params": got}), jax.tree.leaves(want32),
                                 jax.tree.leaves(want64)):
    rows.append((rel_norm(g, w32), rel_norm(g, w64), rel_norm(w32, w64), jax.tree_util.keystr(path)))
  vs32, vs64, torch32 = (max(rows, key=lambda r: r[i]) for i in range(3))
  print(f"PARITY stage-1 grads ({len(rows)} leaves), worst ‖Δ‖/‖ref‖: jax vs torch32 {vs32[0]:.3e} "
        f"({vs32[3]}); jax vs torch64 {vs64[1]:.3e} ({vs64[3]}); torch32 vs torch64 {torch32[2]:.3e} ({torch32[3]})")
  for err32, err64, floor, name in rows:
    assert err64 <= 1e-5, (name, err64)
    assert err32 <= 1e-4 or err64 <= 1.5 * floor, (name, err32, err64, floor)


def test_block_conditioning_equals_dense_block_vector_and_raw():
  """§13.11: the block-mode fst equals torch's Sequential on the block-placed K·d vector (forward and
  gradients, an empty block included); its first layer equals W1[:, d·k : d·(k+1)]·h + b1; "raw" with W1's
  block k as its first kernel equals "block" on the rows of block k."""
  hidden, features = (16, 12), 10
  torch.manual_seed(7)
  tfst = ref.feature_space_transformation_nn(K * D, hidden, features)
  h = np.random.default_rng(8).normal(size=(7, D)).astype(np.float32)
  block = np.array([2, 0, 2, 2, 0, 2, 0])  # block 1 empty: its kernel rows get no gradient
  hj, bj = jnp.asarray(h), jnp.asarray(block)
  module = ctnet.BlockConditioning(K, "block", hidden, features)
  name = "feature_space_transformation_nn"
  expected = {"params": {name: abstract_variables(module, hj, bj)["params"]}}
  params = to_variables(tfst.state_dict(), expected, prefix=name + ".")["params"][name]
  assert params["layers_0"]["kernel"].shape == (K * D, hidden[0])

  c = ref.block_vector(torch.from_numpy(h), torch.from_numpy(block), K)
  np.testing.assert_array_equal(ctnet.block_vector(hj, bj, K), c.numpy())
  want = tfst(c)
  want.pow(2).sum().backward()
  want_grads = to_variables({k: p.grad for k, p in tfst.named_parameters()}, {"params": expected["params"]},
                            prefix=name + ".")["params"][name]
  apply = lambda p, h, b: module.apply({"params": p}, h, b)  # noqa: E731
  z = jax.jit(apply)(params, hj, bj)
  check("fst block vs torch on the block vector", z, want.detach().numpy(), rtol=1e-6)
  grads = jax.jit(jax.grad(lambda p, h, b: jnp.sum(apply(p, h, b) ** 2)))(params, hj, bj)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    check(f"fst block grad {jax.tree_util.keystr(path)}", g, w, rtol=1e-6)
  assert not np.any(grads["layers_0"]["kernel"][D:2 * D])

  w1, b1 = tfst[0].weight.detach().numpy(), tfst[0].bias.detach().numpy()
  sliced = np.stack([w1[:, D * k:D * (k + 1)] @ h[n] + b1 for n, k in enumerate(block)])
  first = ctnet.BlockLinear(hidden[0], K).apply({"params": params["layers_0"]}, hj, bj)
  check("fst layer 1 vs W1[:, d·k : d·(k+1)]·h + b1", first, sliced, rtol=1e-6)

  raw = ctnet.BlockConditioning(K, "raw", hidden, features)
  assert abstract_variables(raw, hj, bj)["params"]["layers_0"]["kernel"].shape == (D, hidden[0])
  for k in np.unique(block):
    rows = block == k
    raw_params = {**params, "layers_0": {"kernel": params["layers_0"]["kernel"][D * k:D * (k + 1)],
                                         "bias": params["layers_0"]["bias"]}}
    check(f"fst raw (block {k}'s kernel) vs block", raw.apply({"params": raw_params}, hj[rows], bj[rows]),
          z[rows], rtol=1e-6)


def test_block_vector_full_size():
  """§13.11 at K = 18, d = 1024: for k = 2, c[2048:3072] = h and the other 17,408 entries are 0."""
  h = jnp.arange(1, 1025, dtype=jnp.float32)[None]
  c = np.asarray(ctnet.block_vector(h, jnp.array([2]), 18))
  assert c.shape == (1, 18432)
  np.testing.assert_array_equal(c[0, 2048:3072], h[0])
  assert np.count_nonzero(c) == 1024 and np.count_nonzero(np.delete(c[0], np.s_[2048:3072])) == 0


def test_ctnet_step_dropout_switch_and_bfloat16():
  """``deterministic`` overrides ``train`` for dropout only (BN stays in batch-stat mode): train mode with
  dropout 0.5 but ``deterministic=True`` gives the dropout-0 outputs; with the rng it drops. bfloat16 compute:
  float32 params and logits, bfloat16 H, close to float32."""
  variables = to_variables(torch_ctnet_step(9).state_dict(), abstract_variables(FLAX_STEP, X_SPEC, train=False))
  x = jnp.asarray(volumes(10))
  (want_h, want_s), _ = flax_forward(FLAX_STEP, variables, x, True)
  dropping = ctnet.CTNetStep(K, D, HEAD_HIDDEN, WIDTHS, HIDDEN[0], dropout_rate=0.5)
  run = jax.jit(lambda v, x, key, det: dropping.apply(v, x, True, deterministic=det, rngs={"dropout": key},
                                                      mutable=["batch_stats"])[0], static_argnums=3)
  h, s = run(variables, x, jax.random.key(0), True)
  np.testing.assert_array_equal(h, want_h)
  np.testing.assert_array_equal(s, want_s)
  h, s = run(variables, x, jax.random.key(0), False)
  assert not np.allclose(h, want_h) and not np.allclose(s, want_s)

  bf16 = ctnet.CTNetStep(K, D, HEAD_HIDDEN, WIDTHS, HIDDEN[0], dropout_rate=0.0, dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract_variables(bf16, X_SPEC, train=False)))
  (h, s), _ = flax_forward(bf16, variables, x, True)
  assert h.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  err = float(np.max(np.abs(np.asarray(s) - want_s)) / np.max(np.abs(want_s)))
  print(f"PARITY ctnet_step bf16 vs f32 logits (train): rel {err:.3e}")
  assert err <= 5e-2


# --- full size: counts, keys, shapes (no compute) -------------------------------------------------------------

FULL_VOLUME = jax.ShapeDtypeStruct((1, 240, 480, 480), jnp.float32)


def test_full_size_counts_and_state_dict_mapping():
  """§13.1 / §10: parameter counts and state_dict entry counts (torch on the meta device), and every original
  key maps onto the full-size Flax trees with the right shape (zero-stride arrays, nothing computed)."""
  full_ctnet = ctnet.CTNet()
  full_step = ctnet.CTNetStep()
  fst = ctnet.BlockConditioning()
  v_ctnet = abstract_variables(full_ctnet, FULL_VOLUME, train=False)
  v_step = abstract_variables(full_step, FULL_VOLUME, train=False)
  v_fst = abstract_variables(fst, jax.ShapeDtypeStruct((4, 1024), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32))
  assert count(v_ctnet["params"]) == 27_241_026
  assert count(v_step["params"]) == 66_255_042
  assert count(v_step["params"]["encoder"]) == 26_123_952
  assert count(v_fst["params"]) == 80_746_496
  assert count(v_ctnet["params"]["reducingconvs_0"]) == 138_304 and count(v_ctnet["params"]["features"]) == 11_176_512

  with torch.device("meta"):
    t_ctnet, t_step, t_fst = ref.CTNet(), ref.CTNetStep(), ref.feature_space_transformation_nn()
  for tmodel, n_params, n_entries, flax_vars, prefix in (
      (t_ctnet, 27_241_026, 134, v_ctnet, ""), (t_step, 66_255_042, 202, v_step, ""),
      (t_fst, 80_746_496, 6, {"params": {"feature_space_transformation_nn": v_fst["params"]}},
       "feature_space_transformation_nn.")):
    sd = tmodel.state_dict()
    assert sum(p.numel() for p in tmodel.parameters()) == n_params
    assert len(sd) == n_entries
    zeros = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}
    to_variables(zeros, flax_vars, prefix)  # raises listing any missing / unexpected / mis-shaped key
  assert "encoder.classifier.0.weight" in t_step.state_dict() and "heads_out.17.3.bias" in t_step.state_dict()


def test_full_size_encoder_shapes():
  """§13.2: the encoder chain for one (240, 480, 480) volume, read from the modules' outputs under
  ``jax.eval_shape`` (channels-last here; torch's shapes are the same axes permuted), and ``ctnet_shapes``."""
  module = ctnet.CTNetStep()
  variables = abstract_variables(module, FULL_VOLUME, train=False)
  (h, s), state = jax.eval_shape(
      lambda v, x: module.apply(v, x, False, capture_intermediates=True, mutable=["intermediates"]),
      variables, FULL_VOLUME)
  inter = state["intermediates"]
  enc, trunk = inter["encoder"], inter["encoder"]["features"]
  shape = lambda tree: tuple(tree["__call__"][0].shape)  # noqa: E731
  assert shape(trunk["conv1"]) == (80, 240, 240, 64)
  assert shape(trunk["layer1_1"]) == (80, 120, 120, 64)
  assert shape(trunk["layer2_1"]) == (80, 60, 60, 128)
  assert shape(trunk["layer3_1"]) == (80, 30, 30, 256)
  assert shape(trunk["layer4_1"]) == (80, 15, 15, 512)
  assert shape(enc["reducingconvs_0"]) == (1, 170, 13, 13, 64)
  assert shape(enc["reducingconvs_2"]) == (1, 56, 11, 11, 32)
  assert shape(enc["reducingconvs_4"]) == (1, 18, 5, 5, 16)
  assert variables["params"]["encoder"]["classifier_0"]["kernel"].shape == (7200, 2048)
  assert shape(enc["classifier_0"]) == (1, 2048)
  assert shape(inter["heads_in_0"]) == (1, 18432)
  assert (h.shape, s.shape, s.dtype) == ((1, 18, 1024), (1, 18), jnp.float32)
  assert ctnet.ctnet_shapes((240, 480, 480)) == ctnet.CTNetShapes(
      80, (80, 512, 15, 15), ((64, 170, 13, 13), (32, 56, 11, 11), (16, 18, 5, 5)), 7200)


def test_ctnet_shapes_refuses_unusable_volumes():
  with pytest.raises(ValueError, match="multiple of 3"):
    ctnet.ctnet_shapes((16, 480, 480))
  with pytest.raises(ValueError, match="too small"):
    ctnet.ctnet_shapes((240, 160, 480))
  assert ctnet.ctnet_shapes((240, 161, 161)).convs[-1] == (16, 18, 1, 1)
