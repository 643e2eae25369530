"""The optimisers of the R2Gen-family trainers (camanet_spec §8; R2Gen's trainer) and of RadGen (radgen_spec §5.1,
§5.2), as optax transformations, for any system: parameter groups, learning rates, schedules, weight decay,
clipping and frozen epochs are configuration (``config.optim``).

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
  parses ``--eta_min`` but never passes it (align2gen_spec §9);
* ``"linear_warmup_decay"`` (RadGen, radgen_spec §5.1): HF ``get_linear_schedule_with_warmup`` through
  ``LambdaLR``, ``lr · μ(s)`` with ``μ(s) = s/W`` for ``s < W`` and ``max(0, (T − s)/(T − W))`` after, ``W =
  warmup_epochs·S``, ``T = config.train.epochs·S`` (the first update uses lr 0); ``config.optim.decay = "constant"``
  keeps ``μ = 1`` after the warm-up (HF ``get_constant_schedule_with_warmup``).

``config.optim.optimizer`` chooses the update of every group (default ``"adam"``):

  ``"adam"``  (torch.optim.Adam)   clip_value → coupled L2 g ← g + wd·θ → torch Adam/AMSGrad → −lr(step)
  ``"adamw"`` (torch.optim.AdamW)  clip_value → torch Adam/AMSGrad → decoupled decay u ← u + wd·θ → −lr(step),
                                   i.e. θ ← θ − lr·wd·θ − lr·m̂/(√v̂ + ε)

where clip_value is element-wise clipping to ±``config.optim.clip_value`` (torch ``clip_grad_value_``; 0 = off),
the Adam moments follow *torch* (AMSGrad with ``config.optim.amsgrad``: max over the raw second moment; torch bias
corrections) and ``wd`` is ``config.optim.weight_decay_<group>`` if set, else ``config.optim.weight_decay`` (decay
on every parameter of the group: no mask). ``config.optim.clip_norm`` > 0 first clips all trainable gradients
together by their global L2 norm as torch ``clip_grad_norm_`` does (``g ← g · min(1, max_norm/(‖g‖ + 1e-6))``,
``clip_by_torch_global_norm``; 0 = off, the default), before the per-group value clipping.

``config.optim.frozen`` lists path substrings of parameters that torch never updates (the unused FBL
``back_norm``): no decay, no update. ``config.optim.frozen_epochs`` (group → epochs; staged training, RadGen's
progressive unfreezing, radgen_spec §5.2) gives a group, for its first epochs, no update, no weight decay (coupled
or decoupled: both are inside the frozen part) and no optimiser-state change, so its Adam starts afresh with its
own step count (bias correction t' = 1 at its first update) when it is unfrozen, as torch does for parameters that
get their first gradient, while its schedule counts every step. Frozen parameters (either kind) do not enter the
global clip norm: torch has no gradient for them. ``optax.amsgrad`` is *not* used: it takes the maximum of the
bias-corrected second moment, which gives different updates.

Gradient accumulation (CT-AGRG stage 2, ct_agrg_spec §6.5): ``config.optim.accumulate_steps = k`` > 1 sums the
gradients of k consecutive batches of an epoch, times ``config.optim.grad_scale / k`` (the code multiplies its loss
by a GradScaler's 65536 that it never unscales: ``grad_scale = 65536``; 1 = the plain mean), and applies the whole
optimiser above to that sum after every k-th batch of the epoch (``accumulate_gradients``). The last ``S mod k``
batches of an epoch are dropped (``config.optim.accumulate_remainder = "drop"``, the code: their gradients are zeroed
at the next epoch's start) or applied as a last, smaller sum (``"apply"``). Schedules and frozen epochs then count
optimiser updates (``updates_per_epoch`` per epoch).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN_GROUP = "frozen"
SCHEDULES = ("timm_step", "step_lr", "cosine_epoch", "linear_warmup_decay")
ACCUMULATE_REMAINDERS = ("drop", "apply")
DECAYS = ("linear", "constant")
OPTIMIZERS = ("adam", "adamw")


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
  # Only the step schedules read decay_epochs (RadGen's config has none).
  decay_steps = max(int(o.decay_epochs) * steps_per_epoch, 1) if kind in ("timm_step", "step_lr") else None
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
    elif kind == "cosine_epoch":
      schedules[g] = functools.partial(cosine_epoch_lr, base_lr=base, eta_min=float(o.get("eta_min", 0.0)),
                                       t_max=int(o.cosine_t_max), steps_per_epoch=steps_per_epoch)
    else:
      decay = o.get("decay", "linear")
      if decay not in DECAYS:
        raise ValueError(f"config.optim.decay={decay!r}; choose one of {DECAYS}.")
      schedules[g] = functools.partial(linear_warmup_decay_lr, base_lr=base,
                                       warmup_steps=int(o.warmup_epochs) * steps_per_epoch,
                                       total_steps=int(config.train.epochs) * steps_per_epoch, decay=decay)
  return schedules


def cosine_epoch_lr(t: jax.typing.ArrayLike, *, base_lr: float, eta_min: float, t_max: int,
                    steps_per_epoch: int) -> jax.Array:
  """torch ``CosineAnnealingLR`` stepped once per epoch, at step ``t``: epoch ``e = t // steps_per_epoch`` (0-based)
  trains at ``eta_min + (base_lr − eta_min)·(1 + cos(π e / t_max)) / 2``."""
  epoch = jnp.floor_divide(jnp.asarray(t), steps_per_epoch).astype(jnp.float32)
  return eta_min + (base_lr - eta_min) * (1.0 + jnp.cos(jnp.pi * epoch / t_max)) / 2.0


def linear_warmup_decay_lr(t: jax.typing.ArrayLike, *, base_lr: float, warmup_steps: int, total_steps: int,
                           decay: str = "linear") -> jax.Array:
  """HF ``get_linear_schedule_with_warmup`` (``decay="linear"``) or ``get_constant_schedule_with_warmup``
  (``"constant"``) through ``LambdaLR``, stepped after every update (radgen_spec §5.1): update ``t`` (0-based)
  trains at ``base_lr · μ(t)``, ``μ(t) = t / max(1, W)`` for ``t < W``, then ``max(0, (T − t) / max(1, T − W))``
  (linear) or 1 (constant)."""
  t = jnp.asarray(t, jnp.float32)
  after = (jnp.maximum(0.0, (total_steps - t) / max(1, total_steps - warmup_steps)) if decay == "linear"
           else jnp.ones_like(t))
  return base_lr * jnp.where(t < warmup_steps, t / max(1, warmup_steps), after)


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
               weight_decay: float, amsgrad: bool, clip_value: float, frozen_steps: int = 0,
               decoupled: bool = False) -> optax.GradientTransformation:
  """One parameter group: clip_grad_value_ (``clip_value`` > 0) → torch Adam/AMSGrad with coupled L2
  (``torch.optim.Adam``) or decoupled decay after it (``decoupled``: ``torch.optim.AdamW``, radgen_spec §5.1), all
  frozen for the first ``frozen_steps`` steps → −lr (the schedule counts every step, frozen ones included)."""
  decay = [optax.add_decayed_weights(weight_decay)]
  direction = optax.chain(
      *([optax.clip(clip_value)] if clip_value > 0 else []),
      *([] if decoupled else decay),
      scale_by_torch_adam(b1=b1, b2=b2, eps=eps, amsgrad=amsgrad),
      *(decay if decoupled else []),
  )
  return optax.chain(frozen_until(direction, frozen_steps), optax.scale_by_learning_rate(learning_rate))


class ClipByGlobalNormState(NamedTuple):
  count: jax.Array


def clip_by_torch_global_norm(max_norm: float, trainable: Callable[[jax.Array, Any], Any]
                              ) -> optax.GradientTransformation:
  """torch ``clip_grad_norm_(max_norm)`` over the gradients that exist at each step (radgen_spec §5.1):
  ``‖g‖`` is the L2 norm over the leaves that ``trainable(step, updates)`` (a tree of bool scalars, ``step``
  0-based) marks, and every leaf is multiplied by ``min(1, max_norm / (‖g‖ + 1e-6))`` (optax's
  ``clip_by_global_norm`` uses ``max_norm / ‖g‖``). Unmarked leaves — torch's ``grad is None`` — do not count."""
  def init_fn(params):
    del params
    return ClipByGlobalNormState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    marks = jax.tree.leaves(trainable(state.count, updates))
    norm = jnp.sqrt(sum(jnp.where(m, jnp.sum(jnp.square(g.astype(jnp.float32))), 0.0)
                        for g, m in zip(leaves, marks, strict=True)))
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    updates = jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates)
    return updates, ClipByGlobalNormState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


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


def group_weight_decay(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Per group ``config.optim.weight_decay_<group>`` if set, else ``config.optim.weight_decay`` (radgen_spec §5.1:
  RadGen's new layers decay at 0.001, the pretrained ones at 0.01)."""
  o, groups = config.optim, param_groups(config)
  unknown = sorted(k for k in o if k.startswith("weight_decay_") and k.removeprefix("weight_decay_") not in groups)
  if unknown:
    raise ValueError(f"config.optim has {unknown}, but no such group in config.optim.param_groups ({sorted(groups)}).")
  return {g: float(o.get(f"weight_decay_{g}", o.weight_decay)) for g in groups}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimiser of ``config.optim`` for a ``params`` tree (the Flax ``'params'`` collection)."""
  o = config.optim
  updates = updates_per_epoch(config, steps_per_epoch)
  schedules = learning_rate_schedules(config, updates)
  groups = param_groups(config)
  frozen_epochs = dict(o.get("frozen_epochs", {}) or {})
  unknown = sorted(set(frozen_epochs) - set(groups))
  if unknown:
    raise ValueError(f"config.optim.frozen_epochs names {unknown}, not groups of config.optim.param_groups "
                     f"({sorted(groups)}).")
  kind = o.get("optimizer", "adam")
  if kind not in OPTIMIZERS:
    raise ValueError(f"config.optim.optimizer={kind!r}; choose one of {OPTIMIZERS}.")
  frozen_steps = {g: int(frozen_epochs.get(g, 0)) * updates for g in groups}
  weight_decay = group_weight_decay(config)
  transforms = {g: torch_adam(schedules[g], b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                              weight_decay=weight_decay[g], amsgrad=bool(o.amsgrad), clip_value=float(o.clip_value),
                              frozen_steps=frozen_steps[g], decoupled=kind == "adamw")
                for g in groups}
  frozen = tuple(o.frozen)

  def labels(tree: Any) -> Any:
    return param_labels(tree, groups, frozen)

  tx = optax.multi_transform({**transforms, FROZEN_GROUP: optax.set_to_zero()}, labels)
  clip_norm = float(o.get("clip_norm", 0.0))
  if clip_norm > 0:
    def trainable(step: jax.Array, tree: Any) -> Any:
      return jax.tree.map(lambda g: jnp.asarray(g != FROZEN_GROUP) & (step >= frozen_steps.get(g, 0)), labels(tree))

    tx = optax.chain(clip_by_torch_global_norm(clip_norm, trainable), tx)
  k, scale = accumulate_steps(config), float(o.get("grad_scale", 1.0))
  if k == 1 and scale == 1.0:
    return tx
  return accumulate_gradients(tx, k, steps_per_epoch, scale=scale,
                              apply_remainder=o.get("accumulate_remainder", "drop") == "apply")


def frozen_groups(config: ml_collections.ConfigDict, epoch: int) -> frozenset[str]:
  """The groups that get no update in (0-based) ``epoch``: ``FROZEN_GROUP`` (``optim.frozen``) and every group whose
  ``optim.frozen_epochs`` exceeds ``epoch``."""
  frozen_epochs = dict(config.optim.get("frozen_epochs", {}) or {})
  return frozenset({FROZEN_GROUP} | {g for g, n in frozen_epochs.items() if int(n) > epoch})


def without_gradient(config: ml_collections.ConfigDict, groups: frozenset[str]) -> Callable[[Any], Any]:
  """``params → params`` with ``stop_gradient`` on the leaves of ``groups``: a train step compiled with it spends no
  backward pass on parameters that get no update (radgen_spec §5.2: the frozen text encoder); their gradients are
  zeros, which the optimiser and the global-norm clip ignore anyway, so the updates are the same."""
  param_group_map, frozen = param_groups(config), tuple(config.optim.frozen)

  def apply(params: Any) -> Any:
    labels = param_labels(params, param_group_map, frozen)
    return jax.tree.map(lambda x, g: jax.lax.stop_gradient(x) if g in groups else x, params, labels)
  return apply


def accumulate_steps(config: ml_collections.ConfigDict) -> int:
  k = int(config.optim.get("accumulate_steps", 1))
  if k < 1:
    raise ValueError(f"config.optim.accumulate_steps={k} must be >= 1.")
  return k


def updates_per_epoch(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Optimiser updates per epoch of ``steps_per_epoch`` batches: ``S`` without accumulation, else ``S // k``
  (remainder dropped) or ``ceil(S / k)`` (applied)."""
  k = accumulate_steps(config)
  if k == 1:
    return steps_per_epoch
  remainder = config.optim.get("accumulate_remainder", "drop")
  if remainder not in ACCUMULATE_REMAINDERS:
    raise ValueError(f"config.optim.accumulate_remainder={remainder!r}; choose one of {ACCUMULATE_REMAINDERS}.")
  n = steps_per_epoch // k if remainder == "drop" else -(-steps_per_epoch // k)
  if n == 0:
    raise ValueError(f"An epoch of {steps_per_epoch} batches makes no optimiser update with "
                     f"config.optim.accumulate_steps={k} (its last {steps_per_epoch} batches are dropped).")
  return n


def update_count(config: ml_collections.ConfigDict, steps_per_epoch: int, step: int) -> int:
  """Optimiser updates made by the first ``step`` train steps (batches)."""
  k = accumulate_steps(config)
  if k == 1:
    return step
  epochs, position = divmod(int(step), steps_per_epoch)
  return epochs * updates_per_epoch(config, steps_per_epoch) + position // k


class AccumulateState(NamedTuple):
  step: jax.Array     # batches seen
  sum: Any            # the scaled gradient sum of the pending batches of this epoch
  inner: optax.OptState


def accumulate_gradients(inner: optax.GradientTransformation, every: int, steps_per_epoch: int, *,
                         scale: float = 1.0, apply_remainder: bool = False) -> optax.GradientTransformation:
  """``inner`` applied to ``scale/every · Σ g`` over the batches of each group of ``every`` batches of an epoch
  (the group of batch ``p`` of the epoch is ``p // every``); zero updates between, ``inner``'s state untouched. The
  sum restarts at every epoch's first batch, so an epoch's last ``S mod every`` batches are dropped — or, with
  ``apply_remainder``, applied at the epoch's last batch."""
  def init_fn(params):
    return AccumulateState(step=jnp.zeros([], jnp.int32), sum=jax.tree.map(jnp.zeros_like, params),
                           inner=inner.init(params))

  def update_fn(updates, state, params=None):
    position = state.step % steps_per_epoch
    total = jax.tree.map(lambda a, g: jnp.where(position == 0, 0.0, a) + g * (scale / every), state.sum, updates)
    apply = (position + 1) % every == 0
    if apply_remainder:
      apply = apply | (position == steps_per_epoch - 1)
    new_updates, new_inner = inner.update(total, state.inner, params)
    out = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new_inner, state.inner)
    total = jax.tree.map(lambda t: jnp.where(apply, jnp.zeros_like(t), t), total)
    return out, AccumulateState(step=optax.safe_int32_increment(state.step), sum=total, inner=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
