"""rrg_jax.convert: .pth reading (safe), the naming rule, refusals, torchvision DenseNet spellings, the CLI."""

from __future__ import annotations

import json
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config
from rrg_jax import convert, models
from torch_reference import camanet as ref


def _np_state_dict(module: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in module.state_dict().items()}


def _densenet_shapes(growth: int, blocks, init: int, bn_size: int) -> dict:
  """Flax variable shapes of the backbone written out from spec §3/§11.1 (independent of the naming rule)."""
  params, stats = {}, {}

  def bn(tree_p, tree_s, name, c):
    tree_p[name] = {"scale": (c,), "bias": (c,)}
    tree_s[name] = {"mean": (c,), "var": (c,)}

  params["conv0"] = {"kernel": (7, 7, 3, init)}
  bn(params, stats, "norm0", init)
  c = init
  for b, n in enumerate(blocks, start=1):
    pb, sb = params.setdefault(f"denseblock{b}", {}), stats.setdefault(f"denseblock{b}", {})
    for i in range(1, n + 1):
      pl, sl = pb.setdefault(f"denselayer{i}", {}), sb.setdefault(f"denselayer{i}", {})
      bn(pl, sl, "norm1", c)
      pl["conv1"] = {"kernel": (1, 1, c, bn_size * growth)}
      bn(pl, sl, "norm2", bn_size * growth)
      pl["conv2"] = {"kernel": (3, 3, bn_size * growth, growth)}
      c += growth
    if b < len(blocks):
      pt, st = params.setdefault(f"transition{b}", {}), stats.setdefault(f"transition{b}", {})
      bn(pt, st, "norm", c)
      pt["conv"] = {"kernel": (1, 1, c, c // 2)}
      c //= 2
  bn(params, stats, "norm5", c)
  as_struct = lambda t: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), t,  # noqa: E731
                                     is_leaf=lambda x: isinstance(x, tuple))
  return {"params": {"visual_extractor": {"model": as_struct(params)}},
          "batch_stats": {"visual_extractor": {"model": as_struct(stats)}}}


class _Small(nn.Module):
  """One of each layer kind, under CAMANet-like names."""

  def __init__(self):
    super().__init__()
    self.conv0 = nn.Conv2d(3, 4, 3, bias=False)
    self.norm0 = nn.BatchNorm2d(4)
    self.linears = nn.ModuleList([nn.Linear(5, 6), nn.Linear(6, 2)])
    self.tgt_embed = nn.Sequential(nn.Embedding(7, 5))
    self.ln = ref.LayerNorm(5)


_SMALL_EXPECTED = {
    "params": {"conv0": {"kernel": (3, 3, 3, 4)}, "norm0": {"scale": (4,), "bias": (4,)},
               "linears_0": {"kernel": (5, 6), "bias": (6,)}, "linears_1": {"kernel": (6, 2), "bias": (2,)},
               "tgt_embed_0": {"embedding": (7, 5)}, "ln": {"gamma": (5,), "beta": (5,)}},
    "batch_stats": {"norm0": {"mean": (4,), "var": (4,)}},
}


def _structs(tree):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture
def small(tmp_path):
  torch.manual_seed(0)
  m = _Small()
  ref.randomize_norms_(m, torch.Generator().manual_seed(1))
  return m


def test_flax_path_naming_rule():
  assert convert.flax_path("encoder_decoder.model.encoder.layers.0.self_attn.linears.1.weight") == (
      ("encoder_decoder", "model", "encoder", "layers_0", "self_attn", "linears_1"), "weight")
  assert convert.flax_path("encoder_decoder.att_embed.0.bias") == (("encoder_decoder", "att_embed_0"), "bias")
  assert convert.flax_path("encoder_decoder.model.tgt_embed.0.lut.weight")[0] == (
      "encoder_decoder", "model", "tgt_embed_0", "lut")
  assert convert.flax_path("x.norm.mlp_gamma.0.weight")[0] == ("x", "norm", "mlp_gamma_0")


@pytest.mark.parametrize("wrapped", [False, True])
def test_small_round_trip_computes_like_torch(small, tmp_path, wrapped):
  path = tmp_path / "m.pth"
  sd = small.state_dict()
  torch.save({"state_dict": sd, "epoch": 3, "monitor_best": 0.5} if wrapped else sd, path)
  v = convert.state_dict_to_variables(convert.load_state_dict(path), _structs(_SMALL_EXPECTED))
  p, s = v["params"], v["batch_stats"]
  x = torch.randn(2, 3, 6, 6)
  y = jax.lax.conv_general_dilated(jnp.asarray(x.permute(0, 2, 3, 1).numpy()), p["conv0"]["kernel"], (1, 1),
                                   "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(y), small.conv0(x).permute(0, 2, 3, 1).detach().numpy(), atol=1e-5)
  h = torch.randn(3, 5)
  out = (h.numpy() @ p["linears_0"]["kernel"] + p["linears_0"]["bias"]) @ p["linears_1"]["kernel"] + p[
      "linears_1"]["bias"]
  np.testing.assert_allclose(out, small.linears[1](small.linears[0](h)).detach().numpy(), atol=1e-5)
  np.testing.assert_array_equal(p["tgt_embed_0"]["embedding"], small.tgt_embed[0].weight.detach().numpy())
  np.testing.assert_array_equal(p["norm0"]["scale"], small.norm0.weight.detach().numpy())
  np.testing.assert_array_equal(p["norm0"]["bias"], small.norm0.bias.detach().numpy())
  np.testing.assert_array_equal(s["norm0"]["mean"], small.norm0.running_mean.numpy())
  np.testing.assert_array_equal(s["norm0"]["var"], small.norm0.running_var.numpy())
  np.testing.assert_array_equal(p["ln"]["gamma"], small.ln.gamma.detach().numpy())
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(v))


def test_refusal_lists_every_missing_unexpected_and_misshaped_key(small):
  sd = _np_state_dict(small)
  sd["extra.layer.weight"] = np.zeros((2, 2), np.float32)
  sd["linears.1.weight"] = np.zeros((3, 6), np.float32)
  del sd["norm0.running_var"]
  expected = dict(_SMALL_EXPECTED, params=dict(_SMALL_EXPECTED["params"], head={"kernel": (5, 2)}))
  with pytest.raises(convert.ConversionError) as e:
    convert.state_dict_to_variables(sd, _structs(expected), "ckpt.pth")
  msg = str(e.value)
  assert "ckpt.pth" in msg
  for needle in ("2 missing", "batch_stats/norm0/var", "params/head/kernel", "1 unexpected", "extra.layer.weight",
                 "1 mis-shaped", "linears.1.weight (3, 6)", "expected (6, 2)"):
    assert needle in msg, (needle, msg)


def test_skipped_buffers_and_dataparallel_prefix(small, tmp_path):
  sd = {f"module.{k}": v for k, v in small.state_dict().items()}
  sd["module.norm0.num_batches_tracked"] = torch.tensor(5)
  sd["module.enc.tgt_embed.1.pe"] = torch.zeros(1, 10, 5)
  sd["module.fore_back_learn.norm.gamma"] = torch.ones(5)
  torch.save(sd, tmp_path / "dp.pth")
  v = convert.state_dict_to_variables(convert.load_state_dict(tmp_path / "dp.pth"), _structs(_SMALL_EXPECTED))
  np.testing.assert_array_equal(v["params"]["ln"]["beta"], small.ln.beta.detach().numpy())


def test_truncated_file_is_refused_naming_it(small, tmp_path):
  path = tmp_path / "trunc.pth"
  torch.save(small.state_dict(), path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match="trunc.pth"):
    convert.load_state_dict(path)


class _Hostile:
  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused_without_running_code(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Hostile(marker)}, path)
  with pytest.raises(convert.ConversionError, match="evil.pth was refused"):
    convert.load_state_dict(path)
  assert not marker.exists()
  path.write_bytes(pickle.dumps(_Hostile(marker)))  # a bare pickle, not a torch zip
  with pytest.raises(convert.ConversionError, match="evil.pth was refused"):
    convert.load_state_dict(path)
  assert not marker.exists()


def test_non_state_dict_and_missing_file(tmp_path):
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(convert.ConversionError, match="not a state_dict"):
    convert.load_state_dict(tmp_path / "list.pth")
  with pytest.raises(convert.ConversionError, match="no such file"):
    convert.load_state_dict(tmp_path / "absent.pth")


def _old_spelling(key: str) -> str:
  for name in ("norm", "relu", "conv"):
    for i in ("1", "2"):
      key = key.replace(f".{name}{i}.", f".{name}.{i}.")
  return key


@pytest.mark.parametrize("old", [False, True])
def test_torchvision_densenet_spellings(tmp_path, old):
  c = tiny_config().model
  torch.manual_seed(0)
  feats, _ = ref.densenet_features(c.growth_rate, tuple(c.block_config), c.num_init_features, c.bn_size)
  ref.randomize_norms_(feats, torch.Generator().manual_seed(2))
  sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
  sd["classifier.weight"], sd["classifier.bias"] = torch.zeros(1000, 17), torch.zeros(1000)
  if old:
    sd = {_old_spelling(k): v for k, v in sd.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
  torch.save(sd, tmp_path / "densenet.pth")
  shapes = _densenet_shapes(c.growth_rate, c.block_config, c.num_init_features, c.bn_size)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  zeros["params"]["visual_extractor"]["head"] = {"bias": np.ones(5, np.float32)}
  zeros["params"]["encoder_decoder"] = {"logit": {"bias": np.ones(3, np.float32)}}
  v = convert.load_torchvision_densenet(tmp_path / "densenet.pth", zeros)
  np.testing.assert_array_equal(v["params"]["visual_extractor"]["head"]["bias"], 1.0)  # untouched
  np.testing.assert_array_equal(v["params"]["encoder_decoder"]["logit"]["bias"], 1.0)
  bb = v["params"]["visual_extractor"]["model"]
  np.testing.assert_array_equal(bb["denseblock2"]["denselayer1"]["norm2"]["scale"],
                                feats.denseblock2.denselayer1.norm2.weight.detach().numpy())
  np.testing.assert_array_equal(bb["transition3"]["conv"]["kernel"][0, 0],
                                feats.transition3.conv.weight.detach().numpy()[:, :, 0, 0].T)
  np.testing.assert_array_equal(v["batch_stats"]["visual_extractor"]["model"]["norm5"]["var"],
                                feats.norm5.running_var.numpy())
  alone = convert.load_torchvision_densenet(tmp_path / "densenet.pth")  # train.py's form: backbone subtrees
  jax.tree.map(np.testing.assert_array_equal, alone,
               {c: v[c]["visual_extractor"]["model"] for c in ("params", "batch_stats")})
  sd.pop(next(k for k in sd if k.endswith("norm5.running_mean")))
  torch.save(sd, tmp_path / "broken.pth")
  with pytest.raises(convert.ConversionError, match="norm5/mean"):
    convert.load_torchvision_densenet(tmp_path / "broken.pth", zeros)


def test_missing_torch_gives_clear_error(monkeypatch, tmp_path):
  import builtins

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(convert.ConversionError, match="needs PyTorch"):
    convert.load_state_dict(tmp_path / "x.pth")


def test_reference_state_dict_layout_matches_spec():
  """The torch reference reproduces the official state_dict (spec §11): 957 entries, 42,421,383 parameters."""
  c = tiny_config("iu_xray").model
  full = type(c)(dict(c, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                      num_classes=14, vocab_size=761, d_model=512, d_ff=512, num_heads=8, num_layers=3,
                      rm_num_heads=8, rm_d_model=512, layer_id=2))
  sd = ref.CAMANet(full).state_dict()
  assert len(sd) == 957
  assert sum(k.startswith("visual_extractor.model.") for k in sd) == 725
  assert sum(v.numel() for k, v in sd.items() if not (k.endswith(("running_mean", "running_var", "pe"))
             or "num_batches" in k or k.startswith("fore_back_learn.norm."))) == 42_421_383
  assert sd["encoder_decoder.model.decoder.layers.2.sublayer.1.norm.mlp_gamma.0.weight"].shape == (512, 1536)
  assert sd["encoder_decoder.model.rm.W.weight"].shape == (1024, 512)
  assert sd["visual_extractor.model.denseblock3.denselayer24.conv1.weight"].shape == (128, 992, 1, 1)


REPORTS = ["the heart is normal .", "the lungs are clear .", "no effusion . the heart is enlarged .",
           "lungs are clear . no pneumothorax ."]


def _tiny_checkpoint(tmp_path, vocab_delta: int = 0):
  """A tiny torch reference whose vocabulary matches an annotation built here; returns (config, pth, annot)."""
  from input_pipeline.tokenizer import Tokenizer

  config = tiny_config()
  config.data.threshold = 1
  annotation = tmp_path / "annotation.json"
  annotation.write_text(json.dumps({"train": [{"id": str(i), "report": r, "image_path": ["x.png"],
                                               "split": "train"} for i, r in enumerate(REPORTS)],
                                    "val": [], "test": []}))
  config.model.vocab_size = Tokenizer.build(REPORTS, threshold=1, clean=config.data.clean).vocab_size + vocab_delta
  torch.manual_seed(0)
  model = ref.CAMANet(config.model)
  ref.randomize_norms_(model, torch.Generator().manual_seed(3))
  torch.save({"state_dict": model.state_dict(), "epoch": 7}, tmp_path / "model_best.pth")
  return config, model, tmp_path / "model_best.pth", annotation


def test_cli_writes_inference_checkpoint(tmp_path):
  from rrg_jax import checkpointing

  config, model, pth, annotation = _tiny_checkpoint(tmp_path)
  cfg_file = tmp_path / "tiny_cfg.py"
  cfg_file.write_text("from conftest import tiny_config\n\n\ndef get_config(preset=''):\n"
                      "  c = tiny_config()\n  c.data.threshold = 1\n  return c\n")
  assert convert.main(["--torch", str(pth), "--config", f"{cfg_file}:x", "--out", str(tmp_path / "ckpt"),
                       "--annotation", str(annotation)]) == 0
  loaded_config, variables, tokenizer = checkpointing.load_inference(tmp_path / "ckpt")
  assert loaded_config.model.vocab_size == config.model.vocab_size == tokenizer.vocab_size
  np.testing.assert_array_equal(np.asarray(variables["params"]["encoder_decoder"]["model"]["tgt_embed_0"]["lut"][
      "embedding"]), model.encoder_decoder.model.tgt_embed[0].lut.weight.detach().numpy())
  np.testing.assert_array_equal(
      np.asarray(variables["batch_stats"]["visual_extractor"]["model"]["denseblock4"]["denselayer1"]["norm1"][
          "var"]), model.visual_extractor.model.denseblock4.denselayer1.norm1.running_var.numpy())
  expected = models.get_system(config).abstract_variables()
  assert jax.tree.structure(expected) == jax.tree.structure(variables)
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(lambda x: np.shape(x), variables)


def test_vocab_size_mismatch_is_refused(tmp_path):
  config, _, pth, annotation = _tiny_checkpoint(tmp_path, vocab_delta=3)
  with pytest.raises(convert.ConversionError, match="output classes but the vocabulary"):
    convert.convert(pth, config, tmp_path / "out", annotation)


def test_flax_backbone_matches_spec_shapes():
  config = tiny_config()
  c = config.model
  want = _densenet_shapes(c.growth_rate, c.block_config, c.num_init_features, c.bn_size)
  got = models.get_system(config).abstract_variables()
  for col in ("params", "batch_stats"):
    assert jax.tree.map(lambda x: x.shape, got[col]["visual_extractor"]["model"]) == jax.tree.map(
        lambda x: x.shape, want[col]["visual_extractor"]["model"])
