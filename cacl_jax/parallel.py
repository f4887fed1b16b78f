"""Mesh, shardings, multi-host start-up, and host batch → global array.

One 1-D mesh axis 'data' over every device of every process. The batch is sharded along it,
the negative queues along K, everything else is replicated.
"""
from __future__ import annotations

import glob
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-host JAX once.

  On Cloud TPU pods `jax.distributed.initialize()` finds its peers by itself (call with no
  arguments and TPU env); elsewhere pass the coordinator `HOST:PORT`, the number of processes
  and this process' id. A single process without a coordinator does nothing.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _on_tpu_pod():
    jax.distributed.initialize()


def _on_tpu_pod() -> bool:
  """A Cloud TPU VM: TPU device files (/dev/accel* up to v4, /dev/vfio/N from v5) or the pod
  variables GKE / multislice set. jax.distributed.initialize() then reads the pod's layout
  from the TPU metadata server (one host is a 1-process 'pod')."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
              or os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (default: all)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch / queue) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(f"batch_size {global_batch} is not divisible by the {n} devices / "
                     f"{jax.process_count()} processes of this run")


def host_to_global(mesh: Mesh, host_batch):
  """This process' slice of the batch (numpy, leading axis) → global arrays sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      host_batch)


def to_host(tree):
  """Fully-addressable or replicated global arrays → numpy (for logging and figures)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
