"""A compact PyTorch R2Gen with the official ``R2GenModel`` state_dict layout: ``visual_extractor.model`` =
``nn.Sequential(*list(resnet.children())[:-2])`` (keys ``model.0`` conv1, ``model.1`` bn1, ``model.4..7``
layer1..4) and the R2Gen ``encoder_decoder`` (the one CAMANet's reference uses, without FBL). Test-only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_reference import camanet, resnet

DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


class VisualExtractor(nn.Module):
  """``model`` (ResNet up to layer4); per view: patch tokens (B, h·w, C) row-major, views concatenated."""

  def __init__(self, cfg):
    super().__init__()
    net = resnet.ResNet(DEPTHS[cfg.backbone], tuple(cfg.resnet_widths))
    self.model = resnet.features(net)
    self.channels = net.fc.in_features

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    tokens = []
    for v in range(images.shape[1]):
      f = self.model(images[:, v])
      tokens.append(f.reshape(f.shape[0], f.shape[1], -1).permute(0, 2, 1))
    return torch.cat(tokens, 1)


class R2Gen(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.visual_extractor = VisualExtractor(cfg)
    self.encoder_decoder = camanet.EncoderDecoder(cfg, self.visual_extractor.channels)

  def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probs (B, T−1, K) (R2Gen ``_forward``: seq = targets[:, :-1], padding-aware mask)."""
    memory = self.decoder_memory(images)
    seq = targets[:, :-1]
    pad = seq > 0
    pad[:, 0] = True
    logprobs, _ = self.encoder_decoder.logprobs(memory, seq, pad[:, None, :] & camanet.subsequent_mask(seq.shape[1]))
    return logprobs

  def decoder_memory(self, images: torch.Tensor) -> torch.Tensor:
    return self.encoder_decoder.encode(self.visual_extractor(images))

  def step_logprobs(self, memory: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    logprobs, _ = self.encoder_decoder.logprobs(memory, ys, camanet.subsequent_mask(ys.shape[1]))
    return F.log_softmax(logprobs[:, -1], dim=-1)


def compute_loss(logprobs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
  """R2Gen's ``compute_loss`` (LanguageModelCriterion on targets[:, 1:], masks[:, 1:])."""
  tgt, m = targets[:, 1:], masks[:, 1:]
  return -(logprobs.gather(2, tgt[:, :, None])[:, :, 0] * m).sum() / m.sum()
