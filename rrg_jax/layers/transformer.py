"""R2Gen memory-driven transformer (spec §5): embeddings, encoder, MCLN decoder, relational memory, caching.

Module names mirror the PyTorch ``encoder_decoder.model`` tree: ``encoder/layers_i/{self_attn,feed_forward,
sublayer_0,sublayer_1}``, ``encoder/norm``, ``decoder/layers_i/{self_attn,src_attn,feed_forward,
sublayer_0..2/norm}``, ``decoder/norm``, ``tgt_embed_0/lut``, ``rm``. Every ≥2-D parameter is Xavier-uniform
(spec §11.4), including the embedding table.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax.layers.attention import MultiHeadedAttention
from rrg_jax.layers.linear import Linear, xavier_uniform
from rrg_jax.layers.norms import ConditionalLayerNorm, LayerNorm
from rrg_jax.layers.relational_memory import RelationalMemory

DecodeCache = dict[str, Any]


def positional_encoding(length: int, d_model: int) -> np.ndarray:
  """Sinusoidal PE (length, D) float32, interleaved: PE[p, 2i] = sin(p·w_i), PE[p, 2i+1] = cos(p·w_i).

  ``w_i = exp(float32(2i) · float32(−ln(10000)/D))`` and the products ``p·w_i`` are float32 as in torch; exp,
  sin and cos are evaluated in float64 and rounded, so every row is independent of ``length``.
  """
  div = np.exp((np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / d_model))
               .astype(np.float64)).astype(np.float32)
  arg = (np.arange(length, dtype=np.float32)[:, None] * div[None]).astype(np.float64)
  pe = np.zeros((length, d_model), np.float32)
  pe[:, 0::2] = np.sin(arg)
  pe[:, 1::2] = np.cos(arg)
  return pe


def causal_mask(length: int) -> jax.Array:
  """(1, L, L) bool: key j visible from query i iff j ≤ i (the sampling mask of the original)."""
  return jnp.tril(jnp.ones((1, length, length), bool))


def padded_causal_mask(seq: jax.Array) -> jax.Array:
  """Training mask (B, L, L) bool for seq (B, L) int: key j visible from query i iff j ≤ i and
  (seq[j] > 0 or j == 0) — BOS always visible, the input copy of EOS and pads hidden."""
  keys = (seq > 0) | (jnp.arange(seq.shape[1]) == 0)[None]
  return keys[:, None, :] & causal_mask(seq.shape[1])


class Embeddings(nn.Module):
  """``tgt_embed_0``: tokens (...) int → ``lut[tokens] · √D`` (..., D) float32; param ``lut/embedding`` (K, D)."""
  vocab_size: int
  d_model: int

  def setup(self):
    self.lut = nn.Embed(self.vocab_size, self.d_model, embedding_init=xavier_uniform)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.lut(tokens) * math.sqrt(self.d_model)


class PositionalEncoding(nn.Module):
  """``tgt_embed_1`` (no params): x (B, L, D) + PE[positions] then dropout, cast to ``dtype``."""
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, table_length: int,
               deterministic: bool = True) -> jax.Array:
    """positions: int, broadcastable to (B, L), each < ``table_length`` (a static size)."""
    pe = jnp.asarray(positional_encoding(table_length, x.shape[-1]))[positions]
    return nn.Dropout(self.dropout)(x + pe, deterministic=deterministic).astype(self.dtype)


class PositionwiseFeedForward(nn.Module):
  """``w_2(dropout(relu(w_1 x)))``: (..., D) → (..., D)."""
  d_model: int
  d_ff: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    h = nn.relu(Linear(self.d_ff, dtype=self.dtype, name="w_1")(x))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return Linear(self.d_model, dtype=self.dtype, name="w_2")(h)


class SublayerConnection(nn.Module):
  """Pre-norm residual ``x + dropout(f(norm(x[, r])))``; ``norm`` is a LayerNorm or (conditional) an MCLN."""
  conditional: bool
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.norm = ConditionalLayerNorm(dtype=self.dtype) if self.conditional else LayerNorm(dtype=self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def normalize(self, x: jax.Array, *memory: jax.Array) -> jax.Array:
    return self.norm(x, *memory)

  def residual(self, x: jax.Array, y: jax.Array, *, deterministic: bool = True) -> jax.Array:
    return x + self.drop(y, deterministic=deterministic)


def key_mask(src_mask: jax.Array | None) -> jax.Array | None:
  """Source key mask (B, S) bool (False = not visible, e.g. an empty lesion slot) → the attention mask (B, 1, S)."""
  return None if src_mask is None else src_mask[:, None, :]


class EncoderLayer(nn.Module):
  """Self-attention + FFN, each pre-norm residual: (B, S, D) → (B, S, D); ``src_mask`` (B, S) hides keys."""
  d_model: int
  num_heads: int
  d_ff: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.self_attn = MultiHeadedAttention(self.num_heads, self.d_model, self.dropout, self.dtype)
    self.feed_forward = PositionwiseFeedForward(self.d_model, self.d_ff, self.dropout, self.dtype)
    self.sublayer = [SublayerConnection(False, self.dropout, self.dtype) for _ in range(2)]

  def __call__(self, x: jax.Array, src_mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    h = self.sublayer[0].normalize(x)
    x = self.sublayer[0].residual(x, self.self_attn(h, h, h, key_mask(src_mask), deterministic=deterministic)[0],
                                  deterministic=deterministic)
    h = self.sublayer[1].normalize(x)
    return self.sublayer[1].residual(x, self.feed_forward(h, deterministic=deterministic),
                                     deterministic=deterministic)


class Encoder(nn.Module):
  """``layers_0..n-1`` then the final LayerNorm ``norm``: (B, S, D) → (B, S, D)."""
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [EncoderLayer(self.d_model, self.num_heads, self.d_ff, self.dropout, self.dtype)
                   for _ in range(self.num_layers)]
    self.norm = LayerNorm(dtype=self.dtype)

  def __call__(self, x: jax.Array, src_mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    for layer in self.layers:
      x = layer(x, src_mask, deterministic=deterministic)
    return self.norm(x)


class DecoderLayer(nn.Module):
  """Masked self-attention, cross-attention to the visual memory, FFN; each sublayer normed by an MCLN on R."""
  d_model: int
  num_heads: int
  d_ff: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.self_attn = MultiHeadedAttention(self.num_heads, self.d_model, self.dropout, self.dtype)
    self.src_attn = MultiHeadedAttention(self.num_heads, self.d_model, self.dropout, self.dtype)
    self.feed_forward = PositionwiseFeedForward(self.d_model, self.d_ff, self.dropout, self.dtype)
    self.sublayer = [SublayerConnection(True, self.dropout, self.dtype) for _ in range(3)]

  def _cross_and_ffn(self, x, r, src_k, src_v, src_mask, deterministic):
    h = self.sublayer[1].normalize(x, r)
    y, probs = self.src_attn.attend(h, src_k, src_v, key_mask(src_mask), deterministic=deterministic)
    x = self.sublayer[1].residual(x, y, deterministic=deterministic)
    h = self.sublayer[2].normalize(x, r)
    x = self.sublayer[2].residual(x, self.feed_forward(h, deterministic=deterministic), deterministic=deterministic)
    return x, probs

  def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array, r: jax.Array,
               src_mask: jax.Array | None = None, *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """x (B, L, D), memory (B, N, D), mask bool (B or 1, L, L), r (B, L, S·Dm), src_mask (B, N) bool or None →
    (x (B, L, D), cross-attention post-dropout probabilities (B, H, L, N))."""
    h = self.sublayer[0].normalize(x, r)
    x = self.sublayer[0].residual(x, self.self_attn(h, h, h, mask, deterministic=deterministic)[0],
                                  deterministic=deterministic)
    return self._cross_and_ffn(x, r, *self.src_attn.project_kv(memory, memory), src_mask, deterministic)

  def init_cache(self, memory: jax.Array, max_len: int) -> DecodeCache:
    """``self_k``/``self_v`` zeros (B, H, max_len, d_k); ``src_k``/``src_v`` = projected memory (B, H, N, d_k)."""
    src_k, src_v = self.src_attn.project_kv(memory, memory)
    zeros = jnp.zeros(src_k.shape[:2] + (max_len,) + src_k.shape[3:], src_k.dtype)
    return {"self_k": zeros, "self_v": zeros, "src_k": src_k, "src_v": src_v}

  def step(self, x: jax.Array, r: jax.Array, cache: DecodeCache, index: jax.Array,
           src_mask: jax.Array | None = None) -> tuple[jax.Array, DecodeCache, jax.Array]:
    """One token (eval): x (B, 1, D), r (B, 1, S·Dm), index (B,) int position of this token, src_mask (B, N) →
    (x (B, 1, D), cache with this token's K/V written at ``index``, cross-attention (B, H, 1, N))."""
    h = self.sublayer[0].normalize(x, r)
    k_new, v_new = self.self_attn.project_kv(h, h)
    slots = jnp.arange(cache["self_k"].shape[2])
    write = (slots[None, :] == index[:, None])[:, None, :, None]
    self_k = jnp.where(write, k_new, cache["self_k"])
    self_v = jnp.where(write, v_new, cache["self_v"])
    visible = (slots[None, :] <= index[:, None])[:, None, :]
    x = self.sublayer[0].residual(x, self.self_attn.attend(h, self_k, self_v, visible)[0])
    x, probs = self._cross_and_ffn(x, r, cache["src_k"], cache["src_v"], src_mask, True)
    return x, {**cache, "self_k": self_k, "self_v": self_v}, probs


class Decoder(nn.Module):
  """``layers_0..n-1`` (MCLN layers) then the final plain LayerNorm ``norm``."""
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [DecoderLayer(self.d_model, self.num_heads, self.d_ff, self.dropout, self.dtype)
                   for _ in range(self.num_layers)]
    self.norm = LayerNorm(dtype=self.dtype)

  def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array, r: jax.Array,
               src_mask: jax.Array | None = None, *, deterministic: bool = True) -> tuple[jax.Array, list[jax.Array]]:
    """→ (out (B, L, D), per-layer cross-attention [(B, H, L, N)] * num_layers)."""
    attns = []
    for layer in self.layers:
      x, probs = layer(x, memory, mask, r, src_mask, deterministic=deterministic)
      attns.append(probs)
    return self.norm(x), attns

  def init_cache(self, memory: jax.Array, max_len: int) -> list[DecodeCache]:
    return [layer.init_cache(memory, max_len) for layer in self.layers]

  def step(self, x: jax.Array, r: jax.Array, caches: list[DecodeCache], index: jax.Array,
           src_mask: jax.Array | None = None) -> tuple[jax.Array, list[DecodeCache], jax.Array]:
    """→ (out (B, 1, D), new per-layer caches, last layer's cross-attention (B, H, 1, N))."""
    new = []
    for layer, cache in zip(self.layers, caches):
      x, cache, probs = layer.step(x, r, cache, index, src_mask)
      new.append(cache)
    return self.norm(x), new, probs


class MemoryDrivenTransformer(nn.Module):
  """R2Gen ``encoder_decoder.model``: ``encoder``, ``decoder``, ``tgt_embed_0`` (+ parameter-free PE), ``rm``.

  ``separate_embedding_dropout``: False (CAMANet, camanet_spec §12.18) — one dropout draw of the target embedding
  feeds both the relational memory and the decoder; True (R2Gen's and Align2Gen's code, align2gen_spec §7 item 3)
  — the embedding module runs twice, so the relational memory and the decoder get independent dropout masks (the
  first draw to the memory). The same in eval mode.
  """
  vocab_size: int
  d_model: int = 512
  d_ff: int = 512
  num_heads: int = 8
  num_layers: int = 3
  dropout: float = 0.1
  rm_num_slots: int = 3
  rm_num_heads: int = 8
  rm_d_model: int = 512
  separate_embedding_dropout: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    args = (self.num_layers, self.d_model, self.num_heads, self.d_ff, self.dropout, self.dtype)
    self.encoder = Encoder(*args)
    self.decoder = Decoder(*args)
    self.tgt_embed = [Embeddings(self.vocab_size, self.d_model), PositionalEncoding(self.dropout, self.dtype)]
    self.rm = RelationalMemory(self.rm_num_slots, self.rm_d_model, self.rm_num_heads, self.dropout, self.dtype)

  def encode(self, x: jax.Array, src_mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    """(B, S, D), source key mask (B, S) bool or None (R2Gen, CAMANet: none) → Henc (B, S, D)."""
    return self.encoder(x, src_mask, deterministic=deterministic)

  def decode(self, memory: jax.Array, seq: jax.Array, mask: jax.Array, src_mask: jax.Array | None = None, *,
             deterministic: bool = True) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    """memory (B, N, D), seq (B, L) int, mask bool (B or 1, L, L), src_mask (B, N) bool or None (the memory's key
    mask in cross-attention) → (decoder output (B, L, D), per-layer cross-attention [(B, H, L, N)], target
    embedding E (B, L, D))."""
    length = seq.shape[1]
    tokens = self.tgt_embed[0](seq)

    def embed():
      return self.tgt_embed[1](tokens, jnp.arange(length)[None], table_length=length, deterministic=deterministic)
    emb = embed()
    r = self.rm(emb, deterministic=deterministic)
    if self.separate_embedding_dropout and not deterministic:
      emb = embed()  # a second dropout draw for the decoder
    out, attns = self.decoder(emb, memory, mask, r, src_mask, deterministic=deterministic)
    return out, attns, emb

  def init_cache(self, memory: jax.Array, max_len: int, src_mask: jax.Array | None = None) -> DecodeCache:
    """Cache for ``step``; every leaf has leading dim B: ``index`` (B,) int32 next position, ``rm`` (B, S, Dm)
    memory state, ``layers`` per-layer dicts (see ``DecoderLayer.init_cache``) and, given one, ``src_mask`` (B, N).
    ``max_len`` bounds the steps."""
    b = memory.shape[0]
    cache = {"index": jnp.zeros((b,), jnp.int32), "rm": self.rm.init_memory(b),
             "layers": self.decoder.init_cache(memory, max_len)}
    if src_mask is not None:
      cache["src_mask"] = src_mask
    return cache

  def step(self, cache: DecodeCache, token: jax.Array) -> tuple[jax.Array, DecodeCache, jax.Array]:
    """token (B,) int at position ``cache['index']`` (eval) →
    (decoder output (B, D), advanced cache, last layer's cross-attention (B, H, N))."""
    index = cache["index"]
    max_len = cache["layers"][0]["self_k"].shape[2]
    emb = self.tgt_embed[1](self.tgt_embed[0](token[:, None]), index[:, None], table_length=max_len)
    memory = self.rm.step(emb[:, 0], cache["rm"])
    r = memory.reshape(memory.shape[0], 1, -1)
    out, layers, probs = self.decoder.step(emb, r, cache["layers"], index, cache.get("src_mask"))
    return out[:, 0], {**cache, "index": index + 1, "rm": memory, "layers": layers}, probs[:, :, 0]
