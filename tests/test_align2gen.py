"""Align2Gen, the whole system: the official ``S2GenModel`` state_dict (dead classifier / BERT poolers dropped,
ResNet indices renamed) → the Flax model; parity with a torch Align2Gen of the official layout built from
``torch_reference.align2gen`` + HF ``transformers.BertModel`` + CAMANet's reference R2Gen encoder-decoder
(eval log-probs, GAB, LAB; train-mode loss, every gradient, the BatchNorm statistics); the masked empty slots;
the presets (§16.1 parameter count of ``mimic_cxr``); the separate embedding dropout draws (§7 item 3).

float32, highest matmul precision (tests/conftest.py). [RECON] parts (GAB, LAB, the fusion) are compared with the
spec's literal torch transcription, not with an original (there is none)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import conftest
from configs import align2gen as align2gen_config
from numerics import check
from rrg_jax import convert, models
from test_align2gen_blocks import check_grads, check_stats
from torch_reference import align2gen as ref
from torch_reference import camanet as camanet_ref
from torch_reference import r2gen as r2gen_ref
from torch_reference import resnet as resnet_ref
from torch_reference.batches import random_batch

B, M, T = 4, 3, 10


def tiny_align2gen_config(vocab_size: int = 30, dropout: float = 0.1):
  """conftest's tiny Align2Gen with a 50-id BERT vocabulary and the given BERT dropout."""
  c = conftest.tiny_align2gen_config(vocab_size)
  c.model.bert.update(vocab_size=50, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
  return c


def _batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Images, targets, regions (image 3 all empty, image 1 slot 2 empty), report and sentence ids (image 2: 1
  sentence; the LAB images are 0, 1, 2)."""
  rng = np.random.default_rng(seed)
  d = config.data
  batch = random_batch(config, rng.integers(4, T + 1, size=B), seed)  # images, targets, masks
  r = d.region_size
  regions = rng.normal(size=(B, M, r, r, 3)).astype(np.float32)
  valid = np.ones((B, M), bool)
  valid[3], valid[1, 2] = False, False
  regions[~valid] = np.float32(ref.PLACEHOLDER)
  tw, s, ts = d.text_max_tokens, d.max_sentences, d.sentence_max_tokens
  text_len = rng.integers(3, tw + 1, size=B)
  text_mask = (np.arange(tw)[None] < text_len[:, None]).astype(np.int32)
  n_sent = np.array([3, 2, 1, 2])
  s_len = rng.integers(2, ts + 1, size=(B, s))
  sentence_mask = ((np.arange(ts)[None, None] < s_len[..., None]) & (np.arange(s)[None, :, None] < n_sent[:, None, None])
                   ).astype(np.int32)
  vocab = config.model.bert.vocab_size
  return {**batch, "regions": regions, "region_valid": valid,
          "text_ids": (rng.integers(1, vocab, size=(B, tw)) * text_mask).astype(np.int32), "text_mask": text_mask,
          "sentence_ids": (rng.integers(1, vocab, size=(B, s, ts)) * sentence_mask).astype(np.int32),
          "sentence_mask": sentence_mask}


def _torch_model(config, seed: int = 0) -> ref.Align2Gen:
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  m = config.model
  bert = transformers.BertConfig(**{k: v for k, v in m.bert.items()})
  cfg = type("Cfg", (), {"depth": 18, "resnet_widths": tuple(m.resnet_widths),
                         "simple_widths": tuple(m.simple_widths), "lera": m.lera})
  model = ref.Align2Gen(cfg, bert, camanet_ref.EncoderDecoder(m, m.simple_widths[-1]), m.margin, m.lambda_softmax)
  for p in model.encoder_decoder.model.parameters():  # R2Gen's init: Xavier inside the transformer, MCLN biases 0.1
    if p.dim() > 1:
      torch.nn.init.xavier_uniform_(p)
  for mod in model.encoder_decoder.model.modules():
    if isinstance(mod, camanet_ref.ConditionalLayerNorm):
      for lin in (*mod.mlp_gamma, *mod.mlp_beta):
        if isinstance(lin, torch.nn.Linear):
          torch.nn.init.constant_(lin.bias, 0.1)
  gen = torch.Generator().manual_seed(seed)
  ref.randomize_(model.align.visual_extractor, gen)
  resnet_ref.scale_residual_bns_(model.align.visual_extractor.visual_extractor.model, 0.3)
  return model.eval()


def _official_state_dict(tmodel) -> dict[str, np.ndarray]:
  """The torch model's state_dict plus the dead modules the official one has (the global branch's classifier;
  HF's BertModel already brings both poolers)."""
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  assert "align.visual_extractor.visual_extractor.model.4.0.conv1.weight" in sd
  assert "align.text_extractor.bert.pooler.dense.weight" in sd
  sd["align.visual_extractor.visual_extractor.classifier.weight"] = np.zeros((14, 64), np.float32)
  sd["align.visual_extractor.visual_extractor.classifier.bias"] = np.zeros((14,), np.float32)
  return sd


def _torch_inputs(batch):
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  return (t["images"][:, 0].permute(0, 3, 1, 2).contiguous(), t["targets"].long(),
          t["regions"].permute(0, 1, 4, 2, 3).contiguous(), t["text_ids"].long(), t["text_mask"].long(),
          t["sentence_ids"].long(), t["sentence_mask"].long())


def _grads_to_flax(system, tmodel, params):
  grads = {k: p.grad.numpy() for k, p in tmodel.named_parameters() if p.grad is not None}
  return convert.state_dict_to_variables(system.rename_torch_keys(grads), {"params": params})["params"]


def test_whole_model_eval_and_train_match_torch():
  config = tiny_align2gen_config(dropout=0.0)
  config.model.lera = "ppa"  # the [RECON] LERA stand-in in the whole model too
  config.model.mask_empty_regions = False  # the torch reference concatenates without a source mask
  config.model.dropout = config.model.drop_prob_lm = config.model.lera_dropout = 0.0
  tmodel = _torch_model(config)
  system = models.get_system(config)
  variables = jax.tree.map(jnp.asarray, system.torch_to_variables(_official_state_dict(tmodel), "s2gen.pth"))
  assert "textlist_extractor" in variables["params"]["align"]
  batch = _batch(config)
  tin = _torch_inputs(batch)

  with torch.no_grad():
    want_lp, want_gab, want_lab = tmodel(*tin)
  out = jax.jit(lambda v, b: system.forward(v, b, train=False))(variables, batch)
  check("align2gen eval log-probs", out["logprobs"], want_lp.numpy(), atol=1e-4)
  check("align2gen eval GAB", out["gab"], want_gab.numpy(), rtol=1e-5)
  check("align2gen eval LAB", out["lab"], want_lab.numpy(), rtol=1e-5)
  assert float(want_gab) > 0 and float(want_lab) > 0  # both hinges active: the comparison means something

  # Train mode, every dropout 0: BatchNorm batch statistics (per-region in the lesion branch), loss, gradients.
  camanet_ref.set_dropout_(tmodel, 0.0)  # also the reference MHA's own p = 0.1 default
  tmodel.train()
  lp, gab, lab = tmodel(*tin)
  total = r2gen_ref.compute_loss(lp, tin[1], torch.from_numpy(batch["masks"])) + gab + lab
  total.backward()

  def loss_fn(params):
    outputs, state = system.forward({"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
                                    mutable=["batch_stats"])
    loss, parts = system.loss(outputs, batch)
    return loss, (parts, state["batch_stats"])
  (loss, (parts, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  check("align2gen train GAB", parts["gab"], gab.detach().numpy(), rtol=1e-5)
  check("align2gen train LAB", parts["lab"], lab.detach().numpy(), rtol=1e-5)
  check("align2gen train CE", parts["ce"], (total - gab - lab).detach().numpy(), rtol=1e-5)
  check("align2gen train loss", loss, total.detach().numpy(), rtol=1e-5)
  want_stats = convert.state_dict_to_variables(
      system.rename_torch_keys({k: v.detach().numpy() for k, v in tmodel.state_dict().items()
                                if "running_" in k}), {"batch_stats": variables["batch_stats"]})["batch_stats"]
  check_stats("align2gen train BN statistics", stats, want_stats)
  check_grads("align2gen train gradients", grads, _grads_to_flax(system, tmodel, variables["params"]), tol=1e-3)


def test_masked_empty_slots_equal_the_model_without_them():
  """mask_empty_regions: an image with an empty slot decodes exactly as the same image with that slot removed.
  (With one shared BERT and word-level LAB units, which leave the log-probs alone.)"""
  config = tiny_align2gen_config()
  config.model.share_bert = True
  config.model.lab_text_unit = "word"

  def forward(config):
    system = models.get_system(config)
    return jax.jit(lambda v, b: system.forward(v, b, train=False))
  system = models.get_system(config)
  variables = jax.jit(system.init)(jax.random.key(0))
  batch = _batch(config)
  out = forward(config)(variables, batch)
  assert np.isfinite(float(out["lab"])) and float(out["lab"]) > 0
  fewer = tiny_align2gen_config()
  fewer.data.max_boxes = M - 1
  fewer.model.share_bert = True
  short = {**batch, "regions": batch["regions"][:, :M - 1], "region_valid": batch["region_valid"][:, :M - 1]}
  out_short = forward(fewer)(variables, short)
  # image 1 lost only an empty slot: identical; image 0 lost a valid region: different.
  check("masked empty slot", out["logprobs"][1], out_short["logprobs"][1], atol=1e-6)
  assert np.abs(np.asarray(out["logprobs"][0]) - np.asarray(out_short["logprobs"][0])).max() > 1e-3
  # unmasked (the code's concatenation), the 1e-8 placeholder token changes the output
  config.model.mask_empty_regions = False
  out_unmasked = forward(config)(variables, batch)
  assert np.abs(np.asarray(out_unmasked["logprobs"][1]) - np.asarray(out["logprobs"][1])).max() > 1e-4


def test_switches_build_the_matching_parameter_trees_and_fields():
  config = tiny_align2gen_config()
  config.model.share_bert = True
  system = models.get_system(config)
  tree = jax.eval_shape(system.init, jax.random.key(0))["params"]["align"]
  assert sorted(tree) == ["text_extractor", "visual_extractor"]
  assert "pooler" not in tree["text_extractor"]["bert"]
  assert set(system.batch_fields(train=False)) == {"images", "targets", "masks", "regions", "region_valid"}
  base = align2gen_config.get_config("base")
  base.model.vocab_size = 30
  system = models.get_system(base)
  assert system.forward_fields == ("images", "targets") and system.encode_fields == ("images",)
  tree = jax.eval_shape(system.init, jax.random.key(0))["params"]["align"]
  assert sorted(tree) == ["visual_extractor"] and sorted(tree["visual_extractor"]) == ["visual_extractor"]
  bad = tiny_align2gen_config()
  bad.data.features = ("report_texts",)
  with pytest.raises(ValueError, match="lesion boxes"):
    models.get_system(bad)


def test_mimic_cxr_parameter_count_of_spec_16_1():
  """The known blocks of §16.1 (312,601,664 + 1,025·V) without the two dead BERT poolers (768² + 768 each), plus
  the PPA(3, 3) LERA stand-in (480)."""
  config = align2gen_config.get_config("mimic_cxr")
  v = 761
  config.model.vocab_size = v
  config.model.bert.vocab_size = 30522
  variables = jax.eval_shape(models.get_system(config).init, jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert count == 312_601_664 - 2 * (768 * 768 + 768) + 480 + 1025 * v


def test_separate_embedding_dropout_draws_two_masks():
  """§7 item 3: with separate draws the relational memory and the decoder see different dropout masks of the
  target embedding (train), the same values in eval; one draw (CAMANet) gives the same logits as feeding the
  decoder that draw."""
  from rrg_jax.layers.transformer import MemoryDrivenTransformer, padded_causal_mask  # pylint: disable=g-import-not-at-top

  seq = jnp.asarray(np.random.default_rng(0).integers(1, 20, size=(2, 7)), jnp.int32)
  memory = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 32)), jnp.float32)
  outs = {}
  for separate in (False, True):
    model = MemoryDrivenTransformer(20, 32, 32, 4, 1, 0.5, 3, 4, 32, separate_embedding_dropout=separate)
    variables = model.init(jax.random.key(0), memory, seq, padded_causal_mask(seq), method="decode")
    rngs = {"dropout": jax.random.key(3)}
    train, _, emb = model.apply(variables, memory, seq, padded_causal_mask(seq), deterministic=False, rngs=rngs,
                                method="decode")
    evals = model.apply(variables, memory, seq, padded_causal_mask(seq), method="decode")[0]
    outs[separate] = (np.asarray(train), np.asarray(evals), np.asarray(emb))
  np.testing.assert_array_equal(outs[False][1], outs[True][1])
  assert np.abs(outs[False][0] - outs[True][0]).max() > 1e-3
  # the first draw is the same in both (fed to the RM); the decoder's differs under separate draws
  assert np.abs(outs[False][2] - outs[True][2]).max() > 1e-3


def test_convert_official_state_dict_then_evaluate_and_generate_with_boxes(tmp_path, capsys):
  """``python -m rrg_jax.convert`` on an official-layout ``.pth`` (vocabulary rebuilt from the sample's
  annotation, BERT vocabulary read from the state_dict) → an inference checkpoint that ``evaluate`` (lesion crops
  in the evaluation batches) and ``generate --boxes`` (boxes.png, words.png) run on; its eval log-probs equal
  the torch model's."""
  from rrg_jax import cli, evaluate, generate  # pylint: disable=g-import-not-at-top
  from rrg_jax.metrics import text  # pylint: disable=g-import-not-at-top

  sample = conftest.REPO / "input_pipeline" / "sample_data"
  config = tiny_align2gen_config()
  config.model.mask_empty_regions = False  # as the torch reference
  tokenizer = convert.build_tokenizer(sample / "annotation_boxes.json", config)
  config.model.vocab_size = tokenizer.vocab_size
  tmodel = _torch_model(config)
  torch.save(tmodel.state_dict(), tmp_path / "model_best.pth")
  config.model.bert.vocab_size = -1   # as the preset: to be read from the state_dict
  out = convert.convert(tmp_path / "model_best.pth", config, tmp_path / "ckpt", sample / "annotation_boxes.json")
  system, variables, _ = cli.load_checkpoint(str(out))
  assert system.config.model.bert.vocab_size == 50
  batch = _batch(system.config)
  got = jax.jit(lambda v, b: system.forward(v, b, train=False))(variables, batch)["logprobs"]
  with torch.no_grad():
    check("align2gen converted checkpoint", got, tmodel(*_torch_inputs(batch))[0].numpy(), atol=1e-4)

  java = text.java_available
  text.java_available = lambda: False  # METEOR (a JVM per call) is tested in test_metrics.py
  try:
    assert evaluate.main([f"--checkpoint={out}", "--split=test", "--no-progress",
                          "--config.train.max_eval_examples=3"]) == 0
  finally:
    text.java_available = java
  assert json.loads((out / "eval_test" / "metrics.json").read_text())["num_reports"] == 3
  records = json.loads((sample / "annotation_boxes.json").read_text())["test"]
  record = next(r for r in records if sum(b != [-1, -1, -1, -1] for b in r["boxes"]) >= 2)
  (tmp_path / "boxes.json").write_text(json.dumps({k: record[k] for k in ("boxes", "scores", "height", "width")}))
  capsys.readouterr()
  assert generate.main([f"--checkpoint={out}", f"--image={sample / 'images' / record['image_path'][0]}",
                        f"--boxes={tmp_path / 'boxes.json'}", f"--out={tmp_path / 'maps'}", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert pathlib.Path(result["heatmaps"]["boxes"]).read_bytes()[:4] == b"\x89PNG"
  (tmp_path / "bad.json").write_text(json.dumps({"boxes": [[0, 0, 5000, 10]], "height": 10, "width": 10}))
  assert generate.main([f"--checkpoint={out}", f"--image={sample / 'images' / record['image_path'][0]}",
                        f"--boxes={tmp_path / 'bad.json'}"]) == 2
  assert "is not inside the 10 x 10" in capsys.readouterr().err


def test_pretrained_resnet_and_bert_folders_load_into_their_branches(tmp_path):
  """``model.pretrained_backbone`` (a torchvision ResNet file) → ``align/visual_extractor/visual_extractor/model``;
  ``model.bert_pretrained`` (an HF folder saved by ``save_pretrained``) → both text branches, its config.json
  becoming ``model.bert``, pooler dropped."""
  import transformers  # pylint: disable=g-import-not-at-top

  config = tiny_align2gen_config()
  tnet = resnet_ref.ResNet(18, tuple(config.model.resnet_widths))
  torch.save(tnet.state_dict(), tmp_path / "resnet18.pth")
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(vocab_size=70, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32,
                                                      max_position_embeddings=32))
  hf.save_pretrained(tmp_path / "bert")
  config.model.pretrained_backbone = str(tmp_path / "resnet18.pth")
  config.model.bert_pretrained = str(tmp_path / "bert")
  system = models.get_system(config)
  assert system.config.model.bert.vocab_size == 70
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), system.abstract_variables())
  variables = system.load_pretrained(zeros)
  conv1 = variables["params"]["align"]["visual_extractor"]["visual_extractor"]["model"]["conv1"]["kernel"]
  np.testing.assert_array_equal(conv1, tnet.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  for branch in ("text_extractor", "textlist_extractor"):
    emb = variables["params"]["align"][branch]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(emb, hf.embeddings.word_embeddings.weight.detach().numpy())


def test_everything_off_is_exactly_the_r2gen_system():
  """``global_head=none``, no boxes, no GAB/LAB, ``fuse=patches_only``: the R2Gen system's log-probs (eval and
  train with dropout), loss and beam tokens for the same weights (its ``visual_extractor`` moved under
  ``align/visual_extractor``)."""
  config = conftest.tiny_r2gen_config(vocab_size=30)
  config.data.max_seq_length = T
  r2gen = models.get_system(config)
  r2gen_vars = jax.jit(r2gen.init)(jax.random.key(0))
  a2g_config = tiny_align2gen_config()
  a2g_config.data.features = ()
  m = a2g_config.model
  m.global_head, m.fuse, m.gab, m.lab = "none", "patches_only", False, False
  a2g = models.get_system(a2g_config)
  assert a2g.forward_fields == r2gen.forward_fields and a2g.encode_fields == ("images",)

  def moved(tree):  # batch_stats has no encoder_decoder
    return {"align": {"visual_extractor": {"visual_extractor": tree["visual_extractor"]}},
            **{k: v for k, v in tree.items() if k == "encoder_decoder"}}
  a2g_vars = {c: moved(r2gen_vars[c]) for c in ("params", "batch_stats")}
  assert jax.tree.structure(a2g_vars) == jax.tree.structure(a2g.abstract_variables())
  batch = {k: v for k, v in _batch(a2g_config).items() if k in ("images", "targets", "masks")}
  rngs = {"dropout": jax.random.key(5)}
  for system, variables in ((r2gen, r2gen_vars), (a2g, a2g_vars)):
    out = jax.jit(lambda v, b, s=system: s.forward(v, b, train=False))(variables, batch)
    train_out, _ = jax.jit(lambda v, b, s=system: s.forward(v, b, train=True, rngs=rngs, mutable=["batch_stats"]))(
        variables, batch)
    tokens = system.generate(variables, batch)["tokens"]
    if system is r2gen:
      want = (out["logprobs"], train_out["logprobs"], r2gen.loss(train_out, batch)[0], tokens)
  got = (out["logprobs"], train_out["logprobs"], a2g.loss(train_out, batch)[0], tokens)
  for name, g, w in zip(("eval log-probs", "train log-probs", "train loss", "beam tokens"), got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
