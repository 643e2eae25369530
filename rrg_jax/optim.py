"""The optimiser of the R2Gen-family trainers (camanet_spec §8; R2Gen's trainer), as optax transformations, for
any system: parameter groups, learning rates, schedules and frozen epochs are configuration (``config.optim``).

``config.optim.param_groups`` maps a group name to parameter-path prefixes (``"visual_extractor"``; ``""``
matches everything): a parameter belongs to the group with the longest matching prefix. Group ``g`` trains at
``config.optim.lr_<g>`` with the schedule ``config.optim.schedule``:

* ``"timm_step"`` (CAMANet): timm's per-iteration ``StepLRScheduler`` with linear warm-up and the trainer's
  one-step lag (``lagged_schedule``);
* ``"step_lr"`` (R2Gen): torch ``StepLR`` stepped after every epoch, ``lr · decay_rate^floor(epoch /
  decay_epochs)`` (no lag, no warm-up);
* ``"cosine_epoch"`` (Align2Gen): torch ``CosineAnnealingLR(T_max = cosine_t_max, eta_min)`` stepped after every
  epoch, ``eta_min + (lr − eta_min)·(1 + cos(π·epoch / T_max)) / 2`` — periodic beyond T_max (epoch T_max trains
  at eta_min, 2·T_max at lr again), as torch's recursive form. ``config.optim.eta_min`` defaults to 0: Align2Gen
  parses ``--eta_min`` but never passes it (align2gen_spec §9).

Per group the update is

  element-wise gradient value clipping to ±clip_value   (torch.nn.utils.clip_grad_value_; 0 = off)
  → coupled L2: g ← g + wd·θ                              (torch.optim.Adam weight_decay)
  → Adam with *torch* AMSGrad (max over the raw second moment, torch bias corrections)
  → −lr(step).

``config.optim.frozen`` lists path substrings of parameters that torch never updates (the unused FBL
``back_norm``): no decay, no update. ``config.optim.frozen_epochs`` (group → epochs, staged training) gives a
group no update and leaves its optimiser state untouched for its first epochs, so it starts Adam afresh when it
is unfrozen, as torch does for parameters that get their first gradient. ``optax.amsgrad`` is *not* used: it takes
the maximum of the bias-corrected second moment, which gives different updates.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN_GROUP = "frozen"
SCHEDULES = ("timm_step", "step_lr", "cosine_epoch")


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


def param_groups(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """``config.optim.param_groups`` as group name → path prefixes; each group needs ``config.optim.lr_<name>``."""
  groups = {str(g): tuple(str(p) for p in prefixes) for g, prefixes in config.optim.param_groups.items()}
  if not groups:
    raise ValueError("config.optim.param_groups is empty: name at least one group (prefix '' = every parameter).")
  for g in groups:
    if g == FROZEN_GROUP or f"lr_{g}" not in config.optim:
      raise ValueError(f"config.optim.param_groups has group {g!r} but config.optim has no lr_{g}"
                       + (f" ({FROZEN_GROUP!r} is reserved)" if g == FROZEN_GROUP else "") + ".")
  return groups


def learning_rate_schedules(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """Per-group schedules ``{group: schedule(step)}`` from ``config.optim`` (epochs → steps)."""
  o = config.optim
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
  kind = o.get("schedule", "timm_step")
  if kind not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={kind!r}; choose one of {SCHEDULES}.")
  decay_steps = max(int(o.decay_epochs) * steps_per_epoch, 1)
  schedules = {}
  for g in param_groups(config):
    base = float(o[f"lr_{g}"])
    if kind == "timm_step":
      schedules[g] = lagged_schedule(base, warmup_lr=float(o.warmup_lr),
                                     warmup_steps=int(o.warmup_epochs) * steps_per_epoch, decay_steps=decay_steps,
                                     decay_rate=float(o.decay_rate))
    elif kind == "step_lr":
      schedules[g] = functools.partial(timm_step_lr, base_lr=base, warmup_lr=base, warmup_steps=0,
                                       decay_steps=decay_steps, decay_rate=float(o.decay_rate))
    else:
      schedules[g] = functools.partial(cosine_epoch_lr, base_lr=base, eta_min=float(o.get("eta_min", 0.0)),
                                       t_max=int(o.cosine_t_max), steps_per_epoch=steps_per_epoch)
  return schedules


def cosine_epoch_lr(t: jax.typing.ArrayLike, *, base_lr: float, eta_min: float, t_max: int,
                    steps_per_epoch: int) -> jax.Array:
  """torch ``CosineAnnealingLR`` stepped once per epoch, at step ``t``: epoch ``e = t // steps_per_epoch`` (0-based)
  trains at ``eta_min + (base_lr − eta_min)·(1 + cos(π e / t_max)) / 2``."""
  epoch = jnp.floor_divide(jnp.asarray(t), steps_per_epoch).astype(jnp.float32)
  return eta_min + (base_lr - eta_min) * (1.0 + jnp.cos(jnp.pi * epoch / t_max)) / 2.0


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


class FrozenUntilState(NamedTuple):
  count: jax.Array
  inner: optax.OptState


def frozen_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """``inner`` from optimizer step ``steps`` on; before it zero updates and ``inner``'s state left as it was."""
  if steps <= 0:
    return inner

  def init_fn(params):
    return FrozenUntilState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

  def update_fn(updates, state, params=None):
    active = state.count >= steps
    new_updates, new_inner = inner.update(updates, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
    return updates, FrozenUntilState(count=optax.safe_int32_increment(state.count), inner=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def torch_adam(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float, eps: float,
               weight_decay: float, amsgrad: bool, clip_value: float, frozen_steps: int = 0
               ) -> optax.GradientTransformation:
  """One parameter group: clip_grad_value_ (``clip_value`` > 0) → coupled L2 → torch Adam/AMSGrad (all frozen
  for the first ``frozen_steps`` steps) → −lr (the schedule counts every step, frozen ones included)."""
  direction = optax.chain(
      *([optax.clip(clip_value)] if clip_value > 0 else []),
      optax.add_decayed_weights(weight_decay),
      scale_by_torch_adam(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad),
  )
  return optax.chain(frozen_until(direction, frozen_steps), optax.scale_by_learning_rate(learning_rate))


# --- parameter groups ----------------------------------------------------------------------------------

def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _matches(path: str, prefix: str) -> bool:
  return prefix == "" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def param_labels(params: Any, groups: dict[str, tuple[str, ...]], frozen: tuple[str, ...] | list[str] = ()) -> Any:
  """Group label per leaf: ``FROZEN_GROUP`` when the '/'-joined path contains one of the ``frozen`` substrings,
  else the group of ``groups`` (name → path prefixes) with the longest matching prefix. A parameter that no
  group matches is an error naming it."""
  def label(path, _):
    s = _path_str(path)
    if any(f in s for f in frozen):
      return FROZEN_GROUP
    best = max(((len(p), g) for g, prefixes in groups.items() for p in prefixes if _matches(s, p)), default=None)
    if best is None:
      raise ValueError(f"Parameter {s} is in no group of config.optim.param_groups {groups}; add a group with "
                       "prefix '' for the rest.")
    return best[1]
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimiser of ``config.optim`` for a ``params`` tree (the Flax ``'params'`` collection)."""
  o = config.optim
  schedules = learning_rate_schedules(config, steps_per_epoch)
  groups = param_groups(config)
  frozen_epochs = dict(o.get("frozen_epochs", {}) or {})
  unknown = sorted(set(frozen_epochs) - set(groups))
  if unknown:
    raise ValueError(f"config.optim.frozen_epochs names {unknown}, not groups of config.optim.param_groups "
                     f"({sorted(groups)}).")
  transforms = {g: torch_adam(schedules[g], b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                              weight_decay=float(o.weight_decay), amsgrad=bool(o.amsgrad),
                              clip_value=float(o.clip_value),
                              frozen_steps=int(frozen_epochs.get(g, 0)) * steps_per_epoch)
                for g in groups}
  frozen = tuple(o.frozen)
  return optax.multi_transform({**transforms, FROZEN_GROUP: optax.set_to_zero()},
                               lambda params: param_labels(params, groups, frozen))
