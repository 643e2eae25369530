"""CT-AGRG (ct_agrg_spec.md): CT volume → abnormality detector → one GPT-2 sentence per detected abnormality.

Composition only (the blocks: ``layers.ctnet`` — CT-Net encoder, abnormality heads, block conditioning MLP —,
``layers.gpt2`` with pseudo self-attention, ``decoding.hf_beam_search``). One system, three stages
(``config.model.stage``), each a parameter tree that the next one's ``train.init_from`` copies as a prefix:

* ``pretrain`` (§4): ``encoder/…`` = ``CTNet(head="full")`` (features, reducingconvs_{0,2,4},
  classifier_{0,3,6,9}) → logits (B, K); loss = mean over B·K of BCE-with-logits.
* ``stage1`` (§5): ``encoder/…`` (``CTNet(head="embedding")``: the same trunk / convs / classifier_0 names) and, at the
  top level, ``heads_in_0``, ``heads_out_{k}_{0,3}`` (``CTNetStep``'s own layout) → logits (B, K); loss
  ``Σ_k L_k``, ``L_k = mean_b BCE`` (logged: ``mean_k L_k``). Take from pretrain: ``("encoder",)``.
* ``stage2`` (§6, also the inference model): ``visual_encoder/<the stage-1 tree>``, ``language_model/…`` = GPT-2's
  own names (``wte``, ``wpe``, ``h_i/{ln_1, attn/{c_attn, c_proj, uk, uv}, ln_2, mlp/{c_fc, c_proj}}``, ``ln_f``)
  and ``language_model/feature_space_transformation_nn/layers_{0,2,4}``. Take from stage 1: ``("visual_encoder=",)``.

Stage-2 training forward (§6.2, §6.4), static shapes: the visual pass runs without gradient (``stop_gradient`` on
its outputs), ``p = σ(s)``, ``det = p > τ`` (strict, §12.3.9), ``valid = det ∧ (y = 1)``; the decoder then runs on
**all** B·K (volume, abnormality) rows — row (b, k) conditioned on ``z = fst(H[b, k] in block k)`` and teacher-forced on
its target slot — and ``valid`` weights the rows in the loss (the original gathers the N valid rows; a row's
logits do not depend on the others, so the valid rows' logits and the loss are the same). The batch's slots are
padded to ``data.max_seq_length``; the collate's length ``T_eff`` (the longest real slot of the batch, selected or
not) is recovered from the masks, and padding after ``T_eff`` changes no logit before it (causal attention).

Quirk switches (§12.2; parity value first, then the clean one):

* ``model.position_table``: ``wte`` (positions embedded with ``wte[t]``; the released weights need it) | ``wpe``.
* ``model.mask_mode``: ``rgrg`` (causal scores replaced by −1e4, padded keys −1e4 added) | ``hf``.
* ``model.encoder_mode_stage2``: ``train`` (the frozen encoder in train mode: BN batch statistics, running stats
  updated — returned through ``mutable=["batch_stats"]`` —, its dropouts on; detections and vectors are
  dropout-perturbed) | ``eval``.
* ``model.train_selection``: ``true_positive`` (det ∧ y = 1) | ``label_positive`` (y = 1).
* ``model.conditioning``: ``block`` (h in block k of a K·d vector → K·d → 4096 → 1024 → 1024) | ``raw`` (d → …).
* ``model.loss_norm``: ``all_positions`` (Σ m·CE / (N·(T_eff − 1)), ignored positions counted) | ``tokens``
  (Σ m·CE / Σ m over the valid rows).
* ``model.head_grad_factor`` (stage 1): 2 (the code's double backward leaves 2·∇ on ``heads_in`` / ``heads_out``,
  §13.18) | 1 — a gradient-scaling identity on the head parameters; the encoder's gradient is unscaled.

Decoding (§7, eval mode): ``probs`` (B, K), ``detected = probs > τ`` and, in stage 2, for every (b, k) row (detected
or not: static shapes) beam search from ``[eos]`` with ``decoding.hf_beam_search`` (``decode.beam_size`` beams,
``data.max_seq_length``, eos = pad = ``model.eos_token_id``, length penalty 1, ``early_stopping=False``) with the
scorer of ``decode.beam_scorer``: ``v4`` (the code: RGRG's loop over transformers 4.x ``BeamSearchScorer`` without
``decoder_prompt_len`` — an EOS-ended hypothesis normalised by its length incl. BOS and EOS, done on the best raw
candidate, running beams added at the end with S / length; §7.1, §13.14; it favours short sentences) | ``v5``
(transformers 5.23 ``generate``); ``decode_reports`` assembles the sentences of the detected rows (§7 step 4) and
the reference of §7.2.

Reconstructions and deviations: a batch without a valid pair gives loss 0 and zero gradients (the code returns
−1 and skips the backward: the same accumulated gradient). After stage 1 of a staged run (``after_stage``) the
thresholds τ are the per-abnormality best-F1 ones on validation (the code never computes them, §7.4).

Checkpoints (§10.2–§10.4): ``torch_to_variables`` reads the layout of the configured stage — pre-training (134
entries), stage 1 (202), or the released stage-2 ``ReportGenerationModel`` (1518: the canonical
``language_model.gpt_with_lm_head.*`` GPT-2 plus its aliases ``language_model.{gpt.*, lm_head.weight, wte.weight,
wpe.weight, final_layernorm.*, gpt2_blocks.*}``, which must equal their canonical tensors and are then dropped, as
are the constant ``attn.causal_mask`` / ``attn.mask_out_value`` buffers, checked against the values this port
hard-codes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from rrg_jax import decoding, hf_weights, losses, models
from rrg_jax.convert import ConversionError
from rrg_jax.layers import ctnet
from rrg_jax.layers.gpt2 import RGRG_FILL, GPT2Config, GPT2LMHeadModel
from rrg_jax.layers.resnet import DEFAULT_WIDTHS
from rrg_jax.models.system import Field, System, module_kwargs

STAGES = ("pretrain", "stage1", "stage2")
ENCODER_MODES = ("train", "eval")
SELECTIONS = ("true_positive", "label_positive")
LOSS_NORMS = ("all_positions", "tokens")
FST = "feature_space_transformation_nn"
THRESHOLDS_FILE = "thresholds.json"  # written by stage 1 of a staged run (§7.4's format)
BEAM_LENGTH_PENALTY, BEAM_EARLY_STOPPING = 1.0, False  # §7.1 (the YAML's last `early_stopping` wins)


# --- pure pieces ------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jax.Array, factor: float) -> jax.Array:
  """Identity whose backward multiplies the cotangent by ``factor`` (stage 1's head gradients, §13.18)."""
  return x


def _scale_fwd(x: jax.Array, factor: float):
  del factor
  return x, None


def _scale_bwd(factor: float, _, g: jax.Array):
  return (g * factor,)


scale_gradient.defvjp(_scale_fwd, _scale_bwd)


def select_pairs(probs: jax.Array, labels: jax.Array, thresholds: jax.Array, selection: str) -> jax.Array:
  """The (volume, abnormality) pairs the decoder trains on (§6.2 step 2, §13.10): probs, labels (B, K), thresholds
  (K,) → bool (B, K); ``true_positive``: ``p > τ`` (strict) and ``y = 1``; ``label_positive``: ``y = 1``."""
  if selection not in SELECTIONS:
    raise ValueError(f"config.model.train_selection={selection!r}; choose one of {SELECTIONS}.")
  positive = labels == 1
  return positive & (probs > thresholds) if selection == "true_positive" else positive


def collate_length(masks: jax.Array) -> jax.Array:
  """T of the original collate (§2.6): the longest real slot of the batch, = max over rows of (last index with mask
  1) + 1; masks (..., T) → int32 () (0 when every slot is empty)."""
  t = jnp.arange(1, masks.shape[-1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(masks > 0, t, 0))


def report_loss(lm_logits: jax.Array, targets: jax.Array, masks: jax.Array, valid: jax.Array, norm: str
                ) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced loss of the valid rows (§6.4, §13.13): lm_logits (B, K, T, V), targets / masks (B, K, T), valid
  (B, K) → (loss, N = Σ valid). ``logits[t]`` predicts ``targets[t + 1]``, counted where ``masks[t + 1] = 1``;
  ``all_positions``: / (N·(T_eff − 1)) with ``T_eff = collate_length(masks)``; ``tokens``: / the counted positions.
  0 (with zero gradients) when nothing is counted."""
  if norm not in LOSS_NORMS:
    raise ValueError(f"config.model.loss_norm={norm!r}; choose one of {LOSS_NORMS}.")
  ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits[..., :-1, :].astype(jnp.float32), targets[..., 1:])
  weight = masks[..., 1:].astype(jnp.float32) * valid[..., None].astype(jnp.float32)
  pairs = jnp.sum(valid.astype(jnp.float32))
  if norm == "all_positions":
    denominator = pairs * (collate_length(masks) - 1).astype(jnp.float32)
  else:
    denominator = jnp.sum(weight)
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, jnp.sum(ce * weight) / safe, 0.0), pairs


# --- modules ----------------------------------------------------------------------------------------------------

def gpt2_module(config: GPT2Config, position_table: str, mask_mode: str, dtype: Any, remat: bool = False
                ) -> GPT2LMHeadModel:
  """CT-AGRG's GPT-2 (§6.3): pseudo self-attention with a prefix of width ``n_embd``."""
  return GPT2LMHeadModel(config, pseudo_self_attention=True, position_table=position_table, mask_mode=mask_mode,
                         prefix_dim=config.n_embd, dtype=dtype, remat=remat)


class LanguageModel(nn.Module):
  """The stage-2 language model (§6.2 step 5, §6.3): GPT-2 with pseudo self-attention (its params at this module's
  level, HF names) conditioned on ``z = feature_space_transformation_nn(h, block)``."""
  gpt2: GPT2Config
  num_abnormalities: int = 18
  fst_hidden: Sequence[int] = (4096, 1024)
  conditioning: str = "block"
  position_table: str = "wte"
  mask_mode: str = "rgrg"
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.gpt = gpt2_module(self.gpt2, self.position_table, self.mask_mode, self.dtype, self.remat)
    nn.share_scope(self, self.gpt)
    self.feature_space_transformation_nn = ctnet.BlockConditioning(
        self.num_abnormalities, self.conditioning, tuple(self.fst_hidden), self.gpt2.n_embd, self.dtype)

  def condition(self, h: jax.Array, block: jax.Array) -> jax.Array:
    """h (N, d), block (N,) int in [0, K) → z (N, n_embd)."""
    return self.feature_space_transformation_nn(h, block)

  def __call__(self, ids: jax.Array, masks: jax.Array, h: jax.Array, block: jax.Array, *, deterministic: bool
               ) -> jax.Array:
    """ids / masks (N, T), h (N, d), block (N,) → teacher-forced logits (N, T, V) float32."""
    return self.gpt(ids, masks, prefix=self.condition(h, block), deterministic=deterministic)["logits"]


class CTAGRG(nn.Module):
  """The module of one stage (module docstring). Attributes are the ``config.model`` fields; ``gpt2`` only in
  stage 2; ``dtype`` the compute dtype name (params, BN statistics and logits stay float32)."""
  stage: str
  gpt2: GPT2Config | None = None
  num_abnormalities: int = 18
  abnormality_dim: int = 1024
  head_hidden: int = 128
  resnet_widths: Sequence[int] = DEFAULT_WIDTHS
  classifier_hidden: Sequence[int] = ctnet.CLASSIFIER_HIDDEN
  dropout_rate: float = 0.5
  fst_hidden: Sequence[int] = (4096, 1024)
  conditioning: str = "block"
  position_table: str = "wte"
  mask_mode: str = "rgrg"
  encoder_mode_stage2: str = "train"
  train_selection: str = "true_positive"
  thresholds: Sequence[float] = (0.5,) * 18
  remat: bool = False
  dtype: str = "float32"

  @classmethod
  def from_config(cls, config: Any) -> CTAGRG:
    kwargs = module_kwargs(cls, config)
    kwargs["gpt2"] = GPT2Config(**dict(config.gpt2)) if config.stage == "stage2" else None
    return cls(**kwargs)

  def setup(self):
    for value, choices, what in ((self.stage, STAGES, "stage"),
                                 (self.encoder_mode_stage2, ENCODER_MODES, "encoder_mode_stage2")):
      if value not in choices:
        raise ValueError(f"config.model.{what}={value!r}; choose one of {choices}.")
    dtype = jnp.dtype(self.dtype)
    if self.stage == "pretrain":
      self.encoder = ctnet.CTNet(self.num_abnormalities, "full", tuple(self.resnet_widths),
                                 tuple(self.classifier_hidden), self.dropout_rate, self.remat, dtype)
      return
    detector = ctnet.CTNetStep(self.num_abnormalities, self.abnormality_dim, self.head_hidden,
                               tuple(self.resnet_widths), self.classifier_hidden[0], self.dropout_rate, self.remat,
                               dtype)
    if self.stage == "stage1":
      self.detector = detector
      nn.share_scope(self, self.detector)
      return
    self.visual_encoder = detector
    self.language_model = LanguageModel(self.gpt2, self.num_abnormalities, tuple(self.fst_hidden), self.conditioning,
                                        self.position_table, self.mask_mode, dtype, self.remat)

  def detect(self, volumes: jax.Array, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
    """volumes (B, D, H, W) → (H (B, K, d) or None (pretrain), logits (B, K) float32). ``train``: BN batch
    statistics (mutable ``batch_stats``) and dropout (the 'dropout' rng)."""
    if self.stage == "pretrain":
      return None, self.encoder(volumes, train)
    return (self.detector if self.stage == "stage1" else self.visual_encoder)(volumes, train)

  def condition(self, h: jax.Array, block: jax.Array) -> jax.Array:
    """Stage 2: h (N, d), block (N,) → z (N, n_embd)."""
    return self.language_model.condition(h, block)

  def __call__(self, volumes: jax.Array, labels: jax.Array | None = None, targets: jax.Array | None = None,
               masks: jax.Array | None = None, *, train: bool = False) -> dict[str, jax.Array]:
    """Training forward: volumes (B, D, H, W) → ``logits`` (B, K); stage 2 also reads labels (B, K) and the slots
    targets / masks (B, K, T) → ``valid`` (B, K) bool (the selected pairs) and ``lm_logits`` (B, K, T, V) (every
    row; the loss weights them by ``valid``)."""
    if self.stage != "stage2":
      return {"logits": self.detect(volumes, train)[1]}
    h, logits = jax.lax.stop_gradient(self.detect(volumes, train and self.encoder_mode_stage2 == "train"))
    valid = select_pairs(jax.nn.sigmoid(logits), labels, jnp.asarray(self.thresholds, jnp.float32),
                         self.train_selection)
    b, k, t = targets.shape
    lm = self.language_model(targets.reshape(b * k, t), masks.reshape(b * k, t), h.reshape(b * k, -1),
                             jnp.tile(jnp.arange(k), b), deterministic=not train)
    return {"logits": logits, "valid": valid, "lm_logits": lm.reshape(b, k, t, -1)}


# --- the released checkpoint's GPT-2 (§10.4) --------------------------------------------------------------------

RELEASED_GPT2 = "language_model.gpt_with_lm_head."
BLOCK_PARTS = ("ln_1", "attn", "ln_2", "mlp")  # language_model.gpt2_blocks.{l}.{0,1,2,3}
# alias key pattern → its canonical key (the same tensor registered under another module attribute).
_ALIASES: tuple[tuple[re.Pattern, Any], ...] = (
    (re.compile(r"^language_model\.gpt\."), RELEASED_GPT2 + "transformer."),
    (re.compile(r"^language_model\.lm_head\."), RELEASED_GPT2 + "lm_head."),
    (re.compile(r"^language_model\.(wte|wpe)\."), RELEASED_GPT2 + r"transformer.\1."),
    (re.compile(r"^language_model\.final_layernorm\."), RELEASED_GPT2 + "transformer.ln_f."),
    (re.compile(r"^language_model\.gpt2_blocks\.(\d+)\.([0-3])\."),
     lambda m: f"{RELEASED_GPT2}transformer.h.{m[1]}.{BLOCK_PARTS[int(m[2])]}."),
)
RELEASED_WTE = RELEASED_GPT2 + "transformer.wte.weight"
_TIED = (RELEASED_GPT2 + "lm_head.weight", RELEASED_WTE)
_CAUSAL_MASK = re.compile(r"\.attn\.causal_mask$")
_MASK_OUT_VALUE = re.compile(r"\.attn\.mask_out_value$")
_LAYOUT_HINTS = {"pretrain": "features.*, classifier.* (§10.2)", "stage1": "encoder.*, heads_in.*, heads_out.* (§10.3)",
                 "stage2": "visual_encoder.*, language_model.* (§10.4)"}


def _same(a: Any, b: Any) -> bool:
  return np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))


def torch_layout(state_dict: Mapping[str, Any]) -> str | None:
  """Which stage's original checkpoint ``state_dict`` is (``STAGES``), or None."""
  keys = list(state_dict)
  if any(k.startswith(("visual_encoder.", "language_model.")) for k in keys):
    return "stage2"
  if any(k.startswith(("heads_in.", "heads_out.")) for k in keys):
    return "stage1"
  if any(k.startswith(("features.", "classifier.")) for k in keys):
    return "pretrain"
  return None


def released_state_dict(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The stage-2 ``ReportGenerationModel`` state_dict (§10.4) → keys of ``convert``'s naming rule for this system
  (before ``ctnet.TORCH_KEY_RENAMES``): every alias checked equal to its canonical tensor and dropped, the tied
  ``lm_head.weight`` checked equal to ``wte`` and dropped, ``attn.causal_mask`` (lower-triangular ones) and
  ``attn.mask_out_value`` (−1e4) checked and dropped, ``language_model.gpt_with_lm_head.transformer.*`` →
  ``language_model.*`` with the Conv1D weights pre-transposed (``hf_weights.gpt2_state_dict``). One
  ConversionError names every alias or buffer that differs."""
  problems, canonical = [], {}
  for key, value in state_dict.items():
    alias = next(((p, r) for p, r in _ALIASES if p.match(key)), None)
    if alias is None:
      canonical[key] = value
      continue
    target = alias[0].sub(alias[1], key, count=1)
    if target in state_dict and not _same(value, state_dict[target]):
      problems.append(f"alias {key} {np.shape(value)} differs from {target} {np.shape(state_dict[target])}")
  if all(k in state_dict for k in _TIED) and not _same(*(state_dict[k] for k in _TIED)):
    problems.append(f"{_TIED[0]} differs from {_TIED[1]} (GPT-2's LM head is tied to wte)")
  for key, value in canonical.items():
    v = np.asarray(value)
    if _CAUSAL_MASK.search(key) and (v.ndim < 2 or not np.array_equal(v != 0, np.tril(np.ones(v.shape[-2:], bool))
                                                                      [(None,) * (v.ndim - 2)])):
      problems.append(f"{key} {v.shape} is not lower-triangular ones (the causal rule this port hard-codes)")
    if _MASK_OUT_VALUE.search(key) and not np.array_equal(v, np.float32(RGRG_FILL)):
      problems.append(f"{key} = {v} is not {RGRG_FILL} (the masking value this port hard-codes)")
  if problems:
    raise ConversionError(f"{source}: {len(problems)} entries of the stage-2 checkpoint are inconsistent:\n  "
                          + "\n  ".join(problems))
  gpt = {k[len(RELEASED_GPT2):]: v for k, v in canonical.items() if k.startswith(RELEASED_GPT2)}
  rest = {k: v for k, v in canonical.items() if not k.startswith(RELEASED_GPT2)}
  return {**rest, **{f"language_model.{k}": v for k, v in hf_weights.gpt2_state_dict(gpt).items()}}


# --- the system -------------------------------------------------------------------------------------------------

@models.register("ct_agrg")
class CTAGRGSystem(System):
  """CT-AGRG (ISBI 2025): CT-Net detector + abnormality vectors → GPT-2 sentences, in three training stages.

  On the system contract: the stage decides the batch fields, the forward and the loss; ``generate`` gives
  ``probs`` / ``detected`` (B, K) and, in stage 2, ``tokens`` (B, K, L) per abnormality; ``decode_reports``
  assembles them (``input_pipeline.ct_rate``)."""
  module_class = CTAGRG
  report_outputs = ("probs", "detected")
  torch_vocab_key = RELEASED_WTE
  torch_key_renames = ctnet.TORCH_KEY_RENAMES

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    self.stage = m.stage
    if self.stage not in STAGES:
      raise ValueError(f"config.model.stage={self.stage!r}; choose one of {STAGES}.")
    if m.get("thresholds_file"):
      from input_pipeline import ct_rate  # pylint: disable=g-import-not-at-top

      m.thresholds = tuple(float(x) for x in ct_rate.read_thresholds(m.thresholds_file))
    k = int(m.num_abnormalities)
    if len(m.thresholds) != k:
      raise ValueError(f"config.model.thresholds has {len(m.thresholds)} values, num_abnormalities={k}.")
    if self.stage == "stage2":
      vocab, size = int(m.get("vocab_size", -1)), int(m.gpt2.vocab_size)
      if size <= 0 and vocab <= 0:
        raise ValueError("config.model.gpt2.vocab_size is unset: set it, or config.model.vocab_size (the "
                         "tokenizer's).")
      if 0 < size and 0 < vocab != size:
        raise ValueError(f"config.model.vocab_size={vocab} (the tokenizer's) but config.model.gpt2.vocab_size="
                         f"{size}.")
      size = size if size > 0 else vocab
      if int(m.eos_token_id) < 0:  # GPT-2's convention: <|endoftext|> is the last id (50256 of 50257)
        m.eos_token_id = size - 1
      if not 0 <= int(m.eos_token_id) < size:
        raise ValueError(f"config.model.eos_token_id={m.eos_token_id} is outside the GPT-2 vocabulary ({size}): "
                         "it must be the tokenizer's <|endoftext|> id.")
      m.gpt2.vocab_size = size
    for value, choices, what in ((m.encoder_mode_stage2, ENCODER_MODES, "encoder_mode_stage2"),
                                 (m.train_selection, SELECTIONS, "train_selection"),
                                 (m.loss_norm, LOSS_NORMS, "loss_norm")):
      if value not in choices:
        raise ValueError(f"config.model.{what}={value!r}; choose one of {choices}.")
    super().__init__(config)
    self.forward_fields = (("volumes", "labels", "targets", "masks") if self.stage == "stage2" else ("volumes",))
    self.thresholds = jnp.asarray(m.thresholds, jnp.float32)
    self._generate = jax.jit(self._generate_impl)

  # --- data ------------------------------------------------------------------------------------------------

  def batch_fields(self, train: bool = True) -> dict[str, Field]:
    """volumes (D, H, W) float32 (intensity-mapped, cropped / padded), labels (K,) float32; stage 2 also the
    sentence slots targets (K, T) int32 and masks (K, T) float32 (T = ``data.max_seq_length``), training and
    evaluation alike."""
    del train
    m = self.config.model
    k = int(m.num_abnormalities)
    fields = {"volumes": Field(tuple(int(n) for n in m.volume_shape), jnp.float32), "labels": Field((k,), jnp.float32)}
    if self.stage == "stage2":
      t = int(self.config.data.max_seq_length)
      fields.update(targets=Field((k, t), jnp.int32), masks=Field((k, t), jnp.float32))
    return fields

  def random_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random volumes N(0, 1); labels ~30% positive, abnormality 0 always; stage 2: each positive slot
    ``[eos, random non-eos ids, eos]`` of random length 4..T, the others all eos with zero mask."""
    rng = np.random.default_rng(seed)
    fields = self.batch_fields()
    labels = (rng.random((batch_size,) + fields["labels"].shape) < 0.3).astype(np.float32)
    labels[:, 0] = 1.0
    batch = {"volumes": rng.normal(size=(batch_size,) + fields["volumes"].shape).astype(np.float32),
             "labels": labels}
    if self.stage == "stage2":
      m = self.config.model
      eos, vocab = int(m.eos_token_id), int(m.gpt2.vocab_size)
      k, t = fields["targets"].shape
      lengths = rng.integers(4, t + 1, size=(batch_size, k))
      masks = (np.arange(t) < lengths[..., None]) & (labels[..., None] > 0)
      ids = rng.integers(0, vocab - 1, size=(batch_size, k, t))
      ids = np.where(ids >= eos, ids + 1, ids)  # never eos inside a sentence
      ids[..., 0] = eos
      ids[np.arange(batch_size)[:, None], np.arange(k)[None], lengths - 1] = eos
      batch["targets"] = np.where(masks, ids, eos).astype(np.int32)
      batch["masks"] = masks.astype(np.float32)
    return batch

  # --- model ----------------------------------------------------------------------------------------------

  def forward(self, variables: Mapping[str, Any], batch: Mapping[str, Any], *, train: bool,
              rngs: Mapping[str, jax.Array] | None = None, mutable: Any = False):
    """The module's training forward; stage 1 first wraps ``heads_in_0`` / ``heads_out_*`` in ``scale_gradient``
    by ``model.head_grad_factor`` (§5, §13.18)."""
    factor = float(self.config.model.head_grad_factor)
    if self.stage == "stage1" and factor != 1.0:
      params = {k: jax.tree.map(functools.partial(scale_gradient, factor=factor), v) if k.startswith("heads_") else v
                for k, v in variables["params"].items()}
      variables = {**variables, "params": params}
    return super().forward(variables, batch, train=train, rngs=rngs, mutable=mutable)

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """pretrain: mean over B·K of BCE (``bce``); stage 1: ``Σ_k L_k`` with ``L_k = mean_b BCE`` (part ``bce`` =
    mean_k L_k); stage 2: ``report_loss`` (parts ``lm`` and ``pairs`` = N)."""
    if self.stage != "stage2":
      bce = losses.bce_with_logits(outputs["logits"], batch["labels"])
      total = bce if self.stage == "pretrain" else bce * outputs["logits"].shape[-1]
      return total, {"bce": bce}
    lm, pairs = report_loss(outputs["lm_logits"], batch["targets"], batch["masks"], outputs["valid"],
                            self.config.model.loss_norm)
    return lm, {"lm": lm, "pairs": pairs}

  def load_pretrained(self, variables: dict[str, Any]) -> dict[str, Any]:
    """A fresh stage-2 run's GPT-2 (§6.1, §10.5): the weights of the local HF GPT-2 folder
    ``model.gpt2_pretrained`` (healx/gpt-2-pubmed-medium) in place of ``language_model``'s random GPT-2 weights;
    ``uk`` / ``uv`` and the conditioning MLP keep their fresh init. Unchanged when unset or in stages 0/1."""
    folder = self.config.model.get("gpt2_pretrained", "")
    if not folder or self.stage != "stage2":
      return variables
    loaded = traverse_util.flatten_dict(hf_weights.load_gpt2(folder)[1]["params"], sep="/")
    lm = traverse_util.flatten_dict(dict(variables["params"]["language_model"]), sep="/")
    differ = [f"{k} {np.shape(v)} vs {np.shape(lm.get(k))}" for k, v in loaded.items()
              if k not in lm or np.shape(lm[k]) != np.shape(v)]
    if differ:
      raise ConversionError(f"config.model.gpt2_pretrained={folder!r} does not fit config.model.gpt2 ({len(differ)} "
                            "weights: " + ", ".join(differ[:4]) + "); check the widths and the tokenizer's vocabulary.")
    lm.update(loaded)
    params = {**variables["params"], "language_model": traverse_util.unflatten_dict(lm, sep="/")}
    return {**variables, "params": params}

  # --- decoding ----------------------------------------------------------------------------------------------

  def _generate_impl(self, variables: Any, volumes: jax.Array) -> dict[str, jax.Array]:
    h, logits = self.module.apply(variables, volumes, method="detect")
    probs = jax.nn.sigmoid(logits)
    out = {"probs": probs, "detected": probs > self.thresholds}
    b, k = logits.shape
    if self.stage != "stage2":
      return {**out, "tokens": jnp.zeros((b, 1), jnp.int32), "scores": jnp.zeros((b,), jnp.float32),
              "steps": jnp.zeros((), jnp.int32)}
    z = self.module.apply(variables, h.reshape(b * k, -1), jnp.tile(jnp.arange(k), b), method="condition")
    m, length = self.module, int(self.config.data.max_seq_length)
    gpt = gpt2_module(m.gpt2, m.position_table, m.mask_mode, jnp.dtype(m.dtype))
    gpt_variables = {"params": {n: p for n, p in variables["params"]["language_model"].items() if n != FST}}
    eos = int(self.config.model.eos_token_id)
    prompt = jnp.full((b * k, 1), eos, jnp.int32)
    step_fn, state = decoding.gpt2_step_fns(gpt, gpt_variables, prompt, None, length, prefix=z)
    dec = decoding.hf_beam_search(step_fn, state, b * k, num_beams=int(self.config.decode.beam_size),
                                  max_length=length, eos_token_id=eos, pad_token_id=eos, prompt=prompt,
                                  length_penalty=BEAM_LENGTH_PENALTY, early_stopping=BEAM_EARLY_STOPPING,
                                  scorer=str(self.config.decode.get("beam_scorer", "v4")))
    return {**out, "tokens": dec.tokens.reshape(b, k, length), "scores": dec.scores.reshape(b, k),
            "steps": dec.steps}

  def generate(self, variables: Any, batch: Mapping[str, jax.Array], *, with_attention: bool = False
               ) -> dict[str, jax.Array]:
    """Eval mode (§7): ``probs`` (B, K), ``detected`` (B, K) bool (``p > τ``); stage 2: ``tokens`` (B, K, L) int32
    (``[eos] + sentence + eos``, then eos; L = ``data.max_seq_length``), ``scores`` (B, K) (HF
    ``sequences_scores``), ``steps`` (); stages 0/1: ``tokens`` zeros (B, 1). No attention maps
    (``with_attention`` is ignored)."""
    del with_attention
    return self._generate(variables, batch["volumes"])

  def decode_reports(self, tokenizer: Any, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]
                     ) -> tuple[list[str], list[str]]:
    """Stage 2: the generated report of each volume (§7 step 4: the detected abnormalities' decoded sentences in
    label order, ``No abnormalities detected.`` when none) and its reference (§7.2: the decoded target rows that
    are not empty, joined; "" without ``targets``). ``tokenizer``: the GPT-2 ``subword.SubwordTokenizer``. Stages
    0/1: "" for both."""
    from input_pipeline import ct_rate  # pylint: disable=g-import-not-at-top

    n = len(outputs["probs"])
    if self.stage != "stage2":
      return [""] * n, [""] * n
    tokens, detected = np.asarray(outputs["tokens"]), np.asarray(outputs["detected"], bool)
    generated = [ct_rate.assemble_report({int(k): ct_rate.decode_sentence(tokenizer, tokens[b, k])
                                          for k in np.flatnonzero(detected[b])}) for b in range(n)]
    if "targets" not in batch:
      return generated, [""] * n
    targets = np.asarray(batch["targets"])
    return generated, [ct_rate.reference_report(ct_rate.decode_sentence(tokenizer, row) for row in targets[b])
                       for b in range(n)]

  def after_stage(self, workdir: Any) -> dict[str, Any]:
    """After stage 1 of a staged run: the decision thresholds τ (§7.4) that maximise each abnormality's F1 of
    ``p > τ`` on the validation split (``ct_rate.best_f1_thresholds`` over the best stage-1 model's probabilities; a
    reconstruction — the code never computes them), written to ``workdir/thresholds.json`` (the released file's
    format) and handed to stage 2 as ``model.thresholds``. Other stages hand over nothing."""
    if self.stage != "stage1":
      return {}
    import pathlib  # pylint: disable=g-import-not-at-top

    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    from input_pipeline import ct_rate, loader  # pylint: disable=g-import-not-at-top
    from rrg_jax import checkpointing  # pylint: disable=g-import-not-at-top

    config, variables, tokenizer = checkpointing.load_inference(workdir)
    variables = jax.device_put(variables)
    probs, labels = [], []
    for batch in loader.eval_batches(config, tokenizer, "val"):
      valid = np.asarray(batch["valid"], bool)
      probs.append(np.asarray(self.generate(variables, {"volumes": batch["volumes"]})["probs"])[valid])
      labels.append(np.asarray(batch["labels"])[valid])
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    if jax.process_count() > 1:
      probs = np.asarray(multihost_utils.process_allgather(probs, tiled=True))
      labels = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
    thresholds = ct_rate.best_f1_thresholds(probs, labels)
    if jax.process_index() == 0:
      ct_rate.write_thresholds(pathlib.Path(workdir) / THRESHOLDS_FILE, thresholds)
    return {"model.thresholds": tuple(float(t) for t in thresholds)}

  @classmethod
  def torch_vocab_size(cls, state_dict: Mapping[str, np.ndarray], source: str) -> int:
    """GPT-2's vocabulary of a stage-2 checkpoint; −1 for the pre-training and stage-1 layouts (no text)."""
    if RELEASED_WTE in state_dict:
      return int(np.shape(state_dict[RELEASED_WTE])[0])
    if torch_layout(state_dict) in ("pretrain", "stage1"):
      return -1
    return super().torch_vocab_size(state_dict, source)

  # --- checkpoint conversion (§10.2–§10.4) ---------------------------------------------------------------------

  def torch_to_variables(self, state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """The original checkpoint of ``config.model.stage`` → ``{"params", "batch_stats"}``: pre-training (``CTNet``,
    under ``encoder/``), stage 1 (``CTNetStep``) or stage 2 (``ReportGenerationModel``, ``released_state_dict``);
    another stage's layout is a ConversionError saying which it is; then ``ctnet.TORCH_KEY_RENAMES`` and one
    ConversionError listing every missing, unexpected and mis-shaped key."""
    layout = torch_layout(state_dict)
    if layout != self.stage:
      what = f"a {layout} checkpoint ({_LAYOUT_HINTS[layout]})" if layout else "not a CT-AGRG checkpoint"
      raise ConversionError(f"{source} is {what}, but config.model.stage={self.stage!r} expects "
                            f"{_LAYOUT_HINTS[self.stage]}.")
    if self.stage == "stage2":
      state_dict = released_state_dict(state_dict, source)
    elif self.stage == "pretrain":
      state_dict = {f"encoder.{k}": v for k, v in state_dict.items()}
    return super().torch_to_variables(state_dict, source)
