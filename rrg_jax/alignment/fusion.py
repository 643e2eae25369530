"""RadGen's cross-modal fusion and gate (radgen_spec §3.8, §9.2, §10.4, §10.5), Flax Linen.

``CrossModalFusion`` maps the image feature z_img (B, D), the text encoder's states H (B, T, d_text) and their
mask m (B, T) ∈ {0, 1} to the fused feature z (B, D) that the classifier reads, plus the cross-attention
probabilities (B, heads, 1, T) (the image query over the report's tokens: a word heatmap).

``mode = "cross_attention"`` (§3.8; D = 512, 8 heads, FFN 2048, dropout 0.1, post-LN with ε 1e-5):
  1. ``U = text_proj(H)`` (d_text → D); the same ``text_proj`` projects the gate's pooled text (step 7).
  2. ``A, P = cross_attn(z_img, U, U, key mask m)`` (query = the image, length 1).
  3. ``z_cross = norm1(z_img + A)`` (no dropout on A).
  4. ``S = self_attn(z_cross)`` on the length-1 sequence: its softmax is over one key (≡ 1), so S is an affine
     map of z_cross with attention-dropout noise per head; ``self_attn/query`` and ``self_attn/key`` are inert
     (zero gradient), kept so that the checkpoint of the public code loads.
  5. ``z_self = norm2(z_cross + S)``.
  6. ``z_fused = z_self + Drop(ffn_out(Drop(GELU(ffn_in(z_self)))))``.
  7. gate (``gate=True``): ``t = pool(H, m)`` (``text_pool``), ``t' = text_proj(t)``,
     ``g = σ(gate([z_img ; t']))``; ``gate_mix = "fused"`` (spec, = code): ``z = g ⊙ z_img + (1 − g) ⊙ z_fused``;
     ``"pooled"`` (the outline read literally): ``z = g ⊙ z_img + (1 − g) ⊙ t'``. ``gate=False``: ``z = z_fused``.

``mode = "concat"`` (§9.2 ``wo_cross_attention``): ``z = Drop_0.3(GELU(norm(dense([z_img ; t]))))`` with t the
pooled, unprojected text (d_text), ``dense`` (D + d_text → D); no gate, no attention (probabilities None).

Parameter tree (§10.4): ``text_proj``, ``cross_attn/{query,key,value,out}``, ``norm1``,
``self_attn/{query,key,value,out}``, ``norm2``, ``ffn_in``, ``ffn_out``, ``gate``; concat mode: ``dense``, ``norm``.
Torch keys: ``fusion.{cross_attn,self_attn}.in_proj_weight`` rows [0, D) / [D, 2D) / [2D, 3D) are the
query / key / value weights (kernels = their transposes), ``out_proj`` → ``out``, ``ffn.0`` → ``ffn_in``,
``ffn.3`` → ``ffn_out``, ``gate.0`` → ``gate``; LayerNorm ``weight`` → ``scale``.
Init = PyTorch defaults (§10.5). Params float32; matmuls in ``dtype``; softmax and LayerNorm statistics float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.attention import MASK_FILL
from rrg_jax.layers.linear import Linear, torch_kernel_init

MODES = ("cross_attention", "concat")
TEXT_POOLS = ("masked_mean", "mean_all", "cls")
GATE_MIXES = ("fused", "pooled")

# nn.MultiheadAttention's packed in_proj_weight (3D, D) is Xavier-uniform as one matrix: bound √(6/(D + 3D)),
# which for each (D, D) query/key/value kernel is variance scaling 1/2 over fan_avg = D (bound √(3·½/D)).
packed_qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def pool_text(text: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """Pooled text (§3.8 pooling) (B, T, d) with mask (B, T) → (B, d) float32.

  ``masked_mean``: ``Σ_j m_j H_j / Σ_j m_j`` over the real tokens ([CLS], [SEP] included); a row without any
  real token gives 0 (torch: NaN), so an all-padding batch row stays finite. ``mean_all`` (the public code): the
  plain mean over all T positions, pads included. ``cls``: ``H_0``.
  """
  text = text.astype(jnp.float32)
  if how == "masked_mean":
    m = mask.astype(jnp.float32)
    return jnp.sum(text * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
  if how == "mean_all":
    return jnp.mean(text, axis=1)
  if how == "cls":
    return text[:, 0]
  raise ValueError(f"text_pool={how!r}; choose one of {TEXT_POOLS}.")


class MultiheadAttention(nn.Module):
  """torch ``nn.MultiheadAttention(D, num_heads, dropout, batch_first=True)`` with kdim = vdim = D (§3.8 step 2).

  Params ``query``, ``key``, ``value`` (D → D; kernels ``packed_qkv_init``, biases 0) and ``out`` (D → D;
  kernel U(±1/√D), bias 0), §10.5. ``Q = (x W_q + b_q)/√d_h``, scores ``Q Kᵀ`` in float32, masked keys
  ``MASK_FILL`` (torch −∞: the same probabilities whenever one key is visible; uniform instead of NaN when
  none is), softmax, dropout on the probabilities, heads concatenated, ``out``.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """query (B, Lq, D), key/value (B, S, D), key_mask (B, S) (> 0 = visible; None = all) →
    (out (B, Lq, D) in ``dtype``, post-dropout probabilities (B, heads, Lq, S) float32, as torch returns with
    ``need_weights=True, average_attn_weights=False``)."""
    b, lq, d = query.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}.")
    head_dim = d // self.num_heads

    def heads(x: jax.Array, name: str) -> jax.Array:
      y = Linear(d, kernel_init=packed_qkv_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)(x)
      return y.reshape(b, x.shape[1], self.num_heads, head_dim).transpose(0, 2, 1, 3)

    q = heads(query, "query") * math.sqrt(1.0 / head_dim)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, heads(key, "key"), preferred_element_type=jnp.float32)
    if key_mask is not None:
      scores = jnp.where(key_mask[:, None, None, :] > 0, scores, MASK_FILL)
    probs = nn.Dropout(self.dropout)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    x = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), heads(value, "value"))
    x = x.transpose(0, 2, 1, 3).reshape(b, lq, d)
    out = Linear(d, kernel_init=torch_kernel_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name="out")
    return out(x), probs


class CrossModalFusion(nn.Module):
  """RadGen's fusion (module docstring; §3.8 / §9.2).

  Attributes:
    d_model: width D (= z_img's width).
    num_heads: attention heads (D divisible by it).
    ffn_dim: FFN hidden width.
    mode: "cross_attention" | "concat".
    text_pool: "masked_mean" | "mean_all" | "cls" (the gate's pooled text; concat mode's text input).
    gate: mix z_img back in through the sigmoid gate (cross_attention mode).
    gate_mix: "fused" (z_img with z_fused) | "pooled" (z_img with the projected pooled text).
    attention_dropout: dropout on both attentions' probabilities.
    ffn_dropout: dropout after the GELU and after ``ffn_out``.
    concat_dropout: dropout of the concat fusion.
    layer_norm_eps: ε of every LayerNorm.
    dtype: compute dtype (params float32).
  """
  d_model: int = 512
  num_heads: int = 8
  ffn_dim: int = 2048
  mode: str = "cross_attention"
  text_pool: str = "masked_mean"
  gate: bool = True
  gate_mix: str = "fused"
  attention_dropout: float = 0.1
  ffn_dropout: float = 0.1
  concat_dropout: float = 0.3
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  def _dense(self, features: int, name: str) -> Linear:
    """torch-default ``nn.Linear``: U(±1/√fan_in) weight and bias."""
    return Linear(features, kernel_init=torch_kernel_init, dtype=self.dtype, name=name)

  def _norm(self, name: str) -> nn.LayerNorm:
    """torch ``nn.LayerNorm`` (biased variance, ε inside the square root), γ 1 / β 0."""
    return nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype,
                        param_dtype=jnp.float32, name=name)

  def _pooled(self, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    """``pool_text`` with this module's ``text_pool``: (B, d_text) in ``dtype``."""
    return pool_text(text, text_mask, self.text_pool).astype(self.dtype)

  @nn.compact
  def __call__(self, z_img: jax.Array, text: jax.Array, text_mask: jax.Array, *,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Fuses an image with its (generated) report.

    Args:
      z_img: (B, D) image feature.
      text: (B, T, d_text) text encoder states H.
      text_mask: (B, T) 1 for real tokens, 0 for pads.
      deterministic: no dropout when True; otherwise needs the 'dropout' rng.

    Returns:
      z (B, D) in ``dtype``, and the cross-attention probabilities (B, heads, 1, T) float32 (after dropout, as
      torch's; None in concat mode).
    """
    for value, choices, what in ((self.mode, MODES, "mode"), (self.text_pool, TEXT_POOLS, "text_pool"),
                                 (self.gate_mix, GATE_MIXES, "gate_mix")):
      if value not in choices:
        raise ValueError(f"fusion {what}={value!r}; choose one of {choices}.")
    if z_img.shape[-1] != self.d_model:
      raise ValueError(f"z_img width {z_img.shape[-1]} != d_model={self.d_model}.")
    z_img = z_img.astype(self.dtype)
    if self.mode == "concat":
      x = self._dense(self.d_model, "dense")(jnp.concatenate([z_img, self._pooled(text, text_mask)], axis=-1))
      x = nn.gelu(self._norm("norm")(x), approximate=False)
      return nn.Dropout(self.concat_dropout)(x, deterministic=deterministic), None

    text_proj = self._dense(self.d_model, "text_proj")
    u = text_proj(text.astype(self.dtype))
    q = z_img[:, None]
    a, probs = MultiheadAttention(self.num_heads, self.attention_dropout, self.dtype, name="cross_attn")(
        q, u, u, text_mask, deterministic=deterministic)
    z_cross = self._norm("norm1")(q + a)
    s, _ = MultiheadAttention(self.num_heads, self.attention_dropout, self.dtype, name="self_attn")(
        z_cross, z_cross, z_cross, deterministic=deterministic)
    z_self = self._norm("norm2")(z_cross + s)[:, 0]
    drop = nn.Dropout(self.ffn_dropout)
    h = drop(nn.gelu(self._dense(self.ffn_dim, "ffn_in")(z_self), approximate=False), deterministic=deterministic)
    z_fused = z_self + drop(self._dense(self.d_model, "ffn_out")(h), deterministic=deterministic)
    if not self.gate:
      return z_fused, probs
    t = text_proj(self._pooled(text, text_mask))
    g = nn.sigmoid(self._dense(self.d_model, "gate")(jnp.concatenate([z_img, t], axis=-1)))
    other = z_fused if self.gate_mix == "fused" else t
    return g * z_img + (1 - g) * other, probs
