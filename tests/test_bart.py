"""HF-semantics BART (rrg_jax.layers.bart) against transformers' ``BartForConditionalGeneration`` (torch, float32,
eval, eager attention).

Random weights from configs written here, saved with ``save_pretrained`` (safetensors) into tmp_path and read
back with ``rrg_jax.hf_weights.load_bart`` — no download. The tiny config scales the embeddings
(``scale_embedding``), gives the encoder and decoder different head counts / FFN widths, so mix-ups show, and a
larger init (``init_std`` 0.1) so that no attention is near-uniform (its q/k gradients would vanish).
Every comparison prints ``PARITY ...`` (visible with ``-s``).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from numerics import check
from rrg_jax import hf_weights
from rrg_jax.convert import ConversionError
from rrg_jax.layers.bart import BartConfig, BartForConditionalGeneration

TINY = dict(vocab_size=99, max_position_embeddings=40, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40,
            activation_function="gelu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
            scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            forced_eos_token_id=None, init_std=0.1)
# facebook/bart-base's config.json (the architecture fields).
BASE = dict(vocab_size=50265, max_position_embeddings=1024, d_model=768, encoder_layers=6, decoder_layers=6,
            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
            activation_function="gelu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
            scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            forced_eos_token_id=2, normalize_before=False, add_final_layer_norm=False, normalize_embedding=True,
            static_position_embeddings=False, add_bias_logits=False, extra_pos_embeddings=2)
PAD = 1


# --- helpers --------------------------------------------------------------------------------------------------



def check_grads(name, got, want, tol=1e-4, zero_tol=1e-6) -> float:
  """Per leaf ‖g_jax − g_torch‖ / ‖g_torch‖ ≤ tol. A leaf whose gradient is zero (exactly, or mathematically —
  e.g. the key-projection biases: softmax is shift invariant — leaving only rounding noise) has
  ‖g_torch‖ ≤ zero_tol · G (G = the total torch gradient norm); its JAX gradient must then be ≤ zero_tol · G too."""
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  total = float(np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in flat_want.values())))
  worst, zeros = 0.0, []
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  assert len(flat_got) == len(flat_want)
  for path, g in flat_got:
    g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
    norm = np.linalg.norm(w)
    if norm > zero_tol * total:
      err = np.linalg.norm(g - w) / norm
      worst = max(worst, err)
      assert err <= tol, f"{name} {jax.tree_util.keystr(path)}: relative gradient error {err:.3e}"
    else:
      zeros.append(np.linalg.norm(g) / total)
      assert zeros[-1] <= zero_tol, f"{name} {jax.tree_util.keystr(path)}: gradient not zero ({zeros[-1]:.3e} G)"
  print(f"PARITY {name}: max per-leaf relative gradient error {worst:.3e} over {len(flat_want)} leaves; "
        f"{len(zeros)} zero-gradient leaves, max |g_jax| {max(zeros, default=0.0):.1e} G")
  return worst


def make_hf(config: dict, seed: int) -> transformers.BartForConditionalGeneration:
  """Random-weight HF BART (eager attention, eval); LayerNorms, biases and final_logits_bias moved off (1, 0)."""
  hf_config = transformers.BartConfig(**config)
  hf_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.BartForConditionalGeneration(hf_config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layernorm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
    model.final_logits_bias.copy_(0.5 * torch.randn_like(model.final_logits_bias))
  return model.eval()


def inputs(config, batch, src_len, src_lengths, tgt_len, tgt_lengths, seed):
  """Encoder ids/mask (right padded with PAD) and decoder ids/mask (start token 2, right padded)."""
  rng = np.random.RandomState(seed)
  v = config["vocab_size"]
  ids = rng.randint(3, v, (batch, src_len))
  mask = (np.arange(src_len)[None] < np.asarray(src_lengths)[:, None]).astype(np.int64)
  ids[mask == 0] = PAD
  dec = rng.randint(3, v, (batch, tgt_len))
  dec[:, 0] = 2
  dec_mask = (np.arange(tgt_len)[None] < np.asarray(tgt_lengths)[:, None]).astype(np.int64)
  dec[dec_mask == 0] = PAD
  return ids, mask, dec, dec_mask


def _t(x):
  return None if x is None else torch.as_tensor(x)


def hf_forward(model, ids, mask, dec, dec_mask, embeds=None):
  with torch.no_grad():
    enc = model.model.encoder(input_ids=None if embeds is not None else _t(ids), attention_mask=_t(mask),
                              inputs_embeds=_t(embeds)).last_hidden_state
    out = model(input_ids=None if embeds is not None else _t(ids), attention_mask=_t(mask),
                inputs_embeds=_t(embeds), decoder_input_ids=_t(dec), decoder_attention_mask=_t(dec_mask),
                output_hidden_states=True)
  return out.logits.numpy(), enc.numpy(), out.decoder_hidden_states[-1].numpy()


def forward(module, variables, ids, mask, dec, dec_mask, embeds=None):
  def f(v):
    return module.apply(v, None if embeds is not None else ids, mask, dec, dec_mask, inputs_embeds=embeds)
  return jax.jit(f)(variables)


# --- tiny config ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = make_hf(TINY, seed=0)
  folder = tmp_path_factory.mktemp("bart_tiny")
  model.save_pretrained(folder)
  module, variables = hf_weights.load_bart(folder)
  return model, str(folder), module, variables


def test_forward_tiny(tiny):
  model, _, module, variables = tiny
  assert module.config == BartConfig.from_hf_config(TINY) and module.config.embed_scale == np.sqrt(32)
  np.testing.assert_array_equal(variables["constants"]["final_logits_bias"], model.final_logits_bias.numpy())
  ids, mask, dec, dec_mask = inputs(TINY, 3, 11, [11, 7, 3], 9, [9, 6, 2], seed=1)
  want_logits, want_enc, want_dec = hf_forward(model, ids, mask, dec, dec_mask)
  got = forward(module, variables, ids, mask, dec, dec_mask)
  assert got["logits"].dtype == jnp.float32
  check("bart tiny encoder last_hidden_state (padding)", got["encoder_last_hidden_state"], want_enc, rtol=1e-5)
  check("bart tiny decoder last_hidden_state (padding)", got["last_hidden_state"], want_dec, rtol=1e-5)
  check("bart tiny logits (padding)", got["logits"], want_logits, rtol=1e-5)
  enc = jax.jit(lambda v: module.apply(v, ids, mask, method=module.encode))(variables)
  check("bart tiny encode()", enc, want_enc, rtol=1e-5)
  want_logits, _, _ = hf_forward(model, ids, None, dec, None)
  check("bart tiny logits (no masks)", forward(module, variables, ids, None, dec, None)["logits"], want_logits,
        rtol=1e-5)


def test_inputs_embeds_tiny(tiny):
  """The encoder over arbitrary embeddings (RadGen's visual tokens): no lookup, no scaling, positions 0..S−1."""
  model, _, module, variables = tiny
  ids, mask, dec, dec_mask = inputs(TINY, 3, 8, [8, 8, 5], 6, [6, 4, 6], seed=2)
  embeds = np.random.RandomState(3).randn(3, 8, TINY["d_model"]).astype(np.float32)
  want_logits, want_enc, _ = hf_forward(model, None, mask, dec, dec_mask, embeds=embeds)
  got = forward(module, variables, None, mask, dec, dec_mask, embeds=embeds)
  check("bart tiny inputs_embeds encoder", got["encoder_last_hidden_state"], want_enc, rtol=1e-5)
  check("bart tiny inputs_embeds logits", got["logits"], want_logits, rtol=1e-5)
  with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
    module.apply(variables, ids, mask, method=module.encode, inputs_embeds=embeds)


def test_gradients_tiny(tiny):
  """d(Σ logits·cot)/d(every parameter) and d/d(inputs_embeds), encoder over input embeddings (RadGen's path), pad
  tokens in the decoder input (the shared embedding's pad row gets gradient from the tied head only)."""
  model, _, module, variables = tiny
  _, mask, dec, dec_mask = inputs(TINY, 3, 10, [10, 6, 4], 8, [8, 5, 3], seed=4)
  embeds = np.random.RandomState(5).randn(3, 10, TINY["d_model"]).astype(np.float32)
  cot = np.random.RandomState(6).randn(3, 8, TINY["vocab_size"]).astype(np.float32)
  embeds_t = torch.tensor(embeds, requires_grad=True)
  model.zero_grad()
  out = model(inputs_embeds=embeds_t, attention_mask=_t(mask), decoder_input_ids=_t(dec),
              decoder_attention_mask=_t(dec_mask))
  (out.logits * torch.as_tensor(cot)).sum().backward()
  grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
  model.zero_grad()
  constants = variables["constants"]

  def loss(params, x):
    out = module.apply({"params": params, "constants": constants}, None, mask, dec, dec_mask, inputs_embeds=x)
    return jnp.sum(out["logits"] * cot)

  got, got_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], embeds)
  check_grads("bart tiny grads", got, hf_weights.bart_variables(grads, module, "torch grads")["params"])
  check_grads("bart tiny grad of inputs_embeds", {"x": got_x}, {"x": embeds_t.grad.numpy()})


def test_decode_matches_forward(tiny):
  """decode_step token by token (KV cache, cross K/V projected once) == the full decoder, position by position."""
  model, _, module, variables = tiny
  ids, mask, dec, _ = inputs(TINY, 3, 9, [9, 5, 2], 10, [10, 10, 10], seed=7)
  full = np.asarray(forward(module, variables, ids, mask, dec, None)["logits"])
  want, _, _ = hf_forward(model, ids, mask, dec, None)

  @jax.jit
  def cached(v):
    enc = module.apply(v, ids, mask, method=module.encode)
    cache = module.apply(v, enc, mask, 12, method=module.init_cache)
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(cache))

    def body(cache, tok):
      logits, cache = module.apply(v, cache, tok, method=module.decode_step)
      return cache, logits

    cache, logits = jax.lax.scan(body, cache, jnp.asarray(dec.T))
    return logits.transpose(1, 0, 2), cache["index"]

  steps, index = cached(variables)
  np.testing.assert_array_equal(index, [10] * 3)
  check("bart tiny decode_step vs full decoder", steps, full, rtol=1e-5)
  check("bart tiny decode_step vs HF", steps, want, rtol=1e-5)
  with pytest.raises(ValueError, match="max_len 41 > max_position_embeddings 40"):
    module.apply(variables, jnp.zeros((1, 2, 32)), None, 41, method=module.init_cache)


def test_dropout_and_dtype(tiny):
  _, _, module, variables = tiny
  ids, mask, dec, dec_mask = inputs(TINY, 2, 7, [7, 4], 6, [6, 3], seed=8)
  eval_out = forward(module, variables, ids, mask, dec, dec_mask)["logits"]
  train = jax.jit(lambda v: module.apply(v, ids, mask, dec, dec_mask, deterministic=False,
                                         rngs={"dropout": jax.random.key(0, impl="unsafe_rbg")})["logits"])(variables)
  assert np.all(np.isfinite(train)) and not np.allclose(train, eval_out)
  bf16 = BartForConditionalGeneration(module.config, dtype=jnp.bfloat16)
  low = jax.jit(lambda v: bf16.apply(v, ids, mask, dec, dec_mask))(variables)
  assert low["logits"].dtype == jnp.float32
  err = float(jnp.max(jnp.abs(low["logits"] - eval_out)) / jnp.max(jnp.abs(eval_out)))
  print(f"PARITY bart tiny bfloat16 vs float32 logits: rel={err:.3e}")
  assert err < 0.05
  with pytest.raises(ValueError, match="'constants' collection"):
    module.apply({"params": variables["params"]}, jnp.zeros((1, TINY["d_model"])), method=module.head)


def test_bart_model_checkpoint(tiny, tmp_path):
  """``BartModel`` keys (no ``model.`` prefix, no head, no final_logits_bias) and only the embed_tokens copies:
  the same params, final_logits_bias zeros; differing tied copies are refused."""
  model, folder, _, variables = tiny
  sd = {k[len("model."):]: v.numpy().copy() for k, v in model.state_dict().items() if k.startswith("model.")}
  shared = sd.pop("shared.weight")
  sd["encoder.embed_tokens.weight"] = shared
  sd["decoder.embed_tokens.weight"] = shared.copy()
  sd["encoder.version"] = np.zeros((1,), np.float32)
  shutil.copy(os.path.join(folder, "config.json"), tmp_path)
  save_file(sd, str(tmp_path / "model.safetensors"))
  _, got = hf_weights.load_bart(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, got["params"], variables["params"])
  assert not np.any(got["constants"]["final_logits_bias"])
  sd["decoder.embed_tokens.weight"] = shared + 1.0
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(ConversionError, match="decoder.embed_tokens.weight .* differs from encoder.embed_tokens.weight"):
    hf_weights.load_bart(tmp_path)


# --- configs and hostile inputs -------------------------------------------------------------------------------

def test_config_refusals(tmp_path):
  with pytest.raises(ValueError, match="activation_function='relu'.*only 'gelu'"):
    BartConfig.from_hf_config({**TINY, "activation_function": "relu"})
  for key in ("add_final_layer_norm", "normalize_before"):
    with pytest.raises(ValueError, match=f"{key}=True .*pre-LN"):
      BartConfig.from_hf_config({**TINY, key: True})
  with pytest.raises(ValueError, match="model_type='mbart'"):
    BartConfig.from_hf_config({**TINY, "model_type": "mbart"})
  with pytest.raises(ValueError, match="untied"):
    BartConfig.from_hf_config({**TINY, "tie_word_embeddings": False})
  with pytest.raises(ValueError, match="LayerDrop"):
    BartConfig.from_hf_config({**TINY, "encoder_layerdrop": 0.1})
  with pytest.raises(ValueError, match="normalize_embedding=False"):
    BartConfig.from_hf_config({**TINY, "normalize_embedding": False})
  assert BartConfig.from_hf_config({}) == BartConfig() == BartConfig.from_hf_config(BASE)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "activation_function": "relu"}))
  with pytest.raises(ConversionError, match="config.json: BART activation_function='relu'"):
    hf_weights.load_bart(tmp_path)


def test_config_does_not_match_weights(tiny, tmp_path):
  _, folder, _, _ = tiny
  shutil.copy(os.path.join(folder, "model.safetensors"), tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "d_model": 48, "max_position_embeddings": 30}))
  with pytest.raises(ConversionError) as info:
    hf_weights.load_bart(tmp_path)
  text = str(info.value)
  print(text)
  assert "does not match the Flax model" in text and "mis-shaped" in text
  assert ("model.encoder.embed_positions.weight (42, 32) → params/encoder/embed_positions/embedding (42, 32), "
          "expected (32, 48)") in text
  assert "model.decoder.layers.1.fc1.weight (40, 32)" in text and "expected (48, 40)" in text
  assert "model.shared.weight (99, 32)" in text
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "vocab_size": 98}))
  with pytest.raises(ConversionError, match=r"model.shared.weight \(99, 32\) → params/shared/embedding"):
    hf_weights.load_bart(tmp_path)


# --- real size ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bart_base_forward(tmp_path):
  """bart-base (6+6 layers, 768, 12 heads, vocab 50265), random weights, short padded sequences, through
  save_pretrained + load_bart; noise floor from the float64 torch model."""
  model = make_hf(BASE, seed=10)
  model.save_pretrained(tmp_path)
  ids, mask, dec, dec_mask = inputs(BASE, 2, 16, [16, 9], 12, [12, 7], seed=11)
  module, variables = hf_weights.load_bart(tmp_path)
  assert module.config == BartConfig.from_hf_config(BASE)
  got = forward(module, variables, ids, mask, dec, dec_mask)
  got = {k: np.asarray(v) for k, v in got.items()}
  del variables
  want_logits, want_enc, _ = hf_forward(model, ids, mask, dec, dec_mask)
  model.double()
  exact_logits, exact_enc, _ = hf_forward(model, ids, mask, dec, dec_mask)
  check("bart-base encoder last_hidden_state", got["encoder_last_hidden_state"], want_enc, rtol=1e-5,
        exact=exact_enc)
  check("bart-base logits", got["logits"], want_logits, rtol=1e-5, exact=exact_logits)
