"""R2Gen (Chen et al., EMNLP 2020): ResNet visual extractor + the memory-driven transformer (relational memory +
MCLN), the base of CAMANet and Align2Gen.

Composition only. Parameter tree (the official ``R2GenModel`` state_dict, with the ResNet's ``nn.Sequential``
indices 0/1/4–7 renamed to torchvision's ``conv1``/``bn1``/``layer1–4`` by the converter):
``visual_extractor/model/{conv1,bn1,layer1_0,…}``, ``encoder_decoder/{att_embed_0,model/…,logit}``; BatchNorm
statistics in ``batch_stats``. The extractor's average-pooled ``fc_feats`` of the original are never read by its
transformer and are not computed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax import losses, models
from rrg_jax.layers.encoder_decoder import EncoderDecoderModel
from rrg_jax.layers.resnet import ResNet
from rrg_jax.layers.views import view_tokens
from rrg_jax.models.system import EncoderDecoderSystem, module_kwargs

BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def sequential_resnet_renames(prefix: str) -> tuple[tuple[str, Any], ...]:
  """``torch_key_renames`` for a ResNet kept as ``nn.Sequential(*list(resnet.children())[:-2])`` at ``prefix``
  (R2Gen, Align2Gen): Sequential index 0 → ``conv1``, 1 → ``bn1``, 4–7 → ``layer1``–``layer4``."""
  p = re.escape(prefix)
  return ((rf"^{p}\.0\.", f"{prefix}.conv1."), (rf"^{p}\.1\.", f"{prefix}.bn1."),
          (rf"^{p}\.([4-7])\.", lambda m: f"{prefix}.layer{int(m.group(1)) - 3}."))


class VisualExtractor(nn.Module):
  """``model`` = ResNet up to ``layer4`` (torchvision ``children()[:-2]``), applied per view."""
  depth: int
  widths: Sequence[int]
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.model = ResNet(self.depth, tuple(self.widths), self.remat, self.dtype)

  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """images (B, V, H, W, 3) → patch tokens (B, V·h·w, C) (49 per 224² view; IU: both views, 98 × 2048)."""
    return view_tokens(self.model, images, train)[0]


class R2Gen(EncoderDecoderModel):
  """R2Gen. Attributes are the ``config.model`` fields (``configs/r2gen.py``); ``dtype`` is the compute dtype name
  ("float32" | "bfloat16"): params, BN/LN statistics, softmax and log-softmax stay float32."""
  vocab_size: int
  backbone: str = "resnet101"
  resnet_widths: Sequence[int] = (64, 128, 256, 512)
  d_model: int = 512
  d_ff: int = 512
  num_heads: int = 8
  num_layers: int = 3
  dropout: float = 0.1
  drop_prob_lm: float = 0.5
  rm_num_slots: int = 3
  rm_num_heads: int = 8
  rm_d_model: int = 512
  separate_embedding_dropout: bool = True   # R2Gen's decode() embeds the targets twice (two dropout draws)
  dtype: str = "float32"
  remat: bool = False

  @classmethod
  def from_config(cls, config: Any) -> R2Gen:
    return cls(**module_kwargs(cls, config))

  def setup(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"config.model.backbone={self.backbone!r}; choose one of {sorted(BACKBONES)}.")
    if self.vocab_size <= 0:
      raise ValueError(f"config.model.vocab_size={self.vocab_size}; fill it from the tokenizer (|vocab| + 1).")
    dtype = jnp.dtype(self.dtype)
    self.visual_extractor = VisualExtractor(BACKBONES[self.backbone], tuple(self.resnet_widths), self.remat, dtype)
    self.encoder_decoder = self.make_encoder_decoder(dtype)

  def _encode(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
    patch_feats = self.visual_extractor(images, train)
    memory = self.encoder_decoder.encode(patch_feats, deterministic=not train)
    return {"memory": memory, "patch_feats": patch_feats}

  def __call__(self, images: jax.Array, targets: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Teacher-forced forward: images (B, V, H, W, 3) ImageNet-normalised, targets (B, T) ``[0, w1..wn, 0]`` zero
    padded (the decoder reads ``targets[:, :-1]``) → ``logprobs`` (B, T−1, K) float32. ``train``: BatchNorm batch
    statistics (mutable ``batch_stats``) and dropout (rng 'dropout')."""
    enc = self._encode(images, train)
    logprobs, _, _ = self.teacher_forced(enc["memory"], targets, train=train)
    return {"logprobs": logprobs}

  def encode(self, images: jax.Array) -> dict[str, jax.Array]:
    """Eval mode: images (B, V, H, W, 3) → ``memory`` (B, N, D) decoder memory, ``patch_feats`` (B, N, C)."""
    return self._encode(images, False)


@models.register("r2gen")
class R2GenSystem(EncoderDecoderSystem):
  """R2Gen (EMNLP 2020): ResNet-101 + memory-driven transformer; the base of CAMANet and Align2Gen."""
  module_class = R2Gen
  pretrained_backbone_kind = "resnet"   # config.model.pretrained_backbone: a torchvision resnet* .pth
  forward_fields = ("images", "targets")
  torch_key_renames = sequential_resnet_renames("visual_extractor.model")

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """R2Gen's ``compute_loss``: the token-level mean NLL (``losses.cross_entropy``)."""
    ce = losses.cross_entropy(outputs["logprobs"], batch["targets"], batch["masks"])
    return ce, {"ce": ce, "loss": ce}
