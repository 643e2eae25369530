"""Device mesh and shardings: pure data parallelism over one mesh axis ``"data"`` (no pmap).

The batch is split along its first dimension (``P('data')``); parameters, batch statistics and optimiser state
are replicated (``P()``). The same code runs on one CPU, one GPU, a multi-GPU host and a TPU pod slice.

Multi-host launch (``initialize_distributed`` is called by ``rrg_jax.train`` before anything touches a device):

* TPU pod slice — run the same command on every host; JAX discovers the topology itself::

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
      "cd rrg_jax && python -m rrg_jax.train --config=configs/camanet.py:mimic_cxr --workdir=gs://BUCKET/run"

* GPU clusters / anything else — set on every process::

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i python -m rrg_jax.train ...

  (SLURM and Open MPI launches are detected by JAX when ``JAX_COORDINATOR_ADDRESS`` is unset but
  ``RRG_JAX_DISTRIBUTED=1`` is.)

Each process feeds its local share of the global batch; ``input_pipeline.loader.to_global_batch`` assembles
the global ``jax.Array`` with ``batch_sharding(mesh)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def should_initialize_distributed(environ: dict[str, str] | None = None) -> bool:
  """True when the process environment says this is one process of a multi-process launch."""
  env = os.environ if environ is None else environ
  if env.get("RRG_JAX_DISTRIBUTED", "") in ("1", "true", "True"):
    return True
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def _env_int(env: dict[str, str], key: str, *, positive: bool = False) -> int | None:
  """The integer environment variable ``key`` (None when unset or empty); a bad value is a ValueError naming it."""
  raw = env.get(key, "")
  if raw == "":
    return None
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or (positive and value < 1):
    raise ValueError(f"environment variable {key}={raw!r} is not a{' positive' if positive else 'n'} integer.")
  return value


def distributed_arguments(environ: dict[str, str] | None = None) -> dict[str, int]:
  """``jax.distributed.initialize`` keyword arguments from the environment.

  ``JAX_COORDINATOR_ADDRESS`` JAX reads itself; ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (which JAX reads only
  through its SLURM / Open MPI / TPU detection) are passed on here. ``RRG_JAX_DISTRIBUTED_TIMEOUT_S`` (default 300)
  bounds every wait: the start-up rendezvous, the heartbeat that declares a silent peer dead, and the shutdown
  barrier, so a process whose peer died fails instead of hanging.
  """
  env = os.environ if environ is None else environ
  kwargs = {name: value for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"))
            if (value := _env_int(env, key)) is not None}
  seconds = _env_int(env, "RRG_JAX_DISTRIBUTED_TIMEOUT_S")
  seconds = 300 if seconds is None else seconds
  kwargs.update(initialization_timeout=seconds, heartbeat_timeout_seconds=seconds, shutdown_timeout_seconds=seconds)
  return kwargs


def initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize`` (arguments from the environment, ``distributed_arguments``) for
  multi-process launches; CPU processes exchange collectives through Gloo.

  Returns whether it initialised. Must run before the first device query.
  """
  if not should_initialize_distributed():
    return False
  jax.distributed.initialize(**distributed_arguments())
  return True


CPU_DEVICES_ENV = "RRG_JAX_CPU_DEVICES"


def cpu_device_count(batch_size: int | None = None, environ: dict[str, str] | None = None,
                     cores: int | None = None) -> int | None:
  """How many data-parallel devices a CPU host should expose, or None to leave JAX's setting alone.

  A CPU host runs every core as one device by default, so XLA:CPU works on the batch shards in parallel
  (BatchNorm statistics still reduce over the global batch: the same math). With ``batch_size``, the count is the
  largest divisor of this process's share of it (``JAX_NUM_PROCESSES``) not above the core count, so the batch
  still splits evenly. ``RRG_JAX_CPU_DEVICES=N`` asks for N; JAX's own settings
  (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, ``JAX_NUM_CPU_DEVICES``) win over both.
  """
  env = os.environ if environ is None else environ
  if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
    return None
  asked = _env_int(env, CPU_DEVICES_ENV, positive=True)
  if asked is not None:
    return asked
  n = cores or len(os.sched_getaffinity(0))
  if batch_size:  # this process's share of the global batch
    return devices_for_batch(batch_size // (_env_int(env, "JAX_NUM_PROCESSES") or 1), n)
  return n


def devices_for_batch(batch_size: int, available: int) -> int:
  """The largest device count up to ``available`` that splits ``batch_size`` evenly."""
  return max(d for d in range(1, available + 1) if batch_size % d == 0)


def use_cpu_cores(batch_size: int | None = None) -> int | None:
  """Applies ``cpu_device_count`` (``jax_num_cpu_devices``); call before the first device query. Returns the
  count set, or None when JAX's own setting stands."""
  n = cpu_device_count(batch_size)
  if n is not None:
    jax.config.update("jax_num_cpu_devices", n)
  return n


def create_mesh(mesh_shape: Sequence[int] = (-1,), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D ``("data",)`` mesh; ``mesh_shape = (n,)`` with ``-1`` meaning all devices.

  With ``n`` smaller than the device count the first ``n`` devices are used (single-process only).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != 1:
    raise ValueError(f"config.mesh_shape must have one entry (axis {DATA_AXIS!r}), got {shape}.")
  n = len(devices) if shape[0] == -1 else shape[0]
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.mesh_shape={shape} asks for {n} devices but {len(devices)} are available.")
  if n < len(devices) and jax.process_count() > 1:
    raise ValueError(f"config.mesh_shape={shape}: a multi-host mesh must span all {len(devices)} devices.")
  return Mesh(np.asarray(devices[:n]).reshape(n), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``"data"``, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh (parameters, optimiser state, scalars)."""
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises unless the global batch divides evenly over the data axis and the processes."""
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % n or global_batch_size % jax.process_count():
    raise ValueError(
        f"config.train.batch_size={global_batch_size} must be divisible by the {n} devices of the mesh "
        f"and the {jax.process_count()} processes.")


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array split over its leading axis (``batch_sharding``), in row order, as
  numpy: the rows ``input_pipeline.loader.to_global_batch`` took from this process (each row once, whatever the
  replication of its shard)."""
  shards = {s.index[0].indices(x.shape[0])[:2]: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
