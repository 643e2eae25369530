"""BERT encoder with Hugging Face ``BertModel`` semantics (transformers 5.x, eager attention), Flax Linen.

Embeddings ``word + absolute position + token type`` → LayerNorm → dropout; post-LN encoder layers (self-attention
with the additive mask ``(1 − mask)·finfo(float32).min``, exact-erf GELU feed-forward); optional pooler
``tanh(dense(h[:, 0]))``. Module names follow the HF state_dict keys through ``rrg_jax.convert``'s naming rule:
``embeddings/{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}``,
``encoder/layer_i/attention/self/{query,key,value}``, ``encoder/layer_i/attention/output/{dense,LayerNorm}``,
``encoder/layer_i/intermediate/dense``, ``encoder/layer_i/output/{dense,LayerNorm}``, ``pooler/dense``.

Parameters are float32; matmuls run in ``dtype``; softmax and LayerNorm statistics are float32. As torch's
``nn.Embedding(padding_idx=pad_token_id)``, the ``pad_token_id`` row of the word embedding gets no gradient.
Weights come from ``rrg_jax.hf_weights.load_bert`` (a local folder; nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear

# HF's `_init_weights`: normal(0, initializer_range) weights, zero biases, LayerNorm (1, 0).
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of an HF BERT ``config.json`` this module uses (defaults: bert-base-uncased)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int | None = 0

  def __post_init__(self):
    if self.hidden_act != "gelu":
      raise ValueError(f"BERT hidden_act={self.hidden_act!r} is not supported: only 'gelu' (exact, erf) is.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BERT hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}.")

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> "BertConfig":
    """From the dict of an HF ``config.json`` (missing fields take HF's ``BertConfig`` defaults).

    Refused with a ValueError: ``position_embedding_type`` other than "absolute", ``hidden_act`` other than
    "gelu", a decoder (``is_decoder`` / ``add_cross_attention``).
    """
    pet = config.get("position_embedding_type", "absolute")
    if pet != "absolute":
      raise ValueError(f"BERT position_embedding_type={pet!r} is not supported: only 'absolute' is.")
    if config.get("is_decoder") or config.get("add_cross_attention"):
      raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported: encoder only.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


def attention_bias(attention_mask: jax.Array | None) -> jax.Array | None:
  """(B, S) 0/1 mask → additive float32 bias (B, 1, 1, S): ``(1 − mask)·finfo(float32).min`` (HF's extended mask)."""
  if attention_mask is None:
    return None
  mask = jnp.asarray(attention_mask).astype(jnp.float32)
  return ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: Any, name: str) -> Linear:
  return Linear(features, kernel_init=_normal, bias_init=_zeros, dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool) -> jax.Array:
    c = self.config
    words = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_normal, name="word_embeddings")(input_ids)
    if c.pad_token_id is not None:  # torch padding_idx: that row is looked up but never updated
      words = jnp.where((input_ids == c.pad_token_id)[..., None], jax.lax.stop_gradient(words), words)
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (words
         + nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=_normal, name="token_type_embeddings")(
             token_type_ids)
         + nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_normal,
                    name="position_embeddings")(positions))
    x = _layer_norm(c, self.dtype, "LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """``query``/``key``/``value`` (D → D); scores ``QKᵀ/√d`` + bias in float32, softmax, dropout, ``PV``."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, *, deterministic: bool) -> jax.Array:
    c = self.config
    b, t, d = x.shape
    h = c.num_attention_heads

    def heads(name):
      return _dense(d, self.dtype, name)(x).reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
    if bias is not None:
      scores = scores + bias
    probs = nn.Dropout(c.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1),
                                                       deterministic=deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
    return out.transpose(0, 2, 1, 3).reshape(b, t, d)


class BertResidualOutput(nn.Module):
  """HF ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(x)) + residual)``."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
    c = self.config
    x = nn.Dropout(c.hidden_dropout_prob)(_dense(c.hidden_size, self.dtype, "dense")(x),
                                          deterministic=deterministic)
    return _layer_norm(c, self.dtype, "LayerNorm")(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, *, deterministic: bool) -> jax.Array:
    a = BertSelfAttention(self.config, self.dtype, name="self")(x, bias, deterministic=deterministic)
    return BertResidualOutput(self.config, self.dtype, name="output")(a, x, deterministic=deterministic)


class BertIntermediate(nn.Module):
  """HF ``BertIntermediate``: ``gelu(dense(x))`` (D → intermediate_size), exact (erf) GELU."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(_dense(self.config.intermediate_size, self.dtype, "dense")(x), approximate=False)


class BertLayer(nn.Module):
  """Post-LN layer: ``attention`` (self-attention + ``output``), ``intermediate``, ``output``."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, *, deterministic: bool) -> jax.Array:
    a = BertAttention(self.config, self.dtype, name="attention")(x, bias, deterministic=deterministic)
    i = BertIntermediate(self.config, self.dtype, name="intermediate")(a)
    return BertResidualOutput(self.config, self.dtype, name="output")(i, a, deterministic=deterministic)


class BertEncoder(nn.Module):
  """HF ``BertEncoder``: ``layer_0 .. layer_{L−1}`` → (last output, [input, each layer's output])."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, *, deterministic: bool
               ) -> tuple[jax.Array, list[jax.Array]]:
    hidden = [x]
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, bias, deterministic=deterministic)
      hidden.append(x)
    return x, hidden


class BertPooler(nn.Module):
  """HF ``BertPooler``: ``tanh(dense(h[:, 0]))``."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(_dense(self.config.hidden_size, self.dtype, "dense")(x[:, 0]))


class BertModel(nn.Module):
  """HF ``BertModel`` (encoder only).

  Attributes:
    config: a ``BertConfig`` (``BertConfig.from_hf_config(json)``).
    add_pooling_layer: build ``pooler/dense`` and return ``pooler_output``.
    dtype: compute dtype (params stay float32).
  """
  config: BertConfig
  add_pooling_layer: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
               output_hidden_states: bool = False) -> dict[str, Any]:
    """input_ids (B, T) int; attention_mask (B, T) 0/1 (None = all visible); token_type_ids (B, T) (None = 0).

    Returns a dict: ``last_hidden_state`` (B, T, H); ``pooler_output`` (B, H) with the pooler;
    ``hidden_states`` (embeddings output, then each layer's; L + 1 arrays) when ``output_hidden_states``.
    Dropout needs the 'dropout' rng when ``deterministic`` is False.
    """
    c = self.config
    if input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} > max_position_embeddings "
                       f"{c.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic=deterministic)
    x, hidden = BertEncoder(c, self.dtype, name="encoder")(x, attention_bias(attention_mask),
                                                          deterministic=deterministic)
    out: dict[str, Any] = {"last_hidden_state": x}
    if self.add_pooling_layer:
      out["pooler_output"] = BertPooler(c, self.dtype, name="pooler")(x)
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden)
    return out
