"""CT-AGRG experiment configs (ct_agrg_spec.md §1, §12).

Usage: ``--config=configs/ct_agrg.py`` (``synthetic``) or ``--config=configs/ct_agrg.py:PRESET``:
* ``synthetic`` (default): the whole pipeline on the embedded **SYNTHETIC** chest-CT set (``input_pipeline.
  synthetic_ct``; phantoms, not patient data) at 24 × 192 × 192 with small widths: pre-training → stage 1 →
  stage 2 in one command (``eval.protocol = "stages"``, ``WORKDIR/<stage>/`` each, resumable), then the per-
  abnormality F1 / AUC of the detector, report metrics and the rule labeler's clinical efficacy.
* ``ct_rate``: the three stages in one command (as ``synthetic``) at full size with the original recipes, on CT-RATE
  contract files (below).
* ``pretrain``, ``stage1``, ``stage2``: each stage alone, the original scripts' recipes (§1, §4, §5, §6.5) on CT-RATE contract files
  (``--config.data.data_dir``, ``data.splits``; ``input_pipeline.ct_prepare`` writes them from NIfTI), full size
  (240 × 480 × 480, ResNet-18, GPT-2 medium from ``model.gpt2_pretrained``, a local healx/gpt-2-pubmed-medium
  folder, also ``data.report_tokenizer``). Each stage starts from the previous one with ``train.init_from``;
  stage 2 needs the thresholds (``model.thresholds_file``, the §7.4 JSON; the ``synthetic`` chain computes them).
* ``inference``: the stage-2 model for the released checkpoint (``python -m rrg_jax.convert``), eval only.
* ``tiny``: unit tests.

Quirk switches (§12.2; parity value first): ``model.position_table`` (wte | wpe), ``model.encoder_mode_stage2``
(train | eval), ``model.train_selection`` (true_positive | label_positive), ``model.conditioning`` (block | raw),
``model.loss_norm`` (all_positions | tokens), ``optim.grad_scale`` (65536 | 1), ``optim.accumulate_remainder``
(drop | apply), ``model.head_grad_factor`` (2 | 1), ``data.shuffle`` (False | True).
"""

import ml_collections

from configs import common
from input_pipeline import ct_rate

PRESETS = ("synthetic", "ct_rate", "pretrain", "stage1", "stage2", "inference", "tiny")
STAGES = ("pretrain", "stage1", "stage2")
FULL_VOLUME = (240, 480, 480)
SYNTHETIC_VOLUME = (24, 192, 192)


def _gpt2_medium() -> ml_collections.ConfigDict:
  """healx/gpt-2-pubmed-medium = GPT-2 medium (§6.3); vocab_size −1 = the tokenizer's."""
  return ml_collections.ConfigDict({
      "vocab_size": -1, "n_positions": 1024, "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_inner": None,
      "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
      "resid_pdrop": 0.1, "scale_attn_weights": True})


def _splits(sentences: bool) -> ml_collections.ConfigDict:
  """CT-RATE has no test split: val is carved out of train (its own labels CSV over the train folder), test is
  CT-RATE validation (§2.1). Paths relative to ``data.data_dir``."""
  def split(folder: str, name: str) -> dict[str, str]:
    return {"volumes": folder, "labels": f"{name}_labels.csv",
            "sentences": f"{name}_sentences.csv" if sentences else ""}
  return ml_collections.ConfigDict({"train": split("train", "train"), "val": split("train", "val"),
                                    "test": split("valid", "test")})


def _stage(stage: str) -> ml_collections.ConfigDict:
  """The overrides that turn the base (stage-2) config into ``stage`` (§4, §5, §6.5)."""
  s = ml_collections.ConfigDict()
  s.model = ml_collections.ConfigDict({"stage": stage})
  s.data = ml_collections.ConfigDict({"splits": _splits(sentences=stage == "stage2")})
  s.train = ml_collections.ConfigDict()
  s.optim = ml_collections.ConfigDict()
  s.eval = ml_collections.ConfigDict()
  if stage == "stage2":
    return s
  # §4 / §5: Adam (no decay), StepLR(40, 0.5) per epoch, batch 4, every parameter trained, no accumulation.
  s.optim.update(optimizer="adam", weight_decay=0.0, clip_value=0.0, frozen=(), accumulate_steps=1, grad_scale=1.0,
                 decay_epochs=40, decay_rate=0.5)
  s.train.update(batch_size=4, selection=ml_collections.ConfigDict({"epoch": 0.0, "val_macro_auc": 1.0}),
                 selection_ties_improve=False, eval_splits=("val",))  # the code scores no split; val selects
  s.eval.evaluators = ("classification",)
  if stage == "pretrain":
    s.optim.lr_all = 1e-4
    s.train.epochs = 40
    s.train.init_from = ml_collections.ConfigDict({"take": ()})
  else:
    s.optim.lr_all = 1e-5  # §5: lr_backbone = lr_heads = 1e-5 (one epoch)
    s.train.epochs = 1
    s.train.init_from = ml_collections.ConfigDict({"take": ("encoder",)})
  return s


def _apply(c: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict) -> None:
  for key, value in overrides.items():
    if isinstance(value, ml_collections.ConfigDict) and isinstance(c[key], ml_collections.ConfigDict):
      _apply(c[key], value)
    else:
      c[key] = value


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  preset = preset or PRESETS[0]
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/ct_agrg.py; choose one of {PRESETS}.")
  synthetic = preset in ("synthetic", "tiny")
  c = common.base_config(preset)
  c.seed = 0

  # --- data (§2) ---------------------------------------------------------------------------------------------
  d = c.data
  d.name = "ct_rate"
  d.format = "ct_rate"
  d.data_dir = ""                       # "" = the embedded SYNTHETIC set (input_pipeline.ct_examples)
  d.labels = ""
  d.class_names = ct_rate.ABNORMALITIES  # the 18 outputs' names (§2.5), for scores and reports
  d.splits = _splits(sentences=True)
  d.volume_shape = SYNTHETIC_VOLUME if synthetic else FULL_VOLUME
  d.synthetic_sizes = (96, 24, 24)      # (train, val, test) volumes of the synthetic set (data_dir "")
  d.max_seq_length = 60                 # §2.6: tokenizer truncation and generation max_length
  d.report_tokenizer = ""               # GPT-2 files (healx); "" with the synthetic set = its own trained BPE
  d.shuffle = False                     # §2.1: no loader shuffles (sorted file order)

  # --- model (§3, §5, §6) --------------------------------------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.name = "ct_agrg"
  m.stage = "stage2"                    # pretrain | stage1 | stage2 (also the inference model)
  m.vocab_size = -1                     # the tokenizer's (filled at start-up)
  m.num_abnormalities = len(ct_rate.ABNORMALITIES)
  m.num_classes = len(ct_rate.ABNORMALITIES)
  m.volume_shape = d.get_ref("volume_shape")
  m.resnet_widths = (64, 128, 256, 512)
  m.classifier_hidden = (2048, 512, 128)
  m.abnormality_dim = 1024              # d
  m.head_hidden = 128
  m.dropout_rate = 0.5
  m.fst_hidden = (4096, 1024)
  m.conditioning = "block"              # block (code) | raw
  m.gpt2 = _gpt2_medium()
  m.gpt2_pretrained = ""                # a local GPT-2 folder loaded into a fresh stage-2 run (uk/uv, MLP: new)
  m.position_table = "wte"              # wte (code; the released weights need it) | wpe
  m.mask_mode = "rgrg"
  m.encoder_mode_stage2 = "train"       # train (code: batch-stat BN updated, dropout on) | eval
  m.train_selection = "true_positive"   # true_positive (code) | label_positive
  m.loss_norm = "all_positions"         # all_positions (code) | tokens
  m.head_grad_factor = 2.0              # stage 1: 2 (code's double backward) | 1
  m.thresholds = (0.5,) * len(ct_rate.ABNORMALITIES)  # τ (§7.4); a staged run sets stage 1's best-F1 ones
  m.thresholds_file = ""                # §7.4 JSON (the released thresholds.json) read at start-up when given
  m.eos_token_id = -1                   # <|endoftext|>; −1 = the last id of the vocabulary (GPT-2: 50256)
  m.remat = False
  m.dtype = "float32"

  # --- training (§6.5) -------------------------------------------------------------------------------------------
  t = c.train
  t.epochs = 99                         # range(1, 100)
  t.batch_size = 8
  t.early_stop = 1000                   # none in the code
  # No model selection in the code: the last epoch is kept (pretrain / stage 1 select on val macro-AUC).
  t.selection = ml_collections.ConfigDict({"epoch": 1.0, "val_macro_auc": 0.0})
  t.selection_ties_improve = False
  t.eval_splits = ("val", "test")
  t.log_every_steps = 10
  t.stages = STAGES
  t.init_from = ml_collections.ConfigDict({"checkpoint": "", "take": ("visual_encoder=",)})
  o = c.optim = ml_collections.ConfigDict()
  # One group in every stage (lr: pretrain 1e-4, stage 1 1e-5, stage 2 5e-5). Trainable in stage 2: each layer's
  # uk / uv and the conditioning MLP; the visual encoder and GPT-2's own weights are frozen.
  o.param_groups = ml_collections.ConfigDict({"all": ("",)})
  o.lr_all = 5e-5
  o.frozen = ("visual_encoder", "/wte", "/wpe", "/ln_", "/c_attn", "/c_proj", "/c_fc")
  o.frozen_epochs = ml_collections.ConfigDict()
  o.optimizer = "adamw"
  o.weight_decay = 0.01
  o.b1, o.b2, o.eps, o.amsgrad = 0.9, 0.999, 1e-8, False
  o.clip_value = 0.1
  o.clip_norm = 0.0
  o.accumulate_steps = 8                # batch_size_sim 64 / 8
  o.grad_scale = 65536.0                # the never-unscaled GradScaler (CUDA); 1 = clean
  o.accumulate_remainder = "drop"       # drop (code) | apply
  o.schedule = "step_lr"
  o.decay_epochs = 50
  o.decay_rate = 0.1
  o.warmup_epochs = 0
  o.warmup_lr = 5e-5

  # --- evaluation and decoding (§7, §8) ---------------------------------------------------------------------
  c.eval.evaluators = ("classification", "report_text", "ct_clinical_efficacy")
  c.eval.protocol = "single"
  c.decode.beam_size = 4
  c.decode.beam_scorer = "v4"  # transformers 4.x BeamSearchScorer (the code's, §7.1) | v5
  c.decode.method = "beam"

  c.stages = ml_collections.ConfigDict({s: _stage(s) for s in STAGES})
  if preset in STAGES:
    _apply(c, c.stages[preset])
  if preset == "inference":
    t.eval_splits = ("test",)
  if preset == "ct_rate":
    c.eval.protocol = "stages"
  if synthetic:
    _synthetic(c, tiny=preset == "tiny")
  return c


def _synthetic(c: ml_collections.ConfigDict, *, tiny: bool) -> None:
  """Small widths and a CPU recipe for the synthetic set (all three stages in ~15 min on 2 cores), or tiny ones
  for tests. Departures from the original recipes, all for a from-scratch run on ~100 phantoms: 24 slices (8 slice
  triplets; the CT-Net shapes follow from the volume, §12.4), a shuffled loader, dropout 0.1, linear warm-up / decay
  schedules, no gradient accumulation, and GPT-2 trained whole in stage 2 — there is no pre-trained GPT-2 here (the
  original fine-tunes only uk / uv and the conditioning MLP of a pre-trained one)."""
  m, t, o = c.model, c.train, c.optim
  m.resnet_widths = (8, 16, 32, 64) if tiny else (16, 32, 64, 128)
  m.classifier_hidden = (32, 16, 8) if tiny else (256, 128, 64)
  m.abnormality_dim = 16 if tiny else 64
  m.head_hidden = 8 if tiny else 32
  m.fst_hidden = (32, 16) if tiny else (256, 64)
  m.gpt2.update(n_positions=64, n_embd=16 if tiny else 64, n_layer=1 if tiny else 2, n_head=2 if tiny else 4)
  c.data.max_seq_length = 40
  c.data.shuffle = True
  c.decode.beam_size = 2 if tiny else 4
  t.batch_size = 4
  m.dropout_rate = 0.1                  # 0.5 in the code; the small synthetic widths learn little under it
  t.log_every_steps = 1
  o.accumulate_steps = 1                # 96 volumes make 24 batches an epoch: every one an update
  o.grad_scale = 1.0                    # a CPU run: the GradScaler disables itself without CUDA (§6.5)
  o.frozen = ("visual_encoder",)        # GPT-2 from scratch: every language-model weight trains
  o.schedule = "linear_warmup_decay"
  o.warmup_epochs = 0
  o.lr_all = 2e-3
  t.epochs = 2 if tiny else 12
  t.eval_every_epochs = t.epochs        # stage 2 decodes val and test once, after its last epoch
  for stage, epochs, warmup, lr in (("pretrain", 14, 1, 1e-3), ("stage1", 4, 0, 1e-3)):
    s = c.stages[stage]
    s.train.epochs = 1 if tiny else epochs
    s.train.eval_every_epochs = 1       # val macro-AUC selects the model
    s.optim.update(schedule="linear_warmup_decay", warmup_epochs=0 if tiny else warmup, lr_all=lr)
  c.eval.protocol = "stages"
  if tiny:
    c.data.volume_shape = (12, 192, 192)
    c.data.synthetic_sizes = (16, 8, 8)
    c.stages.stage2.train.epochs = 1
