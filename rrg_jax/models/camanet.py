"""CAMANet (spec §3–§7): DenseNet + classifier head + CAM/VDM + VDMAE token + R2Gen encoder-decoder + VTAC.

Composition only; the blocks live in ``rrg_jax.layers`` and ``rrg_jax.alignment``. Parameter tree (mirrors the
PyTorch state_dict, spec §11): ``visual_extractor/{model,head}``, ``fore_back_learn/{fore_norm,back_norm}``
(only with ``use_vdmae``), ``encoder_decoder/{att_embed_0,model/{encoder,decoder,tgt_embed_0,rm},logit}``;
BatchNorm statistics in the ``batch_stats`` collection.

Switches: ``use_vdmae=False`` drops the discriminative token: ``att_feats`` = patch tokens only, the decoder
memory is all of ``Henc``, and no ``fore_back_learn`` params exist (the VDM is still computed as VTAC target).
``use_vtac=False`` skips the textual map (no ``tdm`` output). ``vtac_anchor``: "official" = the decoder
memory's first token (``Henc[:, 1]`` with VDMAE, the spec §5.6 bug), "paper" = ``Henc[:, 0]`` (r*).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax import losses, models
from rrg_jax.alignment.cam import cam, vdm_from_cams
from rrg_jax.alignment.vtac import textual_discriminative_map
from rrg_jax.layers.densenet import DenseNet
from rrg_jax.layers.encoder_decoder import EncoderDecoderModel
from rrg_jax.layers.linear import Linear, torch_kernel_init
from rrg_jax.layers.norms import LayerNorm
from rrg_jax.layers.views import view_tokens
from rrg_jax.models.system import EncoderDecoderSystem, Field, module_kwargs

VTAC_ANCHORS = ("official", "paper")


class VisualExtractor(nn.Module):
  """``model`` (DenseNet, called separately per view, view 0 first) and ``head`` Linear(d_vf → classes)."""
  num_classes: int
  growth_rate: int
  block_config: Sequence[int]
  num_init_features: int
  bn_size: int
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.model = DenseNet(self.growth_rate, tuple(self.block_config), self.num_init_features, self.bn_size,
                          self.remat, self.dtype)
    self.head = Linear(self.num_classes, kernel_init=torch_kernel_init, dtype=self.dtype)

  def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
    """images (B, V, H, W, 3) → patch_feats (B, V·h·w, C) (row-major tokens per view, views concatenated),
    gbl (B, C) mean of the per-view global average pools, logits (B, classes) float32, cams (B, classes, N)."""
    patch_feats, gaps = view_tokens(self.model, images, train)
    gbl = sum(gaps[1:], gaps[0]) / len(gaps)
    logits = self.head(gbl).astype(jnp.float32)
    cams = cam(patch_feats, self.head.variables["params"]["kernel"])
    return {"patch_feats": patch_feats, "gbl": gbl, "logits": logits, "cams": cams}


class ForeBackLearning(nn.Module):
  """VDMAE token: ``fore_norm(Σ_n d_v[n] · f[n])`` (B, 1, C). ``back_norm((1 − d_v) · f)`` is computed and
  discarded, as in the original (its params exist but never get a gradient)."""
  dtype: Any = jnp.float32

  def setup(self):
    self.fore_norm = LayerNorm(dtype=self.dtype)
    self.back_norm = LayerNorm(dtype=self.dtype)

  def __call__(self, patch_feats: jax.Array, vdm: jax.Array) -> jax.Array:
    """patch_feats (B, N, C), vdm (B, N) → fore_rep (B, 1, C)."""
    f = patch_feats.astype(jnp.float32)
    self.back_norm(jnp.einsum("bn,bnc->bc", 1.0 - vdm, f)[:, None])
    return self.fore_norm(jnp.einsum("bn,bnc->bc", vdm, f)[:, None])


class CAMANet(EncoderDecoderModel):
  """CAMANet. Attributes are the ``config.model`` fields (see ``configs/camanet.py``); ``dtype`` is the compute
  dtype name ("float32" | "bfloat16"): params, BN/LN statistics, softmax, log-softmax and VTAC stay float32."""
  vocab_size: int
  num_classes: int = 14
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  d_model: int = 512
  d_ff: int = 512
  num_heads: int = 8
  num_layers: int = 3
  dropout: float = 0.1
  drop_prob_lm: float = 0.5
  rm_num_slots: int = 3
  rm_num_heads: int = 8
  rm_d_model: int = 512
  separate_embedding_dropout: bool = False  # CAMANet embeds the targets once (one dropout draw, spec §12.18)
  use_vdmae: bool = True
  use_vtac: bool = True
  vtac_anchor: str = "official"
  topk: float = 0.25
  layer_id: int = 2
  dtype: str = "float32"
  remat: bool = False

  @classmethod
  def from_config(cls, config: Any) -> CAMANet:
    """From ``config.model`` (other keys such as ``name`` and ``pretrained_backbone`` are not model fields)."""
    if config.get("backbone", "densenet121") != "densenet121":
      raise ValueError(f"config.model.backbone={config.backbone!r}: CAMANet supports only 'densenet121'.")
    return cls(**module_kwargs(cls, config))

  def setup(self):
    if self.vtac_anchor not in VTAC_ANCHORS:
      raise ValueError(f"config.model.vtac_anchor={self.vtac_anchor!r}; choose one of {VTAC_ANCHORS}.")
    if not 0 <= self.layer_id < self.num_layers:
      raise ValueError(f"config.model.layer_id={self.layer_id} is not a decoder layer (num_layers="
                       f"{self.num_layers}).")
    if self.vocab_size <= 0:
      raise ValueError(f"config.model.vocab_size={self.vocab_size}; fill it from the tokenizer (|vocab| + 1).")
    dtype = jnp.dtype(self.dtype)
    self.visual_extractor = VisualExtractor(self.num_classes, self.growth_rate, tuple(self.block_config),
                                            self.num_init_features, self.bn_size, self.remat, dtype)
    if self.use_vdmae:
      self.fore_back_learn = ForeBackLearning(dtype)
    self.encoder_decoder = self.make_encoder_decoder(dtype)

  def _encode(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
    vis = self.visual_extractor(images, train)
    vdm = vdm_from_cams(vis["cams"], vis["logits"])
    patch_feats = vis["patch_feats"]
    att_feats = patch_feats
    if self.use_vdmae:
      fore_rep = self.fore_back_learn(patch_feats, vdm)
      att_feats = jnp.concatenate([fore_rep.astype(patch_feats.dtype), patch_feats], axis=1)
    henc = self.encoder_decoder.encode(att_feats, deterministic=not train)
    memory = henc[:, 1:] if self.use_vdmae else henc
    return {"memory": memory, "henc": henc, "patch_feats": patch_feats, "logits": vis["logits"],
            "probs": jax.nn.sigmoid(vis["logits"]), "cams": vis["cams"], "vdm": vdm}

  def __call__(self, images: jax.Array, targets: jax.Array, masks: jax.Array, *, train: bool
               ) -> dict[str, jax.Array]:
    """Teacher-forced forward.

    Args:
      images: (B, V, H, W, 3) float32, ImageNet-normalised.
      targets: (B, T) int ``[0, w1..wn, 0]`` zero padded; the decoder reads ``targets[:, :-1]``.
      masks: (B, T) float32; only ``T_b = max_b Σ masks[b]`` is used (VTAC top-k cap).
      train: BatchNorm batch statistics (mutable ``batch_stats``) and dropout (rng 'dropout').

    Returns:
      ``logprobs`` (B, T−1, K) float32 log-softmax, ``logits`` (B, C), ``cams`` (B, C, N), ``vdm`` (B, N) and,
      with ``use_vtac``, ``tdm`` (B, N).
    """
    enc = self._encode(images, train)
    seq = targets[:, :-1]
    logprobs, attns, emb = self.teacher_forced(enc["memory"], targets, train=train)
    out = {"logprobs": logprobs, "logits": enc["logits"], "cams": enc["cams"], "vdm": enc["vdm"]}
    if self.use_vtac:
      anchor = enc["henc"][:, 0] if self.vtac_anchor == "paper" else enc["memory"][:, 0]
      batch_length = jnp.max(jnp.sum(masks, axis=-1)).astype(jnp.int32)
      out["tdm"] = textual_discriminative_map(anchor, emb, attns[self.layer_id], seq, batch_length, self.topk)
    return out

  def encode(self, images: jax.Array) -> dict[str, jax.Array]:
    """Eval-mode visual path + encoder: images (B, V, H, W, 3) → ``memory`` (B, N', D) decoder memory
    (N' = N with VDMAE, else N), ``henc`` (B, S, D), ``patch_feats`` (B, N, d_vf), ``logits``/``probs`` (B, C),
    ``cams`` (B, C, N), ``vdm`` (B, N)."""
    return self._encode(images, False)


def camanet_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, Any], *, cls_w: float, mse_w: float,
                 use_vtac: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``L = CE + cls_w · BCE + mse_w · MSE`` (spec §7; MSE only when ``use_vtac``, reported as 0 otherwise).

  Args:
    outputs: model outputs with ``logprobs`` (B, T−1, K), ``logits`` (B, C), ``vdm``/``tdm`` (B, N).
    batch: ``targets`` (B, T) int, ``masks`` (B, T), ``labels`` (B, C).

  Returns:
    (total, {"ce", "bce", "mse", "loss"}) scalars.
  """
  ce = losses.cross_entropy(outputs["logprobs"], batch["targets"], batch["masks"])
  bce = losses.bce_with_logits(outputs["logits"], batch["labels"])
  mse = (losses.vtac_mse(outputs["tdm"], outputs["vdm"], batch["labels"]) if use_vtac
         else jnp.zeros((), jnp.float32))
  total = ce + cls_w * bce + mse_w * mse
  return total, {"ce": ce, "bce": bce, "mse": mse, "loss": total}


@models.register("camanet")
class CAMANetSystem(EncoderDecoderSystem):
  """CAMANet (IEEE JBHI 2024): DenseNet-121 + CAM/VDM discriminative token + R2Gen transformer + VTAC loss."""
  module_class = CAMANet
  pretrained_backbone_kind = "densenet"   # config.model.pretrained_backbone: a torchvision densenet121 .pth
  forward_fields = ("images", "targets", "masks")
  report_outputs = ("probs", "vdm")

  def batch_fields(self, train: bool = True) -> dict[str, Field]:
    """The image-report fields plus the pseudo-labels ``labels`` (C,) of the classifier head."""
    return {**super().batch_fields(train), "labels": Field((int(self.config.model.num_classes),), jnp.float32)}

  def loss(self, outputs, batch):
    return camanet_loss(outputs, batch, cls_w=float(self.config.loss.cls_w), mse_w=float(self.config.loss.mse_w),
                        use_vtac=bool(self.config.model.use_vtac))

  def word_attention_layer(self) -> int:
    """VTAC's decoder layer, ``config.model.layer_id``."""
    return int(self.config.model.layer_id)
