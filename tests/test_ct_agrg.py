"""CT-AGRG's system (rrg_jax.models.ct_agrg) against the independent torch reference ``torch_reference.ct_agrg``
(ct_agrg_spec §4–§7, §10, §13).

Tiny sizes: K = 3 abnormalities of width d = 8, volumes (2, 6, 192, 208) → 2 slice triplets through a ResNet-18 of
widths 8..64 → 32 flat features; GPT-2 of width 32, 2 layers, 4 heads, vocabulary 300 with eos = 299; slots of
T = 12 tokens. The torch ``ReportGenerationModel`` (random weights, BN statistics calibrated, every dropout 0) is
converted from its state_dict in the released layout (canonical keys + aliases + RGRG buffers) by the system's
converter. Thresholds (0, 1, 0) make the selection independent of the mode: abnormality 1 is never detected, 0 and 2
always; with labels [[1, 1, 0], [1, 1, 1]] the pairs (0, 0), (1, 0), (1, 2) are valid, (0, 2) is a false positive,
(·, 1) missed positives. Slot lengths 7, 5 and empty (the valid ones) and 9 (a missed one: the collate's T = 9
comes from a slot that is not trained on).

Full size only through ``jax.eval_shape`` and torch's meta device (§13.1, §13.3). float32, highest matmul precision
(tests/conftest.py). Every comparison prints ``PARITY <name> ...`` (pytest -s).
"""

from __future__ import annotations

import copy
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from input_pipeline import ct_rate, subword  # noqa: E402
from numerics import check  # noqa: E402
from rrg_jax import convert, optim, train_state  # noqa: E402
from rrg_jax.convert import ConversionError  # noqa: E402
from rrg_jax.layers import ctnet  # noqa: E402
from rrg_jax.models import ct_agrg  # noqa: E402
from torch_reference import ct_agrg as ref  # noqa: E402
from torch_reference import resnet as ref_resnet  # noqa: E402

K, D, HEAD_HIDDEN = 3, 8, 6
WIDTHS, HIDDEN, FST_HIDDEN = (8, 16, 32, 64), (32, 16, 8), (16, 12)
VOLUME, BATCH, T = (6, 192, 208), 2, 12
V, EOS = 300, 299
GPT2_TINY = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.0, attn_pdrop=0.0,
                 resid_pdrop=0.0, scale_attn_weights=True)
THRESHOLDS = (0.0, 1.0, 0.0)
LABELS = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
SLOT_LENGTHS = np.array([[7, 9, 4], [5, 6, 0]])  # (0, 0), (1, 0), (1, 2) valid; T_eff = 9 from (0, 1)
VALID = np.array([[True, False, False], [True, False, True]])
T_EFF = 9
# (torch seed, EOS logit offset) of the reference's GPT-2: with the first, beams end at step 1 on some rows and run to
# T on the others; with the second, they end mid-sentence (see ``reference_model``).
BEAM_MODELS = ((3, 3.75), (1, 3.5))


def tiny_config(stage: str = "stage2", **model) -> ml_collections.ConfigDict:
  """The system's config at the sizes above (every dropout 0, parity switches), plus the lead's stage-2 optimiser
  (one AdamW group; frozen: the visual encoder and GPT-2's own weights)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"max_seq_length": T})
  c.decode = ml_collections.ConfigDict({"method": "beam", "beam_size": 4})
  c.train = ml_collections.ConfigDict({"epochs": 1})
  c.model = ml_collections.ConfigDict(dict(
      name="ct_agrg", stage=stage, num_abnormalities=K, volume_shape=VOLUME, resnet_widths=WIDTHS,
      classifier_hidden=HIDDEN, abnormality_dim=D, head_hidden=HEAD_HIDDEN, dropout_rate=0.0, fst_hidden=FST_HIDDEN,
      conditioning="block", gpt2=ml_collections.ConfigDict(GPT2_TINY), position_table="wte", mask_mode="rgrg",
      encoder_mode_stage2="train", train_selection="true_positive", loss_norm="all_positions",
      head_grad_factor=2.0, thresholds=THRESHOLDS, eos_token_id=EOS, remat=False, dtype="float32"))
  c.model.update(model)
  c.optim = ml_collections.ConfigDict(dict(
      param_groups=ml_collections.ConfigDict({"all": ("",)}), lr_all=5e-2, optimizer="adamw", weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8, amsgrad=False, clip_value=0.1, clip_norm=0.0, schedule="step_lr",
      decay_epochs=50, decay_rate=0.1, warmup_epochs=0, warmup_lr=5e-2, frozen_epochs=ml_collections.ConfigDict(),
      frozen=("visual_encoder", "/wte", "/wpe", "/ln_", "/c_attn", "/c_proj", "/c_fc"), accumulate_steps=1,
      grad_scale=1.0, accumulate_remainder="drop"))
  return c


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- the torch reference and the batch ------------------------------------------------------------------------

def volumes(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH,) + VOLUME).astype(np.float32)


def torch_visual(seed: int, x: np.ndarray) -> ref.CTNetStep:
  """Random CTNetStep, dropout 0, BN affine params off init and running stats calibrated on ``x`` (see
  test_ctnet)."""
  torch.manual_seed(seed)
  shapes = ctnet.ctnet_shapes(VOLUME, WIDTHS)
  model = ref.CTNetStep(shapes.triplets, shapes.flat_size, K, D, HEAD_HIDDEN, WIDTHS, HIDDEN, dropout=0.0)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    ref_resnet.randomize_norms_(model, gen)
  ref_resnet.scale_residual_bns_(model.encoder.features, 0.3)
  ref_resnet.calibrate_bn_(model.encoder.features, torch.from_numpy(x).reshape(-1, 3, *VOLUME[1:]), gen)
  return model


def hf_config() -> transformers.GPT2Config:
  config = transformers.GPT2Config(**GPT2_TINY, bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.15)
  config._attn_implementation = "eager"
  return config


def reference_model(seed: int, eos_shift: float) -> ref.ReportGenerationModel:
  """The torch ReportGenerationModel with random weights shaped so that z matters and sentences end: LayerNorms
  and biases off init, uk / uv ×4 and the MLP's first layer ×20 (the tiny abnormality vectors are ~0.05), and the
  EOS row of wte (also the BOS input) shrunk ×0.3 plus ``eos_shift`` along ln_f's bias (of norm 6), a near-constant
  EOS logit offset (random tied GPT-2s otherwise loop on one token or copy the BOS)."""
  torch.manual_seed(seed)
  lm = ref.LanguageModel(hf_config(), K, D, FST_HIDDEN)
  gpt = lm.gpt_with_lm_head
  with torch.no_grad():
    for name, p in gpt.named_parameters():
      if ".ln_" in name or (name.endswith(".bias") and ".uk." not in name and ".uv." not in name):
        p.add_(0.1 * torch.randn_like(p))
    for block in gpt.transformer.h:
      block.attn.uk.weight.mul_(4.0)
      block.attn.uv.weight.mul_(4.0)
    lm.feature_space_transformation_nn[0].weight.mul_(20.0)
    bias = gpt.transformer.ln_f.bias
    bias.mul_(6.0 / bias.norm())
    gpt.transformer.wte.weight[EOS] *= 0.3
    gpt.transformer.wte.weight[EOS] += eos_shift * bias / bias.norm() ** 2
  gpt.generation_config = transformers.GenerationConfig()
  return ref.ReportGenerationModel(torch_visual(0, volumes(100)), lm, THRESHOLDS).eval()


@pytest.fixture(scope="module")
def reference() -> ref.ReportGenerationModel:
  return reference_model(*BEAM_MODELS[0])


def make_batch(seed: int) -> dict[str, np.ndarray]:
  """volumes, LABELS and slots ``[eos, ids…, eos]`` of SLOT_LENGTHS, padded with eos to T (zero mask)."""
  rng = np.random.default_rng(seed)
  targets = np.full((BATCH, K, T), EOS, np.int32)
  masks = np.zeros((BATCH, K, T), np.float32)
  for (b, k), n in np.ndenumerate(SLOT_LENGTHS):
    if n:
      targets[b, k, 1:n - 1] = rng.integers(0, EOS, n - 2)
      masks[b, k, :n] = 1.0
  return {"volumes": volumes(seed), "labels": LABELS.copy(), "targets": targets, "masks": masks}


@pytest.fixture(scope="module")
def stage2(reference):
  system = ct_agrg.CTAGRGSystem(tiny_config())
  variables = system.torch_to_variables(numpy_state_dict(reference), "reference")
  return system, variables, make_batch(2)


def torch_stage2(model: ref.ReportGenerationModel, batch, train: bool):
  """(loss, extras, the model copy after the forward) on the batch cut to the collate's length T_EFF."""
  model = copy.deepcopy(model).train(train)
  cut = lambda name: torch.from_numpy(batch[name][..., :T_EFF])  # noqa: E731
  loss, extras = model(torch.from_numpy(batch["volumes"])[:, None], torch.from_numpy(batch["labels"]),
                       cut("targets").long(), cut("masks"))
  return loss.detach().numpy(), {k: v.detach().numpy() for k, v in extras.items()}, model


# --- stage 2: teacher forcing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_stage2_teacher_forced_parity(reference, stage2, train):
  """§6.2–§6.4 end to end: selection, the valid rows' logits at every position (padded queries included; the torch
  reference embeds positions with wte, so a wpe model would fail) and the loss; train mode (BN batch statistics,
  dropout 0) also the updated BN running statistics (§6.2 step 1). The rgrg masks (§13.12) give the same numbers as
  HF's here (the image slot is always visible, so −1e4 and finfo.min both vanish in the softmax): their wiring is
  checked on the bound module."""
  system, variables, batch = stage2
  gpt = system.module.bind(variables).language_model.gpt
  assert (gpt.pseudo_self_attention, gpt.position_table, gpt.mask_mode) == (True, "wte", "rgrg")
  want_loss, want, after = torch_stage2(reference, batch, train)
  mode = "train" if train else "eval"
  if train:
    run = jax.jit(lambda v, b: system.forward(v, b, train=True, rngs={"dropout": jax.random.key(0)},
                                              mutable=["batch_stats"]))
    out, new_vars = run(variables, batch)
  else:
    out = jax.jit(lambda v, b: system.forward(v, b, train=False))(variables, batch)
  loss, parts = system.loss(out, batch)
  np.testing.assert_array_equal(out["valid"], VALID)
  np.testing.assert_array_equal(out["valid"], want["valid"])
  assert out["lm_logits"].shape == (BATCH, K, T, V) and out["lm_logits"].dtype == jnp.float32
  got = np.asarray(out["lm_logits"])[VALID][:, :T_EFF]
  check(f"ct_agrg stage-2 teacher-forced logits ({mode})", got, want["lm_logits"], rtol=1e-5)
  check(f"ct_agrg stage-2 loss ({mode})", loss, want_loss, rtol=1e-6)
  assert float(parts["pairs"]) == 3 and float(parts["lm"]) == float(loss)
  if train:
    want_stats = system.torch_to_variables(numpy_state_dict(after), "after")["batch_stats"]
    rel = [float(np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w)))
           for g, w in zip(jax.tree.leaves(new_vars["batch_stats"]), jax.tree.leaves(want_stats))]
    print(f"PARITY ct_agrg stage-2 train-mode BN running stats ({len(rel)} leaves): worst rel {max(rel):.3e}")
    assert max(rel) <= 1e-5
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                         new_vars["batch_stats"], variables["batch_stats"]))
    assert all(moved)


def test_block_vector_and_conditioning_mlp(reference, stage2):
  """§6.2 steps 4–5, §13.11: z = fst(h_k in block k) of the valid rows equals torch's MLP on the block vectors."""
  system, variables, batch = stage2
  model = copy.deepcopy(reference)
  with torch.no_grad():
    h, _ = model.visual_encoder(torch.from_numpy(batch["volumes"])[:, None])
  _, want, _ = torch_stage2(reference, batch, train=False)
  rows, blocks = h.numpy()[VALID], np.nonzero(VALID)[1]
  z = jax.jit(lambda v, h, k: system.module.apply(v, h, k, method="condition"))(variables, rows, blocks)
  check("ct_agrg fst(block vector) z", z, want["z"], rtol=1e-6)


def test_selection_13_10():
  """§13.10 exactly: p = (0.9, 0.2, 0.7), τ = (0.5, 0.5, 0.8), y = 1 → only abnormality 0; a detected but
  label-negative pair is never trained on but is detected (generated) at inference; strict p > τ."""
  p, tau = jnp.array([[0.9, 0.2, 0.7]]), jnp.array([0.5, 0.5, 0.8])
  np.testing.assert_array_equal(ct_agrg.select_pairs(p, jnp.ones((1, 3)), tau, "true_positive"),
                                [[True, False, False]])
  np.testing.assert_array_equal(ct_agrg.select_pairs(p, jnp.array([[0.0, 1.0, 1.0]]), tau, "true_positive"),
                                [[False, False, False]])
  assert bool((p > tau)[0, 0])  # ... yet detected: generate's `detected` is p > τ alone
  np.testing.assert_array_equal(ct_agrg.select_pairs(p, jnp.array([[0.0, 1.0, 1.0]]), tau, "label_positive"),
                                [[False, True, True]])
  equal = jnp.array([[0.5, 0.5, 0.8]], jnp.float32)  # p == τ is not detected
  assert not np.any(ct_agrg.select_pairs(equal, jnp.ones((1, 3)), tau, "true_positive"))
  with pytest.raises(ValueError, match="train_selection"):
    ct_agrg.select_pairs(p, jnp.ones((1, 3)), tau, "all")


def test_loss_normalisation_13_13():
  """§13.13: two valid rows of real lengths 5 and 3, the collate's T = 5 (here padded to 7) → 4 + 2 scored targets
  over 2·4 = 8; the longest slot may be an unselected one; ``tokens``: / 6; no valid pair: 0 and zero gradients."""
  rng = np.random.default_rng(0)
  b, k, t, v = 1, 3, 7, 11
  logits = rng.normal(size=(b, k, t, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, k, t)).astype(np.int32)
  masks = np.zeros((b, k, t), np.float32)
  masks[0, 0, :5], masks[0, 1, :3], masks[0, 2, :4] = 1, 1, 1
  valid = np.array([[True, True, False]])

  def ce(row, pos):
    x = logits[0, row, pos].astype(np.float64)
    return np.log(np.sum(np.exp(x - x.max()))) + x.max() - x[targets[0, row, pos + 1]]

  total = sum(ce(0, p) for p in range(4)) + sum(ce(1, p) for p in range(2))
  got, pairs = ct_agrg.report_loss(logits, targets, masks, valid, "all_positions")
  check("ct_agrg §13.13 loss (all_positions)", got, total / 8, rtol=1e-6)
  assert float(pairs) == 2
  check("ct_agrg §13.13 loss (tokens)", ct_agrg.report_loss(logits, targets, masks, valid, "tokens")[0], total / 6,
        rtol=1e-6)
  short = masks.copy()
  short[0, 0, 3:] = 0  # valid lengths 3 and 3; the unselected slot's 4 sets T = 4 → divisor 2·3
  want = sum(ce(0, p) for p in range(2)) + sum(ce(1, p) for p in range(2))
  check("ct_agrg loss, T from an unselected slot", ct_agrg.report_loss(logits, targets, short, valid,
                                                                        "all_positions")[0], want / 6, rtol=1e-6)
  assert int(ct_agrg.collate_length(short)) == 4 and int(ct_agrg.collate_length(np.zeros((2, 3)))) == 0
  none = np.zeros_like(valid)
  for norm in ct_agrg.LOSS_NORMS:
    value, grad = jax.value_and_grad(lambda x: ct_agrg.report_loss(x, targets, masks, none, norm)[0])(logits)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
  with pytest.raises(ValueError, match="loss_norm"):
    ct_agrg.report_loss(logits, targets, masks, valid, "mean")


# --- stage 2: decoding ------------------------------------------------------------------------------------------

def teacher_forced_logp(lm: ref.LanguageModel, z: torch.Tensor, tokens: list[int]) -> float:
  """Σ log p(token_i | tokens_<i) of tokens[1:] (tokens[0] = BOS) under the torch model, float64 sum."""
  with torch.no_grad():
    logits = lm.gpt_with_lm_head(torch.tensor([tokens]), prefix=z[None]).logits[0]
  logp = torch.log_softmax(logits.double(), -1)
  return float(sum(logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)))


def test_beam_search_matches_transformers_generate(stage2):
  """§7: for every (b, k) row, z → 4-beam search from [eos] to T tokens. With ``decode.beam_scorer = "v5"``,
  ``generate``'s tokens equal transformers 5.23 ``generate(num_beams=4, length_penalty=1, early_stopping=False)`` on
  the torch reference (no cache), its scores HF's ``sequences_scores`` = S / ℓ with ℓ the generated tokens incl. EOS.
  With the default (``beam_scorer`` unset = "v4", the code's: transformers 4.53 via RGRG's loop, §7.1), tokens and
  scores equal ``ref.rgrg_beam_search``, which divides by ℓ + 1 (§13.14: the reference is checked against that rule).
  Two weight sets (one compiled program per scorer): sentences of 1 and T − 1 tokens, and ending mid-way."""
  system, _, batch = stage2
  v5_config = tiny_config()
  v5_config.decode.beam_scorer = "v5"
  system_v5 = ct_agrg.CTAGRGSystem(v5_config)
  all_lengths = set()
  for seed, eos_shift in BEAM_MODELS:
    model = reference_model(seed, eos_shift)
    variables = system.torch_to_variables(numpy_state_dict(model), "reference")
    out = system_v5.generate(variables, {"volumes": batch["volumes"]})
    out_v4 = system.generate(variables, {"volumes": batch["volumes"]})
    np.testing.assert_array_equal(out_v4["detected"], out["detected"])
    tokens_v4, scores_v4 = np.asarray(out_v4["tokens"]).reshape(BATCH * K, T), np.asarray(out_v4["scores"]).ravel()
    with torch.no_grad():
      h, logits = model.visual_encoder(torch.from_numpy(batch["volumes"])[:, None])
      blocks = torch.arange(K).repeat(BATCH)
      z = model.language_model.feature_space_transformation_nn(ref.block_vector(h.reshape(BATCH * K, D), blocks, K))
    probs = torch.sigmoid(logits).numpy()
    check("ct_agrg generate probs", out["probs"], probs, rtol=1e-6)
    np.testing.assert_array_equal(out["detected"], probs > np.float32(THRESHOLDS))
    np.testing.assert_array_equal(out["detected"], [[True, False, True]] * BATCH)
    config = transformers.GenerationConfig(
        max_length=T, num_beams=4, do_sample=False, num_return_sequences=1, length_penalty=1.0,
        early_stopping=False, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS, use_cache=False,
        return_dict_in_generate=True, output_scores=True)
    gpt = model.language_model.gpt_with_lm_head
    start = torch.full((BATCH * K, 1), EOS)
    with torch.no_grad():
      want = gpt.generate(start, attention_mask=torch.ones_like(start), prefix=z, generation_config=config)
    seqs = want.sequences.numpy()
    tokens = np.asarray(out["tokens"]).reshape(BATCH * K, T)
    assert out["tokens"].shape == (BATCH, K, T) and out["tokens"].dtype == jnp.int32
    np.testing.assert_array_equal(tokens[:, :seqs.shape[1]], seqs)
    assert np.all(tokens[:, seqs.shape[1]:] == EOS)
    scores = np.asarray(out["scores"]).reshape(-1)
    np.testing.assert_allclose(scores, want.sequences_scores.numpy(), rtol=1e-5)
    lengths = [r.index(EOS) + 1 if EOS in r else len(r) for r in (list(row[1:]) for row in seqs)]
    all_lengths |= set(lengths)
    print(f"GENERATE ct_agrg (seed {seed}): generated lengths (EOS incl.) {lengths}, JAX steps {int(out['steps'])}")

    differ = []
    for n, row in enumerate(seqs.tolist()):
      hyp = row[:1 + lengths[n]]
      check(f"ct_agrg beam score row {n} = S/ℓ (5.23, ℓ={lengths[n]})", scores[n],
            teacher_forced_logp(model.language_model, z[n], hyp) / lengths[n], rtol=1e-5)
      with torch.no_grad():
        rgrg, score = ref.rgrg_beam_search(
            lambda ids, n=n: gpt(ids, prefix=z[n].expand(ids.shape[0], -1)).logits[:, -1], eos=EOS, num_beams=4,
            max_length=T)
      closed = len(rgrg) < T  # §13.14: S of the tokens after BOS and the EOS / (length incl. BOS + 1); else S / length
      rgrg_hyp = rgrg + [EOS] if closed else rgrg
      total = teacher_forced_logp(model.language_model, z[n], rgrg_hyp)
      check(f"ct_agrg rgrg (4.53) beam score row {n} §13.14", score, total / (len(rgrg) + closed), rtol=1e-5)
      np.testing.assert_array_equal(tokens_v4[n], rgrg_hyp + [EOS] * (T - len(rgrg_hyp)), err_msg=f"row {n}")
      check(f"ct_agrg beam score row {n} (v4) = rgrg_beam_search", scores_v4[n], score, rtol=1e-5)
      if rgrg_hyp != hyp:
        differ.append(n)
    print(f"PARITY ct_agrg beam search (seed {seed}): beam_scorer v5 tokens = transformers 5.23 generate, v4 tokens "
          f"= rgrg_beam_search (4.53) on {len(seqs)} rows; the two choose different sentences on rows {differ}")
  assert {1, T - 1} <= all_lengths and len(all_lengths) >= 3, all_lengths  # EOS first, mid-way, never


def gpt2_tokenizer(folder, vocab_size: int = V) -> subword.SubwordTokenizer:
  """A tiny GPT-2-family byte-level BPE with <|endoftext|>, trained here (vocab.json + merges.txt)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["heart size is increased .", "bilateral pleural effusion .", "calcific plaques in the aorta ."] * 3
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[ct_rate.ENDOFTEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.model.save(str(folder))
  return subword.load_tokenizer(folder)


def test_decode_reports_13_15(tmp_path):
  """§13.15 / §7.2 through ``decode_reports``: detected {2, 12} → ``heart size is increased. bilateral pleural
  effusion.``; nothing detected → ``No abnormalities detected.``; references = the non-empty target rows; stages
  0/1: empty strings."""
  tok = gpt2_tokenizer(tmp_path)
  eot = tok.token_to_id(ct_rate.ENDOFTEXT)
  system = ct_agrg.CTAGRGSystem(tiny_config())
  texts = {2: "heart size is increased .", 12: "bilateral pleural effusion .", 5: "calcific plaques in the aorta ."}
  slots = [[ct_rate.encode_slot(tok, ct_rate.ENDOFTEXT + texts[k] + ct_rate.ENDOFTEXT) if k in texts else []
            for k in range(18)], [[] for _ in range(18)]]
  targets, masks = ct_rate.collate_slots(slots, pad_id=eot)
  detected = np.zeros((2, 18), bool)
  detected[0, [2, 12]] = True
  outputs = {"probs": detected.astype(np.float32), "detected": detected, "tokens": targets}  # "generated" = slots
  generated, references = system.decode_reports(tok, outputs, {"targets": targets, "masks": masks})
  assert generated == ["heart size is increased. bilateral pleural effusion.", "No abnormalities detected."]
  assert references == ["heart size is increased. calcific plaques in the aorta. bilateral pleural effusion.", ""]
  assert system.decode_reports(tok, outputs, {}) == (generated, ["", ""])
  stage1 = ct_agrg.CTAGRGSystem(tiny_config("stage1"))
  assert stage1.decode_reports(tok, {"probs": outputs["probs"], "tokens": np.zeros((2, 1))}, {}) == (["", ""],
                                                                                                     ["", ""])


# --- stage 2: training with the frozen groups ------------------------------------------------------------------

@pytest.mark.parametrize("encoder_mode", ["train", "eval"])
def test_stage2_train_step_freezes_encoder_and_gpt2(reference, stage2, encoder_mode):
  """A jitted train step (rrg_jax.optim / train_state with ``optim.frozen`` = the visual encoder and GPT-2's own
  weights, stop_gradient'ed): the visual encoder's and GPT-2's parameters are bitwise unchanged, every uk / uv and
  the conditioning MLP move; the BN running statistics change with ``encoder_mode_stage2 = train`` (§6.2 step 1)
  and stay with ``eval``."""
  _, variables, batch = stage2
  config = tiny_config(encoder_mode_stage2=encoder_mode)
  system = ct_agrg.CTAGRGSystem(config)
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  state = train_state.create_train_state(variables, tx, jax.random.key(0))
  step = jax.jit(train_state.make_train_step(system, tx, optim.without_gradient(config,
                                                                                optim.frozen_groups(config, 0))))
  new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  assert bool(metrics["finite"]) and float(metrics["pairs"]) == 3 and float(metrics["loss"]) > 0
  frozen, trained = [], []
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(new.params)):
    name = "/".join(str(p.key) for p in path)
    (trained if ("/uk/" in name or "/uv/" in name or ct_agrg.FST in name) else frozen).append(
        (name, bool(np.array_equal(before, after))))
  assert len(trained) == 2 * 2 * GPT2_TINY["n_layer"] + 6
  assert all(same for _, same in frozen) and any(n.startswith("visual_encoder/") for n, _ in frozen)
  assert not any(same for _, same in trained), [n for n, same in trained if same]
  stats_same = [bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(state.batch_stats),
                                                           jax.tree.leaves(new.batch_stats))]
  assert not any(stats_same) if encoder_mode == "train" else all(stats_same)


# --- stages 0 and 1 ---------------------------------------------------------------------------------------------

def test_pretrain_loss_matches_torch_bce():
  """§4: CTNet (full head) logits and the mean over B·K of BCE-with-logits, from the 134-entry checkpoint."""
  x = volumes(3)
  torch.manual_seed(3)
  shapes = ctnet.ctnet_shapes(VOLUME, WIDTHS)
  model = ref.CTNet(shapes.triplets, shapes.flat_size, K, WIDTHS, HIDDEN, dropout=0.0).eval()
  system = ct_agrg.CTAGRGSystem(tiny_config("pretrain"))
  variables = system.torch_to_variables(numpy_state_dict(model), "pretrain")
  assert len(model.state_dict()) == 134 and set(variables["params"]) == {"encoder"}
  labels = LABELS[::-1].copy()
  with torch.no_grad():
    want_logits = model(torch.from_numpy(x)[:, None])
  want = torch.nn.functional.binary_cross_entropy_with_logits(want_logits, torch.from_numpy(labels)).numpy()
  batch = {"volumes": x, "labels": labels}
  out = jax.jit(lambda v, b: system.forward(v, b, train=False))(variables, batch)
  loss, parts = system.loss(out, batch)
  check("ct_agrg pretrain logits", out["logits"], want_logits.numpy(), rtol=1e-5)
  check("ct_agrg pretrain BCE", loss, want, rtol=1e-6)
  assert set(parts) == {"bce"}
  gen = jax.eval_shape(system._generate_impl, variables, x)  # pylint: disable=protected-access
  assert gen["tokens"].shape == (BATCH, 1) and gen["probs"].shape == gen["detected"].shape == (BATCH, K)


def rel_norm(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def test_stage1_head_gradients_doubled():
  """§5, §13.18: ``jax.grad`` of the system's stage-1 loss Σ_k L_k (train mode, dropout 0) with
  ``head_grad_factor = 2`` equals torch's coded backward (``ref.stage1_backward``: heads 2·∇, encoder ∇) leaf by
  leaf, from the 202-entry checkpoint; float64 torch is the reference, float32 torch printed for scale."""
  x = volumes(4)
  model = torch_visual(4, volumes(104))
  system = ct_agrg.CTAGRGSystem(tiny_config("stage1"))
  variables = system.torch_to_variables(numpy_state_dict(model), "stage1")
  assert len(model.state_dict()) == 130 + 4 * K  # 202 at K = 18 (§10.3)
  assert {k for k in variables["params"] if k.startswith("heads_")} == {"heads_in_0"} | {
      f"heads_out_{k}_{i}" for k in range(K) for i in (0, 3)}
  labels = LABELS
  coded = {}
  for dtype in (torch.float32, torch.float64):
    m = copy.deepcopy(model).to(dtype).train()
    ref.stage1_backward(m, torch.from_numpy(x).to(dtype)[:, None], torch.from_numpy(labels).to(dtype))
    coded[dtype] = {n: p.grad.numpy() for n, p in m.named_parameters()}
  batch = {"volumes": x, "labels": labels}

  def loss(params):
    out, _ = system.forward({"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
                            rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    return system.loss(out, batch)[0]

  got = jax.jit(jax.grad(loss))(variables["params"])
  expected = {"params": system.abstract_variables()["params"]}
  want = {dtype: convert.state_dict_to_variables(system.rename_torch_keys(g), expected)["params"]
          for dtype, g in coded.items()}
  rows = [(rel_norm(g, w64), rel_norm(g, w32), jax.tree_util.keystr(p)) for (p, g), w32, w64 in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want[torch.float32]),
      jax.tree.leaves(want[torch.float64]))]
  worst64, worst32 = max(rows), max(rows, key=lambda r: r[1])
  print(f"PARITY ct_agrg stage-1 grads ({len(rows)} leaves), worst ‖Δ‖/‖ref‖: vs torch64 {worst64[0]:.3e} "
        f"({worst64[2]}), vs torch32 {worst32[1]:.3e} ({worst32[2]})")
  assert worst64[0] <= 1e-5, worst64
  heads = np.asarray(got["heads_in_0"]["kernel"])
  check("ct_agrg stage-1 heads_in grad = 2·∇Σ L_k", heads, want[torch.float64]["heads_in_0"]["kernel"], rtol=1e-5)


# --- checkpoints ------------------------------------------------------------------------------------------------

def test_converter_refusals(reference, stage2):
  """The released layout's aliases / tied head / buffers must agree with the canonical tensors; a missing key and
  another stage's checkpoint are refused with the names."""
  system = stage2[0]
  sd = numpy_state_dict(reference)
  assert sum(k.startswith("language_model.gpt2_blocks.") for k in sd) == 18 * GPT2_TINY["n_layer"]
  bad = dict(sd)
  bad["language_model.gpt2_blocks.1.1.uk.weight"] = sd["language_model.gpt2_blocks.1.1.uk.weight"] + 1
  bad["language_model.wpe.weight"] = sd["language_model.wpe.weight"][:-1]
  bad["language_model.gpt_with_lm_head.lm_head.weight"] = sd["language_model.lm_head.weight"] * 2
  bad["language_model.lm_head.weight"] = bad["language_model.gpt_with_lm_head.lm_head.weight"]
  for key in ("language_model.gpt_with_lm_head.transformer.h.0.attn.mask_out_value",
              "language_model.gpt.h.0.attn.mask_out_value", "language_model.gpt2_blocks.0.1.mask_out_value"):
    bad[key] = np.float32(-1e9)
  with pytest.raises(ConversionError) as info:
    system.torch_to_variables(bad, "bad.pth")
  text = str(info.value)
  print(text)
  assert "4 entries" in text
  assert ("alias language_model.gpt2_blocks.1.1.uk.weight (32, 32) differs from "
          "language_model.gpt_with_lm_head.transformer.h.1.attn.uk.weight (32, 32)") in text
  assert "alias language_model.wpe.weight (63, 32) differs" in text
  assert "lm_head.weight differs from language_model.gpt_with_lm_head.transformer.wte.weight" in text
  assert "transformer.h.0.attn.mask_out_value = " in text and "is not -10000.0" in text

  missing = {k: v for k, v in sd.items() if not k.endswith("h.1.attn.uv.bias")}
  with pytest.raises(ConversionError, match=r"1 missing:\n    params/language_model/h_1/attn/uv/bias"):
    system.torch_to_variables(missing, "missing.pth")
  stage1_sd = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
  with pytest.raises(ConversionError, match=r"stage1.pth is a stage1 checkpoint .*config.model.stage='stage2'"):
    system.torch_to_variables(stage1_sd, "stage1.pth")
  with pytest.raises(ConversionError, match="not a CT-AGRG checkpoint"):
    system.torch_to_variables({"foo.weight": np.zeros(3)}, "other.pth")
  assert system.torch_vocab_size(sd, "reference") == V


def test_load_pretrained_gpt2_folder(stage2, tmp_path):
  """``model.gpt2_pretrained``: a local HF GPT-2 folder replaces the language model's GPT-2 weights; uk / uv and
  the conditioning MLP keep theirs; a folder of another width is refused."""
  _, variables, _ = stage2
  torch.manual_seed(5)
  plain = transformers.GPT2LMHeadModel(hf_config())
  plain.save_pretrained(tmp_path / "gpt2")
  system = ct_agrg.CTAGRGSystem(tiny_config(gpt2_pretrained=str(tmp_path / "gpt2")))
  loaded = system.load_pretrained(variables)["params"]["language_model"]
  np.testing.assert_array_equal(loaded["wte"]["embedding"], plain.transformer.wte.weight.detach().numpy())
  np.testing.assert_array_equal(loaded["h_1"]["mlp"]["c_fc"]["kernel"],
                                plain.transformer.h[1].mlp.c_fc.weight.detach().numpy())
  before = variables["params"]["language_model"]
  np.testing.assert_array_equal(loaded["h_0"]["attn"]["uk"]["kernel"], before["h_0"]["attn"]["uk"]["kernel"])
  np.testing.assert_array_equal(loaded[ct_agrg.FST]["layers_0"]["kernel"], before[ct_agrg.FST]["layers_0"]["kernel"])
  wide = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_TINY, "n_embd": 48}))
  wide.save_pretrained(tmp_path / "wide")
  system = ct_agrg.CTAGRGSystem(tiny_config(gpt2_pretrained=str(tmp_path / "wide")))
  with pytest.raises(ConversionError, match="does not fit config.model.gpt2"):
    system.load_pretrained(variables)


CLI_CONFIG = """from test_ct_agrg import tiny_config


def get_config(preset=""):
  c = tiny_config(preset)
  c.data.report_tokenizer = ""
  return c
"""


def convert_cli(tmp_path, stage: str, model: torch.nn.Module, tokenizer_dir) -> pathlib.Path:
  """``python -m rrg_jax.convert`` of ``model``'s state_dict (a .pth as the original code saves it) with the tiny
  config of ``stage`` and the GPT-2 tokenizer folder as a ``--config`` override → the inference checkpoint."""
  cfg = tmp_path / "tiny_ct_agrg.py"
  cfg.write_text(CLI_CONFIG)
  pth, out = tmp_path / f"{stage}.pth", tmp_path / stage
  torch.save({"state_dict": model.state_dict(), "epoch": 3}, pth)
  assert convert.main(["--torch", str(pth), "--config", f"{cfg}:{stage}", "--out", str(out),
                       f"--config.data.report_tokenizer={tokenizer_dir}"]) == 0
  return out


def test_staged_init_is_a_prefix_copy(tmp_path):
  """The stages' trees nest (module docstring): ``checkpointing.init_from`` with take ``("encoder",)`` starts stage 1
  from a pre-training checkpoint (trunk, convs, classifier_0 and BN statistics; the heads keep their init), and
  ``("visual_encoder=",)`` starts stage 2 from a stage-1 checkpoint (the whole tree and its BN statistics). Both
  checkpoints come from the original layouts (§10.2, §10.3) through the convert CLI; a layout without text keeps the
  tokenizer's vocabulary size, so ``load_inference`` accepts it."""
  from rrg_jax import checkpointing  # pylint: disable=g-import-not-at-top

  tok = gpt2_tokenizer(tmp_path)
  shapes = ctnet.ctnet_shapes(VOLUME, WIDTHS)
  torch.manual_seed(6)
  sources = {"pretrain": ref.CTNet(shapes.triplets, shapes.flat_size, K, WIDTHS, HIDDEN, dropout=0.0),
             "stage1": torch_visual(6, volumes(106))}
  saved = {}
  for stage, model in sources.items():
    config, saved[stage], loaded_tok = checkpointing.load_inference(convert_cli(tmp_path, stage, model, tmp_path))
    assert (config.model.stage, config.model.vocab_size, loaded_tok.vocab_size) == (stage, tok.vocab_size,
                                                                                    tok.vocab_size)
    want = ct_agrg.CTAGRGSystem(tiny_config(stage)).torch_to_variables(numpy_state_dict(model), stage)
    jax.tree.map(np.testing.assert_array_equal, saved[stage], want)

  def fresh(stage):
    abstract = ct_agrg.CTAGRGSystem(tiny_config(stage)).abstract_variables()
    return jax.tree.map(lambda x: np.full(x.shape, 7, x.dtype), abstract)

  stage1 = checkpointing.init_from(fresh("stage1"), tmp_path / "pretrain", ("encoder",))
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(stage1[collection]["encoder"]):
      want = saved["pretrain"][collection]["encoder"]
      for key in path:
        want = want[key.key]
      np.testing.assert_array_equal(leaf, want)
  assert np.all(stage1["params"]["heads_in_0"]["kernel"] == 7)
  stage2 = checkpointing.init_from(fresh("stage2"), tmp_path / "stage1", ("visual_encoder=",))
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, stage2[collection]["visual_encoder"], saved["stage1"][collection])
  assert np.all(stage2["params"]["language_model"]["wte"]["embedding"] == 7)


def test_convert_cli_released_layout(reference, stage2, tmp_path):
  """The released stage-2 layout (§10.4: canonical keys, aliases, RGRG buffers) through the convert CLI: the
  inference checkpoint holds the converter's variables, the tokenizer of the override and its vocabulary size (the
  checkpoint's 300 rows); a tokenizer of another size is refused naming both."""
  from rrg_jax import checkpointing  # pylint: disable=g-import-not-at-top

  _, want, _ = stage2
  tok = gpt2_tokenizer(tmp_path)
  config, variables, loaded_tok = checkpointing.load_inference(convert_cli(tmp_path, "stage2", reference, tmp_path))
  assert config.model.vocab_size == loaded_tok.vocab_size == tok.vocab_size == V
  jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(want))
  small = tmp_path / "small"
  small.mkdir()
  cfg = tiny_config()
  cfg.data.report_tokenizer = str(small)
  gpt2_tokenizer(small, V - 1)
  with pytest.raises(ConversionError, match=rf"stage2.pth has {V} output classes but {small} has {V - 1}"):
    convert.convert(tmp_path / "stage2.pth", cfg, tmp_path / "refused")


# --- full size (no compute) -------------------------------------------------------------------------------------

def full_config(stage: str = "stage2") -> ml_collections.ConfigDict:
  c = tiny_config(stage, volume_shape=(240, 480, 480), resnet_widths=(64, 128, 256, 512),
                  classifier_hidden=(2048, 512, 128), abnormality_dim=1024, head_hidden=128, fst_hidden=(4096, 1024),
                  num_abnormalities=18, thresholds=(0.5,) * 18, eos_token_id=50256, dropout_rate=0.5,
                  gpt2=ml_collections.ConfigDict({**GPT2_TINY, "vocab_size": 50257, "n_positions": 1024,
                                                  "n_embd": 1024, "n_layer": 24, "n_head": 16}))
  c.data.max_seq_length = 60
  return c


def test_full_size_counts_13_1():
  """§13.1: unique parameters 552,205,506 (pretrain 27,241,026; stage 1 66,255,042), trainable uk / uv + MLP
  131,127,296 in 102 tensors (the frozen groups of the stage-2 optimiser); the torch reference's state_dict has
  1518 entries."""
  system = ct_agrg.CTAGRGSystem(full_config())
  params = system.abstract_variables()["params"]
  assert count(params) == 552_205_506
  labels = optim.param_labels(params, optim.param_groups(system.config), tuple(system.config.optim.frozen))
  trainable = [p for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if g != optim.FROZEN_GROUP]
  assert (len(trainable), count(trainable)) == (102, 131_127_296)
  assert count(params["language_model"][ct_agrg.FST]) == 80_746_496 and count(params["visual_encoder"]) == 66_255_042
  for stage, n in (("pretrain", 27_241_026), ("stage1", 66_255_042)):
    assert count(ct_agrg.CTAGRGSystem(full_config(stage)).abstract_variables()["params"]) == n
  config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
  with torch.device("meta"):
    model = ref.ReportGenerationModel(ref.CTNetStep(), ref.LanguageModel(config), [0.5] * 18)
  assert len(model.state_dict()) == 1518 and sum(p.numel() for p in model.parameters()) == 552_205_506


def test_full_size_shapes_13_3():
  """§13.3 for a batch of 8 at T = 60 (all B·K rows decoded): logits (8, 18, 60, 50257), valid (8, 18), detector
  logits (8, 18), per-layer image key uk(z) (144, 1, 1024); generate's tokens (8, 18, 60)."""
  system = ct_agrg.CTAGRGSystem(full_config())
  variables = system.abstract_variables()
  batch = {k: jax.ShapeDtypeStruct((8,) + f.shape, f.dtype) for k, f in system.batch_fields().items()}
  assert batch["targets"].shape == (8, 18, 60) and batch["volumes"].shape == (8, 240, 480, 480)
  out, state = jax.eval_shape(lambda v, b: system.module.apply(
      v, **b, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda m, _: m.name == "uk"), variables, batch)
  assert out["lm_logits"].shape == (8, 18, 60, 50257) and out["lm_logits"].dtype == jnp.float32
  assert (out["valid"].shape, out["valid"].dtype, out["logits"].shape) == ((8, 18), jnp.bool_, (8, 18))
  uk = state["intermediates"]["language_model"]["h_23"]["attn"]["uk"]["__call__"][0]
  assert uk.shape == (144, 1, 1024)
  gen = jax.eval_shape(system._generate_impl, variables, batch["volumes"])  # pylint: disable=protected-access
  assert gen["tokens"].shape == (8, 18, 60) and gen["scores"].shape == (8, 18) and gen["detected"].dtype == jnp.bool_


def test_config_refusals():
  with pytest.raises(ValueError, match="stage='stage3'"):
    ct_agrg.CTAGRGSystem(tiny_config("stage3"))
  with pytest.raises(ValueError, match="thresholds has 2 values"):
    ct_agrg.CTAGRGSystem(tiny_config(thresholds=(0.5, 0.5)))
  with pytest.raises(ValueError, match="loss_norm='mean'"):
    ct_agrg.CTAGRGSystem(tiny_config(loss_norm="mean"))
  config = tiny_config()
  config.model.gpt2.vocab_size = -1
  with pytest.raises(ValueError, match="gpt2.vocab_size is unset"):
    ct_agrg.CTAGRGSystem(config)
  config.model.vocab_size = 77
  with pytest.raises(ValueError, match="eos_token_id=299 is outside the GPT-2 vocabulary"):
    ct_agrg.CTAGRGSystem(config)
  config.model.update(vocab_size=400, eos_token_id=0)
  assert ct_agrg.CTAGRGSystem(config).module.gpt2.vocab_size == 400
  batch = ct_agrg.CTAGRGSystem(tiny_config()).random_batch(3)
  assert batch["targets"].shape == (3, K, T) and np.all(batch["targets"][batch["masks"] == 0] == EOS)
  assert np.all((batch["masks"].sum(-1) > 0) == (batch["labels"] > 0))
  inner = batch["targets"][..., 1:-1][batch["masks"][..., 2:] > 0]
  assert np.all(inner != EOS)
