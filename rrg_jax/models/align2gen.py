"""Align2Gen (published as D2R-Net; Tang et al., JIIM 2025): a global image branch and a lesion-region branch
feeding the plain R2Gen encoder-decoder, with two alignment losses against BERT encodings of the report
(spec ``align2gen_spec.md``).

Composition only; the blocks live in ``rrg_jax.alignment.lesion`` (visual branches), ``rrg_jax.alignment.align``
(GAB / LAB), ``rrg_jax.layers.bert`` and ``rrg_jax.layers.encoder_decoder``. What is the official code and what is
a reconstruction:

* [CODE] global branch (ResNet-101 → CPCA → bias-free 1×1 ``local_embedder``: 144 patch tokens at 384²), lesion
  branch (per-box crop → LERA → SimpleConvNet, batch-size-1 BatchNorm), the two BERT text branches (BERT → ``fc``
  768 → 1024 → ``F.normalize``), the R2Gen encoder-decoder (independent dropout draws of the target embedding for
  the relational memory and the decoder), the loss sum CE + GAB + LAB with weight 1.
* [RECON] (the official ``Align`` and ``LERA`` modules were never published; spec §4.2, §6): LERA = HCF-Net's PPA
  (``lera: ppa | identity``); the fusion ``att_feats = concat(patch_feats, region_feats)`` with empty box slots
  masked out of attention (``fuse: concat | patches_only``, ``mask_empty_regions``); GAB = NAAF fragment
  similarity of report tokens vs patch tokens; LAB = the same for sentence vectors (or words) vs lesion regions;
  both with the VSE++ hardest-negative hinge (``similarity: naaf | scan``, ``margin``, ``align_reduction``). A
  reconstruction, not the paper's method.

Parameter tree (the official ``S2GenModel`` state_dict through ``rrg_jax.convert``'s naming rule):
``align/visual_extractor/{visual_extractor/{model,cpca,local_embedder}, simple, region_visual_extractor}``,
``align/text_extractor/{bert,fc}``, ``align/textlist_extractor/{bert,fc}`` (absent with ``share_bert``),
``encoder_decoder/…``. The dead modules of the original (the global branch's ``classifier``, both BERT poolers)
are not built; the converter drops their keys.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rrg_jax import losses, models
from rrg_jax.alignment import align
from rrg_jax.alignment.lesion import SIMPLE_WIDTHS, MultiTargetExtractor
from rrg_jax.layers.bert import BertConfig, BertModel
from rrg_jax.layers.encoder_decoder import EncoderDecoderModel
from rrg_jax.layers.linear import Linear, torch_kernel_init
from rrg_jax.models.r2gen import BACKBONES, sequential_resnet_renames
from rrg_jax.models.system import EncoderDecoderSystem, Field, module_kwargs

FUSES = ("concat", "patches_only")
LAB_TEXT_UNITS = ("sentence", "word")


class TextExtractor(nn.Module):
  """[CODE] ``TextExtractor`` / ``TextListExtractor`` (§5): ids (N, T), mask (N, T) → token embeddings (N, T, d_e)
  float32, ``F.normalize``d (x / max(‖x‖, 1e-12)). ``bert`` (no pooler: it is dead in the original) → ``fc``
  Linear(hidden → d_e, torch default init)."""
  bert: BertConfig
  embed_size: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    h = BertModel(self.bert, add_pooling_layer=False, dtype=self.dtype, name="bert")(
        ids, mask, deterministic=not train)["last_hidden_state"]
    return align.normalize(Linear(self.embed_size, kernel_init=torch_kernel_init, dtype=self.dtype,
                                  name="fc")(h).astype(jnp.float32))


class Align(nn.Module):
  """The official ``align`` attribute tree: ``visual_extractor`` (``MultiTargetExtractor``), ``text_extractor``
  and ``textlist_extractor`` (``TextExtractor``s; one shared copy with ``share_bert``, none without ``bert``)."""
  depth: int
  resnet_widths: Sequence[int]
  simple_widths: Sequence[int]
  cpca_reduce: int
  global_head: str
  lera: str
  lera_dropout: float
  region_bn: str
  bert: BertConfig | None
  share_bert: bool
  remat: bool
  dtype: Any

  def setup(self):
    self.visual_extractor = MultiTargetExtractor(
        widths=tuple(self.simple_widths), lera=self.lera, lera_dropout=self.lera_dropout, region_bn=self.region_bn,
        depth=self.depth, resnet_widths=tuple(self.resnet_widths), cpca_reduce=self.cpca_reduce, remat=self.remat,
        global_head=self.global_head, dtype=self.dtype)
    if self.bert is not None:
      self.text_extractor = TextExtractor(self.bert, self.simple_widths[-1], self.dtype)
      if not self.share_bert:
        self.textlist_extractor = TextExtractor(self.bert, self.simple_widths[-1], self.dtype)

  def visual(self, images, regions, valid, train: bool):
    """→ (region_feats (B, M, d_e) or None, avg_feats (B, d_e), patch_feats (B, N_p, d_e))."""
    return self.visual_extractor(images, regions, valid, train)

  def report_tokens(self, ids: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    return self.text_extractor(ids, mask, train)

  def sentence_tokens(self, ids: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """ids / mask (B, S, T) → (B, S, T, d_e) (sentences folded into the BERT batch)."""
    encoder = self.text_extractor if self.share_bert else self.textlist_extractor
    b, s, t = ids.shape
    return encoder(ids.reshape(b * s, t), mask.reshape(b * s, t), train).reshape(b, s, t, -1)


class Align2Gen(EncoderDecoderModel):
  """Align2Gen. Attributes are the ``config.model`` fields (``configs/align2gen.py``, which documents each);
  ``bert`` None disables the text branches (so GAB and LAB); ``dtype`` is the compute dtype name."""
  vocab_size: int
  backbone: str = "resnet101"
  resnet_widths: Sequence[int] = (64, 128, 256, 512)
  simple_widths: Sequence[int] = SIMPLE_WIDTHS
  cpca_reduce: int = 4
  global_head: str = "cpca"
  lera: str = "ppa"
  lera_dropout: float = 0.1
  region_bn: str = "per_region"
  fuse: str = "concat"
  mask_empty_regions: bool = True
  gab: bool = True
  lab: bool = True
  bert: BertConfig | None = None
  share_bert: bool = False
  similarity: str = "naaf"
  lab_text_unit: str = "sentence"
  lambda_softmax: float = 20.0
  thres: float = 0.0
  margin: float = 0.2
  align_reduction: str = "sum"
  no_imgnorm: bool = False
  d_model: int = 512
  d_ff: int = 512
  num_heads: int = 8
  num_layers: int = 3
  dropout: float = 0.1
  drop_prob_lm: float = 0.5
  rm_num_slots: int = 3
  rm_num_heads: int = 8
  rm_d_model: int = 512
  separate_embedding_dropout: bool = True
  dtype: str = "float32"
  remat: bool = False

  @classmethod
  def from_config(cls, config: Any) -> Align2Gen:
    kwargs = module_kwargs(cls, config)
    kwargs["bert"] = BertConfig(**dict(config.bert)) if uses_text(config) else None
    return cls(**kwargs)

  def setup(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"config.model.backbone={self.backbone!r}; choose one of {sorted(BACKBONES)}.")
    if self.vocab_size <= 0:
      raise ValueError(f"config.model.vocab_size={self.vocab_size}; fill it from the tokenizer (|vocab| + 1).")
    for key, value, choices in (("fuse", self.fuse, FUSES), ("lab_text_unit", self.lab_text_unit, LAB_TEXT_UNITS),
                                ("similarity", self.similarity, align.SIMILARITIES),
                                ("align_reduction", self.align_reduction, align.REDUCTIONS)):
      if value not in choices:
        raise ValueError(f"config.model.{key}={value!r}; choose one of {choices}.")
    if (self.gab or self.lab) and self.bert is None:
      raise ValueError("config.model.gab / lab need the text branches (config.model.bert).")
    dtype = jnp.dtype(self.dtype)
    self.align = Align(BACKBONES[self.backbone], tuple(self.resnet_widths), tuple(self.simple_widths),
                       self.cpca_reduce, self.global_head, self.lera, self.lera_dropout, self.region_bn, self.bert,
                       self.share_bert, self.remat, dtype)
    self.encoder_decoder = self.make_encoder_decoder(dtype)

  def _visual(self, images, regions, region_valid, train: bool):
    """→ (att_feats (B, N', d_e), memory mask (B, N') bool or None, patch_feats (B, N_p, d_e), region_feats)."""
    region_feats, _, patch_feats = self.align.visual(images[:, 0], regions, region_valid, train)
    if region_feats is None or self.fuse == "patches_only":
      return patch_feats, None, patch_feats, region_feats
    if region_feats.shape[-1] != patch_feats.shape[-1]:
      raise ValueError(f"fuse='concat' needs region features (simple_widths[-1] = {region_feats.shape[-1]}) as wide "
                       f"as the patch tokens ({patch_feats.shape[-1]}; global_head={self.global_head!r}).")
    att_feats = jnp.concatenate([patch_feats, region_feats.astype(patch_feats.dtype)], axis=1)
    mask = None
    if self.mask_empty_regions:
      mask = jnp.concatenate([jnp.ones(patch_feats.shape[:2], bool), region_valid.astype(bool)], axis=1)
    return att_feats, mask, patch_feats, region_feats

  def _alignment_kwargs(self) -> dict[str, Any]:
    kwargs = {"method": self.similarity, "margin": self.margin, "reduction": self.align_reduction,
              "lambda_softmax": self.lambda_softmax, "imgnorm": not self.no_imgnorm}
    if self.similarity == "naaf":
      kwargs["thres"] = self.thres
    return kwargs

  def __call__(self, images: jax.Array, targets: jax.Array, regions: jax.Array | None = None,
               region_valid: jax.Array | None = None, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None, sentence_ids: jax.Array | None = None,
               sentence_mask: jax.Array | None = None, *, train: bool) -> dict[str, jax.Array]:
    """Training forward. images (B, 1, H, W, 3) ImageNet-normalised; targets (B, T) ``[0, w1..wn, 0]`` zero
    padded; regions (B, M, R, R, 3) / region_valid (B, M) (``lesion_regions``; None without boxes); text_ids /
    text_mask (B, Tw), sentence_ids / sentence_mask (B, S, Ts) (``report_texts``; needed by ``gab`` / ``lab``) →
    ``logprobs`` (B, T−1, K) float32 and the [RECON] alignment losses ``gab`` / ``lab`` () float32 when on.
    ``train``: BatchNorm batch statistics (mutable ``batch_stats``) and dropout (rng 'dropout')."""
    att_feats, mask, patch_feats, region_feats = self._visual(images, regions, region_valid, train)
    memory = self.encoder_decoder.encode(att_feats, mask, deterministic=not train)
    logprobs, _, _ = self.teacher_forced(memory, targets, train=train, src_mask=mask)
    out = {"logprobs": logprobs}
    kwargs = self._alignment_kwargs()
    if self.gab:  # report tokens ↔ the 144 patch tokens
      if patch_feats.shape[-1] != self.simple_widths[-1]:
        raise ValueError(f"gab needs patch tokens of width simple_widths[-1] = {self.simple_widths[-1]}, got "
                         f"{patch_feats.shape[-1]} (global_head={self.global_head!r}).")
      tokens = self.align.report_tokens(text_ids, text_mask, train)
      out["gab"] = align.alignment_loss(tokens, text_mask.astype(bool), patch_feats.astype(jnp.float32),
                                        jnp.ones(patch_feats.shape[:2], bool),
                                        image_mask=jnp.any(text_mask.astype(bool), axis=-1), **kwargs)
    if self.lab:  # sentences (or their words) ↔ the valid lesion regions
      if region_feats is None:
        raise ValueError("config.model.lab needs lesion regions (config.data.features 'lesion_regions').")
      tokens = self.align.sentence_tokens(sentence_ids, sentence_mask, train)
      if self.lab_text_unit == "sentence":
        units, unit_mask = align.sentence_vectors(tokens, sentence_mask.astype(bool))
      else:
        b, s, t, d = tokens.shape
        units, unit_mask = tokens.reshape(b, s * t, d), sentence_mask.astype(bool).reshape(b, s * t)
      valid = region_valid.astype(bool)
      out["lab"] = align.alignment_loss(units, unit_mask, region_feats.astype(jnp.float32), valid,
                                        image_mask=align.lab_mask(valid, unit_mask), **kwargs)
    return out

  def encode(self, images: jax.Array, regions: jax.Array | None = None, region_valid: jax.Array | None = None
             ) -> dict[str, jax.Array]:
    """Eval mode (no texts): images (B, 1, H, W, 3) [, regions (B, M, R, R, 3), region_valid (B, M)] →
    ``memory`` (B, N', D), ``memory_mask`` (B, N') bool when empty slots are masked, ``patch_feats``."""
    att_feats, mask, patch_feats, _ = self._visual(images, regions, region_valid, False)
    out = {"memory": self.encoder_decoder.encode(att_feats, mask), "patch_feats": patch_feats}
    if mask is not None:
      out["memory_mask"] = mask
    return out


def uses_text(model_config: Any) -> bool:
  """Whether the text branches exist: GAB or LAB is on (the BERTs serve only them)."""
  return bool(model_config.get("gab", True)) or bool(model_config.get("lab", True))


def _complete_bert_config(config: ml_collections.ConfigDict) -> None:
  """Fills ``config.model.bert`` in place: from the HF folder ``model.bert_pretrained`` when given, else its
  ``vocab_size`` (−1) from the text tokenizer ``data.text_tokenizer`` (``report_texts.prepare`` trains one when none
  is given). A tokenizer with more ids than the BERT vocabulary is refused."""
  from input_pipeline import subword  # pylint: disable=g-import-not-at-top
  from rrg_jax import hf_weights  # pylint: disable=g-import-not-at-top

  m = config.model
  folder = m.get("bert_pretrained", "")
  path = config.data.get("text_tokenizer", "")
  # (a checkpoint moved without its workdir's text_tokenizer/ still loads: its config has the size)
  readable = bool(path) and (pathlib.Path(path).exists() or int(m.bert.vocab_size) <= 0)
  tokenizer_size = int(subword.SubwordTokenizer.load(path).vocab_size) if readable else None
  with config.unlocked():
    if folder:
      m.bert = ml_collections.ConfigDict(dataclasses.asdict(
          BertConfig.from_hf_config(hf_weights.read_config(folder))))
    elif int(m.bert.vocab_size) <= 0:
      if tokenizer_size is None:
        raise ValueError("config.model.bert.vocab_size is unset and config.data.text_tokenizer is empty.")
      m.bert.vocab_size = tokenizer_size
  if tokenizer_size is not None and tokenizer_size > int(m.bert.vocab_size):
    raise ValueError(f"config.data.text_tokenizer={path} has {tokenizer_size} ids, more than the BERT vocabulary "
                     f"config.model.bert.vocab_size={m.bert.vocab_size}.")


@models.register("align2gen")
class Align2GenSystem(EncoderDecoderSystem):
  """Align2Gen / D2R-Net (JIIM 2025): global + lesion branches on R2Gen, GAB / LAB alignment ([RECON])."""
  module_class = Align2Gen
  pretrained_backbone_kind = "resnet"   # config.model.pretrained_backbone: a torchvision resnet101 .pth
  pretrained_backbone_at = ("align", "visual_extractor", "visual_extractor", "model")
  torch_key_renames = sequential_resnet_renames("align.visual_extractor.visual_extractor.model")
  torch_dropped_keys = (r"^align\.visual_extractor\.visual_extractor\.classifier\.",  # dead (no labels exist)
                        r"\.bert\.pooler\.",                                          # dead BERT poolers
                        r"\.bert\.embeddings\.position_ids$")                        # a buffer

  def __init__(self, config):
    m, d = config.model, config.data
    if int(d.num_views) != 1:
      raise ValueError(f"config.data.num_views={d.num_views}: Align2Gen takes one view per study (MIMIC-CXR).")
    self.lesion = "lesion_regions" in tuple(d.get("features", ()))
    self.text = uses_text(m)
    if self.text and "report_texts" not in tuple(d.get("features", ())):
      raise ValueError("config.model.gab / lab need config.data.features to include 'report_texts'.")
    if bool(m.lab) and not self.lesion:
      raise ValueError("config.model.lab needs lesion boxes: config.data.features must include 'lesion_regions' "
                       "(or set config.model.lab=False).")
    if self.text:
      _complete_bert_config(config)
    self.forward_fields = ("images", "targets") + (("regions", "region_valid") if self.lesion else ()) + (
        ("text_ids", "text_mask", "sentence_ids", "sentence_mask") if self.text else ())
    self.encode_fields = ("images",) + (("regions", "region_valid") if self.lesion else ())
    super().__init__(config)

  @classmethod
  def complete_config_from_torch(cls, config, state_dict, source):
    """The BERT vocabulary size from the original's ``text_extractor`` embedding table."""
    key = "align.text_extractor.bert.embeddings.word_embeddings.weight"
    if uses_text(config.model) and key in state_dict:
      config.model.bert.vocab_size = int(state_dict[key].shape[0])

  def batch_fields(self, train: bool = True) -> dict[str, Field]:
    """The image-report fields, the lesion crops (``lesion_regions``) and, for training, the BERT inputs
    (``report_texts``)."""
    d = self.config.data
    fields = super().batch_fields(train)
    if self.lesion:
      m, r = int(d.max_boxes), int(d.region_size)
      fields.update(regions=Field((m, r, r, 3), jnp.float32), region_valid=Field((m,), jnp.bool_))
    if self.text and train:
      tw, s, ts = int(d.text_max_tokens), int(d.max_sentences), int(d.sentence_max_tokens)
      fields.update(text_ids=Field((tw,), jnp.int32), text_mask=Field((tw,), jnp.int32),
                    sentence_ids=Field((s, ts), jnp.int32), sentence_mask=Field((s, ts), jnp.int32))
    return fields

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """§8: L = CE + w_gab·GAB + w_lab·LAB (the code's weights are 1)."""
    m = self.config.model
    ce = losses.cross_entropy(outputs["logprobs"], batch["targets"], batch["masks"])
    parts = {"ce": ce}
    total = ce
    for name, weight in (("gab", m.w_gab), ("lab", m.w_lab)):
      if name in outputs:
        parts[name] = outputs[name]
        total = total + float(weight) * outputs[name]
    return total, {**parts, "loss": total}

  def load_pretrained(self, variables: dict[str, Any]) -> dict[str, Any]:
    """The torchvision ResNet (``model.pretrained_backbone``) and the HF BERT folder (``model.bert_pretrained``,
    into every text branch) when given."""
    from rrg_jax import hf_weights  # pylint: disable=g-import-not-at-top

    variables = super().load_pretrained(variables)
    folder = self.config.model.get("bert_pretrained", "")
    if not folder or not self.text:
      return variables
    _, bert = hf_weights.load_bert(folder)  # config.model.bert was read from the same folder
    bert = {k: v for k, v in bert["params"].items() if k != "pooler"}  # dead in the original
    params = dict(variables["params"])
    branches = ("text_extractor",) + (() if self.module.share_bert else ("textlist_extractor",))
    params["align"] = {**params["align"], **{b: {**params["align"][b], "bert": bert} for b in branches}}
    return {**variables, "params": params}

  def generate(self, variables: Any, batch: Mapping[str, jax.Array], *, with_attention: bool = False
               ) -> dict[str, jax.Array]:
    """As ``EncoderDecoderSystem.generate``; ``word_attention`` keeps the patch tokens (the heatmap grid)."""
    out = super().generate(variables, batch, with_attention=with_attention)
    if with_attention:
      size = int(self.config.data.image_size) // 32
      out["word_attention"] = out["word_attention"][..., :size * size]
    return out
