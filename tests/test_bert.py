"""HF-semantics BERT (rrg_jax.layers.bert) against transformers' ``BertModel`` (torch, float32, eval, eager).

Random weights from configs written here, saved with ``save_pretrained`` (safetensors) into tmp_path and read
back with ``rrg_jax.hf_weights`` — no download. Every comparison prints ``PARITY ...`` (visible with ``-s``).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hostile import RunsCode
from numerics import check
from rrg_jax import hf_weights
from rrg_jax.convert import ConversionError
from rrg_jax.layers.bert import BertConfig, BertModel, attention_bias

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            hidden_act="gelu", max_position_embeddings=24, type_vocab_size=3, layer_norm_eps=1e-12,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
# bert-base-uncased's config.json (the architecture fields).
BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0,
            position_embedding_type="absolute", architectures=["BertForMaskedLM"], model_type="bert")


# --- helpers --------------------------------------------------------------------------------------------------


def make_hf(config: dict, seed: int) -> transformers.BertModel:
  """Random-weight HF BertModel (eager attention, eval); LayerNorms and biases moved off their (1, 0) init."""
  hf_config = transformers.BertConfig(**config)
  hf_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.BertModel(hf_config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def save(model, folder) -> str:
  model.save_pretrained(folder)  # safetensors
  assert (folder / "model.safetensors").is_file()
  return str(folder)


def inputs(config: dict, batch: int, length: int, lengths, seed: int):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, config["vocab_size"], (batch, length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids[mask == 0] = config["pad_token_id"]
  token_types = rng.randint(0, config["type_vocab_size"], (batch, length))
  return ids, mask, token_types


def torch_run(model, ids, mask, token_types):
  with torch.no_grad():
    out = model(torch.tensor(ids), torch.tensor(mask), torch.tensor(token_types), output_hidden_states=True)
  return out


def torch_grads(model, module, ids, mask, token_types, cot_h, cot_p) -> dict:
  """Autograd of Σ last_hidden_state·cot_h + Σ pooler_output·cot_p, mapped onto the Flax params tree."""
  dtype = next(model.parameters()).dtype
  model.zero_grad()
  out = model(torch.tensor(ids), torch.tensor(mask), torch.tensor(token_types))
  loss = (out.last_hidden_state * torch.tensor(cot_h, dtype=dtype)).sum()
  (loss + (out.pooler_output * torch.tensor(cot_p, dtype=dtype)).sum()).backward()
  grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for n, p in model.named_parameters()}
  model.zero_grad()
  return hf_weights.bert_variables(grads, module, "torch grads")["params"]


def check_grads(name, got, want, exact, tol=1e-4) -> float:
  """Per leaf ‖g_jax − g_torch‖ / ‖g_torch‖ ≤ tol.

  A leaf whose exact (torch float64) gradient vanishes (the attention key biases: softmax is invariant to a
  per-query shift) holds float32 round-off only; there JAX must stay at round-off level: ‖g_jax‖ ≤ 1e-5 ×
  the overall gradient norm (torch float32's own ‖g‖ is printed alongside).
  """
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_exact = dict(jax.tree_util.tree_leaves_with_path(exact))
  total = np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in flat_exact.values()))
  worst, zeros = 0.0, []
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
    if np.linalg.norm(np.asarray(flat_exact[path], np.float64)) <= 1e-10 * total:
      zeros.append((jax.tree_util.keystr(path), np.linalg.norm(g) / total, np.linalg.norm(w) / total))
      assert np.linalg.norm(g) <= 1e-5 * total, (name, zeros[-1])
      continue
    err = np.linalg.norm(g - w) / np.linalg.norm(w)
    worst = max(worst, err)
    assert err <= tol, f"{name} {jax.tree_util.keystr(path)}: relative gradient error {err:.3e}"
  zero_text = "".join(f"; {p} (exact 0): jax {j:.1e}, torch32 {t:.1e} of total" for p, j, t in zeros[:2])
  print(f"PARITY {name}: max per-leaf relative gradient error {worst:.3e} over "
        f"{len(flat_want) - len(zeros)} leaves, {len(zeros)} exactly-zero leaves{zero_text}")
  return worst


# --- tiny config ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = make_hf(TINY, seed=0)
  folder = save(model, tmp_path_factory.mktemp("bert_tiny"))
  return model, folder


def test_forward_tiny(tiny):
  model, folder = tiny
  module, variables = hf_weights.load_bert(folder)
  assert module.add_pooling_layer and module.config == BertConfig.from_hf_config(TINY)
  ids, mask, token_types = inputs(TINY, 3, 11, [11, 7, 4], seed=1)
  want = torch_run(model, ids, mask, token_types)
  got = jax.jit(lambda v: module.apply(v, ids, mask, token_types, output_hidden_states=True))(variables)
  check("bert tiny last_hidden_state", got["last_hidden_state"], want.last_hidden_state.numpy(), rtol=1e-5)
  check("bert tiny pooler_output", got["pooler_output"], want.pooler_output.numpy(), rtol=1e-5)
  assert len(got["hidden_states"]) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
  for i, (g, w) in enumerate(zip(got["hidden_states"], want.hidden_states)):
    check(f"bert tiny hidden_states[{i}]", g, w.numpy(), rtol=1e-5)
  # No mask / no token types = all visible / type 0, as HF.
  want = torch_run(model, ids, np.ones_like(mask), np.zeros_like(token_types))
  got = module.apply(variables, ids)
  check("bert tiny unmasked", got["last_hidden_state"], want.last_hidden_state.numpy(), rtol=1e-5)


def test_gradients_tiny(tiny):
  model, folder = tiny
  module, variables = hf_weights.load_bert(folder)
  ids, mask, token_types = inputs(TINY, 3, 11, [11, 7, 4], seed=2)
  rng = np.random.RandomState(3)
  cot_h = rng.randn(3, 11, TINY["hidden_size"]).astype(np.float32)
  cot_p = rng.randn(3, TINY["hidden_size"]).astype(np.float32)
  want, exact = [torch_grads(m, module, ids, mask, token_types, cot_h, cot_p)
                 for m in (model, copy.deepcopy(model).double())]

  def loss(params):
    o = module.apply({"params": params}, ids, mask, token_types)
    return jnp.sum(o["last_hidden_state"] * cot_h) + jnp.sum(o["pooler_output"] * cot_p)

  got = jax.jit(jax.grad(loss))(variables["params"])
  # The pad row of word_embeddings gets no gradient (torch padding_idx), although pad tokens are in the input.
  assert (ids == TINY["pad_token_id"]).any()
  assert not np.any(np.asarray(got["embeddings"]["word_embeddings"]["embedding"])[TINY["pad_token_id"]])
  check_grads("bert tiny grads", got, want, exact)


def test_attention_bias_hand_computed():
  bias = np.asarray(attention_bias(np.array([[1, 1, 0]])))
  m = np.finfo(np.float32).min
  np.testing.assert_array_equal(bias, np.array([[[[0.0, 0.0, m]]]], np.float32))
  assert attention_bias(None) is None


def test_dropout_and_dtype(tiny):
  _, folder = tiny
  module, variables = hf_weights.load_bert(folder)
  ids, mask, token_types = inputs(TINY, 2, 9, [9, 5], seed=4)
  eval_out = module.apply(variables, ids, mask, token_types)["last_hidden_state"]
  train = module.apply(variables, ids, mask, token_types, deterministic=False,
                       rngs={"dropout": jax.random.key(0)})["last_hidden_state"]
  assert np.all(np.isfinite(train)) and not np.allclose(train, eval_out)
  no_drop = BertModel(BertConfig.from_hf_config({**TINY, "hidden_dropout_prob": 0.0,
                                                  "attention_probs_dropout_prob": 0.0}))
  same = no_drop.apply(variables, ids, mask, token_types, deterministic=False, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(same["last_hidden_state"], eval_out, rtol=1e-6, atol=1e-6)
  bf16 = BertModel(module.config, dtype=jnp.bfloat16)
  low = bf16.apply(variables, ids, mask, token_types)["last_hidden_state"]
  assert low.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(low.astype(jnp.float32) - eval_out)) / jnp.max(jnp.abs(eval_out)))
  print(f"PARITY bert tiny bfloat16 vs float32: rel={err:.3e}")
  assert err < 0.05


def test_no_pooler_and_prefixed_checkpoint(tmp_path):
  """BertForMaskedLM: ``bert.`` prefix, no pooler, a ``cls.*`` head → the encoder is read, the head dropped."""
  hf_config = transformers.BertConfig(**TINY)
  hf_config._attn_implementation = "eager"
  torch.manual_seed(5)
  mlm = transformers.BertForMaskedLM(hf_config).eval()
  folder = save(mlm, tmp_path)
  module, variables = hf_weights.load_bert(folder)
  assert not module.add_pooling_layer and "pooler" not in variables["params"]
  ids, mask, token_types = inputs(TINY, 2, 8, [8, 3], seed=6)
  with torch.no_grad():
    want = mlm.bert(torch.tensor(ids), torch.tensor(mask), torch.tensor(token_types)).last_hidden_state.numpy()
  got = module.apply(variables, ids, mask, token_types)
  assert "pooler_output" not in got
  check("bert tiny (BertForMaskedLM encoder)", got["last_hidden_state"], want, rtol=1e-5)


# --- configs and hostile inputs -------------------------------------------------------------------------------

def test_config_refusals():
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'.*only 'absolute'"):
    BertConfig.from_hf_config({**TINY, "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="hidden_act='relu'.*only 'gelu'"):
    BertConfig.from_hf_config({**TINY, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="decoder"):
    BertConfig.from_hf_config({**TINY, "is_decoder": True})
  assert BertConfig.from_hf_config({}) == BertConfig()  # HF defaults = bert-base


def test_missing_folder_and_config(tiny, tmp_path):
  with pytest.raises(ConversionError, match="no such model folder.*nothing is downloaded"):
    hf_weights.load_bert(tmp_path / "absent")
  with pytest.raises(ConversionError, match="no config.json"):
    hf_weights.read_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  with pytest.raises(ConversionError, match="no model.safetensors.*pytorch_model.bin"):
    hf_weights.load_bert(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_act": "tanh"}))
  shutil.copy(os.path.join(tiny[1], "model.safetensors"), tmp_path)
  with pytest.raises(ConversionError, match="config.json: BERT hidden_act='tanh'"):
    hf_weights.load_bert(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
  _, folder = tiny
  data = pathlib.Path(folder, "model.safetensors").read_bytes()
  shutil.copy(os.path.join(folder, "config.json"), tmp_path)
  (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ConversionError, match=r"model\.safetensors is not a readable safetensors file "
                                            r"\(truncated or corrupt\?\)"):
    hf_weights.load_bert(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\xff" * 7)
  with pytest.raises(ConversionError, match="not a readable safetensors file"):
    hf_weights.read_state_dict(tmp_path)


def test_code_running_pickle_refused(tiny, tmp_path):
  _, folder = tiny
  marker = tmp_path / "pwned"
  shutil.copy(os.path.join(folder, "config.json"), tmp_path)
  torch.save({"embeddings.word_embeddings.weight": torch.zeros(3), "evil": RunsCode(marker)},
             tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match=r"pytorch_model\.bin was refused: it pickles objects other than "
                                            r"tensors.*code could run on load"):
    hf_weights.load_bert(tmp_path)
  assert not marker.exists()


def test_pytorch_bin_fallback(tiny, tmp_path):
  model, folder = tiny
  shutil.copy(os.path.join(folder, "config.json"), tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # includes the position_ids buffer or not
  module, variables = hf_weights.load_bert(tmp_path)
  _, ref_variables = hf_weights.load_bert(folder)
  jax.tree.map(np.testing.assert_array_equal, variables, ref_variables)


def test_config_does_not_match_weights(tiny, tmp_path):
  _, folder = tiny
  shutil.copy(os.path.join(folder, "model.safetensors"), tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "intermediate_size": 40, "num_hidden_layers": 3}))
  with pytest.raises(ConversionError) as info:
    hf_weights.load_bert(tmp_path)
  text = str(info.value)
  print(text)
  assert "does not match the Flax model" in text
  assert "encoder/layer_2/attention/self/query/kernel" in text  # missing (config has 3 layers, weights 2)
  assert "mis-shaped" in text
  assert "encoder.layer.0.intermediate.dense.weight (37, 32)" in text and "expected (32, 40)" in text


# --- real size ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bert_base_forward(tmp_path):
  model = make_hf(BASE, seed=7)
  folder = save(model, tmp_path)
  ids, mask, token_types = inputs(BASE, 2, 16, [16, 9], seed=8)
  want = torch_run(model, ids, mask, token_types)
  exact = torch_run(copy.deepcopy(model).double(), ids, mask, token_types)
  del model
  module, variables = hf_weights.load_bert(folder)
  assert module.config == BertConfig.from_hf_config(BASE)
  got = jax.jit(lambda v: module.apply(v, ids, mask, token_types))(variables)
  check("bert-base last_hidden_state", got["last_hidden_state"], want.last_hidden_state.numpy(), rtol=1e-5,
        exact=exact.last_hidden_state.numpy())
  check("bert-base pooler_output", got["pooler_output"], want.pooler_output.numpy(), rtol=1e-5,
        exact=exact.pooler_output.numpy())
