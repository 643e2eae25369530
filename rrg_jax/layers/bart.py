"""BART encoder-decoder with Hugging Face ``BartForConditionalGeneration`` semantics (transformers 5.x, eager
attention), Flax Linen.

Forward (radgen_spec §3.4, HF ``modeling_bart``):
  * ``shared`` word embeddings (V, D), used by the encoder, the decoder and the tied LM head; a token lookup is
    multiplied by ``√D`` when ``scale_embedding`` (bart-base: 1). As torch's ``nn.Embedding(padding_idx=pad)``,
    a lookup of the ``pad_token_id`` row passes no gradient to it (the LM head still does).
  * learned positions with HF's offset 2: position ``p`` reads row ``p + 2`` of ``embed_positions`` (table
    ``max_position_embeddings + 2``); the encoder's ``inputs_embeds`` (e.g. visual tokens) are used as given
    (no lookup, no scaling) and get the same positions 0..S−1.
  * ``layernorm_embedding`` → dropout → post-LN layers (``normalize_before`` false):
    encoder ``h = LN_1(h + Drop(SelfAttn(h)))``, ``h = LN_2(h + Drop(fc2(DropAct(GELU(fc1 h)))))``; the decoder
    adds ``y = LN(y + Drop(CrossAttn(y, H_enc)))`` between the two. No final layer norm.
  * attention: ``Q = x W_q + b_q``, ``K``, ``V`` likewise, scores ``(Q Kᵀ)·d^{−1/2}`` in float32 plus
    ``finfo(float32).min`` where a key is invisible (padding; future positions in the decoder), softmax, dropout,
    ``W_o``. Exact (erf) GELU.
  * logits ``y · sharedᵀ + final_logits_bias`` (float32). ``final_logits_bias`` (1, V) is a torch *buffer*: it
    lives in the non-trainable ``constants`` collection (variables ``{"params", "constants"}``; never updated).

Module names follow the HF keys with the ``model.`` prefix removed, through ``rrg_jax.convert``'s naming rule
(numeric components merged: ``encoder.layers.0`` → ``encoder/layers_0``, as BERT's ``layer_i`` / GPT-2's ``h_i``):
``shared/embedding``, ``{encoder,decoder}/embed_positions/embedding``, ``{encoder,decoder}/layernorm_embedding``,
``{encoder,decoder}/layers_i/self_attn/{q_proj,k_proj,v_proj,out_proj}``, ``…/self_attn_layer_norm``,
``…/fc1``, ``…/fc2``, ``…/final_layer_norm``; decoder layers add ``encoder_attn`` and
``encoder_attn_layer_norm``. (radgen_spec §10.2 writes the HF Flax spelling ``layers/{i}``; this port uses the
project-wide converter rule instead.)

KV-cached decoding: ``init_cache(encoder_hidden_states, encoder_attention_mask, max_len)`` projects the
cross-attention keys/values once; ``decode_step(cache, token)`` advances every row by one token. Every cache leaf
has leading dim B (so a beam search can reorder rows with a gather); ``index`` (B,) is each row's next position.

Parameters are float32; matmuls run in ``dtype``; softmax, LayerNorm statistics and logits are float32. Weights:
``rrg_jax.hf_weights.load_bart`` (a local folder; nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear

DecodeCache = dict[str, Any]
POSITION_OFFSET = 2  # HF BartLearnedPositionalEmbedding.offset
LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, used by every BART layer norm
_zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class BartConfig:
  """The fields of an HF BART ``config.json`` this module uses (defaults: facebook/bart-base)."""
  vocab_size: int = 50265
  max_position_embeddings: int = 1024
  d_model: int = 768
  encoder_layers: int = 6
  decoder_layers: int = 6
  encoder_attention_heads: int = 12
  decoder_attention_heads: int = 12
  encoder_ffn_dim: int = 3072
  decoder_ffn_dim: int = 3072
  activation_function: str = "gelu"
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.1
  scale_embedding: bool = False
  pad_token_id: int | None = 1
  init_std: float = 0.02

  def __post_init__(self):
    if self.activation_function != "gelu":
      raise ValueError(f"BART activation_function={self.activation_function!r} is not supported: only 'gelu' "
                       "(exact, erf) is.")
    for name in ("encoder_attention_heads", "decoder_attention_heads"):
      if self.d_model % getattr(self, name):
        raise ValueError(f"BART d_model={self.d_model} is not divisible by {name}={getattr(self, name)}.")

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.d_model) if self.scale_embedding else 1.0

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> "BartConfig":
    """From the dict of an HF BART ``config.json`` (missing fields take bart-base's values).

    Refused with a ValueError: a ``model_type`` other than "bart" (mBART, PLBart, Marian … are pre-LN or differ
    otherwise), an activation other than gelu, the pre-LN / final-layer-norm variants (``normalize_before``,
    ``add_final_layer_norm``), ``normalize_embedding: false``, ``static_position_embeddings``,
    ``add_bias_logits``, ``extra_pos_embeddings`` ≠ 2, an untied LM head (``tie_word_embeddings: false``) and
    LayerDrop (``encoder_layerdrop`` / ``decoder_layerdrop`` > 0).
    """
    model_type = config.get("model_type", "bart")
    if model_type != "bart":
      raise ValueError(f"model_type={model_type!r} is not supported: only 'bart' (post-LN BART).")
    for key in ("normalize_before", "add_final_layer_norm"):
      if config.get(key):
        raise ValueError(f"BART {key}=True (the mBART-style pre-LN / final-layer-norm variant) is not supported: "
                         "only post-LN BART is.")
    if config.get("normalize_embedding", True) is False:
      raise ValueError("BART normalize_embedding=False is not supported (layernorm_embedding is always applied).")
    for key in ("static_position_embeddings", "add_bias_logits"):
      if config.get(key):
        raise ValueError(f"BART {key}=True is not supported.")
    if config.get("extra_pos_embeddings", POSITION_OFFSET) != POSITION_OFFSET:
      raise ValueError(f"BART extra_pos_embeddings={config['extra_pos_embeddings']} is not supported: the "
                       f"position offset is {POSITION_OFFSET}.")
    if config.get("tie_word_embeddings", True) is False:
      raise ValueError("BART with an untied LM head (tie_word_embeddings=false) is not supported.")
    for key in ("encoder_layerdrop", "decoder_layerdrop"):
      if config.get(key, 0.0):
        raise ValueError(f"BART {key}={config[key]} (LayerDrop) is not supported: only 0.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


def padding_bias(mask: jax.Array | None) -> jax.Array | None:
  """(B, S) 0/1 key mask → additive float32 bias (B, 1, 1, S): 0 where visible, ``finfo(float32).min`` where not."""
  if mask is None:
    return None
  return jnp.where(jnp.asarray(mask)[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_bias(t: int, mask: jax.Array | None) -> jax.Array:
  """Decoder self-attention bias (B or 1, 1, T, T): key j visible from query i iff j ≤ i and ``mask[:, j]``."""
  visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if mask is not None:
    visible = visible & (jnp.asarray(mask)[:, None, None, :] > 0)
  return jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def _layer_norm(dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32)


def _dense(features: int, config: BartConfig, dtype: Any) -> Linear:
  return Linear(features, kernel_init=nn.initializers.normal(config.init_std), bias_init=_zeros, dtype=dtype)


class BartAttention(nn.Module):
  """``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (D → D), ``num_heads`` heads."""
  config: BartConfig
  num_heads: int
  dtype: Any = jnp.float32

  def setup(self):
    d = self.config.d_model
    self.q_proj = _dense(d, self.config, self.dtype)
    self.k_proj = _dense(d, self.config, self.dtype)
    self.v_proj = _dense(d, self.config, self.dtype)
    self.out_proj = _dense(d, self.config, self.dtype)
    self.attn_dropout = nn.Dropout(self.config.attention_dropout)

  def _heads(self, x: jax.Array) -> jax.Array:
    """(B, S, D) → (B, H, S, d)."""
    b, s, d = x.shape
    return x.reshape(b, s, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

  def kv(self, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Key/value source (B, S, D) → k, v heads (B, H, S, d)."""
    return self._heads(self.k_proj(m)), self._heads(self.v_proj(m))

  def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, *,
             deterministic: bool) -> jax.Array:
    """Queries from x (B, Q, D); k/v (B, H, S, d); additive float32 bias broadcastable to (B, H, Q, S) → (B, Q, D)."""
    q = self._heads(self.q_proj(x))
    scale = (self.config.d_model // self.num_heads) ** -0.5
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
      scores = scores + bias
    probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
    b, _, lq, _ = out.shape
    return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, lq, self.config.d_model))

  def __call__(self, x: jax.Array, m: jax.Array, bias: jax.Array | None, *, deterministic: bool) -> jax.Array:
    k, v = self.kv(m)
    return self.attend(x, k, v, bias, deterministic=deterministic)


class _FeedForward(nn.Module):
  """Mixin body: ``LN(x + Drop(fc2(DropAct(GELU(fc1 x)))))`` with the layer's ``fc1``/``fc2``/``final_layer_norm``."""

  def _ffn(self, x: jax.Array, deterministic: bool) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x), approximate=False)
    h = self.fc2(self.activation_dropout(h, deterministic=deterministic))
    return self.final_layer_norm(x + self.dropout(h, deterministic=deterministic))


class BartEncoderLayer(_FeedForward):
  config: BartConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.self_attn = BartAttention(c, c.encoder_attention_heads, self.dtype)
    self.self_attn_layer_norm = _layer_norm(self.dtype)
    self.fc1 = _dense(c.encoder_ffn_dim, c, self.dtype)
    self.fc2 = _dense(c.d_model, c, self.dtype)
    self.final_layer_norm = _layer_norm(self.dtype)
    self.dropout = nn.Dropout(c.dropout)
    self.activation_dropout = nn.Dropout(c.activation_dropout)

  def __call__(self, x: jax.Array, bias: jax.Array | None, *, deterministic: bool) -> jax.Array:
    h = self.self_attn(x, x, bias, deterministic=deterministic)
    x = self.self_attn_layer_norm(x + self.dropout(h, deterministic=deterministic))
    return self._ffn(x, deterministic)


class BartDecoderLayer(_FeedForward):
  config: BartConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.self_attn = BartAttention(c, c.decoder_attention_heads, self.dtype)
    self.self_attn_layer_norm = _layer_norm(self.dtype)
    self.encoder_attn = BartAttention(c, c.decoder_attention_heads, self.dtype)
    self.encoder_attn_layer_norm = _layer_norm(self.dtype)
    self.fc1 = _dense(c.decoder_ffn_dim, c, self.dtype)
    self.fc2 = _dense(c.d_model, c, self.dtype)
    self.final_layer_norm = _layer_norm(self.dtype)
    self.dropout = nn.Dropout(c.dropout)
    self.activation_dropout = nn.Dropout(c.activation_dropout)

  def _cross_and_ffn(self, y: jax.Array, k: jax.Array, v: jax.Array, cross_bias: jax.Array | None,
                     deterministic: bool) -> jax.Array:
    h = self.encoder_attn.attend(y, k, v, cross_bias, deterministic=deterministic)
    y = self.encoder_attn_layer_norm(y + self.dropout(h, deterministic=deterministic))
    return self._ffn(y, deterministic)

  def __call__(self, y: jax.Array, self_bias: jax.Array, enc: jax.Array, cross_bias: jax.Array | None, *,
               deterministic: bool) -> jax.Array:
    h = self.self_attn(y, y, self_bias, deterministic=deterministic)
    y = self.self_attn_layer_norm(y + self.dropout(h, deterministic=deterministic))
    k, v = self.encoder_attn.kv(enc)
    return self._cross_and_ffn(y, k, v, cross_bias, deterministic)

  def init_cache(self, enc: jax.Array, max_len: int) -> DecodeCache:
    """``k``/``v`` zeros (B, H, max_len, d) and the projected cross-attention ``cross_k``/``cross_v`` (B, H, S, d)."""
    c = self.config
    b = enc.shape[0]
    zeros = jnp.zeros((b, c.decoder_attention_heads, max_len, c.d_model // c.decoder_attention_heads), self.dtype)
    cross_k, cross_v = self.encoder_attn.kv(enc)
    return {"k": zeros, "v": zeros, "cross_k": cross_k.astype(self.dtype), "cross_v": cross_v.astype(self.dtype)}

  def step(self, y: jax.Array, cache: DecodeCache, index: jax.Array, cross_bias: jax.Array | None,
           deterministic: bool = True) -> tuple[jax.Array, DecodeCache]:
    """y (B, 1, D) of the token at position ``index`` (B,) → (B, 1, D), cache with its K/V written there
    (``deterministic`` False: the dropouts of the teacher-forced layer, 'dropout' rng)."""
    k_new, v_new = self.self_attn.kv(y)
    slots = jnp.arange(cache["k"].shape[2])
    write = (slots[None, :] == index[:, None])[:, None, :, None]
    k = jnp.where(write, k_new.astype(cache["k"].dtype), cache["k"])
    v = jnp.where(write, v_new.astype(cache["v"].dtype), cache["v"])
    visible = (slots[None, :] <= index[:, None])[:, None, None, :]
    bias = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    h = self.self_attn.attend(y, k, v, bias, deterministic=deterministic)
    y = self.self_attn_layer_norm(y + self.dropout(h, deterministic=deterministic))
    y = self._cross_and_ffn(y, cache["cross_k"], cache["cross_v"], cross_bias, deterministic)
    return y, {**cache, "k": k, "v": v}


class BartEncoder(nn.Module):
  """``embed_positions``, ``layernorm_embedding``, ``layers_0..`` over given (already looked-up) embeddings."""
  config: BartConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.d_model,
                                    embedding_init=nn.initializers.normal(c.init_std))
    self.layernorm_embedding = _layer_norm(self.dtype)
    self.dropout = nn.Dropout(c.dropout)
    self.layers = [BartEncoderLayer(c, self.dtype) for _ in range(c.encoder_layers)]

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None, *, deterministic: bool
               ) -> jax.Array:
    s = inputs_embeds.shape[1]
    x = inputs_embeds + self.embed_positions(jnp.arange(s)[None] + POSITION_OFFSET)
    x = self.dropout(self.layernorm_embedding(x), deterministic=deterministic)
    bias = padding_bias(attention_mask)
    for layer in self.layers:
      x = layer(x, bias, deterministic=deterministic)
    return x


class BartDecoder(nn.Module):
  """``embed_positions``, ``layernorm_embedding``, ``layers_0..`` (self-attention, cross-attention, FFN)."""
  config: BartConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.d_model,
                                    embedding_init=nn.initializers.normal(c.init_std))
    self.layernorm_embedding = _layer_norm(self.dtype)
    self.dropout = nn.Dropout(c.dropout)
    self.layers = [BartDecoderLayer(c, self.dtype) for _ in range(c.decoder_layers)]

  def embed(self, token_embeds: jax.Array, positions: jax.Array, *, deterministic: bool) -> jax.Array:
    """Looked-up token embeddings (B, T, D) + positions (B or 1, T) → after layernorm_embedding and dropout."""
    x = token_embeds + self.embed_positions(positions + POSITION_OFFSET)
    return self.dropout(self.layernorm_embedding(x), deterministic=deterministic)

  def __call__(self, token_embeds: jax.Array, decoder_attention_mask: jax.Array | None, enc: jax.Array,
               encoder_attention_mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    t = token_embeds.shape[1]
    y = self.embed(token_embeds, jnp.arange(t)[None], deterministic=deterministic)
    self_bias = causal_bias(t, decoder_attention_mask)
    cross_bias = padding_bias(encoder_attention_mask)
    for layer in self.layers:
      y = layer(y, self_bias, enc, cross_bias, deterministic=deterministic)
    return y

  def init_cache(self, enc: jax.Array, max_len: int) -> list[DecodeCache]:
    return [layer.init_cache(enc, max_len) for layer in self.layers]

  def step(self, token_embeds: jax.Array, layers: list[DecodeCache], index: jax.Array,
           encoder_attention_mask: jax.Array, deterministic: bool = True) -> tuple[jax.Array, list[DecodeCache]]:
    y = self.embed(token_embeds, index[:, None], deterministic=deterministic)
    cross_bias = padding_bias(encoder_attention_mask)
    out = []
    for layer, layer_cache in zip(self.layers, layers):
      y, layer_cache = layer.step(y, layer_cache, index, cross_bias, deterministic)
      out.append(layer_cache)
    return y, out


class BartForConditionalGeneration(nn.Module):
  """HF ``BartForConditionalGeneration``: ``shared`` + ``encoder`` + ``decoder`` + tied head + final_logits_bias.

  Attributes:
    config: a ``BartConfig`` (``BartConfig.from_hf_config(json)``).
    dtype: compute dtype (params float32; softmax, LayerNorm statistics and logits float32).
    constants_collection: the non-trainable collection that holds ``final_logits_bias`` (a system whose train
      state carries its non-trainable variables as ``batch_stats`` names that one).

  Variables: ``{"params": ..., "constants": {"final_logits_bias": (1, V)}}`` (``init`` creates both; the
  ``constants`` collection must be passed to ``apply`` whenever logits are computed).
  """
  config: BartConfig
  dtype: Any = jnp.float32
  constants_collection: str = "constants"

  def setup(self):
    c = self.config
    normal = nn.initializers.normal(c.init_std)

    def shared_init(key, shape, dtype=jnp.float32):  # HF _init_weights: normal, padding_idx row zeroed
      w = normal(key, shape, dtype)
      return w if c.pad_token_id is None else w.at[c.pad_token_id].set(0.0)

    self.shared = nn.Embed(c.vocab_size, c.d_model, embedding_init=shared_init)
    self.encoder = BartEncoder(c, self.dtype)
    self.decoder = BartDecoder(c, self.dtype)
    if self.is_initializing() or self.has_variable(self.constants_collection, "final_logits_bias"):
      self.final_logits_bias = self.variable(self.constants_collection, "final_logits_bias",
                                             lambda: jnp.zeros((1, c.vocab_size), jnp.float32))
    else:
      self.final_logits_bias = None

  def embed_tokens(self, ids: jax.Array) -> jax.Array:
    """Token ids (B, T) → ``shared[ids]·embed_scale`` (B, T, D); pad rows pass no gradient (torch padding_idx)."""
    c = self.config
    x = self.shared(ids)
    if c.pad_token_id is not None:
      x = jnp.where((ids == c.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
    if c.scale_embedding:
      x = x * jnp.float32(c.embed_scale)
    return x

  def head(self, y: jax.Array) -> jax.Array:
    """Decoder output (..., D) → logits ``y·sharedᵀ + final_logits_bias`` (..., V) float32."""
    if self.final_logits_bias is None:
      raise ValueError(f"BART logits need the {self.constants_collection!r} collection (final_logits_bias): apply "
                       f"with {{'params': ..., {self.constants_collection!r}: ...}} as returned by init / "
                       "hf_weights.load_bart.")
    emb = self.shared.embedding
    logits = jnp.einsum("...d,vd->...v", y.astype(self.dtype), emb.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.final_logits_bias.value[0].astype(jnp.float32)

  def _check_length(self, n: int, what: str):
    if n > self.config.max_position_embeddings:
      raise ValueError(f"{what} {n} > max_position_embeddings {self.config.max_position_embeddings}")

  def encode(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
             inputs_embeds: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Encoder over token ids (B, S) or arbitrary ``inputs_embeds`` (B, S, D) (exactly one; embeddings are used
    as given: no lookup, no scaling) with an optional 0/1 key mask (B, S) → ``last_hidden_state`` (B, S, D)."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("BART encode needs exactly one of input_ids or inputs_embeds")
    x = self.embed_tokens(input_ids) if inputs_embeds is None else jnp.asarray(inputs_embeds)
    if x.shape[-1] != self.config.d_model:
      raise ValueError(f"inputs_embeds width {x.shape[-1]} != d_model {self.config.d_model}")
    self._check_length(x.shape[1], "encoder length")
    return self.encoder(x, attention_mask, deterministic=deterministic)

  def decode(self, decoder_input_ids: jax.Array, encoder_hidden_states: jax.Array,
             encoder_attention_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None, *,
             deterministic: bool = True) -> dict[str, jax.Array]:
    """Teacher-forced decoder (B, T) over the encoder output (B, S, D) → ``{"logits" (B, T, V) float32,
    "last_hidden_state" (B, T, D)}``. ``decoder_attention_mask`` (B, T) 0/1 hides padded keys (with the causal
    rule); None = causal only."""
    self._check_length(decoder_input_ids.shape[1], "decoder length")
    y = self.decoder(self.embed_tokens(decoder_input_ids), decoder_attention_mask, encoder_hidden_states,
                     encoder_attention_mask, deterministic=deterministic)
    return {"logits": self.head(y), "last_hidden_state": y}

  def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
               decoder_input_ids: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None, deterministic: bool = True) -> dict[str, jax.Array]:
    """HF forward: ``encode`` then ``decode`` → ``{"logits" (B, T, V) float32, "last_hidden_state" (B, T, D),
    "encoder_last_hidden_state" (B, S, D)}``. ``decoder_input_ids`` is required (no shift of ``input_ids``).
    Dropout needs the 'dropout' rng when ``deterministic`` is False."""
    if decoder_input_ids is None:
      raise ValueError("BART __call__ needs decoder_input_ids (labels are not shifted here)")
    enc = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds, deterministic=deterministic)
    out = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic=deterministic)
    return {**out, "encoder_last_hidden_state": enc}

  def init_cache(self, encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array | None,
                 max_len: int) -> DecodeCache:
    """Cache for ``decode_step``: ``index`` (B,) int32 zeros, ``encoder_mask`` (B, S) int32 (ones if None) and per
    layer ``{k, v}`` zeros (B, H, max_len, d) plus the cross-attention ``cross_k``/``cross_v`` (B, H, S, d),
    projected here once. ``max_len`` (≤ max_position_embeddings) bounds the number of steps."""
    self._check_length(max_len, "max_len")
    b, s = encoder_hidden_states.shape[:2]
    mask = (jnp.ones((b, s), jnp.int32) if encoder_attention_mask is None
            else jnp.asarray(encoder_attention_mask).astype(jnp.int32))
    return {"index": jnp.zeros((b,), jnp.int32), "encoder_mask": mask,
            "layers": self.decoder.init_cache(encoder_hidden_states, max_len)}

  def decode_step(self, cache: DecodeCache, token: jax.Array, *, deterministic: bool = True
                  ) -> tuple[jax.Array, DecodeCache]:
    """token (B,) int at position ``cache['index']`` → (logits (B, V) float32, advanced cache); eval mode, or with
    ``deterministic`` False the decoder's dropouts ('dropout' rng; HF ``generate`` on a model left in train
    mode)."""
    index = cache["index"]
    y, layers = self.decoder.step(self.embed_tokens(token[:, None]), cache["layers"], index, cache["encoder_mask"],
                                  deterministic)
    return self.head(y)[:, 0], {"index": index + 1, "encoder_mask": cache["encoder_mask"], "layers": layers}
