"""The config sections every image→report system shares (data, training loop, evaluation, decoding, devices).

Each ``configs/<system>.py`` starts from ``base_config()`` and sets its model, loss and optimiser and its
presets' recipe values. Defaults here are the R2Gen-layout pipeline's; nothing here is system-specific.
"""

import ml_collections


def base_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.compilation_cache = "default"  # persistent XLA cache: a directory, "off" or "default" (rrg_jax.compilation_cache)

  # --- data (R2Gen layout; input_pipeline.loader) --------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "cxr_sample"            # iu_xray | mimic_cxr | cxr_sample (TFDS builder name)
  c.data.data_dir = ""                  # R2Gen layout folder; "" = the embedded sample
  c.data.annotation = "annotation.json"  # relative to data_dir
  c.data.labels = "labels.json"         # relative to data_dir; "" = no labels
  c.data.label_key = "id"               # "id" (MIMIC, sample) | "iu" (first two '-' pieces)
  c.data.num_views = 1                  # 2 for IU X-Ray
  c.data.clean = "mimic"                # report cleaning rules: "iu" | "mimic"
  c.data.threshold = 3                  # vocabulary min count
  c.data.report_tokenizer = ""          # HF tokenizer folder (BPE: BART / GPT-2) for the reports; "" = the word
                                        # vocabulary of the train split (threshold, clean)
  c.data.max_seq_length = 60            # ids incl. BOS, truncated after BOS/EOS; also the decoding length
  c.data.image_size = 224
  c.data.resize = 256                   # train: shorter side -> resize, then random crop image_size
  c.data.augment = "flip"               # "flip" (random crop + h-flip) | "rotate_scale" (CAMANet MIMIC --randaug)
  c.data.source = "folder"              # "folder" (direct Grain source) | "tfds" (ArrayRecord via TFDS)
  c.data.tfds_dir = ""                  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.shuffle = True                 # train order: a new permutation every epoch; False = annotation order
  c.data.num_workers = 0                # Grain worker processes (0 = in-process)
  c.data.on_bad_record = "error"        # "error" | "skip"
  c.data.hflip = True                   # the random horizontal flip of augment "flip" / "radgen" (RadGen §2.2)
  # Records and single-label classes (RadGen §2.1, §2.4, §2.7; input_pipeline.records).
  c.data.format = "r2gen"               # "r2gen" (annotation.json + labels.json) | "csv" (one CSV, spec §2.1)
  c.data.csv = ""                       # format "csv": the CSV file, relative to data_dir
  c.data.image_dir = "images"           # format "csv": the image folder, relative to data_dir
  # ((class name, (source names, ...)), ...) in class-id order = priority; a source is a CSV Category or a labels.json
  # class, "*" takes any record; () = none for "r2gen", Normal / Pneumonia / TB for "csv".
  c.data.class_map = ()
  c.data.label_mode = "multi"           # batch labels: "multi" float32 (B, C) | "single" int32 (B,) class-map ids
  # Cross-validation folds (RadGen §2.5, §7; input_pipeline.sampling).
  c.data.fold = -1                      # k >= 0: train = folds != k, val = test = fold k; -1 = the annotation's splits
  c.data.num_folds = 5
  c.data.inner_val = False              # True: val = fold k + 1 (early stopping), test = fold k, train = the rest
  c.data.fold_seed = 0                  # seed of the stratified fold rule (when the records carry no fold)
  c.data.group_key = ""                 # fold unit: "" = record | "id_prefix" = the id before the first "_" (patient)
  # Training batches (RadGen §2.6).
  c.data.weighted_sampler = False       # each epoch draws N records with replacement, P(i) ∝ N / (C n_{y_i})
  c.data.drop_last = True               # False: keep the last partial batch, padded (needs sample_weights)
  c.data.sample_weights = False         # batches carry sample_weight float32 (B,): 1 real row, 0 padding row

  # --- training loop (rrg_jax.train) ----------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 30
  c.train.batch_size = 16               # global batch (train, val and test)
  c.train.early_stop = 10               # stop after early_stop + 1 epochs in a row without improvement
  c.train.keep_checkpoints = 3
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 0    # also save mid-epoch every N steps (0 = only at epoch ends)
  c.train.eval_splits = ("val", "test")
  c.train.eval_every_epochs = 1          # score eval_splits every N epochs (and always after the last)
  c.train.max_eval_examples = -1        # -1 = whole split
  # Model selection: score = Σ weight · epoch-row value (val_* scores); improved if greater (or equal with ties).
  c.train.selection = ml_collections.ConfigDict({"val_BLEU_4": 1.0})
  c.train.selection_ties_improve = False
  # Staged training: start a fresh run from another run's weights (a workdir or inference checkpoint).
  # take: parameter-path prefixes copied ("" = all; "dst=src" copies checkpoint subtree src into dst).
  c.train.init_from = ml_collections.ConfigDict({"checkpoint": "", "take": ("",)})

  # --- evaluation (rrg_jax.evaluators) --------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.evaluators = ("report_text",)
  c.eval.protocol = "single"            # "single" (one run on the splits / data.fold) | "cv" (every fold, rrg_jax.train)

  # --- decoding (rrg_jax.decoding) ------------------------------------------------------------------------
  c.decode = ml_collections.ConfigDict()
  c.decode.method = "beam"              # "beam" | "greedy"
  c.decode.beam_size = 3
  c.decode.cached = True                # incremental KV-cached decoder; False = full-prefix (original)

  # --- devices --------------------------------------------------------------------------------------------
  c.mesh_shape = (-1,)                  # sizes of the ("data",) mesh axis; -1 = all devices
  return c


def set_iu_xray_data(d: ml_collections.ConfigDict) -> None:
  """IU X-Ray in the R2Gen layout: two views, IU cleaning, label key = the study (first two id pieces)."""
  d.name = "iu_xray"
  d.data_dir = "data/iu_xray"
  d.label_key = "iu"
  d.num_views = 2
  d.clean = "iu"
  d.threshold = 3
  d.max_seq_length = 60


def set_mimic_cxr_data(d: ml_collections.ConfigDict) -> None:
  """MIMIC-CXR in the R2Gen layout: one view (image_path[0]), MIMIC cleaning, threshold 10, 100 tokens."""
  d.name = "mimic_cxr"
  d.data_dir = "data/mimic_cxr"
  d.label_key = "id"
  d.num_views = 1
  d.clean = "mimic"
  d.threshold = 10
  d.max_seq_length = 100


def add_memory_driven_transformer(m: ml_collections.ConfigDict) -> None:
  """The R2Gen memory-driven transformer's hyper-parameters (R2Gen's and CAMANet's defaults) on ``config.model``."""
  m.vocab_size = -1                     # K = |vocab| + 1; filled from the tokenizer at start-up
  m.d_model = 512
  m.d_ff = 512                          # the FFN inner width is 512, not 2048
  m.num_heads = 8
  m.num_layers = 3                      # encoder and decoder each
  m.dropout = 0.1
  m.drop_prob_lm = 0.5                  # after the visual projection att_embed
  m.rm_num_slots = 3
  m.rm_num_heads = 8
  m.rm_d_model = 512
  m.separate_embedding_dropout = False  # True: the target embedding's dropout drawn twice (RM, decoder), as R2Gen
  m.dtype = "float32"                   # compute dtype: "float32" | "bfloat16" (params stay fp32)
  m.remat = False                       # rematerialise the backbone's blocks


def r2gen_optim(lr_ve: float, lr_ed: float) -> ml_collections.ConfigDict:
  """torch Adam (AMSGrad, coupled L2) over the two groups of the R2Gen-family trainers: the visual extractor
  (``lr_ve``) and everything else (``lr_ed``), gradient value clipping 0.1."""
  o = ml_collections.ConfigDict()
  o.param_groups = ml_collections.ConfigDict({"ve": ("visual_extractor",), "ed": ("",)})
  o.lr_ve = lr_ve
  o.lr_ed = lr_ed
  o.frozen_epochs = ml_collections.ConfigDict({"ve": 0, "ed": 0})
  o.weight_decay = 5e-5
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.amsgrad = True
  o.clip_value = 0.1
  o.schedule = "timm_step"              # "timm_step" (per step, one-step lag) | "step_lr" (torch StepLR per epoch)
  o.warmup_epochs = 0
  o.warmup_lr = 1e-4
  o.decay_epochs = 50
  o.decay_rate = 0.8
  o.frozen = ()                         # parameter-path substrings never updated
  return o
