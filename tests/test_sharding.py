"""rrg_jax.sharding: mesh construction, shardings, multi-host detection (4 forced CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrg_jax import sharding


def test_mesh_all_devices_and_subset():
  assert jax.device_count() == 4
  mesh = sharding.create_mesh((-1,))
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 4
  one = sharding.create_mesh((1,))
  assert one.shape["data"] == 1 and list(one.devices.ravel()) == [jax.devices()[0]]


@pytest.mark.parametrize("shape", [(5,), (0,), (2, 2)])
def test_mesh_bad_shape(shape):
  with pytest.raises(ValueError, match="mesh_shape"):
    sharding.create_mesh(shape)


def test_batch_is_split_and_state_replicated():
  mesh = sharding.create_mesh((4,))
  x = jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), sharding.batch_sharding(mesh))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
  assert [s.data.shape for s in shards] == [(2, 3)] * 4
  np.testing.assert_array_equal(np.asarray(shards[1].data), np.arange(6, 12).reshape(2, 3))
  w = jax.device_put(jnp.ones((3,)), sharding.replicated(mesh))
  assert all(s.data.shape == (3,) for s in w.addressable_shards) and len(w.addressable_shards) == 4
  # A jitted reduction over the sharded batch equals the host value.
  assert float(jax.jit(lambda a, b: (a @ b).sum())(x, w)) == float(np.arange(24).sum())


def test_check_batch_size():
  mesh = sharding.create_mesh((4,))
  sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match="divisible"):
    sharding.check_batch_size(6, mesh)


@pytest.mark.parametrize("env,want", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "host0:1234"}, True),
    ({"RRG_JAX_DISTRIBUTED": "1"}, True),
])
def test_should_initialize_distributed(env, want):
  assert sharding.should_initialize_distributed(env) is want


def test_initialize_distributed_single_process_is_noop(monkeypatch):
  for k in ("RRG_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert sharding.initialize_distributed() is False


def test_distributed_arguments_from_the_environment():
  args = sharding.distributed_arguments({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                                         "RRG_JAX_DISTRIBUTED_TIMEOUT_S": "45"})
  assert args == {"num_processes": 2, "process_id": 1, "initialization_timeout": 45,
                  "heartbeat_timeout_seconds": 45, "shutdown_timeout_seconds": 45}
  assert sharding.distributed_arguments({}) == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 300,
                                                "shutdown_timeout_seconds": 300}  # SLURM / MPI / TPU: JAX detects
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
    sharding.distributed_arguments({"JAX_PROCESS_ID": "one"})


def test_cpu_device_count_uses_every_core_unless_told_otherwise():
  assert sharding.cpu_device_count(environ={}, cores=2) == 2
  assert sharding.cpu_device_count(batch_size=16, environ={}, cores=6) == 4  # largest divisor of the batch
  assert sharding.cpu_device_count(batch_size=7, environ={}, cores=6) == 1
  assert sharding.cpu_device_count(environ={"RRG_JAX_CPU_DEVICES": "3"}, cores=2) == 3
  assert sharding.cpu_device_count(environ={"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                            "RRG_JAX_CPU_DEVICES": "3"}, cores=2) is None  # JAX's own flag wins
  with pytest.raises(ValueError, match="RRG_JAX_CPU_DEVICES='0' is not a positive integer"):
    sharding.cpu_device_count(environ={"RRG_JAX_CPU_DEVICES": "0"})
