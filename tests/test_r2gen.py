"""R2Gen, the second registered system: official state_dict conversion (nn.Sequential ResNet keys), parity with a
torch R2Gen of the official layout (log-probs, loss, gradients, beam tokens), shapes of the real configs, and the
evaluate / generate CLIs on an R2Gen training workdir."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import REPO, tiny_r2gen_config
from rrg_jax import checkpointing, convert, evaluate, generate, models, train
from torch_reference import camanet as camanet_ref
from torch_reference import r2gen as ref
from torch_reference import resnet as resnet_ref

SAMPLE = REPO / "input_pipeline" / "sample_data"
EOS_BIAS = 2.0


def _torch_model(config, seed: int = 0, eos_bias: float = 0.0) -> ref.R2Gen:
  torch.manual_seed(seed)
  model = ref.R2Gen(config.model)
  camanet_ref.init_weights_(model)  # Xavier transformer, MCLN biases 0.1 (R2Gen's make_model init)
  gen = torch.Generator().manual_seed(seed)
  resnet_ref.randomize_norms_(model.visual_extractor.model, gen)
  resnet_ref.scale_residual_bns_(model.visual_extractor.model, 0.3)
  with torch.no_grad():  # a sharper output layer and a likelier EOS: beams that differ, reports that end
    model.encoder_decoder.logit.weight.mul_(6.0)
    model.encoder_decoder.logit.bias[0] += eos_bias
  return model.eval()


def _batch(config, b: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  d = config.data
  t = d.max_seq_length
  lengths = rng.integers(3, t + 1, size=b)
  targets = rng.integers(1, config.model.vocab_size, size=(b, t))
  masks = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  targets[:, 0] = 0
  targets[np.arange(b), lengths - 1] = 0
  targets = np.where(masks > 0, targets, 0).astype(np.int32)
  images = rng.normal(size=(b, d.num_views, d.image_size, d.image_size, 3)).astype(np.float32)
  return {"images": images, "targets": targets, "masks": masks}


def _to_flax(tmodel, config):
  system = models.get_system(config)
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  assert "visual_extractor.model.0.weight" in sd and "visual_extractor.model.4.0.conv1.weight" in sd  # official
  return system, jax.tree.map(jnp.asarray, system.torch_to_variables(sd, "r2gen.pth"))


@pytest.mark.parametrize("num_views", [1, 2])
def test_eval_logprobs_loss_and_train_gradients_match_torch(num_views):
  config = tiny_r2gen_config(num_views=num_views, vocab_size=30)
  config.data.max_seq_length = 12
  tmodel = _torch_model(config)
  system, variables = _to_flax(tmodel, config)
  batch = _batch(config)
  timages = torch.from_numpy(batch["images"].transpose(0, 1, 4, 2, 3).copy())
  ttargets = torch.from_numpy(batch["targets"]).long()
  with torch.no_grad():
    want = tmodel(timages, ttargets).numpy()
  got = np.asarray(system.forward(variables, batch, train=False)["logprobs"])
  assert got.shape == (3, 11, 30)
  diff = np.abs(got - want).max()
  print(f"R2Gen eval log-probs, views {num_views}: max abs diff {diff:.2e}")
  assert diff <= 1e-4
  # Train mode with dropout 0 (BN batch statistics): loss and every gradient leaf.
  config.model.dropout = config.model.drop_prob_lm = 0.0
  tmodel.train()
  for mod in tmodel.modules():
    if isinstance(mod, torch.nn.Dropout):
      mod.p = 0.0
  tloss = ref.compute_loss(tmodel(timages, ttargets), ttargets, torch.from_numpy(batch["masks"]))
  tloss.backward()
  system = models.get_system(config)

  def loss_fn(params):
    out, _ = system.forward({"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
                            mutable=["batch_stats"])
    return system.loss(out, batch)[0]

  loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
  assert float(loss) == pytest.approx(tloss.item(), rel=1e-5)
  tgrads = {k: p.grad.numpy() for k, p in tmodel.named_parameters()}
  flat = convert.state_dict_to_variables(system.rename_torch_keys(tgrads), {"params": system.abstract_variables()[
      "params"]})["params"]
  total = float(np.sqrt(sum(np.sum(np.square(t)) for t in jax.tree.leaves(flat))))
  worst = 0.0
  for (path, g), t in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(flat)):
    err = float(np.linalg.norm(np.asarray(g) - t))
    # Leaves whose exact gradient is 0 (attention key biases: softmax ignores a per-query constant) hold only
    # float32 round-off on both sides: they are held to 1e-6 of the whole gradient's norm instead.
    if np.linalg.norm(t) < 1e-6 * total:
      assert err <= 1e-6 * total, jax.tree_util.keystr(path)
      continue
    worst = max(worst, err / float(np.linalg.norm(t)))
    assert err <= 1e-4 * float(np.linalg.norm(t)), jax.tree_util.keystr(path)
  print(f"R2Gen train loss rel {abs(float(loss) / tloss.item() - 1):.1e}, worst gradient leaf {worst:.1e}")


@pytest.mark.parametrize("cached", [True, False])
def test_beam_search_tokens_match_the_official_algorithm(cached):
  config = tiny_r2gen_config(num_views=2, vocab_size=20)
  config.data.max_seq_length = 14
  tmodel = _torch_model(config, seed=1, eos_bias=EOS_BIAS)
  system, variables = _to_flax(tmodel, config)
  batch = _batch(config, b=4, seed=2)
  with torch.no_grad():
    want = camanet_ref.beam_search(tmodel, torch.from_numpy(batch["images"].transpose(0, 1, 4, 2, 3).copy()),
                                   config.data.max_seq_length, beam_size=3)
  config.decode.cached = cached
  got = np.asarray(models.get_system(config).generate(variables, {"images": batch["images"]})["tokens"]).tolist()
  got = [row[:row.index(0)] if 0 in row else row for row in got]
  assert got == want
  assert len({len(r) for r in want}) > 1  # reports of different lengths: the test can fail


def test_real_configs_shapes():
  """IU X-Ray: ResNet-101 on two 224² views → 98 patch tokens × 2048 → decoder memory (98, 512); MIMIC: 49."""
  from configs import r2gen  # pylint: disable=g-import-not-at-top

  for preset, tokens in (("iu_xray", 98), ("mimic_cxr", 49)):
    config = r2gen.get_config(preset)
    config.model.vocab_size = 761
    system = models.get_system(config)
    variables = system.abstract_variables()
    images = jax.ShapeDtypeStruct((1, config.data.num_views, 224, 224, 3), jnp.float32)
    enc = jax.eval_shape(lambda v, x: system.module.apply(v, x, method="encode"), variables, images)
    assert enc["patch_feats"].shape == (1, tokens, 2048) and enc["memory"].shape == (1, tokens, 512)
    assert variables["params"]["encoder_decoder"]["att_embed_0"]["kernel"].shape == (2048, 512)


def test_official_checkpoint_converts_and_refuses_a_camanet_one(tmp_path):
  config = tiny_r2gen_config(vocab_size=30)
  annotation = SAMPLE / "annotation.json"
  from rrg_jax.convert import build_tokenizer  # pylint: disable=g-import-not-at-top

  config.model.vocab_size = build_tokenizer(annotation, config).vocab_size
  tmodel = _torch_model(config)
  torch.save({"state_dict": tmodel.state_dict(), "epoch": 3}, tmp_path / "model_best.pth")
  out = convert.convert(tmp_path / "model_best.pth", config, tmp_path / "ckpt", annotation)
  loaded, variables, _ = checkpointing.load_inference(out)
  assert loaded.model.name == "r2gen"
  np.testing.assert_array_equal(variables["params"]["visual_extractor"]["model"]["layer3_1"]["conv2"]["kernel"],
                                tmodel.visual_extractor.model[6][1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
  # A CAMANet state_dict is not an R2Gen one: every differing key is listed.
  sd = {k: v for k, v in tmodel.state_dict().items() if not k.startswith("visual_extractor.model.7")}
  torch.save(sd, tmp_path / "partial.pth")
  with pytest.raises(convert.ConversionError, match=r"missing:[\s\S]*visual_extractor/model/layer4_0/conv1/kernel"):
    convert.convert(tmp_path / "partial.pth", config, tmp_path / "ckpt2", annotation)


@pytest.mark.slow
def test_train_evaluate_generate_on_an_r2gen_workdir(tmp_path, capsys):
  """The same CLIs as CAMANet's, unchanged: train (1 epoch, tiny), then evaluate and generate on its workdir."""
  from rrg_jax.metrics import text  # pylint: disable=g-import-not-at-top

  config = tiny_r2gen_config()
  config.data.max_seq_length = 12
  config.train.epochs = 1
  config.train.max_eval_examples = 4
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, workdir)
  assert (workdir / "best" / "variables").is_dir()
  rows = [json.loads(x) for x in (workdir / train.METRICS_FILE).read_text().splitlines()]
  epoch = next(r for r in rows if r["kind"] == "epoch")
  assert epoch["score"] == pytest.approx(epoch["val_BLEU_4"]) and epoch["improved"]  # R2Gen's monitor metric
  assert {"ce", "loss", "lr_ve", "lr_ed"} <= set(next(r for r in rows if r["kind"] == "train"))
  reports = [json.loads(x) for x in (workdir / train.REPORTS_DIR / "val_epoch001.jsonl").read_text().splitlines()]
  assert len(reports) == 4 and "probabilities" not in reports[0]
  java = text.java_available
  text.java_available = lambda: False  # METEOR (a JVM per call) is tested in test_metrics.py
  try:
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "test", "--no-progress",
                          "--config.train.max_eval_examples=3"]) == 0
  finally:
    text.java_available = java
  metrics = json.loads((workdir / "best" / "eval_test" / "metrics.json").read_text())
  assert metrics["num_reports"] == 3 and "BLEU_4" in metrics and not any(k.startswith("CLS_") for k in metrics)
  rows = [json.loads(x) for x in (workdir / "best" / "eval_test" / "reports.jsonl").read_text().splitlines()]
  assert len(rows) == 3 and "probabilities" not in rows[0]
  image = next((SAMPLE / "images").glob("*/0.jpg"))
  capsys.readouterr()
  assert generate.main(["--checkpoint", str(workdir), "--image", str(image), "--out", str(tmp_path / "maps"),
                        "--json", "--words", "2"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert "findings" not in result and "vdm" not in result["heatmaps"]
  if result["heatmap_words"]:
    assert pathlib.Path(result["heatmaps"]["words"]).read_bytes()[:4] == b"\x89PNG"


def test_pretrained_backbone_loads_a_local_torchvision_resnet(tmp_path):
  """``config.model.pretrained_backbone`` (System.load_pretrained): a torchvision-named ResNet file lands in
  ``visual_extractor/model``; nothing else changes; a missing file is a ConversionError naming it."""
  config = tiny_r2gen_config()
  tnet = resnet_ref.ResNet(18, tuple(config.model.resnet_widths))
  torch.save(tnet.state_dict(), tmp_path / "resnet18.pth")
  variables = jax.device_get(models.get_system(config).init(jax.random.key(0)))
  assert models.get_system(config).load_pretrained(variables) is variables  # "" = random init
  config.model.pretrained_backbone = str(tmp_path / "resnet18.pth")
  got = models.get_system(config).load_pretrained(variables)
  np.testing.assert_array_equal(got["params"]["visual_extractor"]["model"]["layer2_0"]["downsample_0"]["kernel"],
                                tnet.layer2[0].downsample[0].weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got["batch_stats"]["visual_extractor"]["model"]["bn1"]["var"],
                                tnet.bn1.running_var.numpy())
  for a, b in zip(jax.tree.leaves(got["params"]["encoder_decoder"]),
                  jax.tree.leaves(variables["params"]["encoder_decoder"])):
    np.testing.assert_array_equal(a, b)
  config.model.pretrained_backbone = str(tmp_path / "absent.pth")
  with pytest.raises(convert.ConversionError, match="absent.pth"):
    models.get_system(config).load_pretrained(variables)
