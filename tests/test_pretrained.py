"""rrg_jax.pretrained.load: one entry point for torchvision ResNets and local HF folders.

Tiny random weights written here (the ResNet with ``torch.save`` of ``tests/torch_reference/resnet.py``'s
state_dict, the HF models with ``save_pretrained``) and read back through the dispatcher; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rrg_jax import convert, hf_weights, pretrained  # noqa: E402
from rrg_jax.layers.bert import BertModel  # noqa: E402
from rrg_jax.layers.gpt2 import GPT2LMHeadModel  # noqa: E402
from rrg_jax.layers.resnet import ResNet  # noqa: E402
from torch_reference import resnet as ref  # noqa: E402

transformers = pytest.importorskip("transformers")
TINY_WIDTHS = (8, 16, 32, 64)


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _same_variables(a, b) -> None:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _holds(variables, array: np.ndarray) -> bool:
  """Whether some leaf equals ``array`` (up to a transpose for conv / linear kernels)."""
  array = np.asarray(array, np.float32)
  forms = [array, array.T] + ([array.transpose(2, 3, 1, 0)] if array.ndim == 4 else [])
  return any(leaf.shape == f.shape and np.array_equal(leaf, f) for leaf in _leaves(variables) for f in forms)


# --- fixtures -----------------------------------------------------------------------------------------------

def _resnet_file(folder, depth: int, seed: int = 0):
  torch.manual_seed(seed)
  model = ref.ResNet(depth, TINY_WIDTHS)
  ref.randomize_norms_(model, torch.Generator().manual_seed(seed))
  path = folder / f"resnet{depth}-tiny.pth"
  torch.save(model.state_dict(), path)
  return model.eval(), path


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
  return _resnet_file(tmp_path_factory.mktemp("resnet18"), 18)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
  return _resnet_file(tmp_path_factory.mktemp("resnet50"), 50)


def _hf_folder(tmp_path_factory, name, config_cls, model_cls, **config):
  torch.manual_seed(0)
  cfg = config_cls(**config)
  cfg._attn_implementation = "eager"
  model = model_cls(cfg).eval()
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  return _hf_folder(tmp_path_factory, "bert", transformers.BertConfig, transformers.BertModel, vocab_size=50,
                    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                    max_position_embeddings=16)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  return _hf_folder(tmp_path_factory, "gpt2", transformers.GPT2Config, transformers.GPT2LMHeadModel,
                    vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)


# --- round trips ----------------------------------------------------------------------------------------------

def test_resnet18_round_trip(resnet18):
  tmodel, path = resnet18
  module, variables = pretrained.load("resnet18", path)
  assert isinstance(module, ResNet) and module.depth == 18 and tuple(module.widths) == TINY_WIDTHS
  _same_variables(variables, pretrained.load_resnet(path)[1])
  assert set(variables) == {"params", "batch_stats"}
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = ref.features(tmodel)(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), False))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # widths pass through as an option; the kind's case and spaces do not matter.
  assert pretrained.load(" ResNet18 ", path, widths=TINY_WIDTHS)[0].depth == 18


def test_resnet50_round_trip(resnet50):
  _, path = resnet50
  module, variables = pretrained.load("resnet50", path)
  assert module.depth == 50
  _same_variables(variables, pretrained.load_resnet(path)[1])


def test_bert_round_trip(bert):
  model, folder = bert
  module, variables = pretrained.load("bert", folder)
  assert isinstance(module, BertModel)
  _same_variables(variables, hf_weights.load_bert(folder)[1])
  ids = np.random.default_rng(1).integers(0, 50, size=(2, 7))
  with torch.no_grad():
    want = model(torch.from_numpy(ids)).last_hidden_state.numpy()
  got = np.asarray(module.apply(variables, jnp.asarray(ids))["last_hidden_state"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  half, _ = pretrained.load("bert", folder, dtype=jnp.bfloat16)  # options reach the loader
  assert half.dtype == jnp.bfloat16


def test_gpt2_round_trip(gpt2):
  model, folder = gpt2
  module, variables = pretrained.load("gpt2", folder)
  assert isinstance(module, GPT2LMHeadModel)
  _same_variables(variables, hf_weights.load_gpt2(folder)[1])
  ids = np.random.default_rng(2).integers(0, 50, size=(2, 7))
  with torch.no_grad():
    want = model(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(module.apply(variables, jnp.asarray(ids))["logits"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  psa, psa_vars = pretrained.load("gpt2", folder, pseudo_self_attention=True, rng=jax.random.key(0))
  assert psa.pseudo_self_attention and "uk" in psa_vars["params"]["h_0"]["attn"]


@pytest.mark.skipif(not callable(getattr(hf_weights, "load_swin", None)), reason="hf_weights.load_swin absent")
def test_swin_round_trip(tmp_path_factory):
  model, folder = _hf_folder(tmp_path_factory, "swin", transformers.SwinConfig, transformers.SwinModel,
                             image_size=32, patch_size=4, window_size=4, embed_dim=8, depths=[1, 1],
                             num_heads=[1, 2])
  module, variables = pretrained.load("swin", folder)
  direct_module, direct = hf_weights.load_swin(folder)
  assert type(module) is type(direct_module)
  _same_variables(variables, direct)
  assert _holds(variables, model.embeddings.patch_embeddings.projection.weight.detach().numpy())


@pytest.mark.skipif(not callable(getattr(hf_weights, "load_bart", None)), reason="hf_weights.load_bart absent")
def test_bart_round_trip(tmp_path_factory):
  model, folder = _hf_folder(tmp_path_factory, "bart", transformers.BartConfig,
                             transformers.BartForConditionalGeneration, vocab_size=40, d_model=16,
                             encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                             max_position_embeddings=16)
  module, variables = pretrained.load("bart", folder)
  direct_module, direct = hf_weights.load_bart(folder)
  assert type(module) is type(direct_module)
  _same_variables(variables, direct)
  assert _holds(variables, model.model.shared.weight.detach().numpy())


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resnet34", "resnet50", "resnet152"])
def test_wrong_depth(resnet18, kind):
  _, path = resnet18
  with pytest.raises(convert.ConversionError, match=rf"ResNet-18 .*not the ResNet-{kind[6:]}.*'resnet18'"):
    pretrained.load(kind, path)


def test_bottleneck_file_is_not_a_basic_resnet(resnet50):
  _, path = resnet50
  with pytest.raises(convert.ConversionError, match="ResNet-50 .*Bottleneck.*not the ResNet-34"):
    pretrained.load("resnet34", path)


@pytest.mark.parametrize("kind", ["resnet", "resnet19", "vgg16", "swin-b", "", None, 18])
def test_unknown_kind(kind, tmp_path):
  with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101, resnet152, bert, gpt2, swin, bart"):
    pretrained.load(kind, tmp_path)


def test_bad_options_and_paths(resnet18, tmp_path):
  _, path = resnet18
  with pytest.raises(TypeError, match="'depth' is given by the kind"):
    pretrained.load("resnet18", path, depth=18)
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['dtype'\]"):
    pretrained.load("resnet18", path, dtype=jnp.bfloat16)
  with pytest.raises(convert.ConversionError, match="no such file"):
    pretrained.load("resnet18", tmp_path / "missing.pth")
  with pytest.raises(convert.ConversionError, match="no such model folder"):
    pretrained.load("bert", tmp_path / "missing")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(convert.ConversionError, match="junk.pth"):
    pretrained.load("resnet50", tmp_path / "junk.pth")


def test_loader_options_are_checked_against_its_signature(monkeypatch, tmp_path):
  calls = []

  def load_swin(folder, *, flag=False):
    calls.append((folder, flag))
    return "module", {"params": {}}

  monkeypatch.setattr(hf_weights, "load_swin", load_swin)
  assert pretrained.load("swin", tmp_path, flag=True) == ("module", {"params": {}})
  assert calls == [(tmp_path, True)]
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['other'\].*accepts \['flag'\]"):
    pretrained.load("swin", tmp_path, other=1)
