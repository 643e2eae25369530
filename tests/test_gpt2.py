"""HF-semantics GPT-2 (rrg_jax.layers.gpt2) against transformers' ``GPT2LMHeadModel`` (torch, float32, eval, eager),
and its pseudo self-attention against a torch implementation of ct_agrg_spec §6.3 written here on top of the HF
model's modules (plus per-layer ``uk``/``uv`` torch Linears).

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
from safetensors.numpy import save_file

from hostile import RunsCode
from numerics import check
from rrg_jax import hf_weights
from rrg_jax.convert import ConversionError
from rrg_jax.layers.gpt2 import RGRG_FILL, GPT2Config, GPT2LMHeadModel, mask_scores

TINY = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=None,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1,
            resid_pdrop=0.1, bos_token_id=96, eos_token_id=96)
# gpt2-medium's config.json (the architecture fields).
MEDIUM = dict(vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=1024, n_layer=24, n_head=16,
              activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1,
              resid_pdrop=0.1, bos_token_id=50256, eos_token_id=50256, architectures=["GPT2LMHeadModel"],
              model_type="gpt2")


# --- helpers --------------------------------------------------------------------------------------------------



def check_logits(name, got, want, exact=None):
  check(f"{name} logits", got, want, rtol=1e-5, exact=exact)
  logp = lambda x: np.asarray(torch.log_softmax(torch.as_tensor(np.asarray(x, np.float64)), -1))  # noqa: E731
  check(f"{name} log-softmax", logp(got), logp(want), atol=1e-4, exact=None if exact is None else logp(exact))


def check_grads(name, got, want, tol=1e-4) -> float:
  """Per leaf ‖g_jax − g_torch‖ / ‖g_torch‖ ≤ tol; a leaf with no torch gradient must have none in JAX."""
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  worst = 0.0
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
    norm = np.linalg.norm(w)
    err = np.linalg.norm(g - w) / norm if norm > 0 else np.linalg.norm(g)
    worst = max(worst, err)
    assert err <= tol, f"{name} {jax.tree_util.keystr(path)}: relative gradient error {err:.3e}"
  print(f"PARITY {name}: max per-leaf relative gradient error {worst:.3e} over {len(flat_want)} leaves")
  return worst


def make_hf(config: dict, seed: int) -> transformers.GPT2LMHeadModel:
  """Random-weight HF GPT2LMHeadModel (eager attention, eval); LayerNorms and biases moved off their (1, 0)."""
  hf_config = transformers.GPT2Config(**config)
  hf_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(hf_config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".ln_" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def make_uk_uv(config: dict, seed: int) -> tuple[list[torch.nn.Linear], list[torch.nn.Linear]]:
  torch.manual_seed(seed)
  d = config["n_embd"]
  return ([torch.nn.Linear(d, d) for _ in range(config["n_layer"])],
          [torch.nn.Linear(d, d) for _ in range(config["n_layer"])])


def psa_state_dict(model, uk, uv) -> dict[str, torch.Tensor]:
  """The CT-AGRG layout: HF keys + ``transformer.h.{l}.attn.{uk,uv}.{weight,bias}`` (+ RGRG's buffers)."""
  sd = dict(model.state_dict())
  n = model.config.n_positions
  for l, (k, v) in enumerate(zip(uk, uv)):
    for name, lin in (("uk", k), ("uv", v)):
      sd[f"transformer.h.{l}.attn.{name}.weight"] = lin.weight
      sd[f"transformer.h.{l}.attn.{name}.bias"] = lin.bias
    sd[f"transformer.h.{l}.attn.causal_mask"] = torch.tril(torch.ones(1, 1, n, n, dtype=torch.uint8))
    sd[f"transformer.h.{l}.attn.mask_out_value"] = torch.tensor(RGRG_FILL)
  return sd


def save_with_uk_uv(model, uk, uv, folder) -> str:
  """A checkpoint folder with the uk/uv layers: config.json from save_pretrained + one safetensors file."""
  model.save_pretrained(folder)
  sd = psa_state_dict(model, uk, uv)
  save_file({k: v.detach().numpy().copy() for k, v in sd.items()}, str(folder / "model.safetensors"))
  return str(folder)


def torch_psa(model, uk, uv, ids, mask, z, *, position_table="wte", mask_mode="rgrg") -> torch.Tensor:
  """ct_agrg_spec §6.3 written out: logits (N, T, V) of GPT-2 with pseudo self-attention.

  Per layer: a = ln_1(x); q, k, v = c_attn(a); keys [uk(z); k], values [uv(z); v]; scores QKᵀ/√d (N, H, T, 1+T);
  query i sees key j (0 = image) iff j ≤ i + 1. "rgrg": forbidden scores REPLACED by −1e4, then
  (1 − m'_j)·(−1e4) ADDED with m' = [1, m]; "hf": finfo.min added where forbidden or padded.
  """
  tr = model.transformer
  n, t = ids.shape
  d, h = model.config.n_embd, model.config.n_head
  dtype = tr.wte.weight.dtype
  ids, z = torch.as_tensor(ids), torch.as_tensor(z, dtype=dtype)
  m_prime = torch.cat([torch.ones(n, 1, dtype=dtype), torch.as_tensor(mask, dtype=dtype)], 1)  # (N, 1+T)
  allowed = torch.arange(t + 1)[None, :] <= torch.arange(t)[:, None] + 1  # (T, 1+T)
  positions = torch.arange(t)
  x = tr.wte(ids) + (tr.wte(positions) if position_table == "wte" else tr.wpe(positions))
  split = lambda y: y.view(n, -1, h, d // h).transpose(1, 2)  # noqa: E731
  for l, block in enumerate(tr.h):
    a = block.ln_1(x)
    q, k, v = block.attn.c_attn(a).split(d, dim=2)
    k = torch.cat([uk[l](z)[:, None], k], 1)
    v = torch.cat([uv[l](z)[:, None], v], 1)
    q, k, v = split(q), split(k), split(v)
    s = torch.matmul(q, k.transpose(-1, -2)) / (d // h) ** 0.5
    if mask_mode == "rgrg":
      s = torch.where(allowed, s, torch.tensor(RGRG_FILL, dtype=dtype))
      s = s + (1.0 - m_prime)[:, None, None, :] * RGRG_FILL
    else:
      visible = allowed[None, None] & (m_prime[:, None, None, :] > 0)
      s = s + torch.where(visible, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v).transpose(1, 2).reshape(n, t, d)
    x = x + block.attn.c_proj(o)
    x = x + block.mlp(block.ln_2(x))
  return model.lm_head(tr.ln_f(x))


def inputs(config, batch, length, lengths, seed):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, config["vocab_size"], (batch, length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  z = rng.randn(batch, config["n_embd"]).astype(np.float32)
  return ids, mask, z


def hf_logits(model, ids, mask=None):
  with torch.no_grad():
    out = model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask))
    hidden = model.transformer(torch.as_tensor(ids),
                               attention_mask=None if mask is None else torch.as_tensor(mask)).last_hidden_state
  return out.logits.numpy(), hidden.numpy()


def forward(module, variables, ids, mask=None, prefix=None):
  return jax.jit(lambda v: module.apply(v, ids, mask, prefix=prefix))(variables)


# --- tiny config ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = make_hf(TINY, seed=0)
  folder = tmp_path_factory.mktemp("gpt2_tiny")
  model.save_pretrained(folder)
  uk, uv = make_uk_uv(TINY, seed=1)
  psa_folder = save_with_uk_uv(model, uk, uv, tmp_path_factory.mktemp("gpt2_tiny_psa"))
  return model, str(folder), uk, uv, psa_folder


def test_forward_tiny(tiny):
  model, folder, *_ = tiny
  module, variables = hf_weights.load_gpt2(folder)
  assert module.config == GPT2Config.from_hf_config(TINY) and not module.pseudo_self_attention
  ids, mask, _ = inputs(TINY, 3, 12, [12, 8, 3], seed=2)
  want_logits, want_hidden = hf_logits(model, ids, mask)
  got = forward(module, variables, ids, mask)
  assert got["logits"].dtype == jnp.float32
  check_logits("gpt2 tiny (padding)", got["logits"], want_logits)
  check("gpt2 tiny last_hidden_state", got["last_hidden_state"], want_hidden, rtol=1e-5)
  want_logits, _ = hf_logits(model, ids)
  check_logits("gpt2 tiny (no mask)", forward(module, variables, ids)["logits"], want_logits)


def test_position_table_wte_quirk(tiny):
  """position_table="wte" equals HF GPT-2 whose wpe rows are overwritten by wte[0..n_positions−1]."""
  model, folder, *_ = tiny
  module, variables = hf_weights.load_gpt2(folder, position_table="wte")
  derived = copy.deepcopy(model)
  with torch.no_grad():
    derived.transformer.wpe.weight.copy_(derived.transformer.wte.weight[: TINY["n_positions"]])
  ids, mask, _ = inputs(TINY, 2, 10, [10, 6], seed=3)
  want, _ = hf_logits(derived, ids, mask)
  got = forward(module, variables, ids, mask)["logits"]
  check_logits("gpt2 tiny position_table=wte (HF with wpe := wte)", got, want)
  standard = forward(hf_weights.load_gpt2(folder)[0], variables, ids, mask)["logits"]
  assert np.max(np.abs(np.asarray(standard) - got)) > 1e-3  # wpe really is bypassed


def test_mask_scores_hand_computed():
  """ct_agrg_spec §13.12: T = 3, mask [1, 1, 0], key slots [img, w0, w1, w2]."""
  s = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4) / 10  # distinct scores
  allowed = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)[None, None]
  valid = np.array([[1, 1, 1, 0]], np.float32)  # m' = [1, m]
  f, mn = RGRG_FILL, np.finfo(np.float32).min
  # forbidden → −1e4; forbidden and padded (w2 for queries 0, 1) → −2e4; visible but padded → s − 1e4.
  want_rgrg = np.array([[0.0, 0.1, f, f + f], [0.4, 0.5, 0.6, f + f], [0.8, 0.9, 1.0, 1.1 + f]], np.float32)
  np.testing.assert_allclose(np.asarray(mask_scores(s, allowed, valid, "rgrg"))[0, 0], want_rgrg, rtol=1e-7)
  want_hf = np.array([[0.0, 0.1, mn, mn], [0.4, 0.5, 0.6, mn], [0.8, 0.9, 1.0, mn]], np.float32)
  np.testing.assert_array_equal(np.asarray(mask_scores(s, allowed, valid, "hf"))[0, 0], want_hf)
  probs = np.asarray(jax.nn.softmax(mask_scores(s, allowed, valid, "rgrg"), -1))[0, 0]
  assert probs[0, 2:].max() == 0 and probs[1, 3] == 0 and probs[2, 3] == 0 and probs[:, 0].min() > 0
  with pytest.raises(ValueError, match="mask_mode"):
    mask_scores(s, allowed, valid, "other")


@pytest.mark.parametrize("position_table,mask_mode", [("wte", "rgrg"), ("wpe", "rgrg"), ("wpe", "hf"),
                                                       ("wte", "hf")])
def test_pseudo_self_attention_tiny(tiny, position_table, mask_mode):
  model, _, uk, uv, psa_folder = tiny
  module, variables = hf_weights.load_gpt2(psa_folder, pseudo_self_attention=True, position_table=position_table,
                                           mask_mode=mask_mode)
  ids, mask, z = inputs(TINY, 3, 12, [12, 8, 3], seed=4)
  with torch.no_grad():
    want = torch_psa(model, uk, uv, ids, mask, z, position_table=position_table, mask_mode=mask_mode).numpy()
  got = forward(module, variables, ids, mask, z)["logits"]
  check_logits(f"gpt2 tiny pseudo self-attention ({position_table}, {mask_mode})", got, want)
  # The prefix really enters: another z changes the logits.
  other = forward(module, variables, ids, mask, z + 1.0)["logits"]
  assert np.max(np.abs(np.asarray(other) - got)) > 1e-3


def test_gradients_tiny(tiny):
  model, folder, *_ = tiny
  module, variables = hf_weights.load_gpt2(folder)
  ids, mask, _ = inputs(TINY, 3, 12, [12, 8, 3], seed=5)
  cot = np.random.RandomState(6).randn(3, 12, TINY["vocab_size"]).astype(np.float32)
  model.zero_grad()
  out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  (out.logits * torch.as_tensor(cot)).sum().backward()
  grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
  model.zero_grad()
  want = hf_weights.gpt2_variables(grads, module, "torch grads")["params"]
  loss = lambda p: jnp.sum(module.apply({"params": p}, ids, mask)["logits"] * cot)  # noqa: E731
  check_grads("gpt2 tiny grads", jax.jit(jax.grad(loss))(variables["params"]), want)


def test_gradients_pseudo_self_attention_tiny(tiny):
  """All GPT-2 params, uk/uv and the prefix z (the conditioning MLP upstream trains through it)."""
  model, _, uk, uv, psa_folder = tiny
  module, variables = hf_weights.load_gpt2(psa_folder, pseudo_self_attention=True, position_table="wte",
                                           mask_mode="rgrg")
  ids, mask, z = inputs(TINY, 3, 12, [12, 8, 3], seed=7)
  cot = np.random.RandomState(8).randn(3, 12, TINY["vocab_size"]).astype(np.float32)
  model.zero_grad()
  for lin in uk + uv:
    lin.zero_grad()
  z_t = torch.tensor(z, requires_grad=True)
  (torch_psa(model, uk, uv, ids, mask, z_t) * torch.as_tensor(cot)).sum().backward()
  grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()  # wpe is unused: no gradient
           for n, p in model.named_parameters()}
  for l in range(TINY["n_layer"]):
    for name, lin in (("uk", uk[l]), ("uv", uv[l])):
      grads[f"transformer.h.{l}.attn.{name}.weight"] = lin.weight.grad.numpy()
      grads[f"transformer.h.{l}.attn.{name}.bias"] = lin.bias.grad.numpy()
  model.zero_grad()
  want = hf_weights.gpt2_variables(grads, module, "torch grads")["params"]

  def loss(params, prefix):
    return jnp.sum(module.apply({"params": params}, ids, mask, prefix=prefix)["logits"] * cot)

  got, got_z = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], z)
  check_grads("gpt2 tiny pseudo self-attention grads", got, want)
  check_grads("gpt2 tiny pseudo self-attention grad of prefix", {"z": got_z}, {"z": z_t.grad.numpy()})


@pytest.mark.parametrize("psa", [False, True])
def test_decode_matches_forward(tiny, psa):
  _, folder, _, _, psa_folder = tiny
  if psa:
    module, variables = hf_weights.load_gpt2(psa_folder, pseudo_self_attention=True, position_table="wte",
                                             mask_mode="rgrg")
  else:
    module, variables = hf_weights.load_gpt2(folder)
  ids, _, z = inputs(TINY, 2, 9, [9, 9], seed=9)
  prefix = z if psa else None
  full = np.asarray(forward(module, variables, ids, None, prefix)["logits"])
  cache = module.apply(variables, 2, 12, prefix, method=module.init_cache)
  assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(cache))
  step = jax.jit(lambda v, c, t: module.apply(v, c, t, method=module.decode_step))
  steps = []
  for t in range(ids.shape[1]):
    logits, cache = step(variables, cache, ids[:, t])
    steps.append(np.asarray(logits))
  np.testing.assert_array_equal(cache["index"], [ids.shape[1]] * 2)
  check(f"gpt2 tiny decode_step vs forward (pseudo self-attention={psa})", np.stack(steps, 1), full, rtol=1e-5)


def test_dropout_and_dtype(tiny):
  _, folder, *_ = tiny
  module, variables = hf_weights.load_gpt2(folder)
  ids, mask, _ = inputs(TINY, 2, 8, [8, 5], seed=10)
  eval_out = forward(module, variables, ids, mask)["logits"]
  train = module.apply(variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})["logits"]
  assert np.all(np.isfinite(train)) and not np.allclose(train, eval_out)
  bf16 = GPT2LMHeadModel(module.config, dtype=jnp.bfloat16)
  low = bf16.apply(variables, ids, mask)["logits"]
  assert low.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(low - eval_out)) / jnp.max(jnp.abs(eval_out)))
  print(f"PARITY gpt2 tiny bfloat16 vs float32 logits: rel={err:.3e}")
  assert err < 0.05


def test_remat_same_loss_gradients_fewer_residuals(tiny):
  """``remat``: the same params, loss and gradients (dropout on: the same draws), while the backward pass keeps only
  the blocks' inputs (jax.vjp's residuals, shapes only)."""
  from numerics import residual_bytes  # pylint: disable=g-import-not-at-top

  _, _, _, _, psa_folder = tiny
  module, variables = hf_weights.load_gpt2(psa_folder, pseudo_self_attention=True)
  remat = GPT2LMHeadModel(module.config, pseudo_self_attention=True, remat=True)
  ids, mask, z = inputs(TINY, 2, 8, [8, 5], seed=12)

  def loss(net, params):
    out = net.apply({"params": params}, ids, mask, prefix=z, deterministic=False, rngs={"dropout": jax.random.key(3)})
    return jnp.sum(jax.nn.log_softmax(out["logits"])[..., 0])

  assert jax.tree.structure(remat.init(jax.random.key(0), ids, mask, prefix=z)) == jax.tree.structure(variables)
  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(module, p)))(variables["params"])
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)
  kept = {name: residual_bytes(lambda p, n=net: loss(n, p), variables["params"])
          for name, net in (("remat", remat), ("plain", module))}
  print(f"gpt2 tiny residuals: remat {kept['remat']} B, plain {kept['plain']} B")
  assert kept["remat"] < 0.6 * kept["plain"]


def test_prefix_argument_checks(tiny):
  _, folder, _, _, psa_folder = tiny
  module, variables = hf_weights.load_gpt2(folder)
  ids, _, z = inputs(TINY, 1, 4, [4], seed=11)
  with pytest.raises(ValueError, match="pseudo_self_attention=False"):
    module.apply(variables, ids, prefix=z)
  psa, psa_vars = hf_weights.load_gpt2(psa_folder, pseudo_self_attention=True)
  with pytest.raises(ValueError, match="needs a prefix"):
    psa.apply(psa_vars, ids)


def test_fresh_uk_uv_from_rng(tiny):
  """A plain GPT-2 folder + pseudo_self_attention: uk/uv reported missing, or initialised from an rng."""
  _, folder, *_ = tiny
  with pytest.raises(ConversionError) as info:
    hf_weights.load_gpt2(folder, pseudo_self_attention=True)
  assert "missing" in str(info.value) and "params/h_0/attn/uk/kernel" in str(info.value)
  module, variables = hf_weights.load_gpt2(folder, pseudo_self_attention=True, rng=jax.random.key(0))
  uk = variables["params"]["h_1"]["attn"]["uk"]
  bound = 1 / TINY["n_embd"] ** 0.5  # torch-default Linear init U(±1/√in)
  assert uk["kernel"].shape == (TINY["n_embd"],) * 2 and 0.5 * bound < np.abs(uk["kernel"]).max() <= bound
  _, plain = hf_weights.load_gpt2(folder)
  np.testing.assert_array_equal(variables["params"]["wte"]["embedding"], plain["params"]["wte"]["embedding"])


# --- configs and hostile inputs -------------------------------------------------------------------------------

def test_config_refusals():
  with pytest.raises(ValueError, match="activation_function='relu'.*only 'gelu_new'"):
    GPT2Config.from_hf_config({**TINY, "activation_function": "relu"})
  with pytest.raises(ValueError, match="cross-attention"):
    GPT2Config.from_hf_config({**TINY, "add_cross_attention": True})
  with pytest.raises(ValueError, match="untied"):
    GPT2Config.from_hf_config({**TINY, "tie_word_embeddings": False})
  assert GPT2Config.from_hf_config({}) == GPT2Config()
  with pytest.raises(ValueError, match="position_table"):
    GPT2LMHeadModel(GPT2Config.from_hf_config(TINY), position_table="pos").init(
        jax.random.key(0), np.zeros((1, 2), np.int32))


def test_truncated_safetensors(tiny, tmp_path):
  _, folder, *_ = tiny
  data = pathlib.Path(folder, "model.safetensors").read_bytes()
  shutil.copy(os.path.join(folder, "config.json"), tmp_path)
  (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
  with pytest.raises(ConversionError, match=r"model\.safetensors is not a readable safetensors file "
                                            r"\(truncated or corrupt\?\)"):
    hf_weights.load_gpt2(tmp_path)


def test_code_running_pickle_refused(tiny, tmp_path):
  _, folder, *_ = tiny
  marker = tmp_path / "pwned"
  shutil.copy(os.path.join(folder, "config.json"), tmp_path)
  torch.save({"transformer.wte.weight": torch.zeros(3), "x": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match=r"pytorch_model\.bin was refused.*code could run on load"):
    hf_weights.load_gpt2(tmp_path)
  assert not marker.exists()


def test_config_does_not_match_weights(tiny, tmp_path):
  _, folder, *_ = tiny
  shutil.copy(os.path.join(folder, "model.safetensors"), tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "n_embd": 48, "n_positions": 40}))
  with pytest.raises(ConversionError) as info:
    hf_weights.load_gpt2(tmp_path)
  text = str(info.value)
  print(text)
  assert "does not match the Flax model" in text and "mis-shaped" in text
  assert "transformer.wpe.weight (32, 32) → params/wpe/embedding (32, 32), expected (40, 48)" in text
  assert "transformer.h.0.attn.c_attn.weight (32, 96)" in text and "expected (48, 144)" in text


# --- real size ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gpt2_medium_forward(tmp_path):
  """gpt2-medium, random weights: the plain HF forward and CT-AGRG's pseudo self-attention (wte positions, rgrg
  masks, fresh uk/uv) through save_pretrained + load_gpt2."""
  model = make_hf(MEDIUM, seed=12)
  model.save_pretrained(tmp_path)
  ids, mask, z = inputs(MEDIUM, 2, 16, [16, 11], seed=13)

  module, variables = hf_weights.load_gpt2(tmp_path)
  assert module.config == GPT2Config.from_hf_config(MEDIUM)
  got_plain = np.asarray(forward(module, variables, ids, mask)["logits"])
  del variables
  psa, psa_vars = hf_weights.load_gpt2(tmp_path, pseudo_self_attention=True, position_table="wte",
                                       mask_mode="rgrg", rng=jax.random.key(14))
  got_psa = np.asarray(forward(psa, psa_vars, ids, mask, z)["logits"])
  uk, uv = make_uk_uv(MEDIUM, seed=0)
  with torch.no_grad():
    for l in range(MEDIUM["n_layer"]):
      for name, lin in (("uk", uk[l]), ("uv", uv[l])):
        p = psa_vars["params"][f"h_{l}"]["attn"][name]
        lin.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
        lin.bias.copy_(torch.from_numpy(np.array(p["bias"])))
  del psa_vars

  want_plain, _ = hf_logits(model, ids, mask)
  with torch.no_grad():
    want_psa = torch_psa(model, uk, uv, ids, mask, z).numpy()
    model.double()  # in place: the float64 noise-floor reference
    for lin in uk + uv:
      lin.double()
    exact_plain = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    exact_psa = torch_psa(model, uk, uv, ids, mask, z).numpy()
  check_logits("gpt2-medium", got_plain, want_plain, exact_plain)
  check_logits("gpt2-medium pseudo self-attention", got_psa, want_psa, exact_psa)
