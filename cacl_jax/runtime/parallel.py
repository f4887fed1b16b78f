"""Mesh, shardings, multi-host start-up, host batch → global array, and the stop on SIGTERM.

One 1-D mesh axis 'data' over every device of every process. The batch is sharded along it,
the negative queues along K, everything else is replicated. The processes of a run join each
other from explicit flags or from the cluster's environment (`initialize_distributed`); a loop
asks `StopOnSigterm` after each step whether a preemption wants it to save and stop there.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import mesh_utils, multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


# The variables JAX's own cluster detection reads (jax/_src/clusters/), by environment.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def cluster_environment(environ=None) -> str | None:
  """The multi-process job this process belongs to, as its environment describes it: 'Cloud TPU',
  'SLURM', 'Open MPI', 'Kubernetes', or None (a process on its own).

  The variables are those `jax.distributed.initialize()` reads to find its peers. A job of one
  task is not a cluster: there JAX's detection would also restrict the process to one GPU
  (SLURM_LOCALID), while alone it should keep every GPU of the host. A pod outside an Indexed
  Job (a notebook, a service) is not one either: JAX could not find a job to join.
  """
  env = os.environ if environ is None else environ
  count = lambda key: int(env[key]) if env.get(key, "").isdigit() else 0
  if _on_tpu_pod(env):
    return "Cloud TPU"
  if all(key in env for key in SLURM_VARS) and count("SLURM_NTASKS") > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    return "Kubernetes"
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
  """Starts multi-host JAX once; returns how the processes were joined (None: alone).

  Explicit flags win: `HOST:PORT` of process 0, the number of processes and this process' id,
  with JAX's environment detection off (under srun it would otherwise restrict each process to
  GPU SLURM_LOCALID, wrong for one process per host). Without them, a process whose environment
  describes a cluster (`cluster_environment`: TPU pod, SLURM, Open MPI, Kubernetes) joins it
  through `jax.distributed.initialize()`, which reads the layout from that environment (on
  SLURM: one process per GPU, process i of a node driving its GPU i); otherwise it runs alone.
  """
  flags = (coordinator_address, num_processes, process_id)
  if any(f is not None for f in flags):
    if any(f is None for f in flags):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               cluster_detection_method="deactivate")
    return "flags"
  cluster = cluster_environment()
  if cluster == "Kubernetes" and importlib.util.find_spec("kubernetes") is None:
    raise ValueError("this pod belongs to a Kubernetes Indexed Job, and JAX needs the kubernetes "
                     "package to find its peers: pip install 'jax[k8s]', or pass "
                     "--coordinator_address, --num_processes and --process_id")
  if cluster is not None:
    jax.distributed.initialize()
    logging.info("joined a %s job through jax.distributed: process %d of %d", cluster,
                 jax.process_index(), jax.process_count())
  return cluster


def _on_tpu_pod(env) -> bool:
  """A Cloud TPU VM: TPU device files (/dev/accel* up to v4, /dev/vfio/N from v5) or the pod
  variables GKE / multislice set. jax.distributed.initialize() then reads the pod's layout
  from the TPU metadata server (one host is a 1-process 'pod')."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
              or env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"))


class Preempted(Exception):
  """SIGTERM reached a loop, which saved the step it had reached: the entry exits 0, and the
  same command run again resumes from that step."""


class StopOnSigterm:
  """`with StopOnSigterm() as stop: ... if stop.after(step): save, raise Preempted`.

  Answers, after each step, whether SIGTERM asks the loop to save and stop there, with the
  same answer on every process (the step and the save are collectives): a process alone
  installs a handler that only sets a flag, for the `with` block (the previous handler comes
  back after it); several processes ask JAX's preemption service (started by
  jax.distributed.initialize, which takes SIGTERM itself), which agrees on the step at which
  all of them stop, wherever the signal reached each first. Every process must call `after`
  at every step.
  """

  def __enter__(self) -> "StopOnSigterm":
    self.requested = False
    # Handlers can only be set from the main thread; elsewhere the caller's handler stays.
    self._installed = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._request)
    return self

  def _request(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def after(self, step: int) -> bool:
    if jax.process_count() > 1:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)


def device_order(devices: list) -> np.ndarray:
  """The devices in the order the 'data' axis runs over them: as enumerated on CPUs; on GPUs and
  TPUs the order `mesh_utils.create_device_mesh` computes from the topology (on a TPU slice,
  neighbours on the interconnect's ring next to each other, so that the gradients' all-reduce
  and the queues' all-gather travel between neighbours)."""
  if devices[0].platform == "cpu":
    return np.asarray(devices)
  return mesh_utils.create_device_mesh((len(devices),), devices=devices)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (default: all), in
  `device_order`."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(device_order(devices), (DATA,))


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
