"""The one module that talks to Orbax.

A checkpoint of step S lives in `WORKDIR/checkpoints/S/` with three items:
  state   the whole TrainState (online / target params, BN statistics, optimiser, queues and
          pointers, step, RNG), saved from global arrays by every process;
  data    the grain iterator state of each process (so a resumed run sees the same batches);
  config  the run's config as JSON (what `linear_eval` rebuilds the model from).
Saves are asynchronous; restore takes abstract targets that carry *this* run's shardings, so a
checkpoint written on 8 devices restores on 1 (and vice versa).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from etils import epath
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

# Orbax writes a replicated array "replica-parallel": one slice per replica, each slice a
# dispatched device op. For a ResNet state (hundreds of small replicated arrays, 8 replicas)
# that costs seconds per save on a CPU host (5.5 s of a 6 s save in the tests) and buys
# nothing for arrays this small: only slices of at least 1 MiB are worth splitting. The
# handler is otherwise Orbax's default; replaced quietly (no log line on every start).
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20,
                                              array_metadata_store=array_metadata_store.Store()),
    override=True, ignore_warnings=True)


def _grain_args():
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; WORKDIR may be local or a URL such as gs://bucket/run (TPU pods)."""
  base = workdir if "://" in str(workdir) else os.path.abspath(workdir)
  return str(epath.Path(base) / "checkpoints")


def manager(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  save_args, restore_args, handler = _grain_args()
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("data", save_args, handler)
  registry.add("data", restore_args, handler)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, handler_registry=registry)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, config,
         force: bool = False) -> bool:
  """Starts an asynchronous save of (state, iterator, config) at `step`."""
  args = {"state": ocp.args.StandardSave(state),
          "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort()))}
  if data_iterator is not None:
    args["data"] = _grain_args()[0](data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings` (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores the state onto the shardings in `abstract_state`, and the iterator in place."""
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    args["data"] = _grain_args()[1](data_iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**args))
  return restored["state"]


def read_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  path = epath.Path(checkpoint_dir(workdir)) / str(step) / "config" / "metadata"
  if not path.exists():
    raise FileNotFoundError(f"no saved config at {path}")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


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

  The target is dropped; the online heads come along in `heads` (for an evaluation that reads
  a head's features, e.g. `propagate`). Works on any device count: the whole state is
  restored replicated on this process' devices, then the backbone is taken to host memory.
  """
  # Imported here: step.py pulls in the model and losses, which the checkpoint layer itself
  # does not need for saving.
  from cacl_jax import optim, parallel, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top

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
  model = model_from_config(config.model)
  tx, _ = optim.make_optimizer(config)
  mesh = parallel.make_mesh(jax.local_device_count()) if jax.process_count() == 1 else parallel.make_mesh()
  shapes = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, 0))
  rep = parallel.replicated(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)
  state = restore(mngr, step, target)
  mngr.close()
  host = lambda t: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), t)
  return Pretrained(params=host(state.params["backbone"]), batch_stats=host(state.batch_stats["backbone"]),
                    step=step, path=str(epath.Path(checkpoint_dir(pretrain_workdir)) / str(step)),
                    config=config,
                    heads=host({k: v for k, v in state.params.items() if k != "backbone"}))
