"""DenseNet (torchvision ``densenet121().features`` + the final ReLU) with a torch-exact BatchNorm (spec §3).

NHWC. Explicit symmetric padding everywhere (conv0 pad 3, 3×3 convs pad 1, max-pool 3/2 pad 1 with −inf,
avg-pool 2/2); never 'SAME'. Module names mirror torchvision: ``conv0``, ``norm0``,
``denseblock{b}/denselayer{i}/{norm1,conv1,norm2,conv2}``, ``transition{t}/{norm,conv}``, ``norm5``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.conv import conv2d
from rrg_jax.layers.norms import BatchNorm


class DenseLayer(nn.Module):
  """BN → ReLU → conv1×1 (bn_size·growth) → BN → ReLU → conv3×3 pad 1 (growth): (B, H, W, c) → (B, H, W, growth)."""
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm1")(x, train))
    h = conv2d(self.bn_size * self.growth_rate, 1, 1, 0, self.dtype, "conv1")(h)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm2")(h, train))
    return conv2d(self.growth_rate, 3, 1, 1, self.dtype, "conv2")(h)


class DenseBlock(nn.Module):
  """Layer i sees the channel concatenation [block input, out_1, …, out_{i−1}]; returns all of them concatenated."""
  num_layers: int
  growth_rate: int
  bn_size: int
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer
    for i in range(self.num_layers):
      y = layer_cls(self.growth_rate, self.bn_size, self.dtype, name=f"denselayer{i + 1}")(x, train)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """BN → ReLU → conv1×1 (c → c/2) → avg-pool 2×2 stride 2."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm")(x, train))
    h = conv2d(x.shape[-1] // 2, 1, 1, 0, self.dtype, "conv")(h)
    return nn.avg_pool(h, (2, 2), strides=(2, 2))


def densenet_channels(growth_rate: int, block_config: Sequence[int], num_init_features: int) -> int:
  """Output channels of ``DenseNet`` (1024 for DenseNet-121)."""
  c = num_init_features
  for b, n in enumerate(block_config):
    c += n * growth_rate
    if b != len(block_config) - 1:
      c //= 2
  return c


class DenseNet(nn.Module):
  """images (B, H, W, 3) → ReLU(norm5(features)) (B, H/32, W/32, C); 224 → (B, 7, 7, 1024) for DenseNet-121.

  Attributes mirror torchvision's ``DenseNet`` (no dropout); ``remat`` rematerialises each dense layer;
  ``dtype`` is the compute dtype (params and BN statistics stay float32).
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv2d(self.num_init_features, 7, 2, 3, self.dtype, "conv0")(x.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name="norm0")(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for b, n in enumerate(self.block_config):
      x = DenseBlock(n, self.growth_rate, self.bn_size, self.remat, self.dtype, name=f"denseblock{b + 1}")(x, train)
      if b != len(self.block_config) - 1:
        x = Transition(self.dtype, name=f"transition{b + 1}")(x, train)
    return nn.relu(BatchNorm(dtype=self.dtype, name="norm5")(x, train))
