"""ResNet-18/34/50/101/152 exactly as torchvision's (v1.5: the Bottleneck's stride on its 3×3 conv), up to ``layer4``.

NHWC. torchvision's ``nn.Sequential(*list(resnet.children())[:-2])``: conv1 7×7/2 pad 3 → bn1 → ReLU → max-pool
3×3/2 pad 1 (−inf) → layer1..layer4; no avgpool, no fc. Explicit symmetric padding everywhere, never 'SAME'.
BatchNorm is the torch-exact ``layers.norms.BatchNorm`` (eps 1e-5, momentum 0.1). Init as torchvision: convs
Kaiming-normal fan_out (ReLU gain), BN weight 1 / bias 0, no zero-init of the last BN of a block.

Module names are torchvision's state_dict keys through ``convert``'s naming rule: ``conv1``, ``bn1``,
``layer{l}_{i}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_0,downsample_1]}`` (``layer1.0.downsample.1`` →
``layer1_0/downsample_1``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.conv import conv2d, kaiming_normal_fan_out
from rrg_jax.layers.norms import BatchNorm

# depth → blocks per stage (layer1..layer4); BasicBlock below 50, Bottleneck (expansion 4) from 50.
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
DEFAULT_WIDTHS = (64, 128, 256, 512)


def resnet_layers(depth: int) -> tuple[int, ...]:
  """Blocks per stage of ResNet-``depth``; ValueError for a depth torchvision does not define."""
  if depth not in RESNET_LAYERS:
    raise ValueError(f"Unknown ResNet depth {depth!r}: expected one of {sorted(RESNET_LAYERS)}.")
  return RESNET_LAYERS[depth]


def is_bottleneck(depth: int) -> bool:
  """Whether ResNet-``depth`` is built of Bottleneck blocks (50/101/152) rather than BasicBlocks (18/34)."""
  resnet_layers(depth)
  return depth >= 50


def resnet_channels(depth: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> int:
  """Output channels of ``ResNet`` (``layer4``'s): widths[-1] (18/34) or 4·widths[-1] (50/101/152)."""
  return widths[-1] * (4 if is_bottleneck(depth) else 1)


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str) -> nn.Module:
  return conv2d(features, kernel, stride, padding, dtype, name, kernel_init=kaiming_normal_fan_out)


class BasicBlock(nn.Module):
  """conv3×3/stride → BN → ReLU → conv3×3 → BN, + identity (or downsample), ReLU:
  (B, H, W, c) → (B, ⌈H/stride⌉, ⌈W/stride⌉, planes)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = _conv(self.planes, 3, self.stride, 1, self.dtype, "conv1")(x)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(h, train))
    h = _conv(self.planes, 3, 1, 1, self.dtype, "conv2")(h)
    h = BatchNorm(dtype=self.dtype, name="bn2")(h, train)
    return nn.relu(h + _downsample(self, x, self.planes, train))


class Bottleneck(nn.Module):
  """conv1×1 → BN → ReLU → conv3×3/stride → BN → ReLU → conv1×1 (4·planes) → BN, + identity (or downsample),
  ReLU: (B, H, W, c) → (B, ⌈H/stride⌉, ⌈W/stride⌉, 4·planes). torchvision v1.5 (stride on the 3×3)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = _conv(self.planes, 1, 1, 0, self.dtype, "conv1")(x)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(h, train))
    h = _conv(self.planes, 3, self.stride, 1, self.dtype, "conv2")(h)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(h, train))
    h = _conv(self.planes * 4, 1, 1, 0, self.dtype, "conv3")(h)
    h = BatchNorm(dtype=self.dtype, name="bn3")(h, train)
    return nn.relu(h + _downsample(self, x, self.planes * 4, train))


def _downsample(block: BasicBlock | Bottleneck, x: jax.Array, features: int, train: bool) -> jax.Array:
  """The block's identity branch: x, or conv1×1/stride (``downsample_0``; a strided 1×1 is an ``nn.Conv``, only a
  stride-1 one a PointwiseConv) → BN (``downsample_1``). Called inside the block's compact ``__call__``, so the
  two modules are the block's children."""
  if not block.downsample:
    return x
  h = conv2d(features, 1, block.stride, 0, block.dtype, "downsample_0", kernel_init=kaiming_normal_fan_out)
  return BatchNorm(dtype=block.dtype, name="downsample_1")(h(x), train)


class ResNet(nn.Module):
  """images (B, H, W, 3) → ``layer4`` output (B, H/32, W/32, C) (ceil at each stride-2 step); 224 →
  (B, 7, 7, 512) for ResNet-18/34 and (B, 7, 7, 2048) for 50/101/152 (C = ``resnet_channels``).

  ``depth`` ∈ ``RESNET_LAYERS``; ``widths`` are the four stages' planes (conv1/bn1 output widths[0]; default =
  torchvision's); ``remat`` rematerialises the stem (conv1 → bn1 → ReLU → max-pool, whose full-resolution
  activations dominate for large images) and each residual block; ``dtype`` is the compute dtype (params and BN
  statistics stay float32).
  """
  depth: int = 50
  widths: Sequence[int] = DEFAULT_WIDTHS
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers = resnet_layers(self.depth)
    if len(self.widths) != 4:
      raise ValueError(f"ResNet widths must have 4 entries (one per stage), got {tuple(self.widths)}.")
    block_cls = Bottleneck if is_bottleneck(self.depth) else BasicBlock
    expansion = block_cls.expansion

    def stem(module: ResNet, x: jax.Array) -> jax.Array:  # conv1, bn1 as children of ``module``
      x = _conv(module.widths[0], 7, 2, 3, module.dtype, "conv1")(x.astype(module.dtype))
      x = nn.relu(BatchNorm(dtype=module.dtype, name="bn1")(x, train))
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    if self.remat:  # the stem's full-resolution activations too: only its input and output are kept
      block_cls = nn.remat(block_cls, static_argnums=(2,))
      stem = nn.remat(stem)
    x = stem(self, x)
    inplanes = self.widths[0]
    for stage, (n, planes) in enumerate(zip(layers, self.widths)):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        out = planes * expansion
        downsample = i == 0 and (stride != 1 or inplanes != out)
        x = block_cls(planes, stride, downsample, self.dtype, name=f"layer{stage + 1}_{i}")(x, train)
        inplanes = out
    return x
