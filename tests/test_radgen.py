"""RadGen as a whole (rrg_jax.models.radgen; radgen_spec §3, §4, §10.4, §15.1) against the PyTorch composition of
transformers' Swin / BART / BERT and the torch fusion + classifier (``torch_reference/radgen_model.py``, the public
code's module tree and state_dict names), converted with ``RadGenSystem.torch_to_variables``:

* §15.1 parameter counts (shapes only);
* ``radgen_tiny`` eval forward (class logits, report logits, the fusion's attention over GIVEN text ids) and the
  train-mode loss ``L_cls + 0.3·L_report`` with every parameter's gradient, every dropout and drop path at 0;
* the word backend's on-device re-tokenisation ``text_encoder_ids`` against hand-written rows;
* ``RadGenSystem.forward`` classifies the report that transformers' ``generate`` gives for the same weights,
  follows the decoder's parameters, and passes no gradient through the generated ids;
* the converter on a saved state_dict of the public layout (``adapter_input = "swin"``, BERT pooler present, the
  Swin registered twice; both Swin key spellings), and its refusals.

Every comparison prints ``PARITY ...`` (visible with ``-s``)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import radgen as radgen_configs
from numerics import check
from rrg_jax import convert
from rrg_jax.convert import ConversionError
from rrg_jax.models.radgen import RadGen, RadGenSystem, text_encoder_ids
from test_bart import check_grads
from torch_reference import radgen as torch_radgen
from torch_reference.radgen_model import RadGenTorch, perturb

K = 100                     # the word vocabulary of the tests (§3.10): decoder K, text encoder K + 2
CLS, SEP = K, K + 1
BATCH = 4
LABELS = np.array([0, 2, 1, 1], np.int32)
SAMPLE_WEIGHT = np.array([1, 1, 1, 0], np.float32)  # the last row is padding (§4)
TEXT = 20                                          # radgen_tiny's data.text_max_tokens
TEXT_LENGTHS = (20, 9, 2, 5)                       # real tokens of the given text rows ([CLS] … [SEP])


# --- §15.1 parameter counts --------------------------------------------------------------------------------------

def count_params(preset: str, decoder_vocab: int, text_vocab: int) -> dict[str, int]:
  """Per top-level module parameter counts of ``RadGen.from_config`` (``jax.eval_shape`` of init: no memory)."""
  m = radgen_configs.get_config(preset).model
  m.bart.vocab_size, m.bert.vocab_size = decoder_vocab, text_vocab
  module = RadGen.from_config(m)
  s, ids = m.swin.image_size, jax.ShapeDtypeStruct((1, 8), jnp.int32)
  tree = jax.eval_shape(lambda x, i: module.init(jax.random.key(0), x, i, i, i),
                        jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32), ids)["params"]
  return {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in tree.items()}


def test_parameter_counts_15_1():
  """``radgen_tiny`` (V = 100: decoder and text vocabulary 100) per component; ``radgen`` (BART 50265, BERT 28996,
  pooler not built); ``wo_report_generation``; ``radgen_small`` = 11,123,407 + 512·K, read as decoder vocabulary K
  and text vocabulary K (512 = 256 rows of width 256 in each table); the word backend's text vocabulary K + 2 adds
  512 more."""
  tiny = count_params("radgen_tiny", K, K)
  assert tiny == {"image_encoder": 145_294, "image_proj": 2_080, "adapter_dense": 1_056, "adapter_norm": 64,
                  "decoder": 41_760, "text_encoder": 24_512, "fusion": 20_064, "classifier": 739}
  assert tiny["adapter_dense"] + tiny["adapter_norm"] == 1_120 and sum(tiny.values()) == 235_569
  assert sum(count_params("radgen", 50265, 28996).values()) == 340_090_555
  assert sum(count_params("wo_report_generation", 50265, 28996).values()) == 87_433_403
  small = count_params("radgen_small", 1000, 1000)
  assert sum(small.values()) == 11_123_407 + 512 * 1000 and small["image_encoder"] == 5_121_996
  assert sum(count_params("radgen_small", 4321, 4323).values()) == 11_123_407 + 512 * 4321 + 512


BERT_POOLER = 768 * 768 + 768  # the public code's BERT builds an (unused) pooler; the port does not


def test_baseline_parameter_counts_15_1():
  """§9.1 baselines at full size: ``swin_b`` 87,269,563; ``densenet121`` 6,956,931; the text baselines as the
  spec counts them (the code's BERT pooler included): ``report_only`` 108,507,907, ``early_fusion`` 196,104,635,
  ``late_fusion`` 195,777,470."""
  counts = {p: sum(count_params(p, 50265, 28996).values()) for p in radgen_configs.BASELINES}
  assert counts["swin_b"] == 87_269_563 and counts["densenet121"] == 6_956_931
  assert counts["report_only"] + BERT_POOLER == 108_507_907
  assert counts["early_fusion"] + BERT_POOLER == 196_104_635
  assert counts["late_fusion"] + BERT_POOLER == 195_777_470


@pytest.mark.parametrize("preset", ["swin_b", "densenet121", "report_only", "early_fusion", "late_fusion"])
def test_tiny_baselines_train_and_classify_the_ground_truth_report(preset):
  """Each baseline at ``radgen_tiny`` widths: a train-mode forward and loss (class CE only) and ``generate`` (no
  report; class probabilities). Text baselines read the ground-truth report: changing a target word changes that
  study's probabilities, and only its; image-only ones ignore the text."""
  c = radgen_configs.get_config("radgen_tiny")
  base = radgen_configs.get_config(preset)
  c.model.update(arch=base.model.arch, image_backbone=base.model.image_backbone, report_branch=False,
                 vocab_size=K)
  c.train.text_source = c.eval.text_source = "ground_truth"
  if base.model.image_backbone == "densenet121":  # a small DenseNet keeps the test fast; 56² gives a 1×1 map
    c.data.image_size = c.data.resize = 64
  system = RadGenSystem(c)
  variables = system.init(jax.random.key(0))
  batch = system.random_batch(BATCH, seed=3)
  out, new = jax.jit(lambda v, b: system.forward(v, b, train=True, rngs={"dropout": jax.random.key(1)},
                                                 mutable=["batch_stats"]))(variables, batch)
  loss, parts = system.loss(out, batch)
  assert set(out) == {"class_logits"} and out["class_logits"].shape == (BATCH, 3) and set(parts) == {"cls"}
  assert np.isfinite(float(loss))
  generate = jax.jit(lambda v, b: system.generate(v, b))
  fields = system.batch_fields(train=False)
  probs = np.asarray(generate(variables, {k: batch[k] for k in fields})["probs"])
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  changed = dict(batch, targets=batch["targets"].copy())
  changed["targets"][0, 1] = changed["targets"][0, 1] % (K - 1) + 1  # another word, same length
  probs2 = np.asarray(generate(variables, {k: changed[k] for k in fields})["probs"])
  np.testing.assert_array_equal(probs2[1:], probs[1:])
  assert (np.abs(probs2[0] - probs[0]).max() > 0) == (base.model.arch != "image_only")
  if base.model.arch != "image_only":
    c.train.text_source = "generated"
    with pytest.raises(ValueError, match="text_source='generated' needs the report decoder"):
      RadGenSystem(c)


# --- the tiny model and its torch twin ---------------------------------------------------------------------------

def tiny_system(*, dropout: bool = True, adapter_input: str = "projected") -> RadGenSystem:
  """``radgen_tiny`` with the word vocabulary K (the system sets BART K, BERT K + 2, pads 0); ``dropout=False``
  sets every dropout and drop-path rate to 0."""
  c = radgen_configs.get_config("radgen_tiny")
  c.model.vocab_size = K
  c.model.adapter_input = adapter_input
  if not dropout:
    without_dropout(c.model)
  return RadGenSystem(c)


def without_dropout(m) -> None:
  """Every dropout and drop-path rate of a RadGen ``config.model`` set to 0, in place."""
  m.swin.drop_path_rate = 0.0
  m.bart.update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
  m.bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  m.classifier_dropout = m.fusion_dropout = 0.0


def torch_model(system: RadGenSystem, seed: int) -> RadGenTorch:
  """The torch twin of ``system``'s module (dropout as configured): transformers' init (seeded), then ``perturb``;
  eval mode."""
  torch.manual_seed(seed)
  return perturb(RadGenTorch(system.config.model), seed).eval()


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def make_batch(system: RadGenSystem) -> dict[str, np.ndarray]:
  batch = system.random_batch(BATCH, seed=3)
  batch.update(labels=LABELS, sample_weight=SAMPLE_WEIGHT)
  return batch


def text_rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Given text-encoder rows ``[CLS] words [SEP] 0…`` (B, TEXT) int32 of ``TEXT_LENGTHS`` tokens, and their mask."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(TEXT_LENGTHS)
  ids = rng.integers(1, K, (BATCH, TEXT))
  mask = (np.arange(TEXT)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = CLS
  ids[np.arange(BATCH), lengths - 1] = SEP
  return np.where(mask > 0, ids, 0).astype(np.int32), mask


def pixel_values(batch) -> torch.Tensor:
  """The batch's images (B, 1, S, S, 3) as torch's (B, 3, S, S)."""
  return torch.from_numpy(np.ascontiguousarray(batch["images"][:, 0].transpose(0, 3, 1, 2)))


def torch_inputs(batch, ids, mask) -> tuple[torch.Tensor, ...]:
  """(pixel_values, decoder inputs targets[:, :-1], text ids, text mask) as torch tensors."""
  return (pixel_values(batch), torch.from_numpy(batch["targets"][:, :-1]).long(), torch.from_numpy(ids).long(),
          torch.from_numpy(mask).long())


def torch_loss(out, batch) -> torch.Tensor:
  """§4 written here: weighted CE (8, 1, 3.2) over the real rows + 0.3 · token CE of ``targets[:, 1:]`` averaged
  over the real tokens of the real rows."""
  cls = torch_radgen.weighted_cross_entropy(out["class_logits"], torch.from_numpy(batch["labels"]).long(),
                                            torch.tensor([8.0, 1.0, 3.2]), torch.from_numpy(batch["sample_weight"]))
  logits = out["report_logits"]
  ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         torch.from_numpy(batch["targets"][:, 1:]).long().reshape(-1),
                                         reduction="none")
  counted = torch.from_numpy(batch["masks"][:, 1:] * batch["sample_weight"][:, None]).reshape(-1)
  return cls + 0.3 * (ce * counted).sum() / counted.sum()


def generated_text(model: RadGenTorch, batch, system: RadGenSystem) -> tuple[np.ndarray, np.ndarray]:
  """transformers' greedy ``generate`` (the tiny preset's ``train.generation.num_beams = 1``) with the word backend's
  settings (start = BOS = EOS = PAD = 0, forced EOS at the last step, no-repeat-3-gram, max_length =
  max_seq_length − 1), re-tokenised here in numpy: the words before the first EOS (≤ length − 2) between [CLS] and
  [SEP], pads 0 → (ids, mask) (B, text_max_tokens)."""
  d = system.config
  tokens = model.generate(pixel_values(batch), max_length=int(d.data.max_seq_length) - 1,
                          num_beams=int(d.train.generation.num_beams), do_sample=False,
                          decoder_start_token_id=0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                          forced_bos_token_id=None, forced_eos_token_id=0,
                          no_repeat_ngram_size=int(d.decode.no_repeat_ngram_size), min_length=0).numpy()
  length = int(d.data.text_max_tokens)
  ids, mask = np.zeros((len(tokens), length), np.int32), np.zeros((len(tokens), length), np.int32)
  for row, seq in enumerate(tokens):
    words = list(seq[1:])
    words = words[:words.index(0) if 0 in words else len(words)][:length - 2]
    ids[row, :len(words) + 2] = [CLS, *words, SEP]
    mask[row, :len(words) + 2] = 1
  return ids, mask


@pytest.fixture(scope="module")
def tiny():
  """The dropout-free tiny system, its converted variables, a batch, and the torch twin (dropout 0, train mode
  available) sharing the weights of an eval-mode twin with dropout configured."""
  system = tiny_system(dropout=False)
  reference = torch_model(tiny_system(), seed=4)  # a seed whose greedy reports end at different lengths
  twin = RadGenTorch(system.config.model, dropout=False)
  twin.load_state_dict(reference.state_dict())
  variables = jax.tree.map(jnp.asarray, system.torch_to_variables(state_dict(reference), "twin"))
  return {"system": system, "reference": reference, "twin": twin, "variables": variables,
          "batch": make_batch(system)}


def test_eval_forward_matches_torch(tiny):
  """Eval mode, dropout configured: class logits (B, 3), report logits (B, T − 1, K), attention (B, 4, 1, T_t)."""
  system, batch = tiny_system(), tiny["batch"]
  ids, mask = text_rows(seed=4)
  apply = jax.jit(lambda v: system.module.apply(v, batch["images"], batch["targets"][:, :-1], ids, mask))
  got = apply(tiny["variables"])
  with torch.no_grad():
    want = tiny["reference"](*torch_inputs(batch, ids, mask))
  assert got["report_logits"].shape == (BATCH, 16, K) and got["text_attention"].shape == (BATCH, 4, 1, TEXT)
  for name in ("class_logits", "report_logits", "text_attention"):
    check(f"radgen tiny eval {name}", got[name], want[name].numpy(), rtol=1e-5)


def torch_loss_and_grads(model: RadGenTorch, batch, ids, mask) -> tuple[float, dict[str, np.ndarray]]:
  """Train mode: the §4 loss with the text ids as constant inputs and its gradient per named parameter."""
  model.train().zero_grad()
  loss = torch_loss(model(*torch_inputs(batch, ids, mask)), batch)
  loss.backward()
  return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def train_step(tiny):
  """jit(value_and_grad) w.r.t. the params of ``system.loss(system.forward(…, train=True))``; aux: the outputs and
  the (text ids, text mask) that ``forward`` handed to the module (spied)."""
  system = tiny["system"]

  def loss(params, stats, batch, key):
    seen = {}

    def spy(next_fun, args, kwargs, context):
      if isinstance(context.module, RadGen) and context.method_name == "__call__":
        seen["text"] = args[2:4]  # images, targets, text_ids, text_mask
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
      out = system.forward({"params": params, "batch_stats": stats}, batch, train=True, rngs={"dropout": key})
    return system.loss(out, batch)[0], (out, seen["text"])

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return lambda variables: step(variables["params"], variables["batch_stats"], tiny["batch"], jax.random.key(0))


def test_train_forward_matches_torch(tiny, train_step):
  """``RadGenSystem.forward`` in train mode (every dropout and drop path 0) generates the report it classifies: the
  text ids its module receives are those of transformers' ``generate`` with the same weights, re-tokenised here;
  the loss ``L_cls + 0.3·L_report`` (rel. 1e-6) and every parameter's gradient (norm-wise rel. ≤ 1e-4; the leaves
  that are mathematically 0 — softmax shift invariance, the fusion's one-key self-attention — ≤ 1e-6 of the total
  norm) equal torch's with those ids given as constants: nothing flows through the generation."""
  system, batch = tiny["system"], tiny["batch"]
  want_ids, want_mask = generated_text(tiny["twin"], batch, system)
  assert len({int(n) for n in want_mask.sum(1)}) > 2 and len({tuple(r) for r in want_ids}) == BATCH
  (loss, (_, (ids, mask))), grads = train_step(tiny["variables"])
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  want_loss, want = torch_loss_and_grads(tiny["twin"], batch, want_ids, want_mask)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  print(f"PARITY radgen tiny train loss: jax {float(loss):.8f} torch {want_loss:.8f}")
  check_grads("radgen tiny train grads", grads, system.torch_to_variables(want, "torch grads")["params"])


def test_forward_follows_the_decoder(tiny, train_step):
  """After a change of one decoder parameter, ``forward`` classifies the new ``generate`` report."""
  system, batch = tiny["system"], tiny["batch"]
  other = RadGenTorch(system.config.model, dropout=False)
  other.load_state_dict(tiny["twin"].state_dict())
  with torch.no_grad():
    layer = other.report_gen.bart.model.decoder.layers[-1]
    layer.fc2.bias.add_(torch.randn(layer.fc2.bias.shape, generator=torch.Generator().manual_seed(5)))
  (_, (_, (ids, mask))), _ = train_step(
      jax.tree.map(jnp.asarray, system.torch_to_variables(state_dict(other), "changed decoder")))
  want_ids, want_mask = generated_text(other, batch, system)
  assert not np.array_equal(want_ids, generated_text(tiny["twin"], batch, system)[0])
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_array_equal(np.asarray(mask), want_mask)


# --- the word backend's re-tokenisation (§3.6) -----------------------------------------------------------------

def test_text_encoder_ids_by_hand():
  """Start token dropped; the words before the first EOS (0), at most length − 2 of them, between [CLS] = 7 and
  [SEP] = 8; pads 0; mask over [CLS] … [SEP]."""
  tokens = jnp.array([[0, 3, 5, 0, 4, 0, 0],    # EOS after two words; the word after it is dropped
                      [0, 1, 2, 3, 4, 5, 6],    # no EOS: truncated at length − 2 = 4 words
                      [0, 0, 6, 6, 0, 0, 0],    # EOS first: the empty report [CLS][SEP]
                      [0, 2, 4, 6, 0, 0, 0]],   # exactly length − 2 words, then EOS
                     jnp.int32)
  ids, mask = text_encoder_ids(tokens, 7, 8, 6)
  np.testing.assert_array_equal(ids, [[7, 3, 5, 8, 0, 0], [7, 1, 2, 3, 4, 8], [7, 8, 0, 0, 0, 0],
                                      [7, 2, 4, 6, 8, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                                       [1, 1, 1, 1, 1, 0]])
  assert ids.dtype == jnp.int32 and mask.dtype == jnp.int32


# --- the public code's checkpoint (§10.4) ------------------------------------------------------------------------

# transformers 5.x in-memory Swin names → the on-disk (save_pretrained) ones (§10.1).
CLASSIC_SWIN = ((r"\.attention\.q_proj\.", ".attention.self.query."),
                (r"\.attention\.k_proj\.", ".attention.self.key."),
                (r"\.attention\.v_proj\.", ".attention.self.value."),
                (r"\.attention\.o_proj\.", ".attention.output.dense."),
                (r"\.attention\.relative_position_bias\.", ".attention.self."),
                (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense."))


def classic_swin_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in sd.items():
    for pattern, repl in CLASSIC_SWIN:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


@pytest.fixture(scope="module")
def public_checkpoint(tmp_path_factory):
  """``radgen_code``'s adapter (``bart_proj`` over the Swin tokens) at tiny size: the torch model, its state_dict
  saved with ``torch.save`` and read back with ``convert.load_state_dict``, and the system configured as
  ``python -m rrg_jax.convert`` does (``torch_vocab_size``, ``complete_config_from_torch``)."""
  model = torch_model(tiny_system(adapter_input="swin"), seed=1)
  path = tmp_path_factory.mktemp("radgen") / "best_radgen_fold4.pth"
  torch.save(model.state_dict(), path)
  sd = convert.load_state_dict(path)
  c = radgen_configs.get_config("radgen_tiny")
  c.model.adapter_input = "swin"
  RadGenSystem.complete_config_from_torch(c, sd, str(path))
  assert (c.model.bart.vocab_size, c.model.bert.vocab_size) == (K, K + 2)
  c.model.vocab_size = RadGenSystem.torch_vocab_size(sd, str(path))
  return model, sd, RadGenSystem(c)


def test_public_checkpoint_converts_to_torch_equal_logits(public_checkpoint):
  model, sd, system = public_checkpoint
  assert sd["report_gen.bart_proj.0.weight"].shape == (32, 64)  # Linear(Swin width 64 → BART 32)
  assert "clinical_bert.pooler.dense.weight" in sd and "report_gen.image_encoder.backbone.layernorm.weight" in sd
  variables = system.torch_to_variables(sd, "public")
  batch, (ids, mask) = make_batch(system), text_rows(seed=6)
  got = jax.jit(lambda v: system.module.apply(v, batch["images"], batch["targets"][:, :-1], ids, mask))(variables)
  with torch.no_grad():
    want = model(*torch_inputs(batch, ids, mask))
  for name in ("class_logits", "report_logits", "text_attention"):
    check(f"radgen public checkpoint {name}", got[name], want[name].numpy(), rtol=1e-5)
  classic = system.torch_to_variables(classic_swin_names(sd), "classic")
  assert any(".attention.self.query." in k for k in classic_swin_names(sd))
  jax.tree.map(np.testing.assert_array_equal, classic, variables)
  only_backbone = {k: v for k, v in sd.items() if not k.startswith("report_gen.swin.")}
  jax.tree.map(np.testing.assert_array_equal, system.torch_to_variables(only_backbone, "backbone"), variables)


def test_public_checkpoint_refusals(public_checkpoint):
  """One ConversionError names every problem of every part; the two Swin copies must agree; the word backend
  refuses the public code's BPE / WordPiece vocabularies; without the report branch (``wo_report_generation``)
  the BART / BERT entries are unexpected and Swin + projection + classifier convert alone."""
  _, sd, system = public_checkpoint
  dropped = ("fusion.gate.0.bias", "clinical_bert.encoder.layer.1.output.dense.bias")
  bad = {k: v for k, v in sd.items() if k not in dropped}
  bad["report_gen.image_encoder.backbone.layernorm.bias"] = sd["report_gen.swin.layernorm.bias"] + 1
  bad["classifier.9.weight"] = np.zeros((3, 8), np.float32)
  bad["report_gen.bart.model.decoder.layers.0.fc1.weight"] = np.zeros((7, 32), np.float32)
  with pytest.raises(ConversionError) as error:
    system.torch_to_variables(bad, "bad")
  message = str(error.value)
  for part in ("report_gen.swin.* and report_gen.image_encoder.backbone.* (one module registered twice) differ "
               "in 1 entries: layernorm.bias", "fusion/gate/bias", "classifier.9.weight",
               "encoder/layer_1/output/dense/bias", "decoder.layers.0.fc1.weight (7, 32)"):
    assert part in message, (part, message)
  c = radgen_configs.get_config("radgen_tiny")
  hf_vocab = {**sd, "clinical_bert.embeddings.word_embeddings.weight": np.zeros((90, 32), np.float32)}
  with pytest.raises(ConversionError, match="hf tokenizer backend"):
    RadGenSystem.complete_config_from_torch(c, hf_vocab, "hf")
  with pytest.raises(ConversionError, match="not a RadGen"):
    RadGenSystem.complete_config_from_torch(c, {k: v for k, v in sd.items() if "clinical_bert" not in k}, "x")
  c = radgen_configs.get_config("radgen_tiny")  # wo_report_generation: Swin, projection, classifier
  c.update(model=dict(report_branch=False, vocab_size=K))
  without_report = RadGenSystem(c)
  with pytest.raises(ConversionError, match=r"unexpected \(config\.model\.report_branch is False\)"):
    without_report.torch_to_variables(sd, "code")
  image_only = {k: v for k, v in sd.items() if k.startswith(("report_gen.swin.", "report_gen.image_encoder.",
                                                               "classifier."))}
  variables = without_report.torch_to_variables(image_only, "image only")
  assert set(variables["params"]) == {"image_encoder", "image_proj", "classifier"} and not variables["batch_stats"]


def test_text_baseline_reads_a_trained_radgens_reports(tmp_path):
  """§9.1 ``text_source = generated`` for a text baseline: ``model.report_generator`` (a saved RadGen) writes the
  reports; the baseline's train-step text ids (``round_trip``) and its ``generate`` (tokens, probabilities) use
  exactly that model's beam-search reports, re-tokenised as §3.6; a RadGen with a decoder, or a generator of
  another vocabulary, is refused."""
  from input_pipeline.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from rrg_jax import checkpointing, sharding  # pylint: disable=g-import-not-at-top
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top

  generator = tiny_system(dropout=False)
  gen_vars = generator.torch_to_variables(state_dict(torch_model(generator, seed=4)), "generator")  # varied reports
  checkpointing.save_inference(tmp_path / "gen", generator.config, gen_vars,
                               Tokenizer([f"w{i}" for i in range(K - 2)] + ["<unk>"], "mimic"))

  def baseline_config(vocab: int = K):
    c = radgen_configs.get_config("report_only")
    tiny = radgen_configs.get_config("radgen_tiny")
    c.model.swin, c.model.bert, c.data = tiny.model.swin, tiny.model.bert, tiny.data
    c.model.vocab_size = vocab
    c.train.text_source = c.eval.text_source = "generated"
    c.model.report_generator = str(tmp_path / "gen")
    return c

  baseline = RadGenSystem(baseline_config())
  assert baseline.round_trip_fields == ("text_ids", "text_mask")
  variables = jax.device_get(baseline.init(jax.random.key(3)))
  batch = make_batch(baseline)
  global_batch = loader.to_global_batch(baseline.device_batch(batch), sharding.create_mesh((1,)))
  text = baseline.round_trip(variables, global_batch)
  want = generator._generate_tokens(gen_vars, jnp.asarray(batch["images"]), None, num_beams=2,  # pylint: disable=protected-access
                                    deterministic=True)
  want_ids, want_mask = text_encoder_ids(want, CLS, SEP, TEXT)
  assert len({tuple(r) for r in np.asarray(want_ids)}) > 1
  np.testing.assert_array_equal(text["text_ids"], want_ids)
  np.testing.assert_array_equal(text["text_mask"], want_mask)
  out = baseline.generate(variables, {"images": jnp.asarray(batch["images"]), "targets": jnp.asarray(batch["targets"])})
  np.testing.assert_array_equal(out["tokens"][:, :want.shape[1] - 1], np.asarray(want)[:, 1:])
  logits = baseline.module.apply(variables, None, want_ids, want_mask, method="classify")["class_logits"]
  np.testing.assert_allclose(out["probs"], jax.nn.softmax(logits, -1), rtol=1e-6)
  loss, _ = baseline.loss(baseline.forward(variables, {**batch, **text}, train=False), batch)
  assert np.isfinite(float(loss))

  with pytest.raises(ValueError, match="report tokenizer is not this run's"):
    RadGenSystem(baseline_config(vocab=K + 1))
  own = radgen_configs.get_config("radgen_tiny")
  own.model.vocab_size, own.model.report_generator = K, str(tmp_path / "gen")
  with pytest.raises(ValueError, match="RadGen generates its own"):
    RadGenSystem(own)
