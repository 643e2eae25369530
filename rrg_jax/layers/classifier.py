"""MLP classification head of RadGen (radgen_spec §3.9, §9.1, §10.4, §10.5), Flax Linen.

``z (B, D) → [Linear(→ h_i) → LayerNorm → GELU → Dropout]`` for each hidden width h_i ``→ Linear(→ C)`` → logits
(B, C) float32. RadGen: hidden (256, 128), C = 3, dropout 0.3, LayerNorm ε 1e-5, exact (erf) GELU; the loss
takes the logits (softmax only for probabilities). ``layer_norms`` drops the LayerNorm of chosen hidden layers
(the §9.1 baselines' heads: early fusion normalises its first layer only, the others none); no hidden layer is a
plain Linear (the DenseNet-121 baseline).

Params ``dense_i``, ``norm_i`` per hidden layer and ``out``: the public code's ``classifier`` Sequential indices
0, 1, 4, 5, 8 (``classifier.0`` → ``dense_0``, ``classifier.1`` → ``norm_0``, ``classifier.4`` → ``dense_1``,
``classifier.5`` → ``norm_1``, ``classifier.8`` → ``out``). Init = PyTorch defaults: Linear weight and bias
U(±1/√fan_in), LayerNorm 1/0. Params float32; matmuls in ``dtype``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear, torch_kernel_init


class ClassifierHead(nn.Module):
  """Attributes: ``hidden`` widths ((256, 128) full, (16, 8) tiny), ``num_classes`` C, ``dropout`` (after each
  GELU), ``layer_norm_eps``, compute ``dtype``, ``layer_norms`` (one flag per hidden layer; None = all)."""
  hidden: Sequence[int] = (256, 128)
  num_classes: int = 3
  dropout: float = 0.3
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  layer_norms: Sequence[bool] | None = None

  @nn.compact
  def __call__(self, z: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """z (B, D) → logits (B, C) float32; dropout only when not ``deterministic`` (needs the 'dropout' rng)."""
    norms = [True] * len(self.hidden) if self.layer_norms is None else list(self.layer_norms)
    if len(norms) != len(self.hidden):
      raise ValueError(f"layer_norms {norms} needs one flag per hidden layer {tuple(self.hidden)}.")
    x = z.astype(self.dtype)
    for i, (width, norm) in enumerate(zip(self.hidden, norms)):
      x = Linear(width, kernel_init=torch_kernel_init, dtype=self.dtype, name=f"dense_{i}")(x)
      if norm:
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype,
                         param_dtype=jnp.float32, name=f"norm_{i}")(x)
      x = nn.Dropout(self.dropout)(nn.gelu(x, approximate=False), deterministic=deterministic)
    logits = Linear(self.num_classes, kernel_init=torch_kernel_init, dtype=self.dtype, name="out")(x)
    return logits.astype(jnp.float32)
