"""CT-AGRG's vision and conditioning blocks (ct_agrg_spec §3, §5, §6.2 steps 4–5, §10, §12.4), Flax Linen.

* ``CTNet`` (§3): the 2.5-D CT-Net encoder. Volume (B, D, H, W) → slice triplets as RGB images → ResNet-18 trunk
  → three VALID Conv3d that treat the triplet axis as channels and convolve over (ResNet channel, h, w) → flatten
  in torch's (C, D, H, W) order → classifier: the pre-training MLP (``head="full"``, §3.6, §4) or only its first
  layer, ``e = Dropout(ReLU(Linear(→ 2048)))`` (``head="embedding"``, stages 1 and 2). The triplet count and the
  flatten size follow from the volume shape (``ctnet_shapes``, §12.4): 80 and 7200 at (240, 480, 480).
* ``AbnormalityHeads`` (§5): ``heads_in`` 2048 → K·d (ReLU, Dropout) split into the K abnormality vectors, and one
  ``heads_out`` MLP d → 128 → 1 per abnormality.
* ``CTNetStep`` (§5, §6.1): ``encoder`` (embedding head) + the heads; 66,255,042 parameters at full size.
* ``BlockConditioning`` (§6.2 step 5, §11.4, §12.2): ``feature_space_transformation_nn``, Linear(K·d → 4096) →
  ReLU → Linear(4096 → 1024) → ReLU → Linear(1024 → 1024). ``conditioning="block"`` (parity) applies it to the
  block-placed vector (h in block k, zeros elsewhere) as the grouped product ``W1[d·k : d·(k+1)]ᵀ · h + b1``
  (``jax.lax.ragged_dot``), never building the K·d-wide vector; ``"raw"`` starts with Linear(d → 4096) instead.

Channels-last throughout; explicit symmetric padding in the trunk (§12.3). Params, BN statistics and logits are
float32; ``dtype`` is the compute dtype. Init = PyTorch defaults for every Conv3d / Linear (U(±1/√fan_in), §10.5),
torchvision's for the trunk.

Conversion from the original state_dicts (§10.2–§10.4): ``rrg_jax.convert.state_dict_to_variables`` after
``TORCH_KEY_RENAMES`` (a system's ``torch_key_renames``: the trunk's Sequential indices → ``conv1`` / ``bn1`` /
``layer1``..``layer4``, the fst's indices → ``layers``). Everything else already follows the naming rule:
``reducingconvs.0`` → ``reducingconvs_0``, ``classifier.0`` → ``classifier_0``, ``heads_in.0`` → ``heads_in_0``,
``heads_out.7.3`` → ``heads_out_7_3``; the model flattens in torch's order, so no kernel rows are permuted.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrg_jax.layers.linear import Linear, torch_bias_init, torch_kernel_init
from rrg_jax.layers.resnet import DEFAULT_WIDTHS, ResNet, resnet_channels

# (output channels, kernel (d, h, w), stride (d, h, w)) of reducingconvs.0 / .2 / .4 (§3.4); all VALID.
REDUCING_CONVS: tuple[tuple[int, tuple[int, int, int], tuple[int, int, int]], ...] = (
    (64, (3, 3, 3), (3, 1, 1)), (32, (3, 3, 3), (3, 1, 1)), (16, (3, 2, 2), (3, 2, 2)))
CLASSIFIER_HIDDEN = (2048, 512, 128)  # §3.6; the embedding head keeps only the first
HEADS = ("full", "embedding")
CONDITIONINGS = ("block", "raw")

# Original state_dict keys (any prefix: ``encoder.``, ``visual_encoder.encoder.``, ``language_model.``) → the
# ``rrg_jax.convert`` naming rule of these modules, applied in order with ``re.sub``.
TORCH_KEY_RENAMES: tuple[tuple[str, Any], ...] = (
    (r"(^|\.)features\.0\.", r"\1features.conv1."),
    (r"(^|\.)features\.1\.", r"\1features.bn1."),
    (r"(^|\.)features\.([4-7])\.", lambda m: f"{m.group(1)}features.layer{int(m.group(2)) - 3}."),
    (r"(^|\.)feature_space_transformation_nn\.([024])\.", r"\1feature_space_transformation_nn.layers.\2."),
)


class CTNetShapes(NamedTuple):
  """Per-volume shapes of ``CTNet`` in torch's layout (§13.2). At (240, 480, 480) with ResNet-18: triplets 80,
  trunk (80, 512, 15, 15), convs ((64, 170, 13, 13), (32, 56, 11, 11), (16, 18, 5, 5)), flat_size 7200."""
  triplets: int                            # images per volume = Conv3d input channels
  trunk: tuple[int, int, int, int]         # (triplets, C, h, w) ResNet output
  convs: tuple[tuple[int, int, int, int], ...]  # (channels, d, h, w) after each reducing conv
  flat_size: int                           # classifier input width


def _out(n: int, kernel: int, stride: int, padding: int = 0) -> int:
  return (n + 2 * padding - kernel) // stride + 1


def ctnet_shapes(volume_shape: Sequence[int], resnet_widths: Sequence[int] = DEFAULT_WIDTHS) -> CTNetShapes:
  """(D, H, W) → ``CTNetShapes``; ValueError when D is not a multiple of 3 or a reducing conv has no output."""
  depth, height, width = (int(n) for n in volume_shape)
  if depth % 3:
    raise ValueError(f"CT-Net groups slices in triplets: the volume depth must be a multiple of 3, got "
                     f"{depth} (volume {tuple(volume_shape)}).")
  h, w = height, width
  for kernel, stride, padding in ((7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1)):  # conv1, pool, layer2–4
    h, w = _out(h, kernel, stride, padding), _out(w, kernel, stride, padding)
  trunk = (depth // 3, resnet_channels(18, resnet_widths), h, w)
  convs, size = [], trunk[1:]
  for features, kernel, stride in REDUCING_CONVS:
    size = tuple(_out(n, k, s) for n, k, s in zip(size, kernel, stride))
    if min(size) < 1:
      raise ValueError(f"Volume {tuple(volume_shape)} is too small for CT-Net: ResNet-18 output {trunk[1:]} "
                       f"(C, h, w) leaves no output after reducing conv {len(convs)} (kernel {kernel}, stride "
                       f"{stride}).")
    convs.append((features,) + size)
  return CTNetShapes(trunk[0], trunk, tuple(convs), math.prod(convs[-1]))


def _conv3d(features: int, kernel: tuple[int, int, int], stride: tuple[int, int, int], in_features: int,
            dtype: Any, name: str) -> nn.Conv:
  """torch ``nn.Conv3d(in_features, features, kernel, stride)`` (VALID, bias, default init) on (B, D, H, W, C)."""
  fan_in = in_features * math.prod(kernel)
  return nn.Conv(features, kernel, strides=stride, padding="VALID", kernel_init=torch_kernel_init,
                 bias_init=torch_bias_init(fan_in), dtype=dtype, param_dtype=jnp.float32, name=name)


def _linear(features: int, dtype: Any, name: str) -> Linear:
  return Linear(features, kernel_init=torch_kernel_init, dtype=dtype, name=name)


class CTNet(nn.Module):
  """volumes (B, D, H, W) → logits (B, num_classes) float32 (``head="full"``) or e (B, classifier_hidden[0]) in
  ``dtype`` (``head="embedding"``). D must be a multiple of 3 (``ctnet_shapes``).

  Attributes:
    num_classes: outputs of the full head (18 abnormalities).
    head: "full" (classifier_0/3/6/9 with ReLU + Dropout between) or "embedding" (classifier_0 → ReLU → Dropout).
    resnet_widths: the ResNet-18 trunk's stage widths (torchvision's by default; small ones for tests).
    classifier_hidden: the classifier's hidden widths (2048, 512, 128); the embedding head uses only the first.
    dropout_rate: every Dropout (0.5; 0 for train-mode parity tests).
    remat: rematerialise each residual block of the trunk.
    dtype: compute dtype (params and BN statistics stay float32).
  """
  num_classes: int = 18
  head: str = "full"
  resnet_widths: Sequence[int] = DEFAULT_WIDTHS
  classifier_hidden: Sequence[int] = CLASSIFIER_HIDDEN
  dropout_rate: float = 0.5
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, volumes: jax.Array, train: bool, *, deterministic: bool | None = None) -> jax.Array:
    """``train``: BN in batch-statistics mode (and updating ``batch_stats``, pass mutable); ``deterministic``
    (default ``not train``): no dropout; otherwise dropout needs the 'dropout' rng."""
    if self.head not in HEADS:
      raise ValueError(f"Unknown CTNet head {self.head!r}; choose one of {HEADS}.")
    deterministic = not train if deterministic is None else deterministic
    b, d, h, w = volumes.shape
    shapes = ctnet_shapes((d, h, w), self.resnet_widths)
    t = shapes.triplets
    # image b·T + j holds slices 3j, 3j+1, 3j+2 as channels: (B, T, 3, H, W) → (B·T, H, W, 3).
    images = volumes.reshape(b, t, 3, h, w).transpose(0, 1, 3, 4, 2).reshape(b * t, h, w, 3)
    x = ResNet(18, tuple(self.resnet_widths), self.remat, self.dtype, name="features")(images, train)
    # (B·T, h', w', C) → (B, C, h', w', T): torch's (batch, channels = T, depth = C, h', w') channels-last.
    x = x.reshape((b, t) + x.shape[1:]).transpose(0, 4, 2, 3, 1)
    for i, (features, kernel, stride) in enumerate(REDUCING_CONVS):
      x = nn.relu(_conv3d(features, kernel, stride, x.shape[-1], self.dtype, f"reducingconvs_{2 * i}")(x))
    x = x.transpose(0, 4, 1, 2, 3).reshape(b, shapes.flat_size)  # torch's (C, D, H, W) flatten order
    drop = nn.Dropout(self.dropout_rate, deterministic=deterministic)
    hidden = self.classifier_hidden if self.head == "full" else self.classifier_hidden[:1]
    for i, width in enumerate(hidden):
      x = drop(nn.relu(_linear(width, self.dtype, f"classifier_{3 * i}")(x)))
    if self.head == "embedding":
      return x
    return _linear(self.num_classes, self.dtype, f"classifier_{3 * len(hidden)}")(x).astype(jnp.float32)


class AbnormalityHeads(nn.Module):
  """e (B, E) → (H (B, K, d) in ``dtype``, logits (B, K) float32) (§5).

  ``heads_in_0``: Linear(E → K·d) → ReLU → Dropout, reshaped so that ``H[:, k] = out[:, d·k : d·(k+1)]``;
  ``heads_out_{k}_0`` / ``heads_out_{k}_3``: Linear(d → hidden) → ReLU → Dropout → Linear(hidden → 1) for each k.
  Attributes: ``num_abnormalities`` K (18), ``head_dim`` d (1024), ``hidden`` (128), ``dropout_rate`` (0.5),
  compute ``dtype``.
  """
  num_abnormalities: int = 18
  head_dim: int = 1024
  hidden: int = 128
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, e: jax.Array, *, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """``deterministic``: no dropout; otherwise needs the 'dropout' rng."""
    k, d = self.num_abnormalities, self.head_dim
    drop = nn.Dropout(self.dropout_rate, deterministic=deterministic)
    h = drop(nn.relu(_linear(k * d, self.dtype, "heads_in_0")(e)))
    h = h.reshape(e.shape[:-1] + (k, d))
    logits = [_linear(1, self.dtype, f"heads_out_{i}_3")(
        drop(nn.relu(_linear(self.hidden, self.dtype, f"heads_out_{i}_0")(h[..., i, :])))) for i in range(k)]
    return h, jnp.concatenate(logits, axis=-1).astype(jnp.float32)


class CTNetStep(nn.Module):
  """volumes (B, D, H, W) → (H (B, K, d), logits (B, K) float32): ``encoder`` = ``CTNet(head="embedding")`` then
  ``AbnormalityHeads``, whose params sit at this module's level (``heads_in_0``, ``heads_out_{k}_{0,3}``) as the
  torch ``CTNetStep``'s do. Attributes as ``CTNet``'s and ``AbnormalityHeads``'s (``head_hidden`` = the latter's
  ``hidden``); one ``dropout_rate`` for all five Dropouts."""
  num_abnormalities: int = 18
  head_dim: int = 1024
  head_hidden: int = 128
  resnet_widths: Sequence[int] = DEFAULT_WIDTHS
  embed_dim: int = CLASSIFIER_HIDDEN[0]
  dropout_rate: float = 0.5
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = CTNet(head="embedding", resnet_widths=self.resnet_widths, classifier_hidden=(self.embed_dim,),
                         dropout_rate=self.dropout_rate, remat=self.remat, dtype=self.dtype)
    self.heads = AbnormalityHeads(self.num_abnormalities, self.head_dim, self.head_hidden, self.dropout_rate,
                                  self.dtype)
    nn.share_scope(self, self.heads)

  def __call__(self, volumes: jax.Array, train: bool, *, deterministic: bool | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """``train``: BN batch statistics (mutable ``batch_stats``); ``deterministic`` (default ``not train``)."""
    deterministic = not train if deterministic is None else deterministic
    e = self.encoder(volumes, train, deterministic=deterministic)
    return self.heads(e, deterministic=deterministic)


def block_vector(h: jax.Array, block: jax.Array, num_blocks: int) -> jax.Array:
  """The parity conditioning input (§6.2 step 4, §13.11): h (N, d), block (N,) int in [0, K) → c (N, K·d), zeros
  except ``c[n, d·block[n] : d·(block[n] + 1)] = h[n]``. ``BlockConditioning`` never builds it; tests do."""
  onehot = jax.nn.one_hot(block, num_blocks, dtype=h.dtype)
  return (onehot[:, :, None] * h[:, None, :]).reshape(h.shape[0], num_blocks * h.shape[-1])


class BlockLinear(nn.Module):
  """torch ``Linear(K·d → features)`` applied to ``block_vector(h, block, K)`` without building it:
  h (N, d), block (N,) int in [0, K) → ``h · kernel[d·k : d·(k+1)] + bias`` (N, features) in ``dtype``.

  Params ``kernel`` (K·d, features) and ``bias`` (features,), torch default init with fan_in = K·d. The rows are
  grouped by block (stable sort) for one ``jax.lax.ragged_dot`` against the kernel viewed as (K, d, features):
  N·d·features multiply-adds, no per-row copy of a kernel block, and the kernel gradient is the grouped product
  too. Same result as the dense product up to summation order (the zeros drop out).
  """
  features: int
  num_blocks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, block: jax.Array) -> jax.Array:
    k, d = self.num_blocks, h.shape[-1]
    kernel = self.param("kernel", torch_kernel_init, (k * d, self.features), jnp.float32)
    bias = self.param("bias", torch_bias_init(k * d), (self.features,), jnp.float32)
    order = jnp.argsort(block, stable=True)
    sizes = jnp.bincount(block, length=k).astype(jnp.int32)
    y = jax.lax.ragged_dot(h[order].astype(self.dtype), kernel.reshape(k, d, self.features).astype(self.dtype),
                           sizes)
    y = jnp.zeros_like(y).at[order].set(y)
    return y + bias.astype(self.dtype)


class BlockConditioning(nn.Module):
  """CT-AGRG's ``feature_space_transformation_nn`` (§6.2 step 5): h (N, d), block (N,) int in [0, K) →
  z (N, features) in ``dtype``.

  ``layers_0`` → ReLU → ``layers_2`` → ReLU → ``layers_4`` (torch Sequential indices 0, 2, 4; widths ``hidden``
  = (4096, 1024), ``features`` = 1024). ``conditioning``: "block" (parity, §12.2): ``layers_0`` is a
  ``BlockLinear`` over K·d inputs (kernel (K·d, 4096), as the original's 18432 → 4096) fed h in block ``block``;
  "raw": ``layers_0`` = Linear(d → 4096) on h, ``block`` ignored (RGRG's form). Torch default init.
  """
  num_blocks: int = 18
  conditioning: str = "block"
  hidden: Sequence[int] = (4096, 1024)
  features: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, block: jax.Array) -> jax.Array:
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"Unknown conditioning {self.conditioning!r}; choose one of {CONDITIONINGS}.")
    if self.conditioning == "block":
      x = BlockLinear(self.hidden[0], self.num_blocks, self.dtype, name="layers_0")(h, block)
    else:
      x = _linear(self.hidden[0], self.dtype, "layers_0")(h)
    widths = tuple(self.hidden[1:]) + (self.features,)
    for i, width in enumerate(widths, start=1):
      x = _linear(width, self.dtype, f"layers_{2 * i}")(nn.relu(x))
    return x
