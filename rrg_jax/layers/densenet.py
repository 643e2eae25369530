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

# torchvision: nn.init.kaiming_normal_(conv.weight) — fan_in, gain √2, untruncated normal.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class BatchNorm(nn.Module):
  """torch ``BatchNorm2d`` over the last (channel) axis: (..., C) → (..., C) in ``dtype``.

  Params ``scale`` (1) / ``bias`` (0); collection ``batch_stats``: ``mean`` (0) / ``var`` (1).
  train: normalise with the batch mean and biased batch variance; update (unless initialising)
  ``mean ← (1−m)·mean + m·batch_mean`` and ``var ← (1−m)·var + m·batch_var·n/(n−1)`` (unbiased, as torch; Flax's
  BatchNorm stores the biased one). eval: running statistics. Statistics are float32.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      n = x.size // c
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    # torch's CPU kernel form: alpha = weight / sqrt(var + eps), beta = bias − mean · alpha, y = x · alpha + beta.
    alpha = scale * (1.0 / jnp.sqrt(var + self.epsilon))
    return (x * alpha + (bias - mean * alpha)).astype(self.dtype)


class PointwiseConv(nn.Module):
  """Bias-free 1×1 convolution as a matmul: (..., C) → (..., features); param ``kernel`` (1, 1, C, features) as
  ``nn.Conv``'s, so checkpoints and the torch converter see the same tree.

  Same result as ``nn.Conv`` (up to float summation order), but XLA:CPU lowers a 1×1 convolution's weight gradient
  to a convolution with an H×W window over channel-major copies of the activations, while a ``dot``'s is a GEMM:
  the full CAMANet train step is ~25% faster on CPU this way (IU, batch 8 and 32: ``benchmarks/RESULTS.md``).
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", kaiming_normal, (1, 1, x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str) -> nn.Module:
  if (kernel, stride, padding) == (1, 1, 0):
    return PointwiseConv(features, dtype, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 use_bias=False, kernel_init=kaiming_normal, dtype=dtype, param_dtype=jnp.float32, name=name)


class DenseLayer(nn.Module):
  """BN → ReLU → conv1×1 (bn_size·growth) → BN → ReLU → conv3×3 pad 1 (growth): (B, H, W, c) → (B, H, W, growth)."""
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm1")(x, train))
    h = _conv(self.bn_size * self.growth_rate, 1, 1, 0, self.dtype, "conv1")(h)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm2")(h, train))
    return _conv(self.growth_rate, 3, 1, 1, self.dtype, "conv2")(h)


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
    h = _conv(x.shape[-1] // 2, 1, 1, 0, self.dtype, "conv")(h)
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
    x = _conv(self.num_init_features, 7, 2, 3, self.dtype, "conv0")(x.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name="norm0")(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for b, n in enumerate(self.block_config):
      x = DenseBlock(n, self.growth_rate, self.bn_size, self.remat, self.dtype, name=f"denseblock{b + 1}")(x, train)
      if b != len(self.block_config) - 1:
        x = Transition(self.dtype, name=f"transition{b + 1}")(x, train)
    return nn.relu(BatchNorm(dtype=self.dtype, name="norm5")(x, train))
