"""R2Gen's ``EncoderDecoder`` (visual projection → memory-driven transformer → vocabulary logits) and the decoding
API of every model that owns one (R2Gen, CAMANet, later Align2Gen).

Parameter tree (mirrors the PyTorch ``encoder_decoder.*`` state_dict): ``att_embed_0`` (Linear d_vf → D),
``model`` (``MemoryDrivenTransformer``: ``encoder``, ``decoder``, ``tgt_embed_0``, ``rm``), ``logit`` (D → K).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear, torch_kernel_init
from rrg_jax.layers.transformer import DecodeCache, MemoryDrivenTransformer, causal_mask, padded_causal_mask


class EncoderDecoder(nn.Module):
  """``att_embed_0`` (Linear → ReLU → Dropout ``drop_prob_lm``), ``model`` (memory-driven transformer), ``logit``."""
  vocab_size: int
  d_model: int = 512
  d_ff: int = 512
  num_heads: int = 8
  num_layers: int = 3
  dropout: float = 0.1
  drop_prob_lm: float = 0.5
  rm_num_slots: int = 3
  rm_num_heads: int = 8
  rm_d_model: int = 512
  separate_embedding_dropout: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.att_embed_0 = Linear(self.d_model, kernel_init=torch_kernel_init, dtype=self.dtype)
    self.att_drop = nn.Dropout(self.drop_prob_lm)
    self.model = MemoryDrivenTransformer(self.vocab_size, self.d_model, self.d_ff, self.num_heads, self.num_layers,
                                         self.dropout, self.rm_num_slots, self.rm_num_heads, self.rm_d_model,
                                         self.separate_embedding_dropout, self.dtype)
    self.logit = Linear(self.vocab_size, kernel_init=torch_kernel_init, dtype=self.dtype)

  def encode(self, att_feats: jax.Array, src_mask: jax.Array | None = None, *, deterministic: bool = True
             ) -> jax.Array:
    """(B, S, d_vf), source key mask (B, S) bool or None → Henc (B, S, D)."""
    x = self.att_drop(nn.relu(self.att_embed_0(att_feats)), deterministic=deterministic)
    return self.model.encode(x, src_mask, deterministic=deterministic)

  def logprobs(self, memory: jax.Array, seq: jax.Array, mask: jax.Array, src_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    """→ (log-softmax (B, L, K) float32, per-layer cross-attention [(B, H, L, N')], embedding E (B, L, D))."""
    out, attns, emb = self.model.decode(memory, seq, mask, src_mask, deterministic=deterministic)
    return jax.nn.log_softmax(self.logit(out).astype(jnp.float32), axis=-1), attns, emb

  def init_cache(self, memory: jax.Array, max_len: int, src_mask: jax.Array | None = None) -> DecodeCache:
    return self.model.init_cache(memory, max_len, src_mask)

  def step(self, cache: DecodeCache, token: jax.Array) -> tuple[jax.Array, DecodeCache, jax.Array]:
    out, cache, attn = self.model.step(cache, token)
    return jax.nn.log_softmax(self.logit(out).astype(jnp.float32), axis=-1), cache, attn


TRANSFORMER_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "num_layers", "dropout", "drop_prob_lm",
                      "rm_num_slots", "rm_num_heads", "rm_d_model", "separate_embedding_dropout")


class EncoderDecoderModel(nn.Module):
  """Base of the models that own an ``encoder_decoder`` (``make_encoder_decoder()`` in their ``setup``): the
  decoding API ``rrg_jax.decoding`` drives. The subclass has the ``TRANSFORMER_FIELDS`` as attributes and provides
  ``encode(images) -> {"memory": (B, N', D), ...}`` (plus ``"memory_mask"`` (B, N') bool when some memory tokens
  must stay invisible, e.g. empty lesion slots; every method below takes it as ``src_mask``)."""

  def make_encoder_decoder(self, dtype: Any) -> EncoderDecoder:
    """The ``EncoderDecoder`` configured from this model's ``TRANSFORMER_FIELDS``."""
    return EncoderDecoder(**{f: getattr(self, f) for f in TRANSFORMER_FIELDS}, dtype=dtype)

  def teacher_forced(self, memory: jax.Array, targets: jax.Array, *, train: bool,
                     src_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    """Training forward of the decoder on ``seq = targets[:, :-1]`` with the padding-aware causal mask →
    (logprobs (B, T−1, K) float32, per-layer cross-attention, embedding E (B, T−1, D))."""
    seq = targets[:, :-1]
    return self.encoder_decoder.logprobs(memory, seq, padded_causal_mask(seq), src_mask, deterministic=not train)

  def decode_full(self, memory: jax.Array, seq: jax.Array, *, mask_padding: bool = False, train: bool = False,
                  src_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """Full-prefix decoding: memory (B, N', D), seq (B, L) int starting with BOS 0 →
    (logprobs (B, L, K) float32, per-layer cross-attention [(B, H, L, N')]).

    ``mask_padding=False`` is the original's sampling mask (causal only, camanet_spec §9); True is the training mask
    (also hides keys with ``seq == 0`` after position 0). ``train`` enables dropout (rng 'dropout').
    """
    mask = padded_causal_mask(seq) if mask_padding else causal_mask(seq.shape[1])
    logprobs, attns, _ = self.encoder_decoder.logprobs(memory, seq, mask, src_mask, deterministic=not train)
    return logprobs, attns

  def init_decode_cache(self, memory: jax.Array, max_len: int, src_mask: jax.Array | None = None) -> DecodeCache:
    """Cache for ``decode_step`` (``max_len`` static: the number of tokens it can hold, BOS included).

    A dict whose every leaf has leading dim B (reorder beams with ``jax.tree.map(lambda x: x[idx], cache)``):
    ``index`` (B,) int32 position of the next token; ``rm`` (B, S, Dm) relational-memory state;
    ``layers``: per decoder layer ``self_k``/``self_v`` (B, H, max_len, d_k) and ``src_k``/``src_v``
    (B, H, N', d_k) — the memory projected once.
    """
    return self.encoder_decoder.init_cache(memory, max_len, src_mask)

  def decode_step(self, memory: jax.Array, cache: DecodeCache, token: jax.Array
                  ) -> tuple[jax.Array, DecodeCache, jax.Array]:
    """One cached step (eval): token (B,) int at position ``cache['index']`` (the first call feeds BOS 0) →
    (logprobs (B, K) of the next token, advanced cache, last decoder layer's cross-attention (B, H, N')).

    Equals ``decode_full(memory, seq)[0][:, t]`` for ``token = seq[:, t]``. ``memory`` (B, N', D) is the one
    given to ``init_decode_cache`` (its projections are read from the cache).
    """
    del memory  # projected once into the cache by init_decode_cache
    return self.encoder_decoder.step(cache, token)
