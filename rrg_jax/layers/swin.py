"""Swin Transformer with Hugging Face ``SwinModel`` semantics (transformers 5.x, eager attention), Flax Linen.

Input NHWC pixels (B, H, W, num_channels), any H, W the config allows:
  * Patch embedding: zero-pad bottom/right to multiples of the patch size (HF ``maybe_pad``), conv
    patch×patch / stride patch with bias → tokens (B, h·w, C) row-major → LayerNorm (ε = 1e-5, torch's default:
    HF does not pass ``layer_norm_eps`` here) → + absolute position embeddings iff ``use_absolute_embeddings``
    (the grid must then be the config's) → dropout.
  * Stage s (width C·2^s, ``num_heads[s]`` heads): ``depths[s]`` blocks; block j shifts by window//2 when j is
    odd — except that when min(feature height, width) ≤ window the window becomes that minimum and no block of
    the stage shifts (HF ``set_shift_and_window_size``). A block: ``LN_before`` → (B, H, W, C) → zero-pad
    bottom/right to multiples of the window → roll (−shift, −shift) → windows (row-major grid, row-major tokens)
    → window attention (``QKᵀ/√d + Bias + Mask`` in float32, softmax, dropout, ``PV``, ``output.dense``)
    → reverse, roll back, crop → dropout → ``x + DropPath(·)``; then ``x + dropout(MLP(LN_after(x)))`` (HF applies
    drop path to the attention branch only; ``drop_path_on_mlp=True`` gives the Microsoft/timm variant).
    ``Bias[h, i, j] = table[relative_position_index(window)[i, j], h]``; ``Mask`` = −100 between tokens of a
    shifted window that come from different regions (``shift_attention_mask``), absent without shift.
  * Patch merging after every stage but the last: zero-pad to even H, W, concatenate x[0::2, 0::2],
    x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] → LayerNorm(4C) (ε = 1e-5) → Linear 4C → 2C without bias.
  * Final LayerNorm (``layer_norm_eps``) → ``last_hidden_state``; ``pooler_output`` = mean over tokens.

Module names follow the on-disk HF keys (what ``save_pretrained`` writes) through ``rrg_jax.convert``'s naming
rule: ``embeddings/{patch_embeddings/projection, norm, position_embeddings}``,
``encoder/layers_s/blocks_j/{layernorm_before, layernorm_after}``,
``encoder/layers_s/blocks_j/attention/self/{query, key, value, relative_position_bias_table}``,
``encoder/layers_s/blocks_j/attention/output/dense``, ``encoder/layers_s/blocks_j/{intermediate, output}/dense``,
``encoder/layers_s/downsample/{norm, reduction}``, ``layernorm``.

Parameters are float32; matmuls run in ``dtype``; attention scores, softmax and LayerNorm statistics are float32.
Dropout and drop path draw from the 'dropout' rng when ``deterministic`` is False. Weights come from
``rrg_jax.hf_weights.load_swin`` (a local folder; nothing is downloaded).

Where transformers 5.23 itself fails, this module refuses with a ValueError: a feature map whose smaller side is
below ``window_size`` (HF's clamped window no longer matches its (2·window − 1)² bias table). transformers
remembers a clamped window inside the layer object across calls; here each call decides from its own input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_zeros = nn.initializers.zeros
# The fields of a Swin-v2 (or other Swin-like) config.json that this Swin-v1 port does not implement.
_V2_FIELDS = ("pretrained_window_sizes", "use_layernorm", "layer_scale_init_value", "use_post_layernorm")


def _pair(value: Any, name: str) -> tuple[int, int]:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value), int(value)
  if isinstance(value, Sequence) and len(value) == 2 and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
    return int(value[0]), int(value[1])
  raise ValueError(f"Swin {name}={value!r} must be an int or a pair of ints.")


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """The fields of an HF Swin ``config.json`` this module uses (defaults: HF ``SwinConfig()``, swin-tiny)."""
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (4, 4)
  num_channels: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  drop_path_rate: float = 0.1
  hidden_act: str = "gelu"
  use_absolute_embeddings: bool = False
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
    set_("image_size", _pair(self.image_size, "image_size"))
    set_("patch_size", _pair(self.patch_size, "patch_size"))
    set_("depths", tuple(int(d) for d in self.depths))
    set_("num_heads", tuple(int(h) for h in self.num_heads))
    if isinstance(self.window_size, Sequence):
      w = _pair(self.window_size, "window_size")
      if w[0] != w[1]:
        raise ValueError(f"Swin window_size={self.window_size!r}: only square windows are supported (as HF).")
      set_("window_size", w[0])
    if self.hidden_act != "gelu":
      raise ValueError(f"Swin hidden_act={self.hidden_act!r} is not supported: only 'gelu' (exact, erf) is.")
    if min(self.patch_size) < 1 or self.window_size < 1 or self.embed_dim < 1 or self.num_channels < 1:
      raise ValueError(f"Swin patch_size={self.patch_size}, window_size={self.window_size}, "
                       f"embed_dim={self.embed_dim}, num_channels={self.num_channels} must be positive.")
    if not self.depths or len(self.depths) != len(self.num_heads) or min(self.depths) < 1:
      raise ValueError(f"Swin depths={self.depths} and num_heads={self.num_heads} must be non-empty, of equal "
                       "length, with every depth ≥ 1.")
    for s, h in enumerate(self.num_heads):
      if h < 1 or (self.embed_dim * 2 ** s) % h:
        raise ValueError(f"Swin stage {s}: width {self.embed_dim * 2 ** s} is not divisible by num_heads={h}.")
    if int(self.mlp_ratio * self.embed_dim) < 1:
      raise ValueError(f"Swin mlp_ratio={self.mlp_ratio} gives an empty MLP.")

  @property
  def num_features(self) -> int:
    """Width of the last stage (= of ``last_hidden_state``): embed_dim · 2^(stages − 1)."""
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> "SwinConfig":
    """From the dict of an HF ``config.json`` (missing fields take HF's ``SwinConfig`` defaults).

    Refused with a ValueError: a ``model_type`` other than "swin" (Swin-v2, Donut-Swin …) or Swin-v2 fields
    (``pretrained_window_sizes``, ``use_layernorm`` …), ``hidden_act`` other than "gelu", inconsistent
    depths / heads, non-square windows.
    """
    model_type = config.get("model_type", "swin")
    if model_type != "swin":
      raise ValueError(f"Swin model_type={model_type!r} is not supported: only 'swin' (Swin v1, HF SwinModel) is.")
    v2 = [k for k in _V2_FIELDS if k in config]
    if v2:
      raise ValueError(f"Swin config fields {v2} (Swin-v2 variants) are not supported: only Swin v1 is.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


# --- static geometry (numpy; shapes are known at trace time) ----------------------------------------------------

def relative_position_index(window: int) -> np.ndarray:
  """(w², w²) int: ``(r_i − r_j + w − 1)·(2w − 1) + (c_i − c_j + w − 1)`` for tokens numbered row-major (HF)."""
  r, c = np.divmod(np.arange(window * window), window)
  return (r[:, None] - r[None, :] + window - 1) * (2 * window - 1) + (c[:, None] - c[None, :] + window - 1)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) → (B·nH·nW, w·w, C): windows row-major over the grid, tokens row-major inside."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of ``window_partition``: (B·nH·nW, w·w, C) → (B, H, W, C)."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, c)


def shift_attention_mask(height: int, width: int, window: int, shift: int) -> np.ndarray | None:
  """(nH·nW, w², w²) float32 additive mask of a (padded) H×W map shifted by ``shift``; None when shift is 0.

  Regions per axis: [0, L − w), [L − w, L − shift), [L − shift, L); label = 3·row region + column region;
  0 between tokens of equal label, −100 otherwise (HF ``get_attn_mask``)."""
  if shift <= 0:
    return None
  rows = (np.arange(height) >= height - window).astype(np.int64) + (np.arange(height) >= height - shift)
  cols = (np.arange(width) >= width - window).astype(np.int64) + (np.arange(width) >= width - shift)
  labels = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]
  labels = np.asarray(window_partition(labels, window))[..., 0]  # (nW, w²)
  return np.where(labels[:, None, :] != labels[:, :, None], np.float32(-100.0), np.float32(0.0))


def drop_path_rates(config: SwinConfig) -> tuple[float, ...]:
  """Per block (all stages in order): ``drop_path_rate · k / max(total − 1, 1)``, k = 0 .. total − 1."""
  total = sum(config.depths)
  return tuple(config.drop_path_rate * k / max(total - 1, 1) for k in range(total))


def stage_geometry(config: SwinConfig, height: int, width: int) -> list[dict[str, Any]]:
  """For an input image H×W: per stage ``resolution`` (h, w) of its feature map, ``window`` and ``shift`` of its
  odd blocks (HF's clamping), and ``padded`` (h, w) after padding to multiples of the window.

  ValueError where transformers fails as well: min(h, w) < window_size (the bias table no longer fits)."""
  ph, pw = config.patch_size
  h, w = -(-height // ph), -(-width // pw)
  out = []
  for s in range(len(config.depths)):
    window, shift = config.window_size, config.window_size // 2
    if min(h, w) <= window:
      if min(h, w) < window:
        raise ValueError(
            f"Swin stage {s}: the feature map {h}×{w} (image {height}×{width}) is smaller than window_size="
            f"{window}; HF SwinModel clamps the window to {min(h, w)} but keeps its {2 * window - 1}² relative "
            "position table and fails. Use larger images (or a smaller window).")
      window, shift = min(h, w), 0
    out.append({"resolution": (h, w), "window": window, "shift": shift,
                "padded": (-(-h // window) * window, -(-w // window) * window)})
    h, w = (h + 1) // 2, (w + 1) // 2
  return out


# --- modules --------------------------------------------------------------------------------------------------

def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, config: SwinConfig, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(config.initializer_range), bias_init=_zeros, name=name)


class DropPath(nn.Module):
  """Stochastic depth per sample: keep with prob 1 − rate and scale by 1/(1 − rate) (training only)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jnp.floor(jax.random.uniform(self.make_rng("dropout"), shape, jnp.float32) + keep_prob)
    return x / jnp.asarray(keep_prob, x.dtype) * keep.astype(x.dtype)


class SwinPatchEmbeddings(nn.Module):
  """(B, H, W, C_in) → (B, h·w, embed_dim), (h, w); pads to multiples of the patch first."""
  config: SwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    c = self.config
    ph, pw = c.patch_size
    b, height, width, _ = pixel_values.shape
    x = jnp.pad(pixel_values, ((0, 0), (0, -height % ph), (0, -width % pw), (0, 0)))
    x = nn.Conv(c.embed_dim, (ph, pw), strides=(ph, pw), padding="VALID", use_bias=True, dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=nn.initializers.normal(c.initializer_range),
                bias_init=_zeros, name="projection")(x)
    h, w = x.shape[1], x.shape[2]
    return x.reshape(b, h * w, c.embed_dim), (h, w)


class SwinEmbeddings(nn.Module):
  config: SwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, deterministic: bool) -> tuple[jax.Array, tuple[int, int]]:
    c = self.config
    x, (h, w) = SwinPatchEmbeddings(c, self.dtype, name="patch_embeddings")(pixel_values)
    x = _layer_norm(1e-5, self.dtype, "norm")(x)  # HF: nn.LayerNorm(embed_dim), torch's default ε
    if c.use_absolute_embeddings:
      grid = (c.image_size[0] // c.patch_size[0], c.image_size[1] // c.patch_size[1])
      table = self.param("position_embeddings", _zeros, (1, grid[0] * grid[1], c.embed_dim), jnp.float32)
      if (h, w) != grid:
        raise ValueError(f"Swin use_absolute_embeddings: the image gives a {h}×{w} patch grid but the position "
                         f"embeddings are for {grid[0]}×{grid[1]} (config image_size {c.image_size}); "
                         "interpolation is not supported.")
      x = x + table.astype(x.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic), (h, w)


class SwinSelfAttention(nn.Module):
  """Window attention: (nW·B, T, C) windows (T = window²) → (nW·B, T, C) before ``output.dense``."""
  config: SwinConfig
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, window: int, mask: np.ndarray | None, *, deterministic: bool) -> jax.Array:
    c = self.config
    n, t, d = x.shape
    h = self.num_heads
    size = c.window_size
    table = self.param("relative_position_bias_table", _zeros, ((2 * size - 1) ** 2, h), jnp.float32)
    if window != size:  # stage_geometry refuses every other case
      raise ValueError(f"Swin window {window} ≠ window_size {size}")

    def heads(name):
      return _dense(d, c, self.dtype, name, use_bias=c.qkv_bias)(x).reshape(n, t, h, d // h)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
    bias = table[relative_position_index(size).reshape(-1)].reshape(t, t, h).transpose(2, 0, 1)  # (h, T, T)
    if mask is None:
      scores = scores + bias[None]
    else:  # (nW, T, T): windows of one image are consecutive, images outermost
      n_w = mask.shape[0]
      combined = bias[None, None] + jnp.asarray(mask)[None, :, None]  # (1, nW, h, T, T)
      scores = (scores.reshape(n // n_w, n_w, h, t, t) + combined).reshape(n, h, t, t)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1),
                                                       deterministic=deterministic)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(self.dtype), v.astype(self.dtype))
    return out.reshape(n, t, d)


class SwinSelfOutput(nn.Module):
  config: SwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _dense(x.shape[-1], self.config, self.dtype, "dense")(x)


class SwinAttention(nn.Module):
  config: SwinConfig
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, window: int, mask: np.ndarray | None, *, deterministic: bool) -> jax.Array:
    a = SwinSelfAttention(self.config, self.num_heads, self.dtype, name="self")(x, window, mask,
                                                                                deterministic=deterministic)
    return SwinSelfOutput(self.config, self.dtype, name="output")(a)


class SwinIntermediate(nn.Module):
  """``gelu(dense(x))`` (C → int(mlp_ratio·C)), exact (erf) GELU."""
  config: SwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = int(self.config.mlp_ratio * x.shape[-1])
    return jax.nn.gelu(_dense(width, self.config, self.dtype, "dense")(x), approximate=False)


class SwinOutput(nn.Module):
  config: SwinConfig
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _dense(self.dim, self.config, self.dtype, "dense")(x)


class SwinLayer(nn.Module):
  """One block on (B, H·W, C) tokens of an H×W map; ``window``/``shift`` from ``stage_geometry``."""
  config: SwinConfig
  num_heads: int
  drop_path_rate: float = 0.0
  drop_path_on_mlp: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, resolution: tuple[int, int], window: int, shift: int, *,
               deterministic: bool) -> jax.Array:
    c = self.config
    height, width = resolution
    b, _, dim = x.shape
    drop_path = DropPath(self.drop_path_rate)
    shortcut = x
    hs = _layer_norm(c.layer_norm_eps, self.dtype, "layernorm_before")(x).reshape(b, height, width, dim)
    hs = jnp.pad(hs, ((0, 0), (0, -height % window), (0, -width % window), (0, 0)))
    hp, wp = hs.shape[1], hs.shape[2]
    if shift:
      hs = jnp.roll(hs, (-shift, -shift), axis=(1, 2))
    attn = SwinAttention(c, self.num_heads, self.dtype, name="attention")(
        window_partition(hs, window), window, shift_attention_mask(hp, wp, window, shift),
        deterministic=deterministic)
    attn = nn.Dropout(c.hidden_dropout_prob)(attn, deterministic=deterministic)
    hs = window_reverse(attn, window, hp, wp)
    if shift:
      hs = jnp.roll(hs, (shift, shift), axis=(1, 2))
    hs = hs[:, :height, :width].reshape(b, height * width, dim)
    x = shortcut + drop_path(hs, deterministic=deterministic)
    hs = _layer_norm(c.layer_norm_eps, self.dtype, "layernorm_after")(x)
    hs = SwinOutput(c, dim, self.dtype, name="output")(SwinIntermediate(c, self.dtype, name="intermediate")(hs))
    hs = nn.Dropout(c.hidden_dropout_prob)(hs, deterministic=deterministic)
    if self.drop_path_on_mlp:
      hs = drop_path(hs, deterministic=deterministic)
    return x + hs


class SwinPatchMerging(nn.Module):
  """(B, H·W, C) of an H×W map → (B, ⌈H/2⌉·⌈W/2⌉, 2C)."""
  config: SwinConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, resolution: tuple[int, int]) -> jax.Array:
    height, width = resolution
    b, _, dim = x.shape
    x = x.reshape(b, height, width, dim)
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    x = jnp.concatenate([x[:, row::2, col::2] for col in range(2) for row in range(2)], axis=-1)
    x = x.reshape(b, -1, 4 * dim)
    x = _layer_norm(1e-5, self.dtype, "norm")(x)  # HF: nn.LayerNorm(4·dim), torch's default ε
    return _dense(2 * dim, self.config, self.dtype, "reduction", use_bias=False)(x)


class SwinStage(nn.Module):
  config: SwinConfig
  stage: int
  drop_path_on_mlp: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, geometry: Mapping[str, Any], *, deterministic: bool) -> jax.Array:
    c, s = self.config, self.stage
    rates = drop_path_rates(c)[sum(c.depths[:s]):sum(c.depths[:s + 1])]
    for j in range(c.depths[s]):
      x = SwinLayer(c, c.num_heads[s], rates[j], self.drop_path_on_mlp, self.dtype, name=f"blocks_{j}")(
          x, geometry["resolution"], geometry["window"], geometry["shift"] if j % 2 else 0,
          deterministic=deterministic)
    if s < len(c.depths) - 1:
      x = SwinPatchMerging(c, self.dtype, name="downsample")(x, geometry["resolution"])
    return x


class SwinEncoder(nn.Module):
  config: SwinConfig
  drop_path_on_mlp: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, geometry: Sequence[Mapping[str, Any]], *, deterministic: bool
               ) -> tuple[jax.Array, list[jax.Array]]:
    hidden = [x]
    for s, g in enumerate(geometry):
      x = SwinStage(self.config, s, self.drop_path_on_mlp, self.dtype, name=f"layers_{s}")(
          x, g, deterministic=deterministic)
      hidden.append(x)
    return x, hidden


class SwinModel(nn.Module):
  """HF ``SwinModel`` (no mask token, no position-embedding interpolation).

  Attributes:
    config: a ``SwinConfig`` (``SwinConfig.from_hf_config(json)``).
    add_pooling_layer: return ``pooler_output`` (mean over tokens; no parameters).
    dtype: compute dtype (params stay float32).
    drop_path_on_mlp: also apply drop path to the MLP branch (Microsoft/timm Swin); False = HF.
  """
  config: SwinConfig
  add_pooling_layer: bool = True
  dtype: Any = jnp.float32
  drop_path_on_mlp: bool = False

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, deterministic: bool = True,
               output_hidden_states: bool = False) -> dict[str, Any]:
    """pixel_values (B, H, W, num_channels) NHWC.

    Returns a dict: ``last_hidden_state`` (B, N, num_features) after the final LayerNorm, N = h·w of the last
    stage (row-major); ``pooler_output`` (B, num_features) with the pooling layer; ``hidden_states`` when
    ``output_hidden_states`` (as HF: the embeddings output, then each stage's output after its patch merging,
    the last one before the final LayerNorm; stages + 1 arrays (B, N_s, C_s)).
    """
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"Swin expects pixel_values (B, H, W, {c.num_channels}) NHWC, got {pixel_values.shape}.")
    geometry = stage_geometry(c, pixel_values.shape[1], pixel_values.shape[2])
    x, _ = SwinEmbeddings(c, self.dtype, name="embeddings")(pixel_values, deterministic=deterministic)
    x, hidden = SwinEncoder(c, self.drop_path_on_mlp, self.dtype, name="encoder")(x, geometry,
                                                                                  deterministic=deterministic)
    x = _layer_norm(c.layer_norm_eps, self.dtype, "layernorm")(x)
    out: dict[str, Any] = {"last_hidden_state": x}
    if self.add_pooling_layer:
      out["pooler_output"] = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden)
    return out
