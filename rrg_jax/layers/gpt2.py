"""GPT-2 language model with Hugging Face ``GPT2LMHeadModel`` semantics, optional pseudo self-attention (Flax Linen).

Standard path (transformers 5.x, eager attention): ``wte[ids] + wpe[t]`` → dropout → pre-LN blocks
(``ln_1`` → fused ``c_attn`` → causal attention, scores ``QKᵀ/√d`` in float32 plus ``finfo(float32).min`` where
not visible → ``c_proj`` → dropout → residual; ``ln_2`` → ``c_fc`` → gelu_new → ``c_proj`` → dropout → residual)
→ ``ln_f`` → logits ``x·wteᵀ`` (tied head, no bias, float32).

Module names follow the HF keys with the ``transformer.`` prefix removed: ``wte``, ``wpe``, ``h_i/ln_1``,
``h_i/attn/c_attn``, ``h_i/attn/c_proj``, ``h_i/ln_2``, ``h_i/mlp/c_fc``, ``h_i/mlp/c_proj``, ``ln_f``.
HF "Conv1D" weights are stored (in, out) and applied as ``x·W + b``; the Flax ``kernel`` has that same layout, so
the weight loader (``rrg_jax.hf_weights``) hands them to ``convert.state_dict_to_variables`` pre-transposed (the
converter transposes every 2-D ``weight`` into a ``kernel``; the two transposes cancel).

Pseudo self-attention (CT-AGRG / RGRG, ct_agrg_spec §6.3; Ziegler et al. 2019), ``pseudo_self_attention=True``:
each layer ``l`` also has ``h_l/attn/uk`` and ``h_l/attn/uv`` (torch Linear layout, ``z·Wᵀ + b``; Flax kernel =
Wᵀ) mapping the conditioning vector ``prefix`` (B, Dz) to ONE extra key/value slot placed first. It is never
masked and never layer-normalised; queries come only from the words.

Quirk switches (defaults = standard HF behaviour):
  * ``position_table``: "wpe" (HF) or "wte" — CT-AGRG embeds position ``t`` with ``wte[t]`` (ct_agrg_spec §12.2);
    ``wpe`` then exists but is unused.
  * ``mask_mode``: "hf" adds ``finfo(float32).min`` to every invisible score (causal or padded key); "rgrg"
    REPLACES causally forbidden scores by −1e4 and then ADDS ``(1 − m'_j)·(−1e4)`` for padded keys, with
    ``m' = [1 (prefix slot), m_0 … m_{T−1}]`` — a forbidden padded key ends at −2e4 (ct_agrg_spec §6.3). See
    ``mask_scores``.

KV-cached decoding: ``init_cache(batch, max_len, prefix)`` then ``decode_step(cache, token)``; every cache leaf
has leading dim B, ``index`` (B,) is each row's next position (= the position used for its embedding). Decoding
assumes no padding inside the cache (all previous tokens visible).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear, torch_kernel_init

DecodeCache = dict[str, Any]
RGRG_FILL = -1e4  # ct_agrg_spec §6.3 / §12.3: `mask_out_value`
POSITION_TABLES = ("wpe", "wte")
MASK_MODES = ("hf", "rgrg")

_normal = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The fields of an HF GPT-2 ``config.json`` this module uses (defaults: gpt2 small)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  scale_attn_weights: bool = True

  def __post_init__(self):
    if self.activation_function != "gelu_new":
      raise ValueError(f"GPT-2 activation_function={self.activation_function!r} is not supported: only "
                       "'gelu_new' (tanh approximation) is.")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT-2 n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")

  @property
  def inner_dim(self) -> int:
    return self.n_inner if self.n_inner is not None else 4 * self.n_embd

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> "GPT2Config":
    """From the dict of an HF GPT-2 ``config.json`` (missing fields take HF's ``GPT2Config`` defaults).

    Refused with a ValueError: an activation other than gelu_new, ``scale_attn_by_inverse_layer_idx``,
    cross-attention, an untied LM head (``tie_word_embeddings: false``).
    """
    if config.get("scale_attn_by_inverse_layer_idx"):
      raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported.")
    if config.get("add_cross_attention"):
      raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported.")
    if config.get("tie_word_embeddings", True) is False:
      raise ValueError("GPT-2 with an untied LM head (tie_word_embeddings=false) is not supported.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


def mask_scores(scores: jax.Array, allowed: jax.Array, key_valid: jax.Array | None, mode: str) -> jax.Array:
  """Applies the causal/padding mask to float32 ``scores`` (B, H, Q, S).

  Args:
    allowed: bool, broadcastable to (B, 1, Q, S): the causal rule (the prefix slot, if any, always True).
    key_valid: (B, S) 0/1 per key slot (padding; the prefix slot 1), or None = all valid.
    mode: "hf": ``scores + where(allowed ∧ valid, 0, finfo(float32).min)``; "rgrg":
      ``where(allowed, scores, −1e4) + (1 − valid)·(−1e4)``.
  """
  if mode == "hf":
    visible = allowed if key_valid is None else allowed & (key_valid[:, None, None, :] > 0)
    return scores + jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
  if mode == "rgrg":
    scores = jnp.where(allowed, scores, jnp.float32(RGRG_FILL))
    if key_valid is not None:
      scores = scores + (1.0 - key_valid.astype(jnp.float32))[:, None, None, :] * jnp.float32(RGRG_FILL)
    return scores
  raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")


class Conv1D(nn.Module):
  """HF ``Conv1D``: ``x·kernel + bias`` with ``kernel`` (in, features) = the HF ``weight`` as stored."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _normal, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def _layer_norm(config: GPT2Config, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32)


class GPT2Attention(nn.Module):
  """``c_attn`` (D → 3D), ``c_proj`` (D → D); with pseudo self-attention also ``uk``/``uv`` (Dz → D)."""
  config: GPT2Config
  pseudo_self_attention: bool = False
  mask_mode: str = "hf"
  dtype: Any = jnp.float32

  def setup(self):
    d = self.config.n_embd
    self.c_attn = Conv1D(3 * d, self.dtype)
    self.c_proj = Conv1D(d, self.dtype)
    self.attn_dropout = nn.Dropout(self.config.attn_pdrop)
    self.resid_dropout = nn.Dropout(self.config.resid_pdrop)
    if self.pseudo_self_attention:  # torch-default Linear init (ct_agrg_spec §10.5)
      self.uk = Linear(d, kernel_init=torch_kernel_init, dtype=self.dtype)
      self.uv = Linear(d, kernel_init=torch_kernel_init, dtype=self.dtype)

  def _heads(self, x: jax.Array) -> jax.Array:
    """(B, S, D) → (B, H, S, d)."""
    b, s, d = x.shape
    h = self.config.n_head
    return x.reshape(b, s, h, d // h).transpose(0, 2, 1, 3)

  def qkv(self, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ln_1 output (B, T, D) → q, k, v heads (B, H, T, d)."""
    q, k, v = jnp.split(self.c_attn(a), 3, axis=-1)
    return self._heads(q), self._heads(k), self._heads(v)

  def prefix_kv(self, prefix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """prefix z (B, Dz) → the image key/value heads (B, H, 1, d)."""
    if not self.pseudo_self_attention:
      raise ValueError("a prefix needs pseudo_self_attention=True (the uk/uv layers)")
    return self._heads(self.uk(prefix[:, None])), self._heads(self.uv(prefix[:, None]))

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
             key_valid: jax.Array | None, *, deterministic: bool) -> jax.Array:
    """q (B, H, Q, d), k/v (B, H, S, d), mask as ``mask_scores`` → c_proj(attention) (B, Q, D) after dropout."""
    scale = (q.shape[-1] ** -0.5) if self.config.scale_attn_weights else 1.0
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = mask_scores(scores, allowed, key_valid, self.mask_mode)
    probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
    b, _, lq, _ = out.shape
    out = out.transpose(0, 2, 1, 3).reshape(b, lq, self.config.n_embd)
    return self.resid_dropout(self.c_proj(out), deterministic=deterministic)

  def __call__(self, a: jax.Array, attention_mask: jax.Array | None, prefix: jax.Array | None, *,
               deterministic: bool) -> jax.Array:
    """a = ln_1(x) (B, T, D); attention_mask (B, T) 0/1 or None; prefix (B, Dz) or None → (B, T, D)."""
    q, k, v = self.qkv(a)
    t = a.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))
    valid = None if attention_mask is None else jnp.asarray(attention_mask)
    if prefix is not None:
      pk, pv = self.prefix_kv(prefix)
      k, v = jnp.concatenate([pk, k], axis=2), jnp.concatenate([pv, v], axis=2)
      allowed = jnp.concatenate([jnp.ones((t, 1), bool), allowed], axis=1)  # key j ≤ i + 1
      if valid is not None:
        valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
    return self.attend(q, k, v, allowed[None, None], valid, deterministic=deterministic)


class GPT2MLP(nn.Module):
  """``c_fc`` (D → inner) → gelu_new → ``c_proj`` (inner → D) → dropout."""
  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    h = jax.nn.gelu(Conv1D(self.config.inner_dim, self.dtype, name="c_fc")(x), approximate=True)
    h = Conv1D(self.config.n_embd, self.dtype, name="c_proj")(h)
    return nn.Dropout(self.config.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
  """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""
  config: GPT2Config
  pseudo_self_attention: bool = False
  mask_mode: str = "hf"
  dtype: Any = jnp.float32

  def setup(self):
    self.ln_1 = _layer_norm(self.config, self.dtype)
    self.attn = GPT2Attention(self.config, self.pseudo_self_attention, self.mask_mode, self.dtype)
    self.ln_2 = _layer_norm(self.config, self.dtype)
    self.mlp = GPT2MLP(self.config, self.dtype)

  def _mlp(self, x: jax.Array, deterministic: bool) -> jax.Array:
    return x + self.mlp(self.ln_2(x), deterministic=deterministic)

  def __call__(self, x: jax.Array, attention_mask: jax.Array | None, prefix: jax.Array | None,
               deterministic: bool) -> jax.Array:
    x = x + self.attn(self.ln_1(x), attention_mask, prefix, deterministic=deterministic)
    return self._mlp(x, deterministic)

  def init_cache(self, batch: int, max_len: int, prefix: jax.Array | None) -> DecodeCache:
    """``k``/``v`` zeros (B, H, max_len, d); with a prefix also ``prefix_k``/``prefix_v`` (B, H, 1, d)."""
    c = self.config
    zeros = jnp.zeros((batch, c.n_head, max_len, c.n_embd // c.n_head), self.dtype)
    cache = {"k": zeros, "v": zeros}
    if prefix is not None:
      cache["prefix_k"], cache["prefix_v"] = self.attn.prefix_kv(prefix)
    return cache

  def step(self, x: jax.Array, cache: DecodeCache, index: jax.Array, key_valid: jax.Array | None = None
           ) -> tuple[jax.Array, DecodeCache]:
    """x (B, 1, D) of the token at cache slot ``index`` (B,) → (B, 1, D), cache with its K/V written there. Keys
    j ≤ index are visible, except where ``key_valid`` (B, max_len) is 0 (left padding); the pseudo
    self-attention prefix slot, if any, always is."""
    q, k_new, v_new = self.attn.qkv(self.ln_1(x))
    slots = jnp.arange(cache["k"].shape[2])
    write = (slots[None, :] == index[:, None])[:, None, :, None]
    k = jnp.where(write, k_new, cache["k"])
    v = jnp.where(write, v_new, cache["v"])
    allowed = (slots[None, :] <= index[:, None])[:, None, None, :]  # (B, 1, 1, max_len)
    keys, values = k, v
    if "prefix_k" in cache:
      keys = jnp.concatenate([cache["prefix_k"], k], axis=2)
      values = jnp.concatenate([cache["prefix_v"], v], axis=2)
      allowed = jnp.concatenate([jnp.ones_like(allowed[..., :1]), allowed], axis=-1)
      if key_valid is not None:
        key_valid = jnp.concatenate([jnp.ones_like(key_valid[:, :1]), key_valid], axis=1)
    x = x + self.attn.attend(q, keys, values, allowed, key_valid, deterministic=True)
    return self._mlp(x, True), {**cache, "k": k, "v": v}


class GPT2LMHeadModel(nn.Module):
  """HF ``GPT2LMHeadModel`` (``transformer`` + tied ``lm_head``), optional pseudo self-attention.

  Attributes:
    config: a ``GPT2Config`` (``GPT2Config.from_hf_config(json)``).
    pseudo_self_attention: per-layer ``uk``/``uv`` and the ``prefix`` argument (module docstring).
    position_table: "wpe" (HF) or "wte" (the CT-AGRG quirk).
    mask_mode: "hf" or "rgrg" (see ``mask_scores``).
    prefix_dim: Dz, the width of ``prefix`` (None = n_embd); fixes the uk/uv kernel shapes at init.
    dtype: compute dtype (params float32; softmax, LayerNorm statistics and logits float32).
    remat: rematerialise each block in the backward pass (only the blocks' inputs are kept); same params.
  """
  config: GPT2Config
  pseudo_self_attention: bool = False
  position_table: str = "wpe"
  mask_mode: str = "hf"
  prefix_dim: int | None = None
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    if self.position_table not in POSITION_TABLES:
      raise ValueError(f"position_table must be one of {POSITION_TABLES}, got {self.position_table!r}")
    if self.mask_mode not in MASK_MODES:
      raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
    c = self.config
    self.wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=_normal)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, embedding_init=_normal)
    self.drop = nn.Dropout(c.embd_pdrop)
    block = nn.remat(GPT2Block, static_argnums=(4,)) if self.remat else GPT2Block  # (self, x, mask, prefix, det)
    self.h = [block(c, self.pseudo_self_attention, self.mask_mode, self.dtype) for _ in range(c.n_layer)]
    self.ln_f = _layer_norm(c, self.dtype)

  def _check_prefix(self, prefix: jax.Array | None):
    if prefix is not None and not self.pseudo_self_attention:
      raise ValueError("prefix given but pseudo_self_attention=False (the model has no uk/uv layers)")
    if prefix is None and self.pseudo_self_attention and not self.is_initializing():
      raise ValueError("pseudo_self_attention=True needs a prefix (B, Dz)")

  def embed(self, tokens: jax.Array, positions: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """tokens, positions (B, T) int → ``wte[tokens] + table[positions]`` (table = wpe or wte) after dropout."""
    if self.position_table == "wpe":
      x = self.wte(tokens) + self.wpe(positions)
    else:
      _ = self.wpe.embedding  # kept (loaded, saved) although unused, as in CT-AGRG
      x = self.wte(tokens) + self.wte(positions)
    return self.drop(x, deterministic=deterministic).astype(self.dtype)

  def head(self, x: jax.Array) -> jax.Array:
    """``ln_f`` output (..., D) → tied logits ``x·wteᵀ`` (..., V) float32."""
    emb = self.wte.embedding
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), emb.astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               prefix: jax.Array | None = None, deterministic: bool = True) -> dict[str, jax.Array]:
    """input_ids (B, T) int; attention_mask (B, T) 0/1 (None = all visible); prefix (B, Dz) (pseudo
    self-attention) → ``{"logits": (B, T, V) float32, "last_hidden_state": (B, T, D) (after ln_f)}``.

    Positions are ``0..T−1`` whatever the mask (as HF's forward). Dropout needs the 'dropout' rng when
    ``deterministic`` is False.
    """
    if self.is_initializing() and self.pseudo_self_attention and prefix is None:
      prefix = jnp.zeros((input_ids.shape[0], self.prefix_dim or self.config.n_embd), jnp.float32)
    self._check_prefix(prefix)
    t = input_ids.shape[1]
    if t > self.config.n_positions:
      raise ValueError(f"sequence length {t} > n_positions {self.config.n_positions}")
    x = self.embed(input_ids, jnp.broadcast_to(jnp.arange(t)[None], input_ids.shape), deterministic=deterministic)
    for block in self.h:
      x = block(x, attention_mask, prefix, deterministic)
    x = self.ln_f(x)
    return {"logits": self.head(x), "last_hidden_state": x}

  def init_cache(self, batch: int, max_len: int, prefix: jax.Array | None = None) -> DecodeCache:
    """Cache for ``decode_step``: ``index`` (B,) int32 zeros and ``layers`` (per-layer ``GPT2Block.init_cache``
    dicts). ``max_len`` (≤ n_positions) bounds the number of steps; ``prefix`` (B, Dz) with pseudo
    self-attention (its per-layer key/value are computed here, once)."""
    self._check_prefix(prefix)
    if max_len > self.config.n_positions:
      raise ValueError(f"max_len {max_len} > n_positions {self.config.n_positions}")
    return {"index": jnp.zeros((batch,), jnp.int32),
            "layers": [block.init_cache(batch, max_len, prefix) for block in self.h]}

  def decode_step(self, cache: DecodeCache, token: jax.Array) -> tuple[jax.Array, DecodeCache]:
    """token (B,) int at position ``cache['index']`` (eval) → (logits (B, V) float32, advanced cache)."""
    index = cache["index"]
    x = self.embed(token[:, None], index[:, None])
    layers = []
    for block, layer_cache in zip(self.h, cache["layers"]):
      x, layer_cache = block.step(x, layer_cache, index)
      layers.append(layer_cache)
    return self.head(self.ln_f(x))[:, 0], {"index": index + 1, "layers": layers}
