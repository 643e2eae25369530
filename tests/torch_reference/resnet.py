"""A compact PyTorch ResNet (v1.5) written from torchvision's published architecture, without torchvision.

Same module names, ``children()`` order (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc) and state_dict keys as
``torchvision.models.resnet{18,34,50,101,152}``, so ``nn.Sequential(*list(model.children())[:-2])`` is the
feature extractor. ``widths`` scales the four stages' planes (conv1's output = widths[0]); the default is
torchvision's. Init as torchvision: convs ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN 1/0,
fc ``nn.Linear``'s default, no zero-init of the residual BNs.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_reference.camanet import randomize_norms_  # noqa: F401  (BN affine + running stats off init)

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """v1.5: the stride is on the 3×3 conv2."""
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """(B, 3, H, W) → logits (B, num_classes); ``features`` = children()[:-2] gives (B, C, H/32, W/32)."""

  def __init__(self, depth: int, widths=(64, 128, 256, 512), num_classes: int = 1000):
    super().__init__()
    block = Bottleneck if depth >= 50 else BasicBlock
    self.inplanes = widths[0]
    self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, widths[0], LAYERS[depth][0], 1)
    self.layer2 = self._make_layer(block, widths[1], LAYERS[depth][1], 2)
    self.layer3 = self._make_layer(block, widths[2], LAYERS[depth][2], 2)
    self.layer4 = self._make_layer(block, widths[3], LAYERS[depth][3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def features(model: ResNet) -> nn.Sequential:
  """torchvision's feature-extractor idiom: everything but avgpool and fc."""
  return nn.Sequential(*list(model.children())[:-2])


@torch.no_grad()
def scale_residual_bns_(model: nn.Module, factor: float) -> None:
  """Multiplies each block's last BN weight (BasicBlock ``bn2``, Bottleneck ``bn3``) by ``factor``. Trained
  ResNets have small ones; with ~1 a random tiny network in train mode (a few values per channel in layer4) is
  chaotic: float32 noise, torch's own against float64 included, grows ~1.3× per block and ReLU flips move
  gradients by up to 1e-2."""
  for block in model.modules():
    if isinstance(block, (BasicBlock, Bottleneck)):
      (block.bn3 if isinstance(block, Bottleneck) else block.bn2).weight.mul_(factor)


@torch.no_grad()
def calibrate_bn_(model: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None,
                  scale: float = 0.2) -> None:
  """Running stats := the (cumulative, unbiased) batch statistics of ``model(images)``, then perturbed (mean
  +scale·N(0,1)·std, var ×(1 + scale·U)), so that eval-mode activations of a random deep network stay O(1) while
  eval still differs from train. BN affine params are left as they are."""
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  was_training = model.training
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None
  model.train()
  model(images)
  for bn in bns:
    bn.momentum = 0.1
    if generator is not None:
      bn.running_mean.add_(scale * bn.running_var.sqrt() * torch.randn(bn.running_mean.shape, generator=generator))
      bn.running_var.mul_(1 + scale * torch.rand(bn.running_var.shape, generator=generator))
  model.train(was_training)
