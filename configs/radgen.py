"""RadGen experiment configs (radgen_spec.md §1).

Usage: ``--config=configs/radgen.py`` (``radgen_small`` on the embedded sample) or ``--config=configs/radgen.py:PRESET``:
* ``radgen_small``: from scratch on the embedded cxr_sample (§2.7: Normal / COVID-19 / Other pneumonia, patient-
  disjoint splits), word tokenizer, small widths (§3.10), 2 epochs: a CPU run that exercises everything.
* ``radgen``: the outline's system with the spec's [decision]s, full widths (Swin-B 224, BART-base, a BERT-base
  text encoder), 5-fold cross-validation; the data is the user's (CSV of §2.1: ``--config.data.data_dir``,
  ``--config.data.csv``).
* ``radgen_code``: the public code's behaviour where it is built as a switch (weight decay 0.001 on the new layers,
  BERT unfrozen at epoch 3, 10 epochs, report loss over pads, unmasked text mean, single fold 4).
* ``radgen_tiny``: unit tests (§3.10).
* Ablations (§9.2), each ``radgen`` + one change: ``wo_report_generation``, ``wo_report_loss``,
  ``wo_cross_attention``, ``wo_gate``, ``wo_progressive_unfreezing``, ``wo_class_weighting``,
  ``wo_imbalance_handling``.
* Baselines (§9.1): ``densenet121``, ``swin_b`` (image only), ``report_only`` (the ground-truth report through the
  text encoder), ``early_fusion``, ``late_fusion``, with RadGen's recipe (weighted sampler, class weights, per-group
  lr, warm-up + decay, 30 epochs, masked-mean text pooling) so that one thing varies; ``<baseline>_code``: the public
  code's recipe (one AdamW group at 1e-4, no schedule, no sampler, 10 epochs, mean over all text positions).

Tokenizers (§2.3): the word backend by default; the hf backend (BART BPE targets + a BERT WordPiece text encoder, the
generated report re-tokenised on the host, §3.6) with ``--config.data.report_tokenizer=BART_DIR
--config.data.text_tokenizer=BERT_DIR`` — ``radgen_code`` needs it (its ``retokenize = wrong_vocab``). Pretrained
weights (§10): ``--config.model.pretrained.{image_encoder,decoder,text_encoder}=HF_DIR`` (local folders).

Text baselines on generated reports (§9.1 ``baseline.text_source = generated``): ``report_only`` / ``early_fusion`` /
``late_fusion`` with ``--config.train.text_source=generated --config.eval.text_source=generated
--config.model.report_generator=RADGEN_RUN`` read a trained RadGen's beam-search reports instead of the radiologist's.
"""

import ml_collections

from configs import common
from input_pipeline import records

ABLATIONS = ("wo_report_generation", "wo_report_loss", "wo_cross_attention", "wo_gate", "wo_progressive_unfreezing",
             "wo_class_weighting", "wo_imbalance_handling")
# §9.1: preset → (model.arch, model.image_backbone); "<name>_code" = the same with the public code's recipe.
BASELINES = {"densenet121": ("image_only", "densenet121"), "swin_b": ("image_only", "swin"),
             "report_only": ("text_only", "swin"), "early_fusion": ("early_fusion", "swin"),
             "late_fusion": ("late_fusion", "swin")}
PRESETS = (("radgen_small", "radgen", "radgen_code", "radgen_tiny") + ABLATIONS + tuple(BASELINES)
           + tuple(f"{b}_code" for b in BASELINES))
CLASSES = ("Normal", "Pneumonia", "TB")


def _swin_b() -> ml_collections.ConfigDict:
  """microsoft/swin-base-patch4-window7-224 (§3.1)."""
  return ml_collections.ConfigDict({
      "image_size": 224, "patch_size": 4, "embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32),
      "window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True, "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.1, "use_absolute_embeddings": False,
      "layer_norm_eps": 1e-5})


def _bart_base() -> ml_collections.ConfigDict:
  """facebook/bart-base (§3.4); vocab_size −1 = the tokenizer's."""
  return ml_collections.ConfigDict({
      "vocab_size": -1, "max_position_embeddings": 1024, "d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
      "encoder_attention_heads": 12, "decoder_attention_heads": 12, "encoder_ffn_dim": 3072,
      "decoder_ffn_dim": 3072, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1,
      "scale_embedding": False, "pad_token_id": 1, "init_std": 0.02})


def _bert_base() -> ml_collections.ConfigDict:
  """Bio_ClinicalBERT (BERT-base, §3.7); vocab_size −1 = the tokenizer's."""
  return ml_collections.ConfigDict({
      "vocab_size": -1, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
      "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
      "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0})


def _small(m: ml_collections.ConfigDict, *, tiny: bool) -> None:
  """§3.10's ``radgen_small`` / ``radgen_tiny`` widths."""
  if tiny:
    m.swin.update(image_size=56, patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4))
    d, heads, ffn, text_ffn, hidden = 32, 4, 64, 64, (16, 8)
    m.fusion_dim, m.fusion_heads, m.fusion_ffn = 32, 4, 128
  else:
    m.swin.update(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    d, heads, ffn, text_ffn, hidden = 256, 4, 1024, 1024, (128, 64)
    m.fusion_dim, m.fusion_heads, m.fusion_ffn = 256, 4, 1024
  m.bart.update(d_model=d, encoder_layers=1, decoder_layers=2, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=64)
  m.bert.update(hidden_size=d, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=text_ffn,
                max_position_embeddings=128)
  m.classifier_hidden = hidden


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  preset = preset or PRESETS[0]
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/radgen.py; choose one of {PRESETS}.")
  c = common.base_config(preset)
  c.seed = 42

  # --- data (§2) ---------------------------------------------------------------------------------------------
  d = c.data
  d.name = "radgen"
  d.format = "csv"                      # §2.1: Image, Category, fold, Impression
  d.csv = "radgen.csv"
  d.class_map = tuple((name, (name,)) for name in CLASSES)
  d.labels = ""
  d.label_mode = "single"
  d.report_tokenizer = ""               # §2.3: "" = the word backend | a BART BPE folder (hf backend)
  d.text_tokenizer = ""                 # hf backend: the text encoder's BERT WordPiece folder (e.g. Bio_ClinicalBERT)
  d.clean = "mimic"
  d.threshold = 3
  d.max_seq_length = 65                 # word: 1 + the 64 decoder positions; hf: set 64 (§2.3)
  d.text_max_tokens = 128               # T_t (§2.3)
  d.image_size = 224
  d.resize = 224
  d.augment = "radgen"                  # §2.2: resize, flip, rotation, colour jitter, translation
  d.hflip = True                        # [read] kept for fidelity (§2.2)
  d.weighted_sampler = True             # §2.6
  d.drop_last = False                   # S = ceil(N / B); the last batch padded with sample_weight 0
  d.sample_weights = True
  d.fold = 0                            # cv fold k: train on the other folds, evaluate on fold k (§7)
  d.num_folds = 5
  d.fold_seed = 42

  # --- model (§3) --------------------------------------------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.name = "radgen"
  m.vocab_size = -1                     # the word tokenizer's K (filled at start-up)
  m.num_classes = len(CLASSES)
  m.swin = _swin_b()
  m.bart = _bart_base()
  m.bert = _bert_base()
  m.arch = "radgen"                     # | image_only | text_only | early_fusion | late_fusion (§9.1 baselines)
  m.image_backbone = "swin"             # the baselines' image encoder: swin | densenet121
  m.baseline_image_hidden = 512         # §9.1 heads
  m.baseline_text_hidden = 256
  m.baseline_fusion_hidden = (512, 256)
  m.report_branch = True                # False: wo_report_generation (no decoder, no text branch, z = z_img)
  m.visual_memory = "patch"             # [decision] 49 tokens | pooled (one token)
  m.adapter_input = "projected"         # [decision] the 512-d projected tokens | swin (code: 1024-d Swin tokens)
  m.use_encoder = True                  # [read] BART encoder over the visual tokens
  m.drop_path_on_mlp = False            # HF Swin semantics
  m.fusion_dim = 512                    # D
  m.fusion_heads = 8
  m.fusion_ffn = 2048
  m.fusion_dropout = 0.1                # on both attentions' probabilities and in the FFN (§3.8)
  m.fusion_mode = "cross_attention"     # | concat (wo_cross_attention)
  m.text_pool = "masked_mean"           # [decision] | mean_all (code) | cls
  m.gate = True
  m.gate_mix = "fused"                  # [decision, = code] | pooled (the outline read literally)
  m.classifier_hidden = (256, 128)
  m.classifier_dropout = 0.3
  m.class_weights = (8.0, 1.0, 3.2)     # [read] | "auto" = max_k n_k / n_c of the train split
  m.report_weight = 0.3                 # λ
  m.report_ignore_pad = True            # [decision] | False (code: pads counted)
  m.dtype = "float32"                   # compute dtype: float32 | bfloat16
  # §10: local HF folders (config.json + model.safetensors / pytorch_model.bin) loaded into a fresh run; "" = random init.
  m.pretrained = ml_collections.ConfigDict({"image_encoder": "", "decoder": "", "text_encoder": ""})
  # §9.1 text baselines with train/eval.text_source = generated: a trained RadGen (workdir or checkpoint) whose
  # beam-search reports the baseline reads (same report tokenizer); "" = none.
  m.report_generator = ""

  # --- training (§3.6, §5) -------------------------------------------------------------------------------------
  c.train.epochs = 30
  c.train.batch_size = 8
  # §3.6: the report each training step classifies is beam-searched with the current parameters; [decision] no dropout.
  # retokenize (hf backend): text (decode with the decoder's tokenizer) | wrong_vocab (the code: BART ids read as BERT's).
  c.train.generation = ml_collections.ConfigDict({"deterministic": True, "num_beams": 4, "retokenize": "text"})
  c.train.text_source = "generated"     # what the text encoder reads in training: generated | ground_truth (§3.6)
  c.eval.text_source = "generated"
  c.train.selection = ml_collections.ConfigDict({"val_macro_auc": 1.0})    # §5.4: macro-AUC
  c.train.selection_min_delta = 0.001
  c.train.early_stop = 9                # the 10th non-improving epoch in a row stops (patience 10)
  c.train.eval_splits = ("val",)        # cv: the held-out fold (data.fold) is val and test
  o = c.optim = ml_collections.ConfigDict()
  o.param_groups = ml_collections.ConfigDict({"image": ("image_encoder",), "decoder": ("decoder",),
                                              "text": ("text_encoder",), "head": ("",)})
  o.lr_image, o.lr_decoder, o.lr_text, o.lr_head = 1e-5, 2e-5, 2e-5, 1e-4
  o.optimizer = "adamw"
  o.weight_decay = 0.01
  o.b1, o.b2, o.eps, o.amsgrad = 0.9, 0.999, 1e-8, False
  o.clip_value = 0.0
  o.clip_norm = 1.0
  o.schedule = "linear_warmup_decay"
  o.warmup_epochs = 3
  o.decay = "linear"                    # [read] | constant
  o.frozen_epochs = ml_collections.ConfigDict({"image": 0, "decoder": 0, "text": 4, "head": 0})  # U (§5.2)
  o.frozen = ()

  # --- evaluation and decoding (§3.5, §6) ---------------------------------------------------------------------
  c.eval.evaluators = ("classification", "report_text")
  c.eval.protocol = "cv"                # §7: the 5 folds in turn (WORKDIR/fold_k), mean ± std in cv_metrics.json;
                                        # cv_inner_val: select on fold k + 1, report fold k (unbiased)
  c.decode.beam_size = 4
  c.decode.length_penalty = 1.0
  c.decode.no_repeat_ngram_size = 3

  if preset == "radgen_code":
    c.train.generation.deterministic = False  # [quirk] HF generate on a model in train mode: dropout, drop path
    c.train.generation.retokenize = "wrong_vocab"  # [quirk] needs the hf backend's tokenizer files
    d.max_seq_length = 64
    o.weight_decay_head = 0.001
    o.frozen_epochs.text = 3
    c.train.epochs = 10
    m.report_ignore_pad = False
    m.text_pool = "mean_all"
    m.adapter_input = "swin"
    d.fold = 4                          # single_fold: train on folds 0-3, select and report on fold 4
    c.eval.protocol = "single"
  elif preset in ("radgen_small", "radgen_tiny"):
    _small(m, tiny=preset == "radgen_tiny")
    d.format = "r2gen"
    d.name, d.data_dir, d.csv = "cxr_sample", "", ""
    d.labels = "labels.json"
    d.class_map = records.SAMPLE_CLASS_MAP  # §2.7: Normal / COVID-19 / Other pneumonia
    d.fold = -1                         # the sample's own patient-disjoint train / val / test
    c.eval.protocol = "single"
    d.group_key = "id_prefix"
    d.threshold = 2
    c.train.eval_splits = ("val", "test")
    c.train.epochs = 2
    c.train.log_every_steps = 1
    o.warmup_epochs = 1
    o.frozen_epochs.text = 1
    c.decode.beam_size = 2
    c.train.generation.num_beams = 1  # §3.6 allows 1 for small runs: every step generates
    if preset == "radgen_tiny":
      d.image_size = d.resize = 56
      d.max_seq_length, d.text_max_tokens = 17, 20
      c.train.batch_size = 4
  elif preset == "wo_report_generation":
    m.report_branch = False
    m.report_weight = 0.0
  elif preset == "wo_report_loss":
    m.report_weight = 0.0
  elif preset == "wo_cross_attention":
    m.fusion_mode = "concat"
    m.gate = False
  elif preset == "wo_gate":
    m.gate = False
  elif preset == "wo_progressive_unfreezing":
    o.frozen_epochs.text = 0
  elif preset == "wo_class_weighting":
    m.class_weights = (1.0, 1.0, 1.0)
  elif preset == "wo_imbalance_handling":
    m.class_weights = (1.0, 1.0, 1.0)
    d.weighted_sampler = False
  elif preset.removesuffix("_code") in BASELINES:
    m.arch, m.image_backbone = BASELINES[preset.removesuffix("_code")]
    m.report_branch = False
    m.report_weight = 0.0
    c.train.text_source = c.eval.text_source = "ground_truth"  # [read] the radiologist's report, also at validation
    o.frozen_epochs.text = 0
    if preset.endswith("_code"):  # [read] the code's baseline recipe
      o.param_groups = ml_collections.ConfigDict({"all": ("",)})
      o.lr_all = 1e-4
      o.frozen_epochs = ml_collections.ConfigDict({"all": 0})
      o.decay = "constant"
      o.warmup_epochs = 0
      c.train.epochs = 10
      d.weighted_sampler = False
      m.text_pool = "mean_all"
  return c
