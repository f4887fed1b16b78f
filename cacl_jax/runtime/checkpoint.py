"""The one module that talks to Orbax.

A checkpoint of step S lives in `WORKDIR/checkpoints/S/` with two items:
  state   the whole TrainState (online / target params, BN statistics, optimiser, queues and
          pointers, step, RNG), saved from global arrays by every process;
  config  the run's config as JSON (what a resume compares with and `linear_eval` rebuilds the
          model from).
No data-iterator state: the global batch of step t is a function of (seed, t) alone
(`data/pipeline.py`), so the step *is* the data position, on any number of processes.
Saves are asynchronous; restore takes abstract targets that carry *this* run's shardings, so a
checkpoint written on 8 devices restores on 1 (and vice versa). WORKDIR goes through
`paths.resolve` (local, file://, gs://).

Faults: `save` refuses a state with a NaN or inf anywhere (`NonFiniteState`), so every
checkpoint is one a run can continue from; `restore_newest` falls back over checkpoints that do
not restore (a truncated or missing file) and moves each such one aside to
`WORKDIR/checkpoints_damaged/S` (never deletes it).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from cacl_jax.runtime import parallel, paths

# Orbax writes a replicated array "replica-parallel": one slice per replica, each slice a
# dispatched device op. For a ResNet state (hundreds of small replicated arrays, 8 replicas)
# that costs seconds per save on a CPU host (5.5 s of a 6 s save in the tests) and buys
# nothing for arrays this small: only slices of at least 1 MiB are worth splitting. The
# handler is otherwise Orbax's default; replaced quietly (no log line on every start).
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20,
                                              array_metadata_store=array_metadata_store.Store()),
    override=True, ignore_warnings=True)


class NonFiniteState(ValueError):
  """A state with a NaN or inf somewhere: never saved."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; WORKDIR may be local, file:// or a URL such as gs://bucket/run."""
  return str(paths.resolve(workdir) / "checkpoints")


def manager(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


@jax.jit
def all_finite(tree) -> jax.Array:
  """bool []: no NaN or inf in any floating-point leaf (a collective over global arrays)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def save(mngr: ocp.CheckpointManager, step: int, state, config, force: bool = False) -> bool:
  """Starts an asynchronous save of (state, config) at `step`; raises NonFiniteState (and
  saves nothing) if the state holds a NaN or inf."""
  if not bool(all_finite(state)):
    raise NonFiniteState(f"the state after step {step} holds NaN or inf values")
  args = {"state": ocp.args.StandardSave(state),
          "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort()))}
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings` (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores the state onto the shardings in `abstract_state`."""
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def quarantine(workdir: str, step: int) -> str:
  """Moves checkpoints/S aside to checkpoints_damaged/S (S.1, S.2, ... if taken); returns
  where. Process 0 moves, the others wait for it."""
  source = epath.Path(checkpoint_dir(workdir)) / str(step)
  target = paths.resolve(workdir) / "checkpoints_damaged" / str(step)
  n = 0
  while target.exists():
    n += 1
    target = target.parent / f"{step}.{n}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
  return str(target)


def restore_newest(mngr: ocp.CheckpointManager, workdir: str, abstract_state,
                   check_config: Callable[[ml_collections.ConfigDict, str], None]):
  """The newest checkpoint that restores: (step, state), or (None, None) if there is none.

  For each step, newest first: read its config and hand it to `check_config(saved, where)`
  (whose errors propagate: a changed config is the user's to fix, not damage), then restore
  the state. A checkpoint whose config or state cannot be read is moved aside (`quarantine`),
  said in one line, and the next newest is tried.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    where = f"{checkpoint_dir(workdir)}/{step}"
    try:
      saved = read_config(workdir, step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      damage = e
    else:
      check_config(saved, where)
      try:
        return step, restore(mngr, step, abstract_state)
      except Exception as e:  # pylint: disable=broad-exception-caught
        damage = e   # Orbax and tensorstore raise many types for a truncated or missing file
    moved = quarantine(workdir, step)
    print(f"checkpoint {where} does not restore ({_first_line(damage)}): moved to {moved}; "
          "falling back to the one before", flush=True)
    mngr.reload()
  return None, None


def newest_config(workdir: str) -> tuple[str, ml_collections.ConfigDict] | None:
  """(where, saved config) of the newest checkpoint whose config reads, without Orbax (so a
  resume can be refused before any work and any log line); None for a fresh workdir."""
  root = epath.Path(checkpoint_dir(workdir))
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) \
      if root.is_dir() else []
  for step in steps:
    try:
      return f"{root}/{step}", read_config(workdir, step)
    except Exception:  # pylint: disable=broad-exception-caught
      continue   # damaged: restore_newest moves it aside later
  return None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0].split(" See full TensorStore details")[0] if text else ""
  return f"{type(error).__name__}: {line}"[:300]


def read_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  path = epath.Path(checkpoint_dir(workdir)) / str(step) / "config" / "metadata"
  if not path.exists():
    raise FileNotFoundError(f"no saved config at {path}")
  saved = json.loads(path.read_text())
  if not isinstance(saved, dict):
    raise ValueError(f"{path} does not hold a config")
  return ml_collections.ConfigDict(_tuples(saved))


def _tuples(tree):
  """JSON turns config tuples into lists; turn short numeric lists back (crop_scale, ratio)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list) and all(isinstance(x, (int, float)) for x in tree):
    return tuple(tree)
  return tree


@dataclasses.dataclass
class Pretrained:
  """The online backbone of a pretraining checkpoint, as host numpy trees."""
  params: Any
  batch_stats: Any
  step: int
  path: str
  config: ml_collections.ConfigDict
  heads: Any = None   # the online heads' params {'head_G', 'head_P', 'head_C'} (propagate)


def restore_pretrained(pretrain_workdir: str, step: int | None = None) -> Pretrained:
  """The online backbone's params and BN statistics from `pretrain_workdir` (newest or `step`).

  A partial restore: only the state's `params` and `batch_stats` are read, with the shapes and
  dtypes the checkpoint itself records, so no model, optimiser or train step is built to read a
  backbone (the target, the optimiser state and the queues stay on disk). The online heads come
  along in `heads` (for an evaluation that reads a head's features, e.g. `propagate`). Works on
  any device count: the arrays are restored replicated on this process' devices, then taken to
  host memory.
  """

  if not epath.Path(checkpoint_dir(pretrain_workdir)).is_dir():
    raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(pretrain_workdir)}: "
                            "pass the --workdir of a pretraining run as pretrained")
  mngr = manager(pretrain_workdir, read_only=True)
  available = mngr.all_steps()
  if not available:
    raise FileNotFoundError(f"{checkpoint_dir(pretrain_workdir)} holds no finished checkpoint")
  step = max(available) if step is None else int(step)
  if step not in available:
    raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoint_dir(pretrain_workdir)} "
                            f"(available: {sorted(available)})")
  config = read_config(pretrain_workdir, step)
  mesh = parallel.make_mesh(jax.local_device_count()) if jax.process_count() == 1 else parallel.make_mesh()
  rep = parallel.replicated(mesh)
  state_dir = epath.Path(checkpoint_dir(pretrain_workdir)) / str(step) / "state"
  recorded = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep), recorded[k])
            for k in ("params", "batch_stats")}
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))["state"]
  mngr.close()
  host = lambda t: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), t)
  return Pretrained(params=host(state["params"]["backbone"]),
                    batch_stats=host(state["batch_stats"]["backbone"]),
                    step=step, path=str(epath.Path(checkpoint_dir(pretrain_workdir)) / str(step)),
                    config=config,
                    heads=host({k: v for k, v in state["params"].items() if k != "backbone"}))
