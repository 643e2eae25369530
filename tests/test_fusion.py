"""RadGen's cross-modal fusion and gate (radgen_spec §3.8), concat fusion (§9.2) and classifier (§3.9) against
the independent PyTorch reference ``torch_reference/radgen.py`` (its state_dict mapped onto the Flax tree):
eval forward and train-mode (dropout 0) gradients; masked pads; the §15.5 gate and pooling examples; §15.1
parameter counts; §10.5 init; the inert self-attention query/key; dropout on in train mode only."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from numerics import check
from rrg_jax import losses
from rrg_jax.alignment.fusion import CrossModalFusion, pool_text
from rrg_jax.layers.classifier import ClassifierHead
from torch_reference import radgen

SMALL = {"d_text": 48, "d": 32, "heads": 4, "ffn": 64, "hidden": (16, 8)}
FULL = {"d_text": 768, "d": 512, "heads": 8, "ffn": 2048, "hidden": (256, 128)}
LENGTHS = (9, 5, 2)  # real tokens per row of the (3, 9) test batch; ≥ 2 ([CLS][SEP]) as in §3.8
CLASS_WEIGHTS = (8.0, 1.0, 3.2)
# (mode, text_pool, gate, gate_mix)
SWITCHES = [("cross_attention", "masked_mean", True, "fused"), ("cross_attention", "mean_all", True, "fused"),
            ("cross_attention", "cls", False, "fused"), ("cross_attention", "masked_mean", True, "pooled"),
            ("concat", "masked_mean", True, "fused"), ("concat", "mean_all", True, "fused")]
SPEC_TREE = {"text_proj", "cross_attn", "norm1", "self_attn", "norm2", "ffn_in", "ffn_out", "gate"}


def flax_modules(size, mode="cross_attention", text_pool="masked_mean", gate=True, gate_mix="fused",
                 dropout=True) -> tuple[CrossModalFusion, ClassifierHead]:
  """The Flax fusion and classifier; ``dropout=False`` sets every rate to 0 (train-mode parity)."""
  p_attn, p_head = (0.1, 0.3) if dropout else (0.0, 0.0)
  fusion = CrossModalFusion(size["d"], size["heads"], size["ffn"], mode=mode, text_pool=text_pool, gate=gate,
                            gate_mix=gate_mix, attention_dropout=p_attn, ffn_dropout=p_attn, concat_dropout=p_head)
  return fusion, ClassifierHead(size["hidden"], 3, dropout=p_head)


def torch_model(size, mode="cross_attention", text_pool="masked_mean", gate=True, gate_mix="fused",
                dropout=True, seed=0) -> radgen.FusionClassifier:
  """The reference at torch's default init, with the 1-D parameters (biases, LayerNorms) moved off theirs."""
  torch.manual_seed(seed)
  p_attn, p_head = (0.1, 0.3) if dropout else (0.0, 0.0)
  if mode == "concat":
    fusion = radgen.ConcatFusion(size["d_text"], size["d"], p_head, text_pool)
  else:
    fusion = radgen.CrossModalFusion(size["d_text"], size["d"], size["heads"], size["ffn"], p_attn, text_pool,
                                     gate, gate_mix)
  model = radgen.FusionClassifier(fusion, radgen.classifier(size["d"], size["hidden"], 3, p_head))
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


def inputs(size, seed=0, b=3, t=9, lengths=LENGTHS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """z_img (B, D), H (B, T, d_text) (pad positions hold values too, as BERT's outputs there), m (B, T)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(b, size["d"])).astype(np.float32)
  h = rng.normal(size=(b, t, size["d_text"])).astype(np.float32)
  m = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
  return z, h, m


def forward(fusion, head, params, z, h, m, rng=None):
  """(logits, z, probs); dropout on when an rng is given."""
  det = rng is None
  out, probs = fusion.apply({"params": params["fusion"]}, z, h, m, deterministic=det,
                            rngs=None if det else {"dropout": rng})
  logits = head.apply({"params": params["classifier"]}, out, deterministic=det,
                      rngs=None if det else {"dropout": jax.random.fold_in(rng, 1)})
  return logits, out, probs


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s)))
def test_eval_forward_matches_torch(switches):
  model = torch_model(SMALL, *switches).eval()
  z, h, m = inputs(SMALL)
  with torch.no_grad():
    want = model(*map(torch.from_numpy, (z, h, m)))
  fusion, head = flax_modules(SMALL, *switches)
  got = jax.jit(functools.partial(forward, fusion, head))(radgen.flax_params(model.state_dict()), z, h, m)
  name = "-".join(map(str, switches))
  check(f"fusion {name} logits", got[0], want[0].numpy(), rtol=2e-6)
  check(f"fusion {name} z", got[1], want[1].numpy(), rtol=2e-6)
  if switches[0] == "concat":
    assert got[2] is None
    return
  assert got[2].shape == (3, SMALL["heads"], 1, 9) and got[2].dtype == jnp.float32
  check(f"fusion {name} attention", got[2], want[2].numpy(), rtol=2e-6)
  pads = np.broadcast_to(m[:, None, None, :] == 0, got[2].shape)
  np.testing.assert_array_equal(np.asarray(got[2])[pads], 0.0)


def test_full_size_eval_forward_matches_torch():
  """§15.2 shapes at B = 2: H (2, 128, 768), probabilities (2, 8, 1, 128), z (2, 512), logits (2, 3)."""
  model = torch_model(FULL).eval()
  z, h, m = inputs(FULL, b=2, t=128, lengths=(128, 37))
  params = radgen.flax_params(model.state_dict())
  with torch.no_grad():
    want = model(*map(torch.from_numpy, (z, h, m)))
    exact = model.double()(*(torch.from_numpy(x).double() for x in (z, h, m)))
  got = jax.jit(functools.partial(forward, *flax_modules(FULL)))(params, z, h, m)
  assert [g.shape for g in got] == [(2, 3), (2, 512), (2, 8, 1, 128)]
  for name, g, w, e in zip(("logits", "z", "attention"), got, want, exact):
    check(f"fusion full {name}", g, w.numpy(), rtol=2e-6, exact=e.numpy())


def torch_grads(model, z, h, m, labels, cot):
  """Loss and autograd of ``weighted CE(logits) + Σ z·cot`` w.r.t. params (Flax tree) and (z_img, H)."""
  z_t, h_t = (torch.from_numpy(x).requires_grad_() for x in (z, h))
  logits, out, _ = model(z_t, h_t, torch.from_numpy(m))
  loss = radgen.weighted_cross_entropy(logits, torch.from_numpy(labels).long(), torch.tensor(CLASS_WEIGHTS))
  loss = loss + (out * torch.from_numpy(cot)).sum()
  loss.backward()
  grads = {n: p.grad for n, p in model.named_parameters()}
  return loss.item(), radgen.flax_params(grads), z_t.grad.numpy(), h_t.grad.numpy()


# Exact gradient 0: the self-attention's query/key (softmax over one key, §3.8 step 4) and the cross-attention's
# key bias (softmax is invariant to a shift common to all keys); the latter holds float32 round-off only.
INERT = {("self_attn", "query"), ("self_attn", "key")}
ROUND_OFF = {("cross_attn", "key", "bias")}


@pytest.mark.parametrize("switches", SWITCHES[:2] + SWITCHES[4:5], ids=lambda s: "-".join(map(str, s)))
def test_train_mode_gradients_match_torch(switches):
  """Train mode with every dropout rate 0: loss, parameter and input gradients, norm-wise rel. ≤ 1e-5."""
  model = torch_model(SMALL, *switches, dropout=False).train()
  z, h, m = inputs(SMALL)
  labels = np.array([0, 2, 1], np.int32)
  cot = np.random.default_rng(1).normal(size=z.shape).astype(np.float32)
  want_loss, want_params, want_z, want_h = torch_grads(model, z, h, m, labels, cot)
  fusion, head = flax_modules(SMALL, *switches, dropout=False)

  def loss_fn(params, z, h):
    logits, out, _ = forward(fusion, head, params, z, h, m, rng=jax.random.key(0))
    return losses.weighted_cross_entropy(logits, labels, jnp.asarray(CLASS_WEIGHTS)) + jnp.sum(out * cot)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(
      radgen.flax_params(model.state_dict()), z, h)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  got_flat = {tuple(k.key for k in path): np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grads[0])}
  want_flat = {tuple(k.key for k in path): g for path, g in jax.tree_util.tree_leaves_with_path(want_params)}
  assert got_flat.keys() == want_flat.keys()
  total = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in want_flat.values()))
  worst = 0.0
  for path, g in got_flat.items():
    w = want_flat[path]
    if path[1:3] in INERT:  # JAX: softmax over one key, vjp (g − g·1)·1 = 0 exactly; torch: round-off
      np.testing.assert_array_equal(g, 0.0, err_msg=str(path))
      assert np.linalg.norm(w) <= 1e-6 * total, path
    elif path[1:] in ROUND_OFF:
      assert np.linalg.norm(g) <= 1e-6 * total and np.linalg.norm(w) <= 1e-6 * total, path
    else:
      err = np.linalg.norm(g - w) / np.linalg.norm(w)
      assert err <= 1e-5, (path, err)
      worst = max(worst, err)
  for name, g, w in (("z_img", grads[1], want_z), ("H", grads[2], want_h)):
    err = np.linalg.norm(np.asarray(g) - w) / np.linalg.norm(w)
    assert err <= 1e-5, (name, err)
    worst = max(worst, err)
  print(f"PARITY fusion {'-'.join(map(str, switches))} grads: max norm-wise rel. error {worst:.3e} "
        f"over {len(got_flat)} leaves + 2 inputs")


@pytest.mark.parametrize("text_pool", ["masked_mean", "mean_all"])
def test_pad_positions_ignored_by_masked_mean_only(text_pool):
  fusion, _ = flax_modules(SMALL, text_pool=text_pool)
  z, h, m = inputs(SMALL)
  params = fusion.init(jax.random.key(0), z, h, m)
  apply = jax.jit(fusion.apply)
  z0, p0 = apply(params, z, h, m)
  h_pads = np.where(m[..., None] == 0, 100 * h + 3, h)
  z1, p1 = apply(params, z, h_pads, m)
  np.testing.assert_array_equal(np.asarray(p1), np.asarray(p0))  # the cross-attention masks pads in both
  if text_pool == "masked_mean":
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(z0))
  else:  # the code's mean over all positions: the gate reads what the text encoder left at the pads
    assert np.max(np.abs(np.asarray(z1 - z0))[1:]) > 1e-2
    np.testing.assert_array_equal(np.asarray(z1[0]), np.asarray(z0[0]))  # row 0 has no pads


def test_gate_example_15_5():
  """D = 2: z_img (1, −2), z_fused (3, 0) (norm2 γ 0, β (3, 0); ffn_out 0), t' (1, 1) (text_proj kernel 0, bias
  (1, 1)); gate rows (0,0,0,0), (1,0,0,0), bias (0, ln 3 − 1) → g (0.5, 0.75) → z (2, −1.5)."""
  z_img = np.array([[1.0, -2.0]], np.float32)
  h, m = np.ones((1, 3, 2), np.float32), np.ones((1, 3), np.float32)

  def run(**switches):
    fusion = CrossModalFusion(2, 1, 4, **switches)
    p = jax.tree.map(np.array, fusion.init(jax.random.key(0), z_img, h, m)["params"])
    p["norm2"].update(scale=np.zeros(2), bias=np.array([3.0, 0.0]))
    p["ffn_out"].update(kernel=np.zeros((4, 2)), bias=np.zeros(2))
    p["text_proj"].update(kernel=np.zeros((2, 2)), bias=np.ones(2))
    if "gate" in p:
      kernel = np.zeros((4, 2))
      kernel[0, 1] = 1.0  # W_g row 1 = (1, 0, 0, 0) acting on [z_img ; t']
      p["gate"].update(kernel=kernel, bias=np.array([0.0, math.log(3) - 1]))
    return np.asarray(fusion.apply({"params": p}, z_img, h, m)[0])

  np.testing.assert_allclose(run(), [[2.0, -1.5]], rtol=1e-6)
  np.testing.assert_allclose(run(gate_mix="pooled"), [[0.5 * 1 + 0.5 * 1, 0.75 * -2 + 0.25 * 1]], rtol=1e-6)
  np.testing.assert_allclose(run(gate=False), [[3.0, 0.0]], rtol=1e-6)


def test_pooling_example_15_5():
  h = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], np.float32)
  m = np.array([[1.0, 1.0, 0.0]], np.float32)
  want = {"masked_mean": [[2.0, 3.0]], "mean_all": [[104 / 3, 106 / 3]], "cls": [[1.0, 2.0]]}
  for how, value in want.items():
    np.testing.assert_allclose(np.asarray(pool_text(jnp.asarray(h), jnp.asarray(m), how)), value, rtol=1e-6)
    np.testing.assert_allclose(radgen.pool(torch.from_numpy(h), torch.from_numpy(m), how).numpy(), value, rtol=1e-6)
  np.testing.assert_allclose(want["mean_all"], [[34.667, 35.333]], atol=5e-4)  # §15.5's rounding
  with pytest.raises(ValueError, match="text_pool"):
    pool_text(jnp.asarray(h), jnp.asarray(m), "max")


def count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size,want", [(FULL, (5_121_536, 656_896, 165_379)),
                                       ({"d_text": 32, "d": 32, "heads": 4, "ffn": 128, "hidden": (16, 8)},
                                        (20_064, None, 739))], ids=["full", "tiny"])
def test_parameter_counts_15_1(size, want):
  """Full size (§15.1): fusion 5,121,536, concat fusion 656,896, classifier 165,379; radgen_tiny (§3.10): fusion
  20,064, classifier 739. Shapes only (``jax.eval_shape``)."""
  z, h, m = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, size["d"]), (1, 128, size["d_text"]), (1, 128)))
  fusion, head = flax_modules(size)
  tree = jax.eval_shape(fusion.init, jax.random.key(0), z, h, m)["params"]
  assert set(tree) == SPEC_TREE and count(tree) == want[0]
  assert all(set(tree[a]) == {"query", "key", "value", "out"} for a in ("cross_attn", "self_attn"))
  if want[1] is not None:
    concat = jax.eval_shape(flax_modules(size, mode="concat")[0].init, jax.random.key(0), z, h, m)["params"]
    assert set(concat) == {"dense", "norm"} and count(concat) == want[1]
  tree = jax.eval_shape(head.init, jax.random.key(0), z)["params"]
  assert set(tree) == {"dense_0", "norm_0", "dense_1", "norm_1", "out"} and count(tree) == want[2]


def test_init_is_pytorch_default():
  """§10.5: q/k/v kernels U(±√(6/(D + 3D))) (Xavier over torch's packed (3D, D) in_proj_weight, whose own
  init is checked against the same bound), q/k/v/out biases 0, out kernel U(±1/√D), every other Linear
  U(±1/√fan_in) in weight and bias, LayerNorm 1/0."""
  size = {"d_text": 96, "d": 128, "heads": 4, "ffn": 256, "hidden": (64, 32)}
  d = size["d"]
  fusion, head = flax_modules(size)
  z, h, m = inputs(size)
  p = fusion.init(jax.random.key(0), z, h, m)["params"]
  c = head.init(jax.random.key(1), z)["params"]

  def uniform(x, bound):
    x = np.abs(np.asarray(x))
    assert x.max() <= bound and x.max() > 0.95 * bound, (x.max(), bound)

  qkv_bound = math.sqrt(6 / (d + 3 * d))
  torch.manual_seed(0)
  uniform(torch.nn.MultiheadAttention(d, 4).in_proj_weight.detach().numpy(), qkv_bound)
  for attn in ("cross_attn", "self_attn"):
    for name in ("query", "key", "value"):
      uniform(p[attn][name]["kernel"], qkv_bound)
    uniform(p[attn]["out"]["kernel"], 1 / math.sqrt(d))
    for name in ("query", "key", "value", "out"):
      np.testing.assert_array_equal(p[attn][name]["bias"], 0.0)
  for tree, name, fan_in in ((p, "text_proj", size["d_text"]), (p, "ffn_in", d), (p, "ffn_out", size["ffn"]),
                             (p, "gate", 2 * d), (c, "dense_0", d), (c, "dense_1", 64), (c, "out", 32)):
    uniform(tree[name]["kernel"], 1 / math.sqrt(fan_in))
    assert np.all(np.abs(tree[name]["bias"]) <= 1 / math.sqrt(fan_in)) and np.any(tree[name]["bias"] != 0)
  for tree, name in ((p, "norm1"), (p, "norm2"), (c, "norm_0"), (c, "norm_1")):
    np.testing.assert_array_equal(tree[name]["scale"], 1.0)
    np.testing.assert_array_equal(tree[name]["bias"], 0.0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((p, c)))


def test_self_attention_query_key_are_inert_with_dropout():
  """§3.8 step 4: with attention dropout on, the self-attention's query/key still get an exact 0 gradient."""
  fusion, head = flax_modules(SMALL)
  z, h, m = inputs(SMALL)
  params = {"fusion": fusion.init(jax.random.key(0), z, h, m)["params"],
            "classifier": head.init(jax.random.key(1), z)["params"]}
  grads = jax.jit(jax.grad(lambda p: jnp.sum(forward(fusion, head, p, z, h, m, rng=jax.random.key(2))[0] ** 2)))(
      params)["fusion"]
  for name in ("query", "key"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(np.asarray(grads["self_attn"][name][leaf]), 0.0)
  assert np.linalg.norm(np.asarray(grads["self_attn"]["value"]["kernel"])) > 0
  assert np.linalg.norm(np.asarray(grads["cross_attn"]["query"]["kernel"])) > 0


def test_dropout_only_in_train_mode():
  fusion, head = flax_modules(SMALL)
  z, h, m = inputs(SMALL)
  params = {"fusion": fusion.init(jax.random.key(0), z, h, m)["params"],
            "classifier": head.init(jax.random.key(1), z)["params"]}
  run = jax.jit(functools.partial(forward, fusion, head))
  logits, z_eval, p_eval = run(params, z, h, m)
  train = [run(params, z, h, m, rng=jax.random.key(s)) for s in (1, 2)]
  assert np.max(np.abs(np.asarray(train[0][1] - train[1][1]))) > 1e-3  # z
  assert np.max(np.abs(np.asarray(train[0][0] - train[1][0]))) > 1e-3  # logits
  assert np.max(np.abs(np.asarray(train[0][1] - z_eval))) > 1e-3
  again = run(params, z, h, m)
  np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(z_eval))
  # The returned probabilities are the dropped ones (torch's ``need_weights`` output): kept ones scaled by 1/0.9.
  p_train = np.asarray(train[0][2])
  kept = p_train != 0
  assert 0 < np.mean(~kept[np.broadcast_to(m[:, None, None, :] > 0, kept.shape)]) < 0.3
  np.testing.assert_allclose(p_train[kept], np.asarray(p_eval)[kept] / 0.9, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  fusion = CrossModalFusion(SMALL["d"], SMALL["heads"], SMALL["ffn"], dtype=jnp.bfloat16)
  z, h, m = inputs(SMALL)
  params = fusion.init(jax.random.key(0), z, h, m)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out, probs = jax.jit(fusion.apply)(params, z, h, m)
  ref, _ = jax.jit(flax_modules(SMALL)[0].apply)(params, z, h, m)
  assert out.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("field,value", [("mode", "sum"), ("text_pool", "max"), ("gate_mix", "text")])
def test_unknown_switch_is_an_error(field, value):
  z, h, m = inputs(SMALL)
  with pytest.raises(ValueError, match=field):
    CrossModalFusion(SMALL["d"], SMALL["heads"], SMALL["ffn"], **{field: value}).init(jax.random.key(0), z, h, m)
