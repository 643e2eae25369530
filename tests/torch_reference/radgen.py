"""RadGen's fusion and classifier in PyTorch, written from radgen_spec §3.8, §3.9, §9.2 (not from the public
code), with the public model's module structure and state_dict names (§10.4): ``fusion.text_proj``,
``fusion.{cross_attn,self_attn}`` (``nn.MultiheadAttention``, packed ``in_proj_weight``), ``fusion.norm1/norm2``,
``fusion.ffn.{0,3}``, ``fusion.gate.0``, ``classifier.{0,1,4,5,8}``; the §9.2 concat fusion is
``fusion.{0,1}``. ``flax_params`` maps such a state_dict (or gradients under the same names) onto the Flax tree of
``rrg_jax.alignment.fusion.CrossModalFusion`` / ``rrg_jax.layers.classifier.ClassifierHead``. Test-only."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def pool(text: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
  """(B, T, d), (B, T) → (B, d): ``masked_mean`` over real tokens, ``mean_all`` (pads included), ``cls``."""
  if how == "masked_mean":
    m = mask.to(text.dtype)
    return (text * m[..., None]).sum(1) / m.sum(1, keepdim=True)
  if how == "mean_all":
    return text.mean(1)
  assert how == "cls", how
  return text[:, 0]


class CrossModalFusion(nn.Module):
  """§3.8: returns z (B, D) and the cross-attention weights (B, heads, 1, T)."""

  def __init__(self, d_text: int = 768, d: int = 512, heads: int = 8, ffn: int = 2048, dropout: float = 0.1,
               text_pool: str = "masked_mean", gate: bool = True, gate_mix: str = "fused"):
    super().__init__()
    self.text_pool, self.gate_mix = text_pool, gate_mix
    self.text_proj = nn.Linear(d_text, d)
    self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
    self.norm1 = nn.LayerNorm(d)
    self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
    self.norm2 = nn.LayerNorm(d)
    self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, d),
                             nn.Dropout(dropout))
    self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.Sigmoid()) if gate else None

  def forward(self, z_img: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    u = self.text_proj(text)
    q = z_img[:, None]
    a, weights = self.cross_attn(q, u, u, key_padding_mask=mask == 0, need_weights=True,
                                 average_attn_weights=False)
    z_cross = self.norm1(q + a)
    s, _ = self.self_attn(z_cross, z_cross, z_cross, need_weights=False)
    z_self = self.norm2(z_cross + s)
    fused = (z_self + self.ffn(z_self))[:, 0]
    if self.gate is None:
      return fused, weights
    t = self.text_proj(pool(text, mask, self.text_pool))
    g = self.gate(torch.cat([z_img, t], -1))
    return g * z_img + (1 - g) * (fused if self.gate_mix == "fused" else t), weights


class ConcatFusion(nn.Sequential):
  """§9.2 ``wo_cross_attention``: ``Dropout(GELU(LN(Linear([z_img ; pooled text]))))``; no attention weights."""

  def __init__(self, d_text: int = 768, d: int = 512, dropout: float = 0.3, text_pool: str = "masked_mean"):
    super().__init__(nn.Linear(d + d_text, d), nn.LayerNorm(d), nn.GELU(), nn.Dropout(dropout))
    self.text_pool = text_pool

  def forward(self, z_img: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
    return super().forward(torch.cat([z_img, pool(text, mask, self.text_pool)], -1)), None


def classifier(d: int = 512, hidden: Sequence[int] = (256, 128), num_classes: int = 3,
               dropout: float = 0.3) -> nn.Sequential:
  """§3.9: [Linear, LayerNorm, GELU, Dropout] per hidden width, then Linear (indices 0, 1, 4, 5, 8 hold weights)."""
  layers: list[nn.Module] = []
  for width in hidden:
    layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
    d = width
  return nn.Sequential(*layers, nn.Linear(d, num_classes))


class FusionClassifier(nn.Module):
  """``fusion`` + ``classifier`` as in the public model: (z_img, H, m) → (logits (B, C), z (B, D), weights)."""

  def __init__(self, fusion: nn.Module, head: nn.Sequential):
    super().__init__()
    self.fusion, self.classifier = fusion, head

  def forward(self, z_img: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
    z, weights = self.fusion(z_img, text, mask)
    return self.classifier(z), z, weights


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
                           sample_weight: torch.Tensor | None = None) -> torch.Tensor:
  """§4 ``L_cls``: ``Σ s_i w_{y_i} CE_i / Σ s_i w_{y_i}``."""
  w = class_weights[labels] * (1 if sample_weight is None else sample_weight)
  ce = nn.functional.cross_entropy(logits, labels, reduction="none")
  return (w * ce).sum() / w.sum()


_FUSION_NAMES = {"ffn.0": "ffn_in", "ffn.3": "ffn_out", "gate.0": "gate", "0": "dense", "1": "norm"}


def _flax_leaves(key: str, x: np.ndarray, names: Mapping[str, Mapping[str, str]]):
  """One torch entry → its (Flax path, array) leaves."""
  top, rest = key.split(".", 1)
  module, leaf = rest.rsplit(".", 1)
  if leaf.startswith("in_proj_"):  # fusion.{cross,self}_attn.in_proj_{weight (3D, D), bias (3D,)}
    for name, part in zip(("query", "key", "value"), np.split(x, 3)):
      yield (top, module, name, "kernel" if x.ndim == 2 else "bias"), part.T if x.ndim == 2 else part
    return
  if "_attn." in module:  # fusion.{cross,self}_attn.out_proj
    path = tuple(module.replace("out_proj", "out").split("."))
  else:
    path = (names[top].get(module, module),)
  if x.ndim == 2:
    yield (top, *path, "kernel"), x.T
  else:  # a 1-D ``weight`` is a LayerNorm's
    yield (top, *path, "scale" if leaf == "weight" else leaf), x


def flax_params(state_dict: Mapping[str, torch.Tensor | np.ndarray], num_hidden: int = 2) -> dict:
  """A ``FusionClassifier`` state_dict (or its gradients, same names) → ``{"fusion": ..., "classifier": ...}``
  Flax params (numpy float32): Linear weights transposed into kernels, LayerNorm ``weight`` → ``scale``,
  ``out_proj`` → ``out``, packed ``in_proj_weight`` / ``in_proj_bias`` split into thirds query | key | value.
  ``num_hidden``: the classifier's hidden layer count."""
  names = {"fusion": _FUSION_NAMES, "classifier": {str(4 * num_hidden): "out"}}
  for i in range(num_hidden):
    names["classifier"].update({str(4 * i): f"dense_{i}", str(4 * i + 1): f"norm_{i}"})
  out: dict = {}
  for key, value in state_dict.items():
    x = np.asarray(value.detach().numpy() if isinstance(value, torch.Tensor) else value, np.float32)
    for path, array in _flax_leaves(key, x, names):
      node = out
      for part in path[:-1]:
        node = node.setdefault(part, {})
      assert path[-1] not in node, key
      node[path[-1]] = array
  return out
