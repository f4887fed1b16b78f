"""The one module that talks to Orbax (its public API only: `orbax.checkpoint` as `ocp`).

A checkpoint of step S lives in `WORKDIR/checkpoints/S/` with three items:
  state   the whole TrainState (online / target params, BN statistics, optimiser, queues and
          pointers, step, skipped_steps, RNG), saved from global arrays by every process;
  config  the run's config as JSON (what a resume compares with and `linear_eval` rebuilds the
          model from);
  timing  JSON {first_start, productive_s}: when the run first started and how much step time
          it has kept, so goodput accumulates across restarts (absent in older checkpoints).
No data-iterator state: the global batch of step t is a function of (seed, t) alone
(`data/pipeline.py`), so the step *is* the data position, on any number of processes.
Saves are asynchronous; restore takes abstract targets that carry *this* run's shardings, so a
checkpoint written on 8 devices restores on 1 (and vice versa). WORKDIR goes through
`paths.resolve` (local, file://, gs://).

Faults: `save` refuses a state with a NaN or inf anywhere (`NonFiniteState`), so every
checkpoint is one a run can continue from. `restore_newest` never silently starts over:

* damage (a missing, truncated or undecodable file: `is_damage`) moves the checkpoint aside to
  `WORKDIR/checkpoints_damaged/S` (never deleted) and the next newest is tried;
* any other error (a GCS or file-system hiccup, a timeout, out of memory) is transient until
  shown otherwise: retried with backoff, then the run stops (`StorageUnavailable`, one line),
  moving nothing;
* process 0 decides which step is tried and all processes agree on each outcome, so every
  process restores the same step or all stop;
* when checkpoints exist (or were moved aside) and none restores, the run refuses to start at
  step 0 (`NothingRestores`, one line naming what it tried) unless the caller allows a fresh
  start (`--config.allow_fresh_start=True`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from cacl_jax.runtime import parallel, paths

# Orbax writes a replicated array "replica-parallel": one slice per replica, each slice a
# dispatched device op. For a ResNet state (hundreds of small replicated arrays, 8 replicas)
# that costs seconds per save on a CPU host (5.5 s of a 6 s save in the tests) and buys
# nothing for arrays this small: only slices of at least 1 MiB are worth splitting. Registered
# through the public `ocp.type_handlers`; what that costs: Orbax's default handler also keeps
# an array-metadata store, which only typed PRNG-key arrays need (the state holds its key as
# uint32 key data), so checkpoints lack `state/array_metadatas/` and read the same.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20),
    override=True)



class _DamageNoise(logging.Filter):
  """Orbax logs an ERROR for every read of a metadata file that does not parse (dozens per
  damaged checkpoint, from its threads); `restore_newest` names the damage once, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to json parse")


logging.getLogger("absl").addFilter(_DamageNoise())

# Seconds between the attempts at reading a checkpoint that failed with an error that is not
# damage: 6 attempts over about a minute, then the run stops with the checkpoint in place.
RETRY_DELAYS_S = (2.0, 4.0, 8.0, 16.0, 32.0)
# What a missing, truncated or undecodable file looks like from Orbax and tensorstore: a
# status code of tensorstore (a truncated chunk: OUT_OF_RANGE; garbage: FAILED_PRECONDITION
# from the decompressor; a missing file: NOT_FOUND) or a JSON file that does not parse.
_DAMAGE_CODES = ("NOT_FOUND:", "OUT_OF_RANGE:", "DATA_LOSS:", "FAILED_PRECONDITION:")
_DAMAGE_TYPES = (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError)


class RestoreError(RuntimeError):
  """A restore that must stop the run (one line); nothing is trained or written."""


class StorageUnavailable(RestoreError):
  """A checkpoint could not be read for a reason that is not damage, after every retry."""


class NothingRestores(RestoreError):
  """Checkpoints exist (or were moved aside) and none restores; no fresh start allowed."""


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


def save(mngr: ocp.CheckpointManager, step: int, state, config, force: bool = False,
         timing: dict[str, float] | None = None) -> bool:
  """Starts an asynchronous save of (state, config[, timing]) at `step`; raises NonFiniteState
  (and saves nothing) if the state holds a NaN or inf."""
  if not bool(all_finite(state)):
    raise NonFiniteState(f"the state after step {step} holds NaN or inf values")
  args = {"state": ocp.args.StandardSave(state),
          "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort()))}
  if timing is not None:
    args["timing"] = ocp.args.JsonSave(timing)
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings` (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores the state onto the shardings in `abstract_state`. A TrainState checkpoint from
  before `skipped_steps` existed restores with the count at 0."""
  def read(target):
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  counter = getattr(abstract_state, "skipped_steps", None)
  try:
    state = read(abstract_state)
  except ValueError as e:
    if counter is None or "skipped_steps" not in str(e) or "do not match" not in str(e):
      raise
    state = read(abstract_state.replace(skipped_steps=None))
  if counter is not None and state.skipped_steps is None:
    state = state.replace(skipped_steps=jax.device_put(np.zeros((), counter.dtype), counter.sharding))
  return state


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


def is_damage(error: BaseException) -> bool:
  """Whether `error` (or an error it was raised from) says a file is missing, truncated or
  undecodable. Anything else (a timeout, a GCS 503, out of memory, an error never seen) is not
  damage: moving a good checkpoint aside for it is how a run silently starts over."""
  while error is not None:
    if isinstance(error, _DAMAGE_TYPES) or str(error).lstrip().startswith(_DAMAGE_CODES):
      return True
    error = error.__cause__ or error.__context__
  return False


# Outcomes of one attempt at a step, ordered: the processes agree on the largest.
_OK, _DAMAGED, _UNREADABLE = 0, 1, 2


def _agree(outcome: int) -> int:
  """The worst outcome over all processes (all of them call this at the same point)."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _newest_step(mngr: ocp.CheckpointManager) -> int | None:
  """The newest step, as process 0 sees it: every process then tries that one."""
  steps = mngr.all_steps()
  newest = max(steps) if steps else -1
  if jax.process_count() > 1:
    newest = int(multihost_utils.broadcast_one_to_all(np.int32(newest)))
  return None if newest < 0 else newest


def damaged_dir(workdir: str) -> epath.Path:
  return paths.resolve(workdir) / "checkpoints_damaged"


def restore_newest(mngr: ocp.CheckpointManager, workdir: str, abstract_state,
                   check_config: Callable[[ml_collections.ConfigDict, str], None],
                   allow_fresh_start: bool = False,
                   retry_delays_s: Sequence[float] = RETRY_DELAYS_S):
  """The newest checkpoint that restores: (step, state), or (None, None) for a workdir with
  no checkpoint (or, with `allow_fresh_start`, none that restores).

  For each step, newest first (process 0's listing): read its config and hand it to
  `check_config(saved, where)` (whose errors propagate: a changed config is the user's to fix),
  then restore the state. Damage (`is_damage`) on any process moves the checkpoint aside
  (`quarantine`, one line) and the next newest is tried; any other error is retried after each
  of `retry_delays_s` and then raises StorageUnavailable, moving nothing. Raises NothingRestores
  when checkpoints exist, or were moved aside now or before, and none restores, unless
  `allow_fresh_start`.
  """
  moved = []
  while (step := _newest_step(mngr)) is not None:
    where = f"{checkpoint_dir(workdir)}/{step}"
    for attempt, delay in enumerate((*retry_delays_s, None)):
      outcome, state, error = _attempt(mngr, workdir, step, abstract_state, check_config, where)
      outcome = _agree(outcome)
      if outcome == _OK:
        return step, state
      if outcome == _DAMAGED:
        break
      if delay is None:
        raise StorageUnavailable(
            f"checkpoint {where} could not be read after {attempt + 1} attempts over "
            f"{sum(retry_delays_s):.0f} s ({_first_line(error) if error else 'another process failed'}), "
            "and this is not damage: nothing was moved; the run stops. Rerun the same command "
            "when the storage answers")
      print(f"checkpoint {where} could not be read ({_first_line(error) if error else 'on another process'}); "
            f"retrying in {delay:g} s (attempt {attempt + 2} of {len(retry_delays_s) + 1})", flush=True)
      time.sleep(delay)
    target = quarantine(workdir, step)
    moved.append(step)
    print(f"checkpoint {where} does not restore ({_first_line(error) if error else 'damaged on another process'}): "
          f"moved to {target}; falling back to the one before", flush=True)
    mngr.reload()
  damaged = damaged_dir(workdir)
  earlier = sorted((p.name for p in damaged.iterdir()), key=_step_order) if damaged.is_dir() else []
  if earlier and not allow_fresh_start:
    now = f"now moved aside: {', '.join(map(str, moved))}; " if moved else ""
    raise NothingRestores(
        f"{checkpoint_dir(workdir)} holds no checkpoint that restores ({now}in {damaged}: "
        f"{', '.join(earlier)}): refusing to start over at step 0 in a workdir that holds a "
        "run; repair or restore a checkpoint from a copy, pass another --workdir, or start "
        "from step 0 here with --config.allow_fresh_start=True")
  return None, None


def _step_order(name: str) -> tuple:
  """'12' after '9'; '12.1' (a second damaged copy of 12) after '12'."""
  return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))


def _attempt(mngr, workdir, step, abstract_state, check_config, where):
  """One try at `step` on this process: (outcome, state or None, error or None)."""
  try:
    saved = read_config(workdir, step)
  except Exception as e:  # pylint: disable=broad-exception-caught
    return (_DAMAGED if is_damage(e) else _UNREADABLE), None, e
  check_config(saved, where)
  try:
    return _OK, restore(mngr, step, abstract_state), None
  except Exception as e:  # pylint: disable=broad-exception-caught
    if is_damage(e):
      return _DAMAGED, None, e
    if not _state_tree_reads(workdir, step):
      return _DAMAGED, None, FileNotFoundError(f"no state metadata that reads ({_first_line(e)})")
    return _UNREADABLE, None, e


def _state_tree_reads(workdir: str, step: int) -> bool:
  """Whether Orbax finds the tree of checkpoint `step`'s state. Without its metadata file the
  state restores into a tree of the wrong structure ("pytree structure error"), which says
  nothing of a missing file; Orbax's metadata then has no tree. An error that is not damage
  while reading it counts as a tree that reads (the restore is retried)."""
  try:
    with ocp.StandardCheckpointer() as reader:
      return reader.metadata(epath.Path(checkpoint_dir(workdir)) / str(step) / "state").item_metadata is not None
  except Exception as e:  # pylint: disable=broad-exception-caught
    return not is_damage(e)


def newest_config(workdir: str) -> tuple[str, ml_collections.ConfigDict] | None:
  """(where, saved config) of the newest checkpoint whose config reads, before any manager is
  built (so a resume can be refused before any work and any log line); None for a fresh
  workdir."""
  root = epath.Path(checkpoint_dir(workdir))
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) \
      if root.is_dir() else []
  for step in steps:
    try:
      return f"{root}/{step}", read_config(workdir, step)
    except Exception:  # pylint: disable=broad-exception-caught
      continue   # damaged or unreadable: restore_newest decides what it is
  return None


def _first_line(error: BaseException) -> str:
  """The first line of the error a failure started from (Orbax wraps tensorstore's, whose
  message names the file and what is wrong with it)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().splitlines()
  line = text[0].split(" See full TensorStore details")[0] if text else ""
  return f"{type(error).__name__}: {line}"[:300]


def read_item(workdir: str, step: int, item: str) -> Any:
  """The JSON item `item` ('config', 'timing') of checkpoint `step`, through Orbax's JSON
  handler (FileNotFoundError if the checkpoint has no such item)."""
  return ocp.JsonCheckpointHandler().restore(epath.Path(checkpoint_dir(workdir)) / str(step) / item)


def read_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  saved = read_item(workdir, step, "config")
  if not isinstance(saved, dict):
    raise json.JSONDecodeError(f"checkpoint {step}'s config item is not a JSON object", "", 0)
  return ml_collections.ConfigDict(_tuples(saved))


def read_timing(workdir: str, step: int) -> dict[str, float] | None:
  """Checkpoint `step`'s timing item, or None (a checkpoint from before it existed, or one
  whose timing does not read: goodput then restarts its count, nothing else depends on it)."""
  try:
    timing = read_item(workdir, step, "timing")
  except Exception:  # pylint: disable=broad-exception-caught
    return None
  return timing if isinstance(timing, dict) else None


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
