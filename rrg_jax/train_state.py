"""Train state and the jitted, sharded train step (one ``jax.jit``, donated state).

``TrainState`` is a pytree of device arrays only, so Orbax saves and restores it as one item. The dropout key of
step ``s`` is ``fold_in(base_key, s)``: a resumed run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rrg_jax import sharding

# The batch fields that enter the jitted step (host-only fields such as ``ids`` never do).
TRAIN_FIELDS = ("images", "targets", "masks", "labels")

# loss_fn(model_outputs, batch) -> (scalar loss, {part name: scalar}).
LossFn = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a bitwise-exact resume needs besides the data iterator.

  step: int32 () optimizer steps done; rng: uint32 key data of the base dropout key.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  def variables(self) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` for ``model.apply`` / inference export."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def dummy_inputs(config, batch_size: int = 1) -> dict[str, jnp.ndarray]:
  """Zero inputs with the configured shapes: images (B, V, H, W, 3), targets/masks (B, T)."""
  d = config.data
  return {"images": jnp.zeros((batch_size, d.num_views, d.image_size, d.image_size, 3), jnp.float32),
          "targets": jnp.zeros((batch_size, d.max_seq_length), jnp.int32),
          "masks": jnp.zeros((batch_size, d.max_seq_length), jnp.float32)}


def init_variables(model: nn.Module, config, key: jax.Array) -> dict[str, Any]:
  """``model.init`` on dummy inputs (train=False); returns ``{'params', 'batch_stats'}``."""
  x = dummy_inputs(config)
  params_key, dropout_key = jax.random.split(key)
  variables = model.init({"params": params_key, "dropout": dropout_key}, x["images"], x["targets"],
                         x["masks"], train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                       dropout_key: jax.Array) -> TrainState:
  """Step 0 state: given variables, fresh optimiser state, the base dropout key (typed or raw)."""
  key_data = dropout_key if dropout_key.dtype == jnp.uint32 else jax.random.key_data(dropout_key)
  return TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    rng=key_data)


def state_sharding(state: TrainState, mesh: Mesh) -> TrainState:
  """Replicated sharding for every leaf of the state (pure data parallelism)."""
  return jax.tree.map(lambda _: sharding.replicated(mesh), state)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def training_loss(model: nn.Module, loss_fn: LossFn, params, batch_stats, batch: Mapping[str, jax.Array],
                  key: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
  """The train-mode loss of ``params`` (dropout from ``key``, BatchNorm batch statistics) → (loss, (loss parts,
  updated batch_stats)). Model outputs are cast to float32 before ``loss_fn``, so bf16 compute still gets an fp32
  loss."""
  out, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, batch["images"], batch["targets"],
                              batch["masks"], train=True, rngs={"dropout": key}, mutable=["batch_stats"])
  out = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, out)
  loss, parts = loss_fn(out, batch)
  return loss, (parts, new_vars.get("batch_stats", batch_stats))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn: LossFn
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """``train_step(state, batch) -> (new_state, metrics)`` (not jitted; see ``jit_train_step``).

  metrics: ``loss`` and the loss parts from ``loss_fn``, plus ``finite`` (bool: loss and all gradients finite).
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(
        lambda p: training_loss(model, loss_fn, p, state.batch_stats, batch, key), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, **parts, "finite": jnp.isfinite(loss) & _all_finite(grads)}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state: TrainState, mesh: Mesh):
  """One ``jax.jit`` with donated state: state replicated, batch split over ``"data"``, metrics replicated."""
  state_sh = state_sharding(state, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in TRAIN_FIELDS}
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def train_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The jit-side fields of a batch (drops host-only extras such as ``ids``)."""
  missing = [k for k in TRAIN_FIELDS if k not in batch]
  if missing:
    raise KeyError(f"Train batch lacks fields {missing}; has {sorted(batch)}.")
  return {k: batch[k] for k in TRAIN_FIELDS}
