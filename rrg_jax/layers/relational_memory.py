"""R2Gen relational memory (spec §5.2): full sequence (``nn.scan``) and one step (cached decoding)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.attention import MultiHeadedAttention
from rrg_jax.layers.linear import Linear


class RelationalMemory(nn.Module):
  """Memory M (B, S, Dm) updated by each input e_t (B, Dm).

  Params: ``attn`` (``linears_0..3``), ``mlp_0``/``mlp_2`` (Dm → Dm, ReLU after each), ``W``/``U`` (Dm → 2·Dm).
  ``M' = sigmoid(i) ⊙ tanh(Z) + sigmoid(f) ⊙ M`` with ``Z = M + MHA(M, [M; e], [M; e])``, ``Z = Z + mlp(Z)``,
  ``[i, f] = W(e) + U(tanh(M))``. The memory state is float32.
  """
  num_slots: int
  d_model: int
  num_heads: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.attn = MultiHeadedAttention(self.num_heads, self.d_model, self.dropout, self.dtype)
    self.mlp_0 = Linear(self.d_model, dtype=self.dtype)
    self.mlp_2 = Linear(self.d_model, dtype=self.dtype)
    self.W = Linear(2 * self.d_model, dtype=self.dtype)
    self.U = Linear(2 * self.d_model, dtype=self.dtype)

  def init_memory(self, batch_size: int) -> jax.Array:
    """M_0 (B, S, Dm): slot s is the one-hot e_s (identity padded with zeros / truncated to Dm)."""
    eye = jnp.eye(self.num_slots, self.d_model, dtype=jnp.float32)
    return jnp.broadcast_to(eye, (batch_size, self.num_slots, self.d_model))

  def step(self, e: jax.Array, memory: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """e (B, Dm), memory (B, S, Dm) → next memory (B, S, Dm) float32."""
    m = memory.astype(self.dtype)
    kv = jnp.concatenate([m, e[:, None].astype(self.dtype)], axis=1)
    z = m + self.attn(m, kv, kv, deterministic=deterministic)[0]
    z = z + nn.relu(self.mlp_2(nn.relu(self.mlp_0(z))))
    gates = (self.W(e[:, None]) + self.U(jnp.tanh(m))).astype(jnp.float32)
    input_gate, forget_gate = jnp.split(gates, 2, axis=-1)
    return (jax.nn.sigmoid(input_gate) * jnp.tanh(z.astype(jnp.float32))
            + jax.nn.sigmoid(forget_gate) * memory.astype(jnp.float32))

  def __call__(self, emb: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """emb (B, L, Dm) → R (B, L, S·Dm): the memory after reading each token, flattened."""

    def body(module: RelationalMemory, memory: jax.Array, e: jax.Array):
      memory = module.step(e, memory, deterministic=deterministic)
      return memory, memory.reshape(memory.shape[0], -1)

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   in_axes=1, out_axes=1)
    return scan(self, self.init_memory(emb.shape[0]), emb)[1]
