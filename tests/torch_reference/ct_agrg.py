"""An independent PyTorch reference of CT-AGRG's encoder, stage-1 heads and conditioning MLP, written from
ct_agrg_spec §3, §5, §6.2 and §10 (the original code is not public any more).

Same module names, Sequential indices and therefore ``state_dict`` keys as the original: ``CTNet`` (§10.2, 134
entries at full size), ``CTNetStep`` (§10.3, 202 entries), ``feature_space_transformation_nn`` ({0, 2, 4}, §10.4).
The original hard-codes (240, 480, 480) volumes (80 triplets, 7200 flat features); here the triplet count and the
flat size are constructor arguments, as are the MLP widths and the dropout rate, so tiny volumes and dropout-free
train-mode parity run. The trunk is ``torch_reference.resnet``'s ResNet-18 (torchvision's keys and
``children()``), cut as torchvision's ``resnet18`` would be: ``children()[:-2]``.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_reference import resnet


class CTNet(nn.Module):
  """(B, 1, D, H, W) → logits (B, num_classes); after ``adjust()`` → e (B, hidden[0]) (§3)."""

  def __init__(self, triplets: int = 80, flat_size: int = 7200, num_classes: int = 18,
               resnet_widths=(64, 128, 256, 512), hidden=(2048, 512, 128), dropout: float = 0.5):
    super().__init__()
    self.triplets = triplets
    self.features = nn.Sequential(*list(resnet.ResNet(18, resnet_widths).children())[:-2])
    self.reducingconvs = nn.Sequential(
        nn.Conv3d(triplets, 64, kernel_size=(3, 3, 3), stride=(3, 1, 1), padding=0), nn.ReLU(inplace=True),
        nn.Conv3d(64, 32, kernel_size=(3, 3, 3), stride=(3, 1, 1), padding=0), nn.ReLU(inplace=True),
        nn.Conv3d(32, 16, kernel_size=(3, 2, 2), stride=(3, 2, 2), padding=0), nn.ReLU(inplace=True))
    widths = (flat_size,) + tuple(hidden)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
      layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    self.classifier = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))

  def adjust(self) -> None:
    """Stages 1 and 2: keep classifier indices 0..2; ``classifier_`` is built from the already truncated
    classifier, so it is empty (the pre-trained layers 3..9 are discarded)."""
    self.classifier = nn.Sequential(*list(self.classifier.children())[:3])
    self.classifier_ = nn.Sequential(*list(self.classifier.children())[3:])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, _, _, height, width = x.shape
    x = x.view(b * self.triplets, 3, height, width)  # image b·T + j = slices 3j..3j+2
    x = self.features(x)
    x = x.view(b, self.triplets, *x.shape[1:])  # (B, T = Conv3d channels, C = depth, h, w)
    x = self.reducingconvs(x)
    x = x.view(b, -1)  # (C, D, H, W) order
    return self.classifier(x)


class CTNetStep(nn.Module):
  """(B, 1, D, H, W) → (H (B, K, d), logits (B, K)) (§5): ``encoder`` (adjusted CTNet) → ``heads_in`` →
  per-abnormality ``heads_out``."""

  def __init__(self, triplets: int = 80, flat_size: int = 7200, num_abnormalities: int = 18,
               head_dim: int = 1024, head_hidden: int = 128, resnet_widths=(64, 128, 256, 512),
               hidden=(2048, 512, 128), dropout: float = 0.5):
    super().__init__()
    self.num_abnormalities, self.head_dim = num_abnormalities, head_dim
    self.encoder = CTNet(triplets, flat_size, num_abnormalities, resnet_widths, hidden, dropout)
    self.encoder.adjust()
    self.heads_in = nn.Sequential(nn.Linear(hidden[0], num_abnormalities * head_dim), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout))
    self.heads_out = nn.ModuleList([
        nn.Sequential(nn.Linear(head_dim, head_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                      nn.Linear(head_hidden, 1)) for _ in range(num_abnormalities)])

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = self.encoder(x)
    h = self.heads_in(e).view(x.shape[0], self.num_abnormalities, self.head_dim)
    logits = torch.cat([head(h[:, k]) for k, head in enumerate(self.heads_out)], dim=1)
    return h, logits


def abnormality_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """L_k = mean_b BCEWithLogits(s_bk, y_bk): (B, K) → (K,) (§5)."""
  return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)


def stage1_backward(model: CTNetStep, volumes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Stage 1's backward as coded (§5): forward; encoder frozen, each L_k back-propagated (graph retained);
  encoder re-enabled, Σ_k L_k back-propagated. Leaves the gradients in ``.grad`` (heads: 2·∇Σ L_k, encoder:
  ∇Σ L_k, since torch skips accumulation into leaves that no longer require grad); returns (L_k) (K,)."""
  _, logits = model(volumes)
  losses = abnormality_losses(logits, labels)
  for p in model.encoder.parameters():
    p.requires_grad_(False)
  for k in range(losses.shape[0]):
    losses[k].backward(retain_graph=True)
  for p in model.encoder.parameters():
    p.requires_grad_(True)
  losses.sum().backward()
  return losses.detach()


def feature_space_transformation_nn(in_features: int = 18 * 1024, hidden=(4096, 1024), features: int = 1024
                                    ) -> nn.Sequential:
  """Stage 2's conditioning MLP (§6.2 step 5): Linear → ReLU → Linear → ReLU → Linear (indices 0, 2, 4)."""
  return nn.Sequential(nn.Linear(in_features, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                       nn.Linear(hidden[1], features))


def block_vector(h: torch.Tensor, block: torch.Tensor, num_blocks: int) -> torch.Tensor:
  """(N, d), (N,) → (N, K·d): zeros except h[n] at ``d·block[n] : d·(block[n] + 1)`` (§6.2 step 4)."""
  d = h.shape[1]
  c = h.new_zeros(h.shape[0], num_blocks * d)
  for n, k in enumerate(block.tolist()):
    c[n, d * k:d * (k + 1)] = h[n]
  return c
