"""Align2Gen (D2R-Net) visual blocks (spec align2gen_spec.md §3, §4, §13.1), Flax Linen, NHWC.

* ``GlobalVisualBranch`` [CODE] (the official ``VisualExtractor``): images (B, H, W, 3) → ResNet trunk ``model``
  (B, h, w, C) → ``cpca`` (B, h, w, C) → bias-free 1×1 ``local_embedder`` E (B, h, w, d_e) →
  (patch_feats (B, h·w, d_e) row-major, avg_feats (B, d_e) = spatial mean of E). 384² ResNet-101:
  (B, 144, 1024), (B, 1024). The dead ``classifier`` is not built.
* ``CPCA`` [CODE]: one shared 1×1 conv ``conv`` (P, with bias) applied three times; channel prior ``ca`` (shared
  ``fc1``/``fc2`` on the global average and max pools); depthwise spatial prior ``dconv5_5``, ``dconv1_7``/
  ``dconv7_1``, ``dconv1_11``/``dconv11_1``, ``dconv1_21``/``dconv21_1``; y = P(P(z) ⊙ u), no residual.
* ``SimpleConvNet`` [CODE]: five [3×3 VALID conv + bias → BN → ReLU] (``conv1..5``/``bn1..5``), 3→64 s1, →128 s2,
  →256 s2, →512 s2, →1024 s2, global average pool: (N, S, S, 3) → (N, 1024). 384 → 382, 190, 94, 46, 22.
* ``PPA`` [HYP] / [RECON] LERA stand-in: HCF-Net's PPA(in_features=3, filters=3) (§4.2); ``lera="identity"``
  skips it. [RECON] reconstruction, not the paper's published code (``modulesS/LERA.py`` was never committed).
* ``LesionBranch`` [CODE except LERA] (the official ``MultiTargetExtractor``'s region loop): regions
  (B, M, S, S, 3), valid (B, M) → region_feats (B, M, d_e): ``simple(region_visual_extractor(region))`` per valid
  box, the constant 1e-8 vector (no gradient) per placeholder. ``MultiTargetExtractor`` adds the global branch
  ``visual_extractor`` at the same level, as the official module.

BatchNorm in the lesion branch (§4.3, ``region_bn``): "per_region" (the code: batch size 1 per crop) normalises
every region with its own statistics in training (a vmap over regions) and updates the running statistics once
per valid region, in i-major/j-minor order (a sequential ``lax.scan`` fold; placeholders skipped); "batched"
(corrected) normalises all valid regions of the batch with one set of statistics and updates once. Eval uses the
running statistics in both.

Names are the official state_dict keys through ``rrg_jax.convert``'s naming rule (``ca.fc1.weight`` →
``ca/fc1/kernel``, ``simple.bn1.running_mean`` → ``batch_stats`` ``simple/bn1/mean``, ``cn.conv.0.weight`` →
``cn/conv_0/kernel``); depthwise kernels (C, 1, kh, kw) become (kh, kw, 1, C) through the ordinary OIHW → HWIO
transpose (``feature_group_count = C``). The ResNet trunk is ``model/{conv1,bn1,layer1_0,…}``: the official
``model.0``/``model.1``/``model.4–7`` Sequential indices must be renamed by the system (as R2Gen's
``torch_key_renames``). Init: torch defaults (U(±1/√fan_in) weights and biases; BN 1/0; PPA ``prompt`` N(0, 1),
``top_down_transform`` identity); the ResNet as torchvision. Params and BN statistics float32; ``dtype`` is the
compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.alignment.align import normalize
from rrg_jax.layers.conv import conv2d
from rrg_jax.layers.linear import Linear, torch_bias_init, torch_kernel_init
from rrg_jax.layers.norms import BatchNorm
from rrg_jax.layers.resnet import DEFAULT_WIDTHS, ResNet

PLACEHOLDER = 1e-8  # an empty box slot: every pixel 1e-8 in, the constant 1e-8 feature vector out (§4, §14 item 4)
SIMPLE_WIDTHS = (64, 128, 256, 512, 1024)
SIMPLE_STRIDES = (1, 2, 2, 2, 2)
LERAS = ("ppa", "identity")
REGION_BNS = ("per_region", "batched")
GLOBAL_HEADS = ("cpca", "none")


def conv2d_bias(features: int, kernel: tuple[int, int], padding: tuple[int, int], in_features: int, dtype: Any,
                name: str, stride: int = 1, groups: int = 1) -> nn.Module:
  """torch ``nn.Conv2d(in_features, features, kernel, stride, padding, groups=groups)`` with bias and torch's
  default init (U(±1/√fan_in) kernel and bias, fan_in = in_features/groups·kh·kw): (B, H, W, in_features) →
  (B, H', W', features) in ``dtype``; explicit symmetric zero padding; float32 params ``kernel``
  (kh, kw, in_features/groups, features) and ``bias``."""
  fan_in = in_features // groups * kernel[0] * kernel[1]
  return nn.Conv(features, kernel, strides=(stride, stride), padding=tuple((p, p) for p in padding),
                 feature_group_count=groups, use_bias=True, kernel_init=torch_kernel_init,
                 bias_init=torch_bias_init(fan_in), dtype=dtype, param_dtype=jnp.float32, name=name)


# --- CPCA and the global branch ---------------------------------------------------------------------------------

class ChannelAttention(nn.Module):
  """CPCA's channel prior: u (B, H, W, C) → a (B, 1, 1, C) ∈ (0, 2), a = σ(fc2(ReLU(fc1(avgpool u)))) +
  σ(fc2(ReLU(fc1(maxpool u)))); ``fc1`` C → ``internal``, ``fc2`` internal → C (1×1 convs with bias, shared)."""
  internal: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    c = u.shape[-1]
    fc1 = conv2d_bias(self.internal, (1, 1), (0, 0), c, self.dtype, "fc1")
    fc2 = conv2d_bias(c, (1, 1), (0, 0), self.internal, self.dtype, "fc2")

    def prior(pooled: jax.Array) -> jax.Array:
      return nn.sigmoid(fc2(nn.relu(fc1(pooled))))
    return prior(jnp.mean(u, axis=(1, 2), keepdims=True)) + prior(jnp.max(u, axis=(1, 2), keepdims=True))


class CPCA(nn.Module):
  """[CODE] CPCA(C, C) (§3 step 2): x (B, H, W, C) → y (B, H, W, C).

  u = GELU_erf(P x); u ← ``ca``(u) ⊙ u; z0 = DW5×5(u); z = DW7×1(DW1×7 z0) + DW11×1(DW1×11 z0) + DW21×1(DW1×21 z0)
  + z0 (depthwise, bias, zero pad half the kernel on its long axis); y = P(P(z) ⊙ u) with the same 1×1 conv P
  (``conv``, bias) all three times. ``reduce``: C → C/reduce in the channel prior (the code's 4).
  """
  reduce: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    p = conv2d_bias(c, (1, 1), (0, 0), c, self.dtype, "conv")
    u = nn.gelu(p(x.astype(self.dtype)), approximate=False)
    u = ChannelAttention(c // self.reduce, self.dtype, name="ca")(u) * u

    def dw(h: jax.Array, kh: int, kw: int) -> jax.Array:
      return conv2d_bias(c, (kh, kw), (kh // 2, kw // 2), c, self.dtype, f"dconv{kh}_{kw}", groups=c)(h)
    z0 = dw(u, 5, 5)
    z = dw(dw(z0, 1, 7), 7, 1) + dw(dw(z0, 1, 11), 11, 1) + dw(dw(z0, 1, 21), 21, 1) + z0
    return p(p(z) * u)


class GlobalVisualBranch(nn.Module):
  """[CODE] The official ``VisualExtractor`` (§3): images (B, H, W, 3) ImageNet-normalised →
  (patch_feats (B, h·w, embed_size) row-major (token = w·row + col), avg_feats (B, embed_size)).

  ``model`` = ``ResNet(depth, widths)`` up to layer4 (C channels), ``cpca`` = ``CPCA`` on C, ``local_embedder`` =
  bias-free 1×1 conv C → ``embed_size`` (torch default init). Neither output is normalised.
  ``head``: "cpca" ([CODE]) | "none" (R2Gen's plain ResNet tokens, width C: no ``cpca``, no ``local_embedder``).
  """
  depth: int = 101
  widths: Sequence[int] = DEFAULT_WIDTHS
  embed_size: int = 1024
  cpca_reduce: int = 4
  remat: bool = False
  dtype: Any = jnp.float32
  head: str = "cpca"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    if self.head not in GLOBAL_HEADS:
      raise ValueError(f"global branch head={self.head!r}; choose one of {GLOBAL_HEADS}.")
    e = ResNet(self.depth, tuple(self.widths), self.remat, self.dtype, name="model")(images, train)
    if self.head == "cpca":
      x = CPCA(self.cpca_reduce, self.dtype, name="cpca")(e)
      e = conv2d(self.embed_size, 1, 1, 0, self.dtype, "local_embedder", kernel_init=torch_kernel_init)(x)
    b, h, w, d = e.shape
    return e.reshape(b, h * w, d), jnp.mean(e, axis=(1, 2))


# --- the region networks ----------------------------------------------------------------------------------------

class SimpleConvNet(nn.Module):
  """[CODE] §4.1: x (N, S, S, c) → (N, widths[-1]); block i = conv3×3 VALID / strides[i] with bias (``conv{i}``)
  → BN (``bn{i}``, ``BatchNorm``: ``mask`` (N,) restricts training statistics) → ReLU; then the global
  average pool. Full size 6,274,560 params; S ≥ 47 for five blocks."""
  widths: Sequence[int] = SIMPLE_WIDTHS
  strides: Sequence[int] = SIMPLE_STRIDES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    for i, (features, stride) in enumerate(zip(self.widths, self.strides), start=1):
      x = conv2d_bias(features, (3, 3), (0, 0), x.shape[-1], self.dtype, f"conv{i}", stride=stride)(x)
      x = nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train, mask))
    return jnp.mean(x, axis=(1, 2))


class ConvBlock(nn.Module):
  """HCF-Net ``conv_block``: conv k×k pad k//2 with bias (``conv``) → BN (``norm``) → ReLU if ``activation``."""
  features: int
  kernel: int
  activation: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    k = self.kernel
    x = conv2d_bias(self.features, (k, k), (k // 2, k // 2), x.shape[-1], self.dtype, "conv")(x)
    x = BatchNorm(dtype=self.dtype, name="norm")(x, train, mask)
    return nn.relu(x) if self.activation else x


class LocalGlobalAttention(nn.Module):
  """[HYP] PPA's ``lga{P}`` (§4.2): x (B, H, W, f) → (B, H, W, f).

  Non-overlapping P×P tiles (rows/cols beyond ⌊H/P⌋·P dropped, as torch ``unfold``); per tile its f·P² values in
  (channel, tile-row, tile-col) order reshaped row-major to (P², f) and row-averaged (the quirk: consecutive
  values, not a pixel's channels) → ``mlp1`` P² → ⌊f/2⌋ → ``norm`` LayerNorm (eps 1e-5) → ``mlp2`` → f = z;
  z ← z ⊙ softmax(z); z ← z · clamp(cos(z, ``prompt``), 0, 1); z ← z ``top_down_transform``; back to
  (B, ⌊H/P⌋, ⌊W/P⌋, f) → bilinear resize to (H, W) (half-pixel, = torch align_corners=False) → ``conv`` 1×1.
  """
  features: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, f = x.shape
    p, hp, wp = self.patch, h // self.patch, w // self.patch
    tiles = x[:, :hp * p, :wp * p].reshape(b, hp, p, wp, p, f).transpose(0, 1, 3, 5, 2, 4)
    z = jnp.mean(tiles.reshape(b, hp * wp, p * p, f), axis=-1)
    z = Linear(self.features // 2, kernel_init=torch_kernel_init, dtype=self.dtype, name="mlp1")(z)
    z = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(z)
    z = Linear(self.features, kernel_init=torch_kernel_init, dtype=self.dtype, name="mlp2")(z)
    z = z * jax.nn.softmax(z, axis=-1)
    prompt = self.param("prompt", nn.initializers.normal(1.0), (self.features,), jnp.float32)
    transform = self.param("top_down_transform", lambda _, s, d: jnp.eye(*s, dtype=d),
                           (self.features, self.features), jnp.float32)
    cos = normalize(z) @ normalize(prompt).astype(z.dtype)
    z = (z * jnp.clip(cos, 0, 1)[..., None]) @ transform.astype(z.dtype)
    z = jax.image.resize(z.reshape(b, hp, wp, self.features), (b, h, w, self.features), "bilinear")
    return conv2d_bias(self.features, (1, 1), (0, 0), self.features, self.dtype, "conv")(z)


class PPA(nn.Module):
  """[HYP] LERA stand-in: HCF-Net's PPA(in_features=c, filters) (§4.2). [RECON] reconstruction, not the paper's
  published code. x (N, H, W, c) → (N, H, W, filters) ≥ 0; PPA(3, 3) has 480 params.

  x_s = ``skip``(x) (1×1 conv + BN); x1..x3 = ``c1``/``c2``/``c3`` (3×3 conv + BN + ReLU, chained);
  y = x1 + x2 + x3 + x_s + ``lga2``(x_s) + ``lga4``(x_s); ECA ``cn`` (1-D conv of k = 1 for f = 3 across the pooled
  channels, no bias, sigmoid gate); spatial attention ``sa`` (7×7 conv pad 3 on [mean_c; max_c], sigmoid gate);
  Dropout2d(``dropout_rate``, whole channels, rng 'dropout') → BN ``bn1`` → ReLU. ``mask`` restricts the BNs'
  training statistics (``BatchNorm``).
  """
  filters: int = 3
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    f = self.filters
    x = x.astype(self.dtype)
    x_skip = ConvBlock(f, 1, False, self.dtype, name="skip")(x, train, mask)
    x_lga2 = LocalGlobalAttention(f, 2, self.dtype, name="lga2")(x_skip)
    x_lga4 = LocalGlobalAttention(f, 4, self.dtype, name="lga4")(x_skip)
    x1 = ConvBlock(f, 3, True, self.dtype, name="c1")(x, train, mask)
    x2 = ConvBlock(f, 3, True, self.dtype, name="c2")(x1, train, mask)
    x3 = ConvBlock(f, 3, True, self.dtype, name="c3")(x2, train, mask)
    y = x1 + x2 + x3 + x_skip + x_lga2 + x_lga4
    y = ECA(self.dtype, name="cn")(y)
    y = SpatialAttention(self.dtype, name="sa")(y)
    y = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(y)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train, mask))


class ECA(nn.Module):
  """PPA's ``cn`` (ECA, gamma 2, b 1): y (N, H, W, f) → y ⊙ σ(conv1d(mean_HW y)); the conv (``conv_0``, kernel
  (k, 1, 1), no bias, zero pad k//2) runs across the f channels, k = int(|log2 f + 1| / 2) made odd (1 for f = 3)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    f = y.shape[-1]
    k = int(abs((math.log(f, 2) + 1) / 2))
    k = k if k % 2 else k + 1
    pooled = jnp.mean(y, axis=(1, 2))[..., None]  # (N, f, 1): a length-f sequence of one feature
    gate = nn.Conv(1, (k,), padding=((k // 2, k // 2),), use_bias=False, kernel_init=torch_kernel_init,
                   dtype=self.dtype, param_dtype=jnp.float32, name="conv_0")(pooled)
    return y * nn.sigmoid(gate[:, None, None, :, 0])


class SpatialAttention(nn.Module):
  """PPA's ``sa``: y (N, H, W, f) → y ⊙ σ(``conv2d``([mean_c y; max_c y])), a 7×7 conv pad 3, 2 → 1, bias."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    pooled = jnp.concatenate([jnp.mean(y, axis=-1, keepdims=True), jnp.max(y, axis=-1, keepdims=True)], axis=-1)
    return y * nn.sigmoid(conv2d_bias(1, (7, 7), (3, 3), 2, self.dtype, "conv2d")(pooled))


# --- the lesion branch ------------------------------------------------------------------------------------------

def region_valid(regions: jax.Array) -> jax.Array:
  """The code's placeholder test (§4, §14 item 4): regions (B, M, S, S, 3) → (B, M) bool, False where every
  value equals float32(1e-8)."""
  return ~jnp.all(regions == jnp.asarray(PLACEHOLDER, regions.dtype), axis=(2, 3, 4))


def fold_running_stats(stats: Any, increments: Any, valid: jax.Array, momentum: float) -> Any:
  """Sequential running-statistics updates of the per-region BatchNorms (§4.3): for k = 0..N−1 in order, where
  ``valid[k]``, r ← (1 − momentum)·r + increments[k]. ``stats`` a tree of (C,) arrays, ``increments`` the same tree
  of (N, C) (momentum · region k's mean / unbiased variance), valid (N,) bool."""
  def step(r, inc_valid):
    inc, v = inc_valid
    return jax.tree.map(lambda a, i: jnp.where(v, (1 - momentum) * a + i, a), r, inc), None
  return jax.lax.scan(step, stats, (increments, valid))[0]


def _per_region(parent: nn.Module, cls: type[nn.Module], kwargs: dict[str, Any], name: str, x: jax.Array,
                valid: jax.Array) -> jax.Array:
  """Training forward of the region network ``cls(**kwargs, name=name)`` (a child of ``parent``) on x
  (N, S, S, c) one region at a time (batch size 1, a vmap with shared params and split dropout rngs), the
  running statistics folded over the valid regions (``fold_running_stats``).

  The vmapped network sees all-zero running statistics, so each region's BatchNorm update is exactly its increment
  momentum·statistic; ``nn.map_variables`` stores the fold instead of the per-region (N, C) statistics."""
  old = parent.variables["batch_stats"][name]
  n = x.shape[0]
  per_region = nn.vmap(cls, variable_axes={"params": None, "batch_stats": 0},
                       split_rngs={"params": False, "dropout": True}, in_axes=(0, None))

  def zeros(variables):
    return jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), variables)

  def fold(variables):
    return {"batch_stats": fold_running_stats(old, variables["batch_stats"], valid, BatchNorm.momentum)}
  mapped = nn.map_variables(per_region, "batch_stats", trans_in_fn=zeros, trans_out_fn=fold, mutable=True)
  return mapped(**kwargs, name=name)(x[:, None], True)[:, 0]


def _region_features(module: LesionBranch, regions: jax.Array, valid: jax.Array, train: bool) -> jax.Array:
  """The body of ``LesionBranch`` (children ``region_visual_extractor``, ``simple`` of ``module``; called from
  its compact ``__call__``)."""
  if module.lera not in LERAS:
    raise ValueError(f"lera={module.lera!r}; choose one of {LERAS}.")
  if module.region_bn not in REGION_BNS:
    raise ValueError(f"region_bn={module.region_bn!r}; choose one of {REGION_BNS}.")
  b, m = valid.shape
  x = regions.reshape((b * m,) + regions.shape[2:])
  v = valid.reshape(b * m).astype(bool)
  stages = [(SimpleConvNet, {"widths": tuple(module.widths), "dtype": module.dtype}, "simple")]
  if module.lera == "ppa":
    stages.insert(0, (PPA, {"dropout_rate": module.lera_dropout, "dtype": module.dtype}, "region_visual_extractor"))
  for cls, kwargs, name in stages:
    if train and module.region_bn == "per_region" and not module.is_initializing():
      x = _per_region(module, cls, kwargs, name, x, v)
    else:
      x = cls(**kwargs, name=name)(x, train, v if train and module.region_bn == "batched" else None)
  feats = jnp.where(v[:, None], x, jnp.asarray(PLACEHOLDER, x.dtype))
  return feats.reshape(b, m, -1)


class LesionBranch(nn.Module):
  """[CODE except LERA] The official ``MultiTargetExtractor``'s region loop (§4): regions (B, M, S, S, 3)
  normalised crops (placeholders all 1e-8), valid (B, M) bool (``region_valid``) → region_feats
  (B, M, widths[-1]): ``simple``(``region_visual_extractor``(region)) per valid box, 1e-8 (no gradient) per
  placeholder. 384² crops, full widths: (B, M, 1024).

  Attributes:
    widths: SimpleConvNet widths (d_e = widths[-1]).
    lera: "ppa" ([RECON] PPA(3, 3) stand-in, child ``region_visual_extractor``) | "identity" (no LERA).
    lera_dropout: PPA's Dropout2d rate (0.1; rng 'dropout').
    region_bn: "per_region" ([CODE] batch-size-1 BatchNorm per crop, running statistics updated once per valid
      region in i-major/j-minor order) | "batched" (corrected: one BatchNorm over the valid regions of the batch).
    dtype: compute dtype.
  S ≥ 47 for SimpleConvNet's five VALID blocks; PPA's tiles cover ⌊S/P⌋·P rows/cols (torch ``unfold``'s rule).
  """
  widths: Sequence[int] = SIMPLE_WIDTHS
  lera: str = "ppa"
  lera_dropout: float = 0.1
  region_bn: str = "per_region"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, regions: jax.Array, valid: jax.Array, train: bool) -> jax.Array:
    return _region_features(self, regions, valid, train)


class MultiTargetExtractor(LesionBranch):
  """[CODE except LERA] The official ``MultiTargetExtractor`` (§4): children ``simple``, ``visual_extractor``
  (``GlobalVisualBranch``), ``region_visual_extractor`` (§13.1 ``align.visual_extractor.*``).

  (images (B, H, W, 3), regions (B, M, S, S, 3), valid (B, M)) → (region_feats (B, M, d_e), avg_feats (B, d_e),
  patch_feats (B, h·w, d_e)), the official order; regions and valid None (no boxes: the global branch alone, no
  region networks built) → region_feats None. ``LesionBranch``'s attributes, plus the global branch's ``depth``,
  ``resnet_widths``, ``cpca_reduce``, ``remat``, ``global_head``; d_e = ``widths[-1]`` is the ``local_embedder``
  width.
  """
  depth: int = 101
  resnet_widths: Sequence[int] = DEFAULT_WIDTHS
  cpca_reduce: int = 4
  remat: bool = False
  global_head: str = "cpca"

  @nn.compact
  def __call__(self, images: jax.Array, regions: jax.Array | None, valid: jax.Array | None, train: bool
               ) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    region_feats = None if regions is None else _region_features(self, regions, valid, train)
    patch_feats, avg_feats = GlobalVisualBranch(self.depth, tuple(self.resnet_widths), self.widths[-1],
                                                self.cpca_reduce, self.remat, self.dtype, self.global_head,
                                                name="visual_extractor")(images, train)
    return region_feats, avg_feats, patch_feats
