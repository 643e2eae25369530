"""RadGen's hf tokenizer backend, pretrained HF folders, the public checkpoint through ``python -m rrg_jax.convert``
and generation with dropout (radgen_spec §2.3, §3.5, §3.6, §10), against transformers:

* targets ``<s> … </s> <pad>…`` = ``PreTrainedTokenizerFast`` with truncation / padding; decoder inputs =
  transformers' ``shift_tokens_right``;
* the host re-tokenisation (``retokenize = text``: BART decode → BERT; ``wrong_vocab``: BART ids decoded by BERT)
  = transformers' tokenizers on the same files; the word index that the report-attention picture sums over;
* eval pipeline (beam search → BART decode → BERT → fusion → class) = transformers ``generate`` + the tokenizers +
  the torch composition; the train-step text (``round_trip``) = transformers' greedy ``generate`` re-tokenised;
  the loss over BART labels = torch's;
* ``model.pretrained`` folders written by ``save_pretrained`` load (widths from their config.json), and a misfit
  is refused naming the folder; the convert CLI with ``--config.data.report_tokenizer``;
* ``train.generation.deterministic = False``: dropout during generation, deterministic per key;
* the train / generate CLIs end to end on the embedded sample with the hf backend and pretrained folders.

Tokenizers and weights are made in the test (``train_subword`` on the sample's reports; random-init transformers
models), nothing is downloaded."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.bart.modeling_bart import shift_tokens_right

from configs import radgen as radgen_configs
from conftest import REPO
from input_pipeline import loader, subword
from numerics import check
from rrg_jax import checkpointing, convert, hf_weights, sharding
from rrg_jax.convert import ConversionError
from rrg_jax.models.radgen import RadGenSystem
from test_radgen import BATCH, LABELS, SAMPLE_WEIGHT, pixel_values, state_dict, torch_model, without_dropout
from torch_reference import radgen as torch_radgen
from torch_reference.radgen_model import RadGenTorch

TEXT = 20  # radgen_tiny's text_max_tokens
BPE, WORDPIECE = 1000, 200  # the test tokenizers' vocabularies
SEQ = 60   # data.max_seq_length = the decoder length (hf backend)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
  """A BART-style BPE (BPE ids) and a BERT-style WordPiece (WORDPIECE ids) tokenizer trained on the sample's train
  reports, saved as folders."""
  root = tmp_path_factory.mktemp("radgen_hf")
  texts = [r.report for r in loader.load_records(radgen_configs.get_config("radgen_tiny"), "train")]
  subword.train_subword(texts, "bpe", BPE).save(root / "bart_tok")
  subword.train_subword(texts, "wordpiece", WORDPIECE).save(root / "bert_tok")
  return {"bart": root / "bart_tok", "bert": root / "bert_tok", "root": root}


def hf_config(files, *, dropout: bool = False, **overrides):
  c = radgen_configs.get_config("radgen_tiny")
  c.data.report_tokenizer, c.data.text_tokenizer = str(files["bart"]), str(files["bert"])
  c.data.max_seq_length = SEQ
  if not dropout:
    without_dropout(c.model)
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = c[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
  c.model.vocab_size = BPE
  return c


def fast(path: pathlib.Path, **specials) -> transformers.PreTrainedTokenizerFast:
  return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / subword.TOKENIZER_FILE), **specials)


@pytest.fixture(scope="module")
def hf_tokenizers(files):
  return (fast(files["bart"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
          fast(files["bert"], pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]"))


def hf_batch(system: RadGenSystem) -> dict[str, np.ndarray]:
  """The first BATCH val records of the sample through the loader (hf targets), labels / weights of the tests."""
  batch = next(iter(loader.eval_batches(system.config, loader.build_tokenizer(system.config), "val")))
  out = {k: batch[k][:BATCH] for k in system.batch_fields(train=False)}
  out.update(labels=LABELS, sample_weight=SAMPLE_WEIGHT)
  return out


def test_targets_and_decoder_inputs_are_barts(files, hf_tokenizers):
  system = RadGenSystem(hf_config(files))
  bart_fast, _ = hf_tokenizers
  reports = [r.report for r in loader.load_records(system.config, "val")][:BATCH]
  batch = hf_batch(system)
  want = bart_fast(reports, truncation=True, max_length=SEQ, padding="max_length", return_tensors="np")
  np.testing.assert_array_equal(batch["targets"], want["input_ids"])
  np.testing.assert_array_equal(batch["masks"], want["attention_mask"])
  assert (batch["targets"][:, 0] == 0).all() and (batch["targets"] == 1).any()  # <s> first, some <pad>
  inputs, labels, counted = system.report_io(jax.tree.map(jnp.asarray, batch))
  np.testing.assert_array_equal(inputs, shift_tokens_right(torch.from_numpy(want["input_ids"]), 1, 2).numpy())
  np.testing.assert_array_equal(labels, batch["targets"])
  np.testing.assert_array_equal(counted, batch["masks"])
  assert system.decoder_length == SEQ and system.tokens == (2, 2, 1, 0)


def test_host_text_ids_text_and_wrong_vocab(files, hf_tokenizers):
  """Decoder rows ``</s> <s> w.. </s> <pad>..`` → BERT ids as transformers' tokenizers give them; ``wrong_vocab``:
  the BART ids decoded by BERT (ids ≥ WORDPIECE and BERT's specials vanish); the word index of each text token."""
  bart_fast, bert_fast = hf_tokenizers
  texts = ["Heart size is normal. No focal consolidation, effusion or pneumothorax.",
           "Bilateral patchy opacities; findings concerning for pneumonia.", "", "The lungs are clear."]
  rows = np.full((len(texts), 30), 1, np.int32)
  for b, t in enumerate(texts):
    ids = [2] + bart_fast(t, truncation=True, max_length=29)["input_ids"]
    rows[b, :len(ids)] = ids
  for retokenize in ("text", "wrong_vocab"):
    system = RadGenSystem(hf_config(files, **{"train.generation.retokenize": retokenize}))
    ids, mask, words = system.host_text_ids(rows)
    for b, row in enumerate(rows.tolist()):
      text = (bart_fast.decode(row, skip_special_tokens=True) if retokenize == "text" else
              bert_fast.decode([i for i in row if i < WORDPIECE], skip_special_tokens=True))
      want = bert_fast(text, truncation=True, max_length=TEXT, padding="max_length")
      np.testing.assert_array_equal(ids[b], want["input_ids"])
      np.testing.assert_array_equal(mask[b], want["attention_mask"])
      if retokenize == "text":
        assert text == texts[b]
        pieces = bert_fast.convert_ids_to_tokens(want["input_ids"])
        last = int(words[b].max())  # the text is cut at TEXT tokens: the words up to the last one kept
        assert 0 <= last < len(text.split()) or not text
        for w, word in enumerate(text.split()[:last + 1]):
          joined = "".join(p.removeprefix("##") for p, i in zip(pieces, words[b]) if i == w)
          assert joined and (joined == word.lower() or w == last and word.lower().startswith(joined)), (word, joined)
      else:
        assert words is None and text != texts[b] or not texts[b]


@pytest.fixture(scope="module")
def twin(files):
  """The dropout-free hf tiny system, a torch twin (transformers' BART / BERT with the tokenizers' vocabularies) and
  its converted variables."""
  system = RadGenSystem(hf_config(files))
  assert (system.config.model.bart.vocab_size, system.config.model.bert.vocab_size) == (BPE, WORDPIECE)
  reference = torch_model(system, seed=4)
  return system, reference, jax.tree.map(jnp.asarray, system.torch_to_variables(state_dict(reference), "twin"))


def torch_text(reference, images, system, hf_tokenizers, num_beams: int) -> tuple[np.ndarray, np.ndarray]:
  """transformers' ``generate`` with BART's settings (§3.5), decoded with the BART tokenizer and re-encoded by
  BERT (§3.6)."""
  bart_fast, bert_fast = hf_tokenizers
  tokens = reference.generate(images, max_length=SEQ, num_beams=num_beams, do_sample=False, decoder_start_token_id=2,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1, forced_bos_token_id=0,
                              forced_eos_token_id=2,
                              no_repeat_ngram_size=int(system.config.decode.no_repeat_ngram_size),
                              length_penalty=1.0, early_stopping=True, min_length=0).numpy()
  texts = [bart_fast.decode(t, skip_special_tokens=True) for t in tokens]
  enc = bert_fast(texts, truncation=True, max_length=TEXT, padding="max_length", return_tensors="np")
  return tokens, enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def test_generate_and_round_trip_match_transformers(twin, hf_tokenizers):
  """Eval (``generate``, beam 2): tokens, class probabilities; training (``round_trip``, greedy): the text ids; the
  train loss over BART labels with those ids = torch's."""
  system, reference, variables = twin
  batch = hf_batch(system)
  images = pixel_values(batch)
  out = jax.device_get(system.generate(variables, {k: jnp.asarray(v) for k, v in batch.items()}))
  tokens, ids, mask = torch_text(reference, images, system, hf_tokenizers, num_beams=2)
  assert len({tuple(t) for t in tokens}) > 1
  np.testing.assert_array_equal(out["tokens"][:, :tokens.shape[1] - 1], tokens[:, 1:])
  with torch.no_grad():
    decoder_inputs = shift_tokens_right(torch.from_numpy(batch["targets"]).long(), 1, 2)
    want = reference(images, decoder_inputs, torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
  check("radgen hf generate probs", out["probs"], torch.softmax(want["class_logits"], -1).numpy(), rtol=1e-5)

  mesh = sharding.create_mesh((2,))
  global_batch = loader.to_global_batch(system.device_batch(batch), mesh)
  text = system.round_trip(variables, global_batch, jax.random.key(0))
  _, want_ids, want_mask = torch_text(reference, images, system, hf_tokenizers, num_beams=1)
  np.testing.assert_array_equal(text["text_ids"], want_ids)
  np.testing.assert_array_equal(text["text_mask"], want_mask)

  full = {**batch, **text}
  out = system.forward(variables, full, train=True, rngs={"dropout": jax.random.key(1)})
  loss, parts = system.loss(jax.tree.map(lambda x: x.astype(jnp.float32), out), full)
  train_twin = RadGenTorch(system.config.model, dropout=False)  # train mode with every dropout at 0
  train_twin.load_state_dict(reference.state_dict())
  with torch.no_grad():
    got = train_twin.train()(images, decoder_inputs, torch.from_numpy(want_ids).long(),
                             torch.from_numpy(want_mask).long())
  cls = torch_radgen.weighted_cross_entropy(got["class_logits"], torch.from_numpy(LABELS).long(),
                                            torch.tensor([8.0, 1.0, 3.2]), torch.from_numpy(SAMPLE_WEIGHT))
  logits = got["report_logits"]
  ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         torch.from_numpy(batch["targets"]).long().reshape(-1), reduction="none")
  counted = torch.from_numpy(batch["masks"] * SAMPLE_WEIGHT[:, None]).reshape(-1)
  want_loss = cls + 0.3 * (ce * counted).sum() / counted.sum()
  np.testing.assert_allclose(float(loss), want_loss.item(), rtol=1e-5)
  print(f"PARITY radgen hf train loss: jax {float(loss):.8f} torch {want_loss.item():.8f}")


def test_generation_with_dropout(files):
  """``deterministic = False``: with every rate 0 the tokens are the deterministic ones; with dropout 0.5 they
  depend on the key only (same key, same tokens; keys differ → some row differs)."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 1, 56, 56, 3)), jnp.float32)

  def tokens(system, key, deterministic):
    variables = system.init(jax.random.key(3))
    generate = system._generate_tokens  # pylint: disable=protected-access
    return np.asarray(generate(variables, images, key, num_beams=1, deterministic=deterministic))

  quiet = RadGenSystem(hf_config(files))
  np.testing.assert_array_equal(tokens(quiet, jax.random.key(0), False), tokens(quiet, None, True))
  noisy = RadGenSystem(hf_config(files, dropout=True, **{"model.bart.dropout": 0.5}))
  a, b = tokens(noisy, jax.random.key(0), False), tokens(noisy, jax.random.key(0), False)
  np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, tokens(noisy, jax.random.key(k), False)) for k in range(1, 4))


def save_tiny_hf_models(root: pathlib.Path, config, bert_vocab: int = WORDPIECE) -> dict[str, str]:
  """Random-init transformers Swin / BART / BERT at radgen_tiny's widths, ``save_pretrained`` (safetensors)."""
  m = config.model
  torch.manual_seed(0)
  swin = transformers.SwinModel(transformers.SwinConfig(
      image_size=56, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=7))
  bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
      vocab_size=BPE, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=bert_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=128))
  out = {}
  for name, model in (("image_encoder", swin), ("decoder", bart), ("text_encoder", bert)):
    model.save_pretrained(root / name)
    out[name] = str(root / name)
  assert m.swin.image_size == 56
  return out


def test_pretrained_folders_load(files, tmp_path):
  folders = save_tiny_hf_models(tmp_path, hf_config(files))
  config = hf_config(files)
  config.model.swin.window_size = 4  # read back from the folder's config.json
  for k, v in folders.items():
    config.model.pretrained[k] = v
  system = RadGenSystem(config)
  assert system.config.model.swin.window_size == 7
  fresh = jax.device_get(system.init(jax.random.key(0)))
  loaded = system.load_pretrained(fresh)
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["decoder"],
               hf_weights.load_bart(folders["decoder"])[1]["params"])
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["image_encoder"],
               hf_weights.load_swin(folders["image_encoder"], add_pooling_layer=False)[1]["params"])
  bert = hf_weights.load_bert(folders["text_encoder"])[1]["params"]
  assert "pooler" in bert and "pooler" not in loaded["params"]["text_encoder"]
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["text_encoder"],
               {k: v for k, v in bert.items() if k != "pooler"})
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["fusion"], fresh["params"]["fusion"])
  assert not np.array_equal(loaded["params"]["decoder"]["shared"]["embedding"],
                            fresh["params"]["decoder"]["shared"]["embedding"])

  other = tmp_path / "other"
  bad = save_tiny_hf_models(other, hf_config(files), bert_vocab=150)["text_encoder"]
  config = hf_config(files)
  config.model.pretrained.text_encoder = bad
  system = RadGenSystem(config)
  with pytest.raises(ConversionError, match=f"{bad}: its text_encoder weights do not fit"):
    system.load_pretrained(jax.device_get(system.init(jax.random.key(0))))


def test_convert_cli_with_the_hf_backend(twin, files, tmp_path):
  """A public-layout state_dict of BPE / WordPiece vocabularies (BPE / WORDPIECE) through ``python -m rrg_jax.convert``
  with ``--config.data.*`` overrides: the checkpoint holds the BART tokenizer and the converted variables."""
  system, reference, variables = twin
  path = tmp_path / "best_radgen_fold4.pth"
  torch.save(reference.state_dict(), path)
  config_file = tmp_path / "radgen_hf.py"
  config_file.write_text(
      "from configs import radgen\n\ndef get_config():\n  c = radgen.get_config('radgen_tiny')\n"
      + "".join(f"  c.model.{k} = 0.0\n" for k in ("classifier_dropout", "fusion_dropout")) + "  return c\n")
  out = tmp_path / "converted"
  rc = convert.main(["--torch", str(path), "--config", str(config_file), "--out", str(out),
                     f"--config.data.report_tokenizer={files['bart']}", f"--config.data.text_tokenizer={files['bert']}",
                     f"--config.data.max_seq_length={SEQ}"])
  assert rc == 0
  config, loaded, tokenizer = checkpointing.load_inference(out)
  assert isinstance(tokenizer, subword.SubwordTokenizer) and tokenizer.vocab_size == BPE
  assert config.data.report_tokenizer == str(files["bart"])
  jax.tree.map(np.testing.assert_allclose, loaded["params"]["fusion"], jax.device_get(variables["params"]["fusion"]))
  word = radgen_configs.get_config("radgen_tiny")
  with pytest.raises(ConversionError, match="hf tokenizer backend"):
    RadGenSystem.complete_config_from_torch(word, convert.load_state_dict(path), str(path))


@pytest.mark.slow
def test_train_and_generate_cli_on_the_sample(files, tmp_path):
  """``radgen_tiny`` with the hf backend and pretrained HF folders on the embedded sample through ``rrg_jax.train``
  (1 epoch; val on its first 4 records — the sample's val split has no Normal study: that AUC is null) and
  ``rrg_jax.generate``: the train loop's round trip, classification and report scores in metrics.jsonl, ROC /
  confusion PNGs, reports with a predicted class, a best/ model whose generate output names one class and draws
  the fusion's attention over the report's words."""
  from rrg_jax import train  # pylint: disable=g-import-not-at-top
  from test_train import _train_cli  # pylint: disable=g-import-not-at-top

  folders = save_tiny_hf_models(tmp_path / "hf", hf_config(files))
  workdir = tmp_path / "run"
  r = _train_cli(tmp_path, workdir, "--config.train.eval_splits=('val',)", f"--config.data.max_seq_length={SEQ}",
                 f"--config.data.report_tokenizer={files['bart']}", f"--config.data.text_tokenizer={files['bert']}",
                 *(f"--config.model.pretrained.{k}={v}" for k, v in folders.items()), name="radgen")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / train.METRICS_FILE).read_text().splitlines()]
  epoch = next(row for row in rows if row["kind"] == "epoch")
  assert epoch["step"] == -(-147 // 4)  # the last partial batch is kept (padded)
  assert {"train_cls", "train_report", "val_macro_auc", "val_macro_f1", "val_accuracy", "val_BLEU_4",
          "val_confusion_2_2", "val_sensitivity_COVID-19"} <= set(epoch)
  assert epoch["val_auc_Normal"] is None and epoch["val_sensitivity_Normal"] is None
  assert sum(v for k, v in epoch.items() if k.startswith("val_confusion_")) == 4
  assert epoch["score"] == epoch["val_macro_auc"]
  for name in ("val_epoch001_roc.png", "val_epoch001_confusion.png"):
    assert (workdir / train.PLOTS_DIR / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  reports = [json.loads(x) for x in (workdir / train.REPORTS_DIR / "val_epoch001.jsonl").read_text().splitlines()]
  names = ["Normal", "COVID-19", "Other pneumonia"]
  assert len(reports) == 4 and all(list(x["probabilities"]) == names for x in reports)
  assert all(x["prediction"] == max(x["probabilities"], key=x["probabilities"].get) for x in reports)
  assert (workdir / checkpointing.VOCAB_FILE).is_file() and (workdir / subword.TOKENIZER_FILE).is_file()

  image = sorted((REPO / "input_pipeline" / "sample_data" / "images").glob("*/0.jpg"))[0]
  g = subprocess.run([sys.executable, "-m", "rrg_jax.generate", "--checkpoint", str(workdir), "--image", str(image),
                      "--out", str(tmp_path / "out"), "--json"], cwd=REPO, capture_output=True, text=True)
  assert g.returncode == 0, g.stderr[-3000:]
  result = json.loads(g.stdout.strip().splitlines()[-1])
  assert result["prediction"] in names and sum(result["findings"].values()) == pytest.approx(1.0, abs=1e-5)
  assert result["prediction"] == max(result["findings"], key=result["findings"].get)
  if result["report"]:
    assert (tmp_path / "out" / "report_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
