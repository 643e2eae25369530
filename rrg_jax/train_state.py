"""Train state and the jitted, sharded train step (one ``jax.jit``, donated state).

``TrainState`` is a pytree of device arrays only, so Orbax saves and restores it as one item. The dropout key of
step ``s`` is ``fold_in(base_key, s)``: a resumed run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rrg_jax import sharding
from rrg_jax.models.system import System


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


def training_loss(system: System, params, batch_stats, batch: Mapping[str, jax.Array], key: jax.Array
                  ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
  """The train-mode loss of ``params`` (dropout from ``key``, BatchNorm batch statistics) → (loss, (loss parts,
  updated batch_stats)). Model outputs are cast to float32 before ``system.loss``, so bf16 compute still gets an
  fp32 loss."""
  out, new_vars = system.forward({"params": params, "batch_stats": batch_stats}, batch, train=True,
                                 rngs={"dropout": key}, mutable=["batch_stats"])
  out = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, out)
  loss, parts = system.loss(out, batch)
  return loss, (parts, new_vars.get("batch_stats", batch_stats))


def round_trip_key(state: TrainState) -> jax.Array:
  """The random key of ``System.round_trip`` at this step (a stream apart from the train step's dropout)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1)


def make_train_step(system: System, tx: optax.GradientTransformation,
                    without_gradient: Callable[[Any], Any] | None = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """``train_step(state, batch) -> (new_state, metrics)`` (not jitted; see ``jit_train_step``).

  metrics: ``loss`` and the loss parts of ``system.loss``, plus ``finite`` (bool: loss and all gradients finite).
  ``without_gradient`` (``optim.without_gradient``): params → params with ``stop_gradient`` on the leaves that get
  no update this epoch, so no backward pass is spent on them.
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    cut = without_gradient or (lambda p: p)

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(
        lambda p: training_loss(system, cut(p), state.batch_stats, batch, key), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, **parts, "finite": jnp.isfinite(loss) & _all_finite(grads)}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state: TrainState, mesh: Mesh, fields: Iterable[str]):
  """One ``jax.jit`` with donated state: state replicated, the batch ``fields`` split over ``"data"``, metrics
  replicated."""
  state_sh = state_sharding(state, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in fields}
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
