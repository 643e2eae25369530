"""Linear layer with PyTorch ``nn.Linear`` semantics and initialisers.

``y = x · kernel + bias`` with ``kernel`` = torch ``weight``ᵀ, shape (in, out). Params are float32; the matmul
runs in ``dtype`` (float32 or bfloat16).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# torch.nn.Linear default weight init, kaiming_uniform(a=√5): U(±1/√fan_in) on a (in, out) kernel.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()


def torch_bias_init(fan_in: int) -> Initializer:
  """torch.nn.Linear default bias init: U(±1/√fan_in)."""
  bound = 1.0 / fan_in ** 0.5 if fan_in > 0 else 0.0

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Linear(nn.Module):
  """(..., in) → (..., features).

  Attributes:
    features: output width.
    kernel_init: initialiser of the (in, features) kernel (default Xavier-uniform, as inside R2Gen's
      ``encoder_decoder.model``; use ``torch_kernel_init`` for a torch-default Linear).
    bias_init: initialiser of the bias; None = torch default U(±1/√in).
    dtype: compute dtype.
  """
  features: int
  kernel_init: Initializer = xavier_uniform
  bias_init: Initializer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init or torch_bias_init(fan_in), (self.features,), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)
