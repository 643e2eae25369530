"""Align2Gen (D2R-Net) experiment configs (align2gen_spec.md §15).

Usage: ``--config=configs/align2gen.py`` (embedded sample) or ``--config=configs/align2gen.py:PRESET``:
* ``sample``: the embedded cxr_sample with the boxes committed beside it (``annotation_boxes.json``: CAM boxes of
  a CAMANet sample run, made by ``python -m rrg_jax.boxes``; provenance in ``annotation_boxes.json.provenance.json``), at
  a CPU size (224² images, ResNet-18, 96² crops, a 2-layer BERT): a short run that exercises everything.
* ``mimic_cxr``: the official code's defaults (``main.py``): 384², ResNet-101, BERT-base ×2, batch 32, 50 epochs,
  Adam/AMSGrad 1e-4 for every group, cosine T_max 25 per epoch with eta_min 0, value clip 0.1, unshuffled train
  order, beam 3 / 100 tokens, BLEU-4 selection (ties improve). Needs ``annotation.json`` with per-record ``boxes``,
  ``scores``, ``height``, ``width`` (spec §2.1; ``python -m input_pipeline.boxes vindr`` converts VinDr-CXR CSVs,
  ``python -m rrg_jax.boxes`` makes CAM boxes), ``model.pretrained_backbone`` (torchvision resnet101 .pth) and
  ``model.bert_pretrained`` (an HF bert-base-uncased folder; also ``data.text_tokenizer``) for the original start.
* ``base``: R2Gen with the global branch (ResNet-101 + CPCA + embedder) only: no boxes, no GAB/LAB.

[CODE] = the official code (parity target, quirks as switches with a corrected value beside them).
[RECON] = a reconstruction of what the official code never published (``modulesS/alignment.py``, ``LERA.py``;
spec §4.2, §6): switchable, not the paper's method.
"""

import ml_collections

from configs import common

PRESETS = ("sample", "mimic_cxr", "base")


def _bert_base() -> ml_collections.ConfigDict:
  """bert-base-uncased's config.json fields (spec §5); vocab_size −1 = the text tokenizer's size."""
  return ml_collections.ConfigDict({
      "vocab_size": -1, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
      "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
      "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0})


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  preset = preset or "sample"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/align2gen.py; choose one of {PRESETS}.")
  c = common.base_config(preset)
  c.seed = 456789
  d = c.data
  common.set_mimic_cxr_data(d)
  d.labels = ""                         # Align2Gen reads no labels
  d.image_size = 384                    # §2.5: val/test Resize((384, 384)); train Resize(train) → RandomCrop(384)
  d.resize = 439                        # [RECON] the code's Resize(256) → RandomCrop(384) crashes (§2.5)
  d.shuffle = False                     # [CODE] the train loader is not shuffled (§2.8)
  d.features = ("lesion_regions", "report_texts")
  # --- lesion boxes (input_pipeline.boxes; §2.1, §2.6) ---
  d.box_format = "coco_xywh"            # coco_xywh ([x, y, w, h], the code's) | xyxy
  d.max_boxes = 8                       # M (unknown in the code; the spec suggests 8)
  d.min_box_score = 0.0
  d.box_crop = "code"                   # [CODE] scaled coordinates cropped from the original image | corrected
  d.pad_fix = False                     # [CODE] the square-padding helper swaps width and height | True: fixed
  d.region_size = 384                   # crops resized to R × R
  # --- BERT inputs (input_pipeline.report_texts; §2.7, §14 item 29) ---
  d.text_tokenizer = ""                 # HF BERT tokenizer folder; "" = train a WordPiece one into WORKDIR
  d.text_tokenizer_vocab_size = 2000    # ids of that trained tokenizer
  d.text_max_tokens = 256
  d.sentence_max_tokens = 128
  d.max_sentences = 32

  # --- model ----------------------------------------------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.name = "align2gen"
  m.backbone = "resnet101"              # [CODE] global branch trunk (the code hard-codes 2048 channels for CPCA)
  m.resnet_widths = (64, 128, 256, 512)
  m.cpca_reduce = 4                     # [CODE] CPCA channel-attention reduction
  m.global_head = "cpca"                # [CODE] CPCA + local_embedder | none (R2Gen's plain ResNet tokens)
  m.simple_widths = (64, 128, 256, 512, 1024)  # [CODE] SimpleConvNet; the last = embed_size d_e (1024)
  m.lera = "ppa"                        # [RECON] LERA: ppa (HCF-Net PPA(3, 3)) | identity (no LERA)
  m.lera_dropout = 0.1
  m.region_bn = "per_region"            # [CODE] batch-size-1 BatchNorm per crop | batched (corrected)
  m.fuse = "concat"                     # [RECON] att_feats = patches ++ regions | patches_only (R2Gen-style)
  m.mask_empty_regions = True           # [RECON] empty box slots hidden from attention | False: 1e-8 tokens seen
  m.gab = True                          # [RECON] global alignment: report tokens ↔ patch tokens
  m.lab = True                          # [RECON] local alignment: sentences ↔ lesion regions
  m.w_gab = 1.0                         # [CODE] the code adds both auxiliary losses with weight 1
  m.w_lab = 1.0
  m.similarity = "naaf"                 # [RECON] naaf (fixed boundary) | scan
  m.lab_text_unit = "sentence"          # [RECON] sentence vectors | word (every token of every sentence)
  m.lambda_softmax = 20.0               # the code's reserved NAAF/SCAN hyper-parameters (§6.1)
  m.thres = 0.0
  m.margin = 0.2
  m.align_reduction = "sum"             # [RECON] sum (NAAF) | mean
  m.no_imgnorm = False
  # Accepted for the record, meaning unknown, NO effect (read only by the unpublished Align; §6.7):
  m.alpha = 2.0
  m.margin_ratio = 0.1
  m.l2_lambda = 0.01
  m.precomp_enc_type = "basic"
  m.share_bert = False                  # [CODE] two BERT copies (report, sentences) | True: one shared
  m.bert = _bert_base()
  m.bert_pretrained = ""                # local HF BERT folder (config.json + weights); "" = random init
  common.add_memory_driven_transformer(m)
  m.separate_embedding_dropout = True   # [CODE] §7 item 3: the target embedding is run twice (two dropout draws)
  m.pretrained_backbone = ""            # local torchvision resnet101 .pth (ImageNet); "" = random init

  # --- optimiser (§9: four groups at 1e-4, Adam AMSGrad, coupled L2 5e-5, value clip 0.1, cosine per epoch) ----
  c.optim = common.r2gen_optim(lr_ve=1e-4, lr_ed=1e-4)
  c.optim.param_groups = ml_collections.ConfigDict({
      "ve": ("align/visual_extractor",), "te": ("align/text_extractor",), "tle": ("align/textlist_extractor",),
      "other": ("",)})
  c.optim.lr_te = c.optim.lr_tle = c.optim.lr_other = 1e-4
  del c.optim["lr_ed"]
  c.optim.frozen_epochs = ml_collections.ConfigDict({"ve": 0, "te": 0, "tle": 0, "other": 0})
  c.optim.schedule = "cosine_epoch"
  c.optim.cosine_t_max = 25
  c.optim.eta_min = 0.0                 # [CODE] --eta_min 1e-6 is parsed but never passed

  # --- training loop, selection, decoding (§10, §11) ------------------------------------------------------
  c.train.epochs = 50
  c.train.batch_size = 32
  c.train.early_stop = 50
  c.train.selection = ml_collections.ConfigDict({"val_BLEU_4": 1.0})
  c.train.selection_ties_improve = True
  c.decode.beam_size = 3

  if preset == "sample":
    d.name, d.data_dir = "cxr_sample", ""
    d.annotation = "annotation_boxes.json"
    d.clean, d.threshold, d.max_seq_length = "mimic", 2, 60
    d.image_size, d.resize = 224, 256
    d.max_boxes, d.region_size = 4, 96
    d.text_tokenizer_vocab_size = 500
    d.text_max_tokens, d.sentence_max_tokens, d.max_sentences = 96, 32, 12
    d.shuffle = True
    m.backbone = "resnet18"
    m.simple_widths = (16, 32, 64, 128, 512)   # d_e = 512 = ResNet-18's channels
    m.bert = _bert_base()
    m.bert.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.log_every_steps = 1
  elif preset == "base":
    d.features = ()
    m.fuse = "patches_only"
    m.gab = m.lab = False
  return c
