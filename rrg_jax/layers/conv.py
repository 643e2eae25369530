"""Bias-free torch-style convolutions (NHWC, HWIO kernels): explicit symmetric padding, never 'SAME'.

``conv2d`` builds torch's ``nn.Conv2d(bias=False)``; a 1×1 / stride 1 / padding 0 one is a ``PointwiseConv``
(a matmul, same parameter tree as ``nn.Conv``).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# torchvision DenseNet: nn.init.kaiming_normal_(conv.weight) — fan_in, gain √2, untruncated normal.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torchvision ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu") — fan_out = out_channels·kh·kw.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PointwiseConv(nn.Module):
  """Bias-free 1×1 convolution as a matmul: (..., C) → (..., features); param ``kernel`` (1, 1, C, features) as
  ``nn.Conv``'s, so checkpoints and the torch converter see the same tree.

  Same result as ``nn.Conv`` (up to float summation order), but XLA:CPU lowers a 1×1 convolution's weight gradient
  to a convolution with an H×W window over channel-major copies of the activations, while a ``dot``'s is a GEMM:
  the full CAMANet train step is ~25% faster on CPU this way (IU, batch 8 and 32: ``benchmarks/RESULTS.md``).
  """
  features: int
  dtype: Any = jnp.float32
  kernel_init: Initializer = kaiming_normal

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def conv2d(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str,
           kernel_init: Initializer = kaiming_normal) -> nn.Module:
  """torch ``nn.Conv2d(c, features, kernel, stride, padding, bias=False)``: (B, H, W, c) →
  (B, ⌊(H + 2·padding − kernel)/stride⌋ + 1, …, features) in ``dtype``; float32 param ``kernel``
  (kernel, kernel, c, features). 1×1 / stride 1 / padding 0 → ``PointwiseConv``."""
  if (kernel, stride, padding) == (1, 1, 0):
    return PointwiseConv(features, dtype, kernel_init, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 use_bias=False, kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32, name=name)
