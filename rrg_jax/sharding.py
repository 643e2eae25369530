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


def initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize()`` (arguments from the environment) for multi-process launches.

  Returns whether it initialised. Must run before the first device query.
  """
  if not should_initialize_distributed():
    return False
  jax.distributed.initialize()
  return True


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
