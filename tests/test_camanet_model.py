"""CAMANet composition: parameter tree and counts (spec §11), cached vs full decoding, gradient reach of the
VTAC loss (spec §7), switches, padding invariance, bf16."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import camanet as camanet_config
from conftest import tiny_config
from rrg_jax import losses, models

SPEC_PART_COUNTS = {  # spec §11, IU configuration (K = 761, 14 classes)
    ("visual_extractor", "model"): 6_953_856, ("visual_extractor", "head"): 14_350, ("fore_back_learn",): 4_096,
    ("encoder_decoder", "att_embed_0"): 524_800, ("encoder_decoder", "model", "encoder"): 4_734_976,
    ("encoder_decoder", "model", "decoder"): 26_782_720, ("encoder_decoder", "model", "rm"): 2_626_560,
    ("encoder_decoder", "model", "tgt_embed_0"): 389_632, ("encoder_decoder", "logit"): 390_393}


def abstract_variables(config, t: int = 8):
  model = models.get_model(config.model)
  d = config.data
  shapes = (jax.ShapeDtypeStruct((1, d.num_views, d.image_size, d.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.float32))
  rng = jax.random.key(0)
  return jax.eval_shape(lambda i, tg, m: model.init({"params": rng, "dropout": rng}, i, tg, m, train=False), *shapes)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_iu_parameter_count_and_parts():
  config = camanet_config.get_config("iu_xray")
  config.model.vocab_size = 761
  params = abstract_variables(config)["params"]
  assert count(params) == 42_421_383
  for path, n in SPEC_PART_COUNTS.items():
    node = params
    for k in path:
      node = node[k]
    assert count(node) == n, path
  flat = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  assert flat["encoder_decoder/model/encoder/layers_0/self_attn/linears_1/kernel"] == (512, 512)
  assert flat["encoder_decoder/model/decoder/layers_2/sublayer_1/norm/mlp_gamma_0/kernel"] == (1536, 512)
  assert flat["encoder_decoder/model/tgt_embed_0/lut/embedding"] == (761, 512)
  assert flat["encoder_decoder/model/rm/W/kernel"] == (512, 1024)
  assert flat["visual_extractor/model/denseblock3/denselayer24/conv1/kernel"] == (1, 1, 992, 128)
  assert flat["visual_extractor/head/kernel"] == (1024, 14)
  assert flat["fore_back_learn/back_norm/gamma"] == (1024,)


def test_base_preset_has_no_vdmae_token_params():
  config = camanet_config.get_config("base")
  config.model.vocab_size = 761
  params = abstract_variables(config)["params"]
  assert "fore_back_learn" not in params
  assert count(params) == 42_421_383 - 4_096


def init(model, batch, seed=0):
  return jax.jit(lambda b: model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed)},
                                      b["images"], b["targets"], b["masks"], train=False))(batch)


def jitted_forward(model):
  """Jitted eval ``apply`` and train ``apply`` (→ (out, state)) for ``model``."""
  def train(v, b, key):
    return model.apply(v, b["images"], b["targets"], b["masks"], train=True, rngs={"dropout": key},
                       mutable=["batch_stats"])
  return (jax.jit(lambda v, b: model.apply(v, b["images"], b["targets"], b["masks"], train=False)),
          jax.jit(train))


def make_batch(config, lengths, t=None, seed=0):
  rng = np.random.default_rng(seed)
  t = t or config.data.max_seq_length
  b, k, d = len(lengths), config.model.vocab_size, config.data
  targets = np.zeros((b, t), np.int32)
  masks = np.zeros((b, t), np.float32)
  for i, n in enumerate(lengths):
    targets[i, 1:n - 1] = rng.integers(1, k, size=n - 2)
    masks[i, :n] = 1
  labels = (rng.random((b, config.model.num_classes)) < 0.5).astype(np.float32)
  labels[:, 0] = 1
  images = rng.normal(size=(b, d.num_views, d.image_size, d.image_size, 3)).astype(np.float32)
  return {"images": jnp.asarray(images), "targets": jnp.asarray(targets), "masks": jnp.asarray(masks),
          "labels": jnp.asarray(labels)}


class Tiny(NamedTuple):
  config: Any
  model: Any
  init_params: Any
  variables: Any
  batch: Any
  fwd: Any
  fwd_train: Any
  encode: Any


@pytest.fixture(scope="module")
def tiny() -> Tiny:
  """Tiny two-view model (dropout rates kept), calibrated variables, a batch and jitted functions."""
  config = tiny_config(num_views=2)
  config.data.max_seq_length = 12
  model = models.get_model(config.model)
  batch = make_batch(config, [12, 5, 8])
  variables = init(model, batch)
  fwd, fwd_train = jitted_forward(model)
  # One train-mode pass calibrates BN running stats so eval activations are O(1); bias the head so that
  # some classes are predicted (non-trivial VDM).
  _, state = fwd_train(variables, batch, jax.random.key(2))
  params = flax.core.unfreeze(variables["params"])
  params["visual_extractor"]["head"]["bias"] = params["visual_extractor"]["head"]["bias"] + 0.5
  encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))
  return Tiny(config, model, variables["params"], {"params": params, "batch_stats": state["batch_stats"]}, batch,
              fwd, fwd_train, encode)


def test_forward_contract(tiny):
  config, model, variables, batch = tiny.config, tiny.model, tiny.variables, tiny.batch
  out = tiny.fwd(variables, batch)
  b, t, k, c, n = 3, 12, config.model.vocab_size, config.model.num_classes, 2 * 2 * 2  # 64 px → 2×2 per view
  assert out["logprobs"].shape == (b, t - 1, k) and out["logits"].shape == (b, c)
  assert out["cams"].shape == (b, c, n) and out["vdm"].shape == (b, n) and out["tdm"].shape == (b, n)
  np.testing.assert_allclose(np.exp(np.asarray(out["logprobs"])).sum(-1), 1.0, rtol=1e-5)
  assert np.asarray(out["vdm"]).max() == 1.0 and np.asarray(out["vdm"]).min() == 0.0
  enc = tiny.encode(variables, batch["images"])
  assert enc["memory"].shape == (b, n, config.model.d_model) and enc["henc"].shape == (b, n + 1, config.model.d_model)
  np.testing.assert_array_equal(np.asarray(enc["memory"]), np.asarray(enc["henc"])[:, 1:])
  np.testing.assert_allclose(np.asarray(enc["probs"]), jax.nn.sigmoid(out["logits"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(enc["vdm"]), np.asarray(out["vdm"]))


def test_train_mode_dropout_and_batch_stats(tiny):
  a, sa = tiny.fwd_train(tiny.variables, tiny.batch, jax.random.key(5))
  b, _ = tiny.fwd_train(tiny.variables, tiny.batch, jax.random.key(6))
  assert not np.allclose(a["logprobs"], b["logprobs"])
  before = tiny.variables["batch_stats"]["visual_extractor"]["model"]["norm0"]["var"]
  assert not np.allclose(sa["batch_stats"]["visual_extractor"]["model"]["norm0"]["var"], before)


def test_cached_decode_step_equals_decode_full(tiny):
  config, model, variables = tiny.config, tiny.model, tiny.variables
  memory = tiny.encode(variables, tiny.batch["images"])["memory"]
  seq = jnp.asarray(np.random.default_rng(3).integers(1, config.model.vocab_size, size=(3, 9)).astype(np.int32))
  seq = seq.at[:, 0].set(0).at[1, 4].set(0)  # BOS, and an EOS id inside a prefix (causal-only mask: visible)
  full, attns = jax.jit(lambda m, s: model.apply(variables, m, s, method=model.decode_full))(memory, seq)
  assert full.shape == (3, 9, config.model.vocab_size) and attns[-1].shape == (3, 4, 9, memory.shape[1])
  cache = model.apply(variables, memory, 12, method=model.init_decode_cache)
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(cache))
  step = jax.jit(lambda c, tok: model.apply(variables, memory, c, tok, method=model.decode_step))
  for t in range(seq.shape[1]):
    logp, cache, attn = step(cache, seq[:, t])
    np.testing.assert_allclose(np.asarray(logp), np.asarray(full[:, t]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(attn), np.asarray(attns[-1][:, :, t]), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(cache["index"]), 9)


def test_decode_full_training_mask_matches_forward(tiny):
  model, variables, batch = tiny.model, tiny.variables, tiny.batch
  out = tiny.fwd(variables, batch)
  memory = tiny.encode(variables, batch["images"])["memory"]
  decode = jax.jit(lambda m, s, pad: model.apply(variables, m, s, mask_padding=pad, method=model.decode_full)[0],
                   static_argnums=2)
  seq = batch["targets"][:, :-1]
  masked, causal = decode(memory, seq, True), decode(memory, seq, False)
  np.testing.assert_allclose(np.asarray(masked), np.asarray(out["logprobs"]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(causal)[:, :4], np.asarray(masked)[:, :4], atol=1e-5)  # no pad yet
  assert not np.allclose(np.asarray(causal)[1, 6:], np.asarray(masked)[1, 6:], atol=1e-4)  # sample 1 pads at 4


def test_static_padding_does_not_change_outputs(tiny):
  """Extra padding beyond the batch's own length T_b: same logprobs on the real positions, same TDM."""
  batch = tiny.batch
  padded = dict(batch, targets=jnp.pad(batch["targets"], ((0, 0), (0, 7))),
                masks=jnp.pad(batch["masks"], ((0, 0), (0, 7))))
  a, b = tiny.fwd(tiny.variables, batch), tiny.fwd(tiny.variables, padded)
  np.testing.assert_allclose(np.asarray(b["logprobs"])[:, :11], np.asarray(a["logprobs"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(b["tdm"]), np.asarray(a["tdm"]), atol=1e-5)


@pytest.mark.slow
def test_vtac_gradient_reach(tiny):
  """Spec §7: the MSE reaches backbone, FBL fore_norm, att_embed, encoder, decoder layers, RM, embedding;
  not the head, back_norm, decoder final norm or logit."""
  variables, batch = tiny.variables, tiny.batch

  def mse(params):
    out, _ = tiny.model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["images"],
                              batch["targets"], batch["masks"], train=True, rngs={"dropout": jax.random.key(0)},
                              mutable=["batch_stats"])
    return losses.vtac_mse(out["tdm"], out["vdm"], batch["labels"])

  grads = jax.jit(jax.grad(mse))(variables["params"])

  def norm(path):
    node = grads
    for k in path:
      node = node[k]
    return float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(node)))

  for path in [("visual_extractor", "model", "conv0"), ("fore_back_learn", "fore_norm"),
               ("encoder_decoder", "att_embed_0"), ("encoder_decoder", "model", "encoder"),
               ("encoder_decoder", "model", "decoder", "layers_0", "sublayer_0"),
               ("encoder_decoder", "model", "rm"), ("encoder_decoder", "model", "tgt_embed_0")]:
    assert norm(path) > 0, path
  for path in [("visual_extractor", "head"), ("fore_back_learn", "back_norm"),
               ("encoder_decoder", "model", "decoder", "norm"), ("encoder_decoder", "logit")]:
    assert norm(path) == 0, path


def test_initialisation_follows_spec(tiny):
  p = tiny.init_params
  d, k, c = tiny.config.model.d_model, tiny.config.model.vocab_size, 17  # tiny DenseNet: 16+8 →12 →10 →9 →17
  emb = np.asarray(p["encoder_decoder"]["model"]["tgt_embed_0"]["lut"]["embedding"])
  assert np.abs(emb).max() <= np.sqrt(6 / (k + d)) and np.abs(emb).max() > 0.8 * np.sqrt(6 / (k + d))
  mcln = p["encoder_decoder"]["model"]["decoder"]["layers_0"]["sublayer_2"]["norm"]
  np.testing.assert_array_equal(mcln["mlp_beta_2"]["bias"], np.float32(0.1))
  np.testing.assert_array_equal(mcln["gamma"], 1.0)
  att = p["encoder_decoder"]["att_embed_0"]
  assert att["kernel"].shape == (c, d)
  for leaf in (att["kernel"], att["bias"]):  # torch Linear default: U(±1/√fan_in) for weight and bias
    assert np.abs(leaf).max() <= 1 / np.sqrt(c) and np.abs(leaf).max() > 0.5 / np.sqrt(c)
  q = np.asarray(p["encoder_decoder"]["model"]["encoder"]["layers_0"]["self_attn"]["linears_0"]["kernel"])
  assert np.abs(q).max() <= np.sqrt(6 / (2 * d)) and np.abs(q).max() > 1 / np.sqrt(d)  # Xavier, not torch default
  qb = np.asarray(p["encoder_decoder"]["model"]["encoder"]["layers_0"]["self_attn"]["linears_0"]["bias"])
  assert np.abs(qb).max() <= 1 / np.sqrt(d) and np.abs(qb).max() > 0.5 / np.sqrt(d)
  conv = np.asarray(p["visual_extractor"]["model"]["conv0"]["kernel"])
  np.testing.assert_allclose(conv.std(), np.sqrt(2 / (7 * 7 * 3)), rtol=0.15)  # Kaiming normal, fan_in
  np.testing.assert_array_equal(p["visual_extractor"]["model"]["norm0"]["scale"], 1.0)
  np.testing.assert_array_equal(p["fore_back_learn"]["fore_norm"]["gamma"], 1.0)


def test_vtac_anchor_and_vdmae_switches(tiny):
  """"paper" anchors VTAC on r* = Henc[:, 0] (same logprobs, different TDM); without VDMAE there is no
  discriminative token: the same params minus ``fore_back_learn`` run, and the memory is all of Henc."""
  config = tiny_config(num_views=2)
  config.data.max_seq_length = 12
  base = tiny.fwd(tiny.variables, tiny.batch)
  config.model.vtac_anchor = "paper"
  paper = jitted_forward(models.get_model(config.model))[0](tiny.variables, tiny.batch)
  np.testing.assert_allclose(paper["logprobs"], base["logprobs"])
  assert not np.allclose(paper["tdm"], base["tdm"])
  config.model.use_vdmae, config.model.vtac_anchor = False, "official"
  model = models.get_model(config.model)
  params = {k: v for k, v in tiny.variables["params"].items() if k != "fore_back_learn"}
  variables = {"params": params, "batch_stats": tiny.variables["batch_stats"]}
  enc = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, tiny.batch["images"])
  assert enc["memory"].shape == enc["henc"].shape == (3, 8, config.model.d_model)
  assert jitted_forward(model)[0](variables, tiny.batch)["tdm"].shape == (3, 8)
  config.model.vtac_anchor = "r_star"
  with pytest.raises(ValueError, match="vtac_anchor"):
    jax.eval_shape(lambda v: models.get_model(config.model).apply(v, tiny.batch["images"], method="encode"),
                   tiny.variables)


def test_registry_errors():
  config = tiny_config()
  config.model.name = "nope"
  with pytest.raises(models.UnknownSystemError, match="'nope' is not a registered system; known: \\['align2gen', "
                                                     "'camanet', 'ct_agrg', 'r2gen', 'radgen'\\]"):
    models.get_model(config.model)
  with pytest.raises(models.UnknownSystemError):
    models.get_system(config)


def test_bfloat16_forward_close_to_float32(tiny):
  config16 = tiny_config(num_views=2)
  config16.model.dtype = "bfloat16"
  a = tiny.fwd(tiny.variables, tiny.batch)
  b = jitted_forward(models.get_model(config16.model))[0](tiny.variables, tiny.batch)
  assert b["logprobs"].dtype == jnp.float32
  assert np.abs(np.asarray(b["logprobs"]) - np.asarray(a["logprobs"])).max() < 0.1
  assert np.abs(np.asarray(b["logits"]) - np.asarray(a["logits"])).max() < 0.05 * np.abs(a["logits"]).max() + 0.05
