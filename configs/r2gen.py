"""R2Gen experiment configs (the official ``train_iu_xray.sh`` / ``train_mimic_cxr.sh`` of zhjohnchan/R2Gen).

Usage: ``--config=configs/r2gen.py`` (embedded sample) or ``--config=configs/r2gen.py:PRESET`` with PRESET one
of ``iu_xray``, ``mimic_cxr``.

Where R2Gen's code differs from CAMANet's (configs/camanet.py), as R2Gen's ``main_train.py`` defaults and
``modules/trainer.py`` behave:
* schedule: torch ``StepLR(step_size, gamma)`` stepped after every epoch (``optim.schedule = "step_lr"``,
  ``decay_epochs = step_size``, ``decay_rate = gamma``), no warm-up; CAMANet uses timm's per-step scheduler.
* model selection: ``val_BLEU_4`` alone (``--monitor_metric BLEU_4``, mode max) and an equal score counts as an
  improvement (``>=``; ``train.selection_ties_improve``); CAMANet: ``val BLEU_4 + 0.5·val BLEU_1``, strictly
  greater. Early stopping after ``early_stop`` (50) + 1 non-improving epochs.
* gradient clipping: the same element-wise ``clip_grad_value_(0.1)`` as CAMANet (R2Gen's trainer has it too).
* no classifier, no labels, no VTAC: the loss is the token-level cross-entropy alone.
* augmentation: Resize(256) → RandomCrop(224) → RandomHorizontalFlip for both datasets (no MIMIC ``--randaug``).
* the ResNet-101 starts from ImageNet in the original (``--visual_extractor_pretrained True``): set
  ``model.pretrained_backbone`` to a local torchvision ``resnet101-*.pth``; "" trains it from random init.
"""

import ml_collections

from configs import common

PRESETS = ("sample", "iu_xray", "mimic_cxr")


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  preset = preset or "sample"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/r2gen.py; choose one of {PRESETS}.")
  c = common.base_config(preset)
  c.seed = 9223
  c.data.labels = ""                    # R2Gen reads no labels

  # --- model (R2Gen main_train.py defaults) -------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = "r2gen"
  c.model.backbone = "resnet101"        # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
  c.model.resnet_widths = (64, 128, 256, 512)  # torchvision's stage widths (smaller only for tests)
  common.add_memory_driven_transformer(c.model)
  c.model.separate_embedding_dropout = True  # decode() embeds the targets twice: independent dropout masks
  c.model.pretrained_backbone = ""      # local torchvision resnet*.pth (ImageNet) to start from; "" = random

  # --- optimiser (R2Gen optimizers.py: Adam, AMSGrad, two groups; trainer: clip_grad_value_ 0.1) -----------
  c.optim = common.r2gen_optim(lr_ve=5e-5, lr_ed=1e-4)
  c.optim.schedule = "step_lr"
  c.optim.decay_epochs = 50             # --step_size
  c.optim.decay_rate = 0.1              # --gamma

  # --- training loop, selection ---------------------------------------------------------------------------
  c.train.epochs = 100
  c.train.batch_size = 16
  c.train.early_stop = 50
  c.train.selection = ml_collections.ConfigDict({"val_BLEU_4": 1.0})
  c.train.selection_ties_improve = True

  if preset == "sample":
    # Embedded real sample (219 one-view CXRs): a short CPU run that exercises everything.
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.log_every_steps = 1
    c.data.threshold = 2
  elif preset == "iu_xray":               # train_iu_xray.sh (the values above are its own)
    common.set_iu_xray_data(c.data)
  elif preset == "mimic_cxr":             # train_mimic_cxr.sh
    common.set_mimic_cxr_data(c.data)
    c.train.epochs = 30
    c.optim.decay_epochs = 1
    c.optim.decay_rate = 0.8
    c.seed = 456789
    c.eval.evaluators = ("report_text", "clinical_efficacy")
  return c
