"""Optimiser of the official CAMANet trainer (reference spec §8), as optax transformations.

Per parameter group (visual extractor incl. its head at ``lr_ve``; everything else at ``lr_ed``) the update is

  element-wise gradient value clipping to ±clip_value   (torch.nn.utils.clip_grad_value_)
  → coupled L2: g ← g + wd·θ                              (torch.optim.Adam weight_decay)
  → Adam with *torch* AMSGrad (max over the raw second moment, torch bias corrections)
  → −lr(step) from the timm StepLR schedule with warm-up and the trainer's one-step lag.

Parameters that never receive a gradient in PyTorch (the unused FBL ``back_norm``) are frozen: no decay, no
update. ``optax.amsgrad`` is *not* used: it takes the maximum of the bias-corrected second moment, which
gives different updates.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

VE_GROUP = "visual_extractor"
ED_GROUP = "encoder_decoder"
FROZEN_GROUP = "frozen"


# --- learning-rate schedule --------------------------------------------------------------------------------

def timm_step_lr(t: jax.typing.ArrayLike, *, base_lr: float, warmup_lr: float, warmup_steps: int,
                 decay_steps: int, decay_rate: float) -> jax.typing.ArrayLike:
  """timm ``StepLRScheduler._get_lr(t)`` (``t_in_epochs=False``): linear warm-up, then step decay.

  ``lr(t) = warmup_lr + t·(base_lr − warmup_lr)/warmup_steps`` for ``t < warmup_steps``,
  else ``base_lr · decay_rate^floor(t / decay_steps)``.
  """
  t = jnp.asarray(t, jnp.float32)
  decayed = base_lr * jnp.power(decay_rate, jnp.floor(t / decay_steps))
  if warmup_steps <= 0:
    return decayed
  warm = warmup_lr + t * ((base_lr - warmup_lr) / warmup_steps)
  return jnp.where(t < warmup_steps, warm, decayed)


def lagged_schedule(base_lr: float, *, warmup_lr: float, warmup_steps: int, decay_steps: int,
                    decay_rate: float) -> optax.Schedule:
  """The lr that optimizer step ``s`` (0-based) actually uses in the official trainer.

  The trainer sets ``lr(g)`` *after* step ``g``, so step ``s ≥ 1`` uses ``lr(s−1)``; step 0 uses the lr the
  scheduler set at construction: ``warmup_lr`` with warm-up (= ``lr(0)``), ``base_lr`` without (= ``lr(0)``).
  Hence ``lr_used(s) = lr(max(s − 1, 0))`` in both cases.
  """
  def schedule(step: jax.typing.ArrayLike) -> jax.typing.ArrayLike:
    return timm_step_lr(jnp.maximum(jnp.asarray(step) - 1, 0), base_lr=base_lr, warmup_lr=warmup_lr,
                        warmup_steps=warmup_steps, decay_steps=decay_steps, decay_rate=decay_rate)
  return schedule


def learning_rate_schedules(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """Per-group schedules ``{VE_GROUP: ..., ED_GROUP: ...}`` from ``config.optim`` (epochs → steps)."""
  o = config.optim
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
  common = dict(warmup_lr=float(o.warmup_lr), warmup_steps=int(o.warmup_epochs) * steps_per_epoch,
                decay_steps=max(int(o.decay_epochs) * steps_per_epoch, 1), decay_rate=float(o.decay_rate))
  return {VE_GROUP: lagged_schedule(float(o.lr_ve), **common),
          ED_GROUP: lagged_schedule(float(o.lr_ed), **common)}


# --- torch-semantics Adam / AMSGrad ------------------------------------------------------------------------

class TorchAdamState(NamedTuple):
  """Adam moments; ``nu_max`` is the running max of the raw ``nu`` (only used with AMSGrad)."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        amsgrad: bool = True) -> optax.GradientTransformation:
  """``torch.optim.Adam`` direction (without lr and weight decay), torch AMSGrad semantics.

  ``m ← b1·m + (1−b1)·g``; ``v ← b2·v + (1−b2)·g²``; ``vmax ← max(vmax, v)`` (raw, not bias-corrected);
  ``u = (m/(1−b1^t)) / (sqrt(vmax)/sqrt(1−b2^t) + eps)`` (``v`` instead of ``vmax`` without AMSGrad).
  """
  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return TorchAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(),
                          nu_max=zeros() if amsgrad else optax.EmptyState())

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else state.nu_max
    t = count.astype(jnp.float32)
    # 1 − b^t as −expm1(t·log b) with log b taken in float64: torch forms the bias corrections in Python
    # float64, and float32 ``1 − 0.999^t`` is off by ~1e-5 relative at small t.
    bc1 = -jnp.expm1(t * math.log(b1))
    bc2_sqrt = jnp.sqrt(-jnp.expm1(t * math.log(b2)))
    second = nu_max if amsgrad else nu
    new_updates = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), mu, second)
    return new_updates, TorchAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def torch_adam(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float, eps: float,
               weight_decay: float, amsgrad: bool, clip_value: float) -> optax.GradientTransformation:
  """One parameter group: clip_grad_value_ → coupled L2 → torch Adam/AMSGrad → −lr."""
  return optax.chain(
      optax.clip(clip_value),
      optax.add_decayed_weights(weight_decay),
      scale_by_torch_adam(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad),
      optax.scale_by_learning_rate(learning_rate),
  )


# --- parameter groups ----------------------------------------------------------------------------------

def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params: Any, frozen: tuple[str, ...] | list[str] = ()) -> Any:
  """Group label per leaf: ``VE_GROUP`` under ``params['visual_extractor']``, ``FROZEN_GROUP`` when the
  '/'-joined path contains one of the ``frozen`` substrings, else ``ED_GROUP``."""
  def label(path, _):
    s = _path_str(path)
    if any(f in s for f in frozen):
      return FROZEN_GROUP
    return VE_GROUP if s.split("/")[0] == "visual_extractor" else ED_GROUP
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The full CAMANet optimiser for a ``params`` tree (the Flax ``'params'`` collection)."""
  o = config.optim
  schedules = learning_rate_schedules(config, steps_per_epoch)
  group = lambda lr: torch_adam(  # noqa: E731
      lr, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), weight_decay=float(o.weight_decay),
      amsgrad=bool(o.amsgrad), clip_value=float(o.clip_value))
  frozen = tuple(o.frozen)
  return optax.multi_transform(
      {VE_GROUP: group(schedules[VE_GROUP]), ED_GROUP: group(schedules[ED_GROUP]),
       FROZEN_GROUP: optax.set_to_zero()},
      lambda params: param_labels(params, frozen))
