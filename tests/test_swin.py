"""HF-semantics Swin (rrg_jax.layers.swin) against transformers' ``SwinModel`` (torch, float32, eval, eager).

Random weights from configs written here (LayerNorms, biases, relative-position tables and position embeddings
moved off their init), saved with ``save_pretrained`` (safetensors) into tmp_path and read back with
``rrg_jax.hf_weights.load_swin`` — no download. Every comparison prints ``PARITY ...`` (visible with ``-s``).
"""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.initialization import no_init_weights

from numerics import check
from rrg_jax import hf_weights
from rrg_jax.convert import ConversionError
from rrg_jax.layers import swin
from rrg_jax.layers.swin import SwinConfig, SwinModel

TINY = dict(image_size=64, patch_size=4, num_channels=3, window_size=4, embed_dim=16, depths=[2, 2],
            num_heads=[2, 4], mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, drop_path_rate=0.1, hidden_act="gelu", layer_norm_eps=1e-5,
            use_absolute_embeddings=False)
# (name, config overrides, input H×W, expected per-stage (resolution, window, shift, padded)).
CASES = {
    # 16×16 → 8×8: every odd block shifts, no padding (forward only: the other two cases check gradients, which
    # cost XLA:CPU ~5 s of compilation each).
    "shifted": ({}, (64, 64), [((16, 16), 4, 2, (16, 16)), ((8, 8), 4, 2, (8, 8))]),
    # 14×14 → padded to 16; merging of 14 → 7, padded to 8 and shifted (the mask of a padded map); merging of the
    # odd 7 → 4. Saved as SwinForImageClassification (swin. prefix + classifier).
    "padded": (dict(image_size=56, depths=[1, 2, 1], num_heads=[2, 2, 4]), (56, 56),
               [((14, 14), 4, 2, (16, 16)), ((7, 7), 4, 2, (8, 8)), ((4, 4), 4, 0, (4, 4))]),
    # Non-square image not divisible by the patch (30×46 → 8×12), last stage 4×6: min side ≤ window, so its odd
    # block does not shift; width padded to 8. Also: absolute position embeddings (config image 32×48 = the padded
    # input), no qkv bias, odd MLP ratio, a large ε (the embeddings / merging LayerNorms keep torch's 1e-5, as HF),
    # 2 channels, dropout configured (inactive in eval).
    "options": (dict(image_size=[32, 48], depths=[1, 2], use_absolute_embeddings=True, qkv_bias=False, mlp_ratio=2.5,
                     layer_norm_eps=1e-3, num_channels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
                (30, 46), [((8, 12), 4, 2, (8, 12)), ((4, 6), 4, 0, (4, 8))]),
}
# microsoft/swin-base-patch4-window7-224 (the architecture fields), as RadGen uses it (radgen_spec §3.1).
BASE = dict(image_size=224, patch_size=4, num_channels=3, window_size=7, embed_dim=128, depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32], mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, drop_path_rate=0.1, hidden_act="gelu", layer_norm_eps=1e-5,
            use_absolute_embeddings=False, model_type="swin")


# --- helpers --------------------------------------------------------------------------------------------------

def make_hf(config: dict, seed: int, cls=transformers.SwinModel):
  """Random-weight HF Swin (eager attention, eval): matrices and conv kernels N(0, 0.02²) (HF's init), LayerNorm
  weights 1 + N(0, 0.1²), biases, relative-position tables and position embeddings N(0, 0.1²) (HF: 0)."""
  hf_config = transformers.SwinConfig(**config)
  hf_config._attn_implementation = "eager"
  with no_init_weights():  # HF's own init of swin-base takes seconds; every parameter is set below
    model = cls(hf_config)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2 and "relative_position_bias_table" not in name and "position_embeddings" not in name:
        p.normal_(0.0, 0.02, generator=generator)
      else:
        p.normal_(1.0 if "norm" in name and name.endswith(".weight") else 0.0, 0.1, generator=generator)
  return model.eval()


def save(model, folder) -> str:
  model.save_pretrained(folder)
  assert (folder / "model.safetensors").is_file()
  return str(folder)


def nchw(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
  return torch.tensor(x, dtype=dtype).permute(0, 3, 1, 2)


def torch_outputs_and_grads(model, x, cot_h, cot_p):
  """Forward with hidden states, then autograd of Σ last_hidden_state·cot_h + Σ pooler_output·cot_p: (outputs,
  {in-memory param name: grad}, pixel grad NHWC)."""
  dtype = next(model.parameters()).dtype
  model.zero_grad()
  pixels = nchw(x, dtype).requires_grad_(True)
  out = model(pixels, output_hidden_states=True)
  loss = (out.last_hidden_state * torch.tensor(cot_h, dtype=dtype)).sum()
  (loss + (out.pooler_output * torch.tensor(cot_p, dtype=dtype)).sum()).backward()
  grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for n, p in model.named_parameters()}
  return out, grads, pixels.grad.permute(0, 2, 3, 1).numpy()


def check_grads(name, got, want, exact, tol=1e-4) -> float:
  """Per leaf ‖g_jax − g_torch‖ / ‖g_torch‖ ≤ tol; a leaf whose exact (torch float64) gradient is 0 (the
  attention key biases: softmax ignores a per-query shift) holds float32 round-off only and is held to
  ‖g_jax − g_torch‖ ≤ 1e-6 × the total gradient norm (tests/test_r2gen.py's rule)."""
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_exact = dict(jax.tree_util.tree_leaves_with_path(exact))
  total = np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in flat_exact.values()))
  worst, zeros, worst_zero = 0.0, 0, 0.0
  assert set(flat_want) == {p for p, _ in jax.tree_util.tree_leaves_with_path(got)}
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
    if np.linalg.norm(np.asarray(flat_exact[path], np.float64)) <= 1e-10 * total:
      zeros += 1
      worst_zero = max(worst_zero, np.linalg.norm(g - w) / total)
      assert np.linalg.norm(g - w) <= 1e-6 * total, (name, jax.tree_util.keystr(path))
      continue
    err = np.linalg.norm(g - w) / np.linalg.norm(w)
    worst = max(worst, err)
    assert err <= tol, f"{name} {jax.tree_util.keystr(path)}: relative gradient error {err:.3e}"
  print(f"PARITY {name}: max per-leaf relative gradient error {worst:.3e} over {len(flat_want) - zeros} leaves; "
        f"{zeros} exactly-zero leaves within {worst_zero:.1e} of the total norm")
  return worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Per case: (config dict, torch model (the SwinModel part), folder)."""
  out = {}
  for i, (name, (overrides, _, _)) in enumerate(CASES.items()):
    config = {**TINY, **overrides}
    cls = transformers.SwinForImageClassification if name == "padded" else transformers.SwinModel
    model = make_hf(config, seed=i, cls=cls)
    folder = save(model, tmp_path_factory.mktemp(f"swin_{name}"))
    out[name] = (config, model.swin if name == "padded" else model, folder)
  return out


# --- tiny configs: forward, hidden states, gradients ----------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_tiny(tiny, case):
  config, model, folder = tiny[case]
  _, (height, width), geometry = CASES[case]
  module, variables = hf_weights.load_swin(folder)
  assert module.add_pooling_layer and module.config == SwinConfig.from_hf_config(config)
  assert [(g["resolution"], g["window"], g["shift"], g["padded"])
          for g in swin.stage_geometry(module.config, height, width)] == geometry
  rng = np.random.RandomState(10)
  x = rng.randn(2, height, width, config["num_channels"]).astype(np.float32)
  n_last = np.prod(geometry[-1][0])
  cot_h = rng.randn(2, n_last, module.config.num_features).astype(np.float32)
  cot_p = rng.randn(2, module.config.num_features).astype(np.float32)
  if case == "shifted":
    with torch.no_grad():
      want = model(nchw(x), output_hidden_states=True)
  else:
    want, want_grads, want_dx = torch_outputs_and_grads(model, x, cot_h, cot_p)
    _, exact_grads, exact_dx = torch_outputs_and_grads(copy.deepcopy(model).double(), x, cot_h, cot_p)
  # transformers clamped its blocks' window / shift in place on that call: the same decisions as stage_geometry.
  for stage, (_, window, shift, _) in zip(model.encoder.layers, geometry):
    assert [(b.window_size, b.shift_size) for b in stage.blocks] == [
        (window, shift if j % 2 else 0) for j in range(len(stage.blocks))]

  def loss(params, pixels):
    o = module.apply({"params": params}, pixels, output_hidden_states=True)
    return jnp.sum(o["last_hidden_state"] * cot_h) + jnp.sum(o["pooler_output"] * cot_p), o

  if case == "shifted":
    got = jax.jit(lambda v: module.apply(v, x, output_hidden_states=True))(variables)
  else:
    (_, got), (grads, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
  check(f"swin {case} last_hidden_state", got["last_hidden_state"], want.last_hidden_state.detach().numpy(),
        rtol=1e-5)
  check(f"swin {case} pooler_output", got["pooler_output"], want.pooler_output.detach().numpy(), rtol=1e-5)
  assert len(got["hidden_states"]) == len(want.hidden_states) == len(config["depths"]) + 1
  for i, (g, w) in enumerate(zip(got["hidden_states"], want.hidden_states)):
    check(f"swin {case} hidden_states[{i}]", g, w.detach().numpy(), rtol=1e-5)
  if case != "shifted":
    as_tree = lambda g: hf_weights.swin_variables(g, module, "torch grads")["params"]  # noqa: E731 (5.x names)
    check_grads(f"swin {case} grads", grads, as_tree(want_grads), as_tree(exact_grads))
    check(f"swin {case} pixel grads", dx, want_dx, rtol=1e-4, exact=exact_dx)


# --- radgen_spec §15.8 / §15.1 / §3.1 test vectors -----------------------------------------------------------

def test_spec_relative_index_masks_and_drop_path():
  idx = swin.relative_position_index(7)
  assert idx.shape == (49, 49)
  assert (idx[0, 0], idx[0, 48], idx[48, 0], idx[24, 24], idx[0, 1], idx[1, 0], idx[7, 0]) == (
      84, 0, 168, 84, 83, 85, 97)
  np.testing.assert_array_equal(idx, transformers.models.swin.modeling_swin.SwinRelativePositionBias(
      2, (7, 7)).relative_position_index.view(49, 49).numpy())
  totals = {}
  for r in (56, 28, 14):
    mask = swin.shift_attention_mask(r, r, 7, 3)
    masked = (mask == -100).sum(axis=(1, 2)).reshape(r // 7, r // 7)
    assert set(np.unique(mask)) <= {0.0, -100.0}
    assert np.all(masked[:-1, :-1] == 0) and np.all(masked[:-1, -1] == 1176) and np.all(masked[-1, :-1] == 1176)
    assert masked[-1, -1] == 1776
    totals[r] = int(masked.sum())
  assert totals == {56: 18240, 28: 8832, 14: 4128}
  assert swin.shift_attention_mask(7, 7, 7, 0) is None
  base = SwinConfig.from_hf_config(BASE)
  geometry = swin.stage_geometry(base, 224, 224)
  assert [(g["resolution"], g["window"], g["shift"]) for g in geometry] == [
      ((56, 56), 7, 3), ((28, 28), 7, 3), ((14, 14), 7, 3), ((7, 7), 7, 0)]  # 7×7: never shifts
  assert [(g["padded"][0] // g["window"]) ** 2 for g in geometry] == [64, 16, 4, 1]  # windows per image
  rates = swin.drop_path_rates(base)
  assert len(rates) == 24
  np.testing.assert_allclose(rates[:4], [0, 0.004348, 0.008696, 0.013043], atol=5e-7)
  np.testing.assert_allclose(rates[-3:], [0.091304, 0.095652, 0.1], atol=5e-7)


def test_spec_swin_base_parameter_count_and_shapes():
  module = SwinModel(SwinConfig.from_hf_config(BASE))
  pixels = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
  variables, out = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x, output_hidden_states=True)[::-1], pixels)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
  params = variables["params"]
  assert count(params) == 86_743_224
  assert count(params["embeddings"]) == 6_528 and count(params["layernorm"]) == 2_048
  assert [count(params["encoder"][f"layers_{s}"]) for s in range(4)] == [529_992, 2_108_560, 58_892_832,
                                                                       25_203_264]
  assert [h.shape for h in out["hidden_states"]] == [(8, 3136, 128), (8, 784, 256), (8, 196, 512),
                                                         (8, 49, 1024), (8, 49, 1024)]
  assert out["last_hidden_state"].shape == (8, 49, 1024) and out["pooler_output"].shape == (8, 1024)


# --- configs, modes and hostile inputs ------------------------------------------------------------------------

def test_config_refusals():
  with pytest.raises(ValueError, match="hidden_act='relu'.*only 'gelu'"):
    SwinConfig.from_hf_config({**TINY, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="model_type='swinv2'"):
    SwinConfig.from_hf_config({**TINY, "model_type": "swinv2"})
  with pytest.raises(ValueError, match="Swin-v2"):
    SwinConfig.from_hf_config({**TINY, "pretrained_window_sizes": [0, 0]})
  with pytest.raises(ValueError, match="equal length"):
    SwinConfig.from_hf_config({**TINY, "num_heads": [2]})
  with pytest.raises(ValueError, match="width 32 is not divisible by num_heads=3"):
    SwinConfig.from_hf_config({**TINY, "num_heads": [2, 3]})
  with pytest.raises(ValueError, match="square windows"):
    SwinConfig.from_hf_config({**TINY, "window_size": [4, 5]})
  assert SwinConfig.from_hf_config({}) == SwinConfig()  # HF defaults (swin-tiny)
  assert SwinConfig.from_hf_config(transformers.SwinConfig(**TINY).to_dict()) == SwinConfig.from_hf_config(TINY)


def test_input_refusals(tiny):
  config, model, folder = tiny["shifted"]
  module, variables = hf_weights.load_swin(folder)
  # 28×28 → 7×7 → 4×4 would work; 20×20 → 5×5 → 3×3 < window 4: transformers fails there too.
  with pytest.raises(ValueError, match="stage 1: the feature map 3×3.*smaller than window_size=4"):
    module.apply(variables, np.zeros((1, 20, 20, 3), np.float32))
  with pytest.raises(RuntimeError):
    make_hf({**config, "image_size": 20}, seed=0)(torch.zeros(1, 3, 20, 20))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\) NHWC"):
    module.apply(variables, np.zeros((1, 3, 64, 64), np.float32))
  _, _, options_folder = tiny["options"]
  module, variables = hf_weights.load_swin(options_folder)
  with pytest.raises(ValueError, match="position embeddings are for 8×12"):
    module.apply(variables, np.zeros((1, 48, 32, 2), np.float32))


def test_dropout_drop_path_and_dtype():
  config = SwinConfig.from_hf_config({**TINY, "image_size": 16, "depths": [2], "num_heads": [2],
                                      "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                                      "drop_path_rate": 0.5})
  assert swin.drop_path_rates(config) == (0.0, 0.5)
  module = SwinModel(config)
  low = SwinModel(config, dtype=jnp.bfloat16)
  x = np.random.RandomState(3).randn(4, 16, 16, 3).astype(np.float32)
  rngs = {"dropout": jax.random.key(2, impl="rbg")}  # rbg: XLA:CPU compiles threefry's dropout masks slowly

  @jax.jit
  def run(key):
    v = module.init(key, x)
    return (module.apply(v, x)["last_hidden_state"],
            module.apply(v, x, deterministic=False, rngs=rngs)["last_hidden_state"],
            module.clone(drop_path_on_mlp=True).apply(v, x, deterministic=False, rngs=rngs)["last_hidden_state"],
            low.apply(v, x)["last_hidden_state"])

  eval_out, train, train_mlp, low_out = run(jax.random.key(0, impl="rbg"))
  assert np.all(np.isfinite(train)) and not np.allclose(train, eval_out)
  assert np.all(np.isfinite(train_mlp)) and not np.allclose(train_mlp, train)  # drop path on the MLP branch too
  assert low_out.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(low_out.astype(jnp.float32) - eval_out)) / jnp.max(jnp.abs(eval_out)))
  print(f"PARITY swin tiny bfloat16 vs float32: rel={err:.3e}")
  assert err < 0.05
  # DropPath: per sample 0 or 1/(1 − p), kept with probability 1 − p.
  dropped = np.asarray(swin.DropPath(0.25).apply({}, jnp.ones((4000, 3, 2)), deterministic=False,
                                                 rngs={"dropout": jax.random.key(1)}))
  np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / 0.75], rtol=1e-6)
  assert np.all(np.ptp(dropped, axis=(1, 2)) == 0)
  assert abs(float(np.mean(dropped[:, 0, 0] == 0)) - 0.25) < 0.03
  np.testing.assert_array_equal(swin.DropPath(0.25).apply({}, jnp.ones((5, 2)), deterministic=True), 1.0)


def test_checkpoint_spellings_and_buffers(tiny, tmp_path):
  """``torch.save(model.state_dict())`` carries the 5.x in-memory names: same variables as save_pretrained's;
  a classifier checkpoint's prefix and head; relative_position_index buffers (older transformers saved them)."""
  config, model, folder = tiny["shifted"]
  _, ref = hf_weights.load_swin(folder)
  shutil.copy(f"{folder}/config.json", tmp_path)
  state = model.state_dict()
  assert any(".attention.q_proj." in k for k in state)
  torch.save(state, tmp_path / "pytorch_model.bin")
  module, variables = hf_weights.load_swin(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, variables, ref)
  on_disk = hf_weights.read_state_dict(folder)
  index = torch.tensor(swin.relative_position_index(4))
  with_buffers = {**on_disk, "encoder.layers.0.blocks.0.attention.self.relative_position_index": index.numpy()}
  jax.tree.map(np.testing.assert_array_equal, hf_weights.swin_variables(with_buffers, module), ref)
  prefixed = {**{f"swin.{k}": v for k, v in with_buffers.items()}, "classifier.weight": np.zeros((5, 32)),
              "classifier.bias": np.zeros(5)}
  assert hf_weights.swin_state_dict(prefixed).keys() == hf_weights.swin_state_dict(on_disk).keys()
  wrong = {**on_disk, "encoder.layers.1.blocks.1.attention.self.relative_position_index": (index + 1).numpy()}
  with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.blocks\.1\.attention\.self\."
                                            r"relative_position_index \(16, 16\)"):
    hf_weights.swin_variables(wrong, module)
  mixed = {**on_disk, "encoder.layers.0.blocks.0.attention.q_proj.weight": np.zeros((16, 16), np.float32)}
  with pytest.raises(ConversionError, match="mixes the transformers 5.x in-memory key spelling"):
    hf_weights.swin_variables(mixed, module)


def test_config_does_not_match_weights(tiny, tmp_path):
  _, _, folder = tiny["shifted"]
  shutil.copy(f"{folder}/model.safetensors", tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "embed_dim": 24, "depths": [2, 3], "window_size": 5,
                                                    "num_heads": [2, 4]}))
  with pytest.raises(ConversionError) as info:
    hf_weights.load_swin(tmp_path)
  text = str(info.value)
  print(text)
  assert "does not match the Flax model" in text
  assert "encoder/layers_1/blocks_2/attention/self/query/kernel" in text  # missing (config 3 blocks, weights 2)
  assert "mis-shaped" in text
  assert "encoder.layers.0.blocks.0.attention.self.query.weight (16, 16)" in text and "expected (24, 24)" in text
  assert "encoder.layers.0.blocks.0.attention.self.relative_position_bias_table (49, 2)" in text
  assert "expected (81, 2)" in text
  (tmp_path / "config.json").write_text(json.dumps({**TINY, "use_absolute_embeddings": True}))
  with pytest.raises(ConversionError, match="1 missing:\n    params/embeddings/position_embeddings"):
    hf_weights.load_swin(tmp_path)
  with pytest.raises(ConversionError, match="no such model folder"):
    hf_weights.load_swin(tmp_path / "absent")


# --- real size ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_swin_base_forward(tmp_path):
  model = make_hf(BASE, seed=7)
  folder = save(model, tmp_path)
  x = np.random.RandomState(8).randn(1, 224, 224, 3).astype(np.float32)
  with torch.no_grad():
    want = model(nchw(x))
  module, variables = hf_weights.load_swin(folder)
  assert module.config == SwinConfig.from_hf_config(BASE)
  got = jax.jit(module.apply)(variables, x)
  for name in ("last_hidden_state", "pooler_output"):
    try:
      check(f"swin-base {name}", got[name], getattr(want, name).numpy(), rtol=1e-5)
    except AssertionError:  # the float64 noise-floor rule (tests/numerics.py), only where float32 misses 1e-5
      with torch.no_grad():
        exact = getattr(copy.deepcopy(model).double()(nchw(x, torch.float64)), name).numpy()
      check(f"swin-base {name}", got[name], getattr(want, name).numpy(), rtol=1e-5, exact=exact)
