"""Pretraining: the one thin stateful loop around the pure train step.

Reads top to bottom in sections: validate → mesh → input → model and state → restore →
loop (step, log, figure, checkpoint, SIGTERM) → finish. The loop keeps the devices one step
ahead of the host: batches are placed two steps ahead (`prefetch.py`), and a step's `skipped`
flag is read after the next step is dispatched; a watchdog (`watchdog.py`) ends a run in which
no step completes. Everything numeric lives in
`step.py`, `losses.py`, `queue.py`, `ema.py`; this file only moves data and writes files.

WORKDIR is a local path or a URL (`paths.py`: file://, gs://). Files in it:
  checkpoints/S/      Orbax (state + config + timing); the newest N are kept
  checkpoints_damaged/S/  a damaged checkpoint, moved aside (never deleted; `checkpoint.py`)
  run.lock            the live run writing here (`runlock.py`)
  metrics.jsonl       one JSON object per logged step (`metrics_log.py`; on gs:// the parts in
                      metrics.jsonl.parts/): step, loss, loss_global, loss_pixel, loss_cycle, lr,
                      skipped (this step's update was not applied: `nonfinite.py`), skipped_steps
                      (cumulative), loss_step (only when the losses are an earlier step's: every
                      step of the window was skipped), steps_per_sec, data_wait_s, step_s,
                      checkpoint_s, log_s, goodput, memory (`timing.py`), compile_s (the first
                      record of every start), batch_hash (which data the step saw,
                      `pipeline.batch_hash`), state_hash (which bits the state holds after it,
                      `fingerprint.py`), skipped_pairs, and the diagnostics of `diagnostics.py`
                      (match_true_acc, match_label_acc, cos_within_*, ...)
  profile/            a jax.profiler trace of `profile.num_steps` steps from `profile.start_step`
  events.out.tfevents.*  TensorBoard scalars (tensorboardX, no TensorFlow)
  figures/affinity_S.png  the paper's Fig. 3 for the current networks
  figures/diagnostics.png the diagnostics' curves over the run (redrawn at the end)
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cacl_jax.runtime import (checkpoint, compile_cache, config_diff, fingerprint, metrics_log, parallel,
                              paths, runlock, timing, viz, watchdog)
from cacl_jax.training import diagnostics, grad_cosines, logbook, optim, prefetch, state as state_lib, step as step_lib
from cacl_jax.data import augment, pipeline
from cacl_jax.models.cacl import model_from_config


class UsageError(ValueError):
  """A config, device or data problem found before any work; main prints it as one line."""


class TrainingDiverged(RuntimeError):
  """A logged metric, or the state about to be saved, holds NaN or inf: the run stops; the
  last good checkpoint is kept and named."""


class DataWorkerDied(RuntimeError):
  """A grain worker process died (killed, out of memory): the run stops; it resumes exactly
  from its last checkpoint when restarted."""


class Preempted(Exception):
  """SIGTERM: the step reached was saved. main exits 0 (and skips a chained evaluation)."""


# ---------------------------------------------------------------- validation

def validate(config: ml_collections.ConfigDict, mesh) -> None:
  """Every check that can fail fast, before any data is read or any array is built."""
  parallel.check_batch_size(config.batch_size, mesh)
  step_lib.check_config(config)
  state_lib.check_queue_sharding(config, mesh)
  optim.warmup_steps(config)
  for key in ("total_steps", "checkpoint_every_steps", "log_every_steps"):
    if int(config[key]) <= 0:
      raise ValueError(f"{key} must be positive, got {config[key]}")
  if config.data.name != "synthetic" and not os.path.isdir(config.data.root or ""):
    raise FileNotFoundError(f"data.root={config.data.root!r} is not a directory: prepare the data with "
                            f"`python -m cacl_jax.prepare_data {config.data.name} --src RAW --out DATA` "
                            "and pass --config.data.root=DATA")


# ---------------------------------------------------------------- figures

def make_affinity_probe(model, mesh):
  """jit: online network (running BN statistics) on the first pair of the *global* batch →
  the pair and the three head maps, replicated. Every process calls it (it is a collective
  on a multi-host mesh); process 0 draws the figure."""
  def probe(params, batch_stats, v, v_pos):
    pair = jnp.concatenate([v[:1], v_pos[:1]])
    out = model.apply({"params": params, "batch_stats": batch_stats}, augment.normalize(pair),
                      train=False)
    return pair, {h: out[k] for h, k in zip(step_lib.HEADS, "upc")}
  return jax.jit(probe, out_shardings=parallel.replicated(mesh))


def save_affinity_figure(probe, state, batch, workdir: epath.Path, step: int) -> str | None:
  pair, maps = probe(state.params, state.batch_stats, batch["v"], batch["v_pos"])
  if jax.process_index() != 0:
    return None
  pair, maps = parallel.to_host(pair), parallel.to_host(maps)
  size = pair.shape[1]
  return viz.affinity_figure(pair[0], pair[1], maps, (size // 2, size // 2),
                             os.fspath(workdir / "figures" / f"affinity_{step:07d}.png"))


# ---------------------------------------------------------------- initialisation

def save_diagnostics_figure(workdir: epath.Path) -> None:
  """figures/diagnostics.png from metrics.jsonl (process 0; the workdir may be a URL)."""
  if jax.process_index() != 0:
    return
  records = metrics_log.read(workdir)
  if records:
    viz.diagnostics_figure(records, os.fspath(workdir / "figures" / "diagnostics.png"))


def _init_backbone_from(state: step_lib.TrainState, pretrain_workdir: str, shardings):
  """A fresh run starts θo and θt's backbone (and BN statistics) from another pretraining
  run's online backbone, e.g. the ImageNet stage of the R50 IN+Kinetics rows (paper Table 2).
  The heads, queues and optimiser start fresh."""
  pre = checkpoint.restore_pretrained(pretrain_workdir)
  def put(tree, sub, sharding_tree):
    merged = {**tree, "backbone": sub}
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), merged, sharding_tree)
  try:
    same = jax.tree.map(lambda a, b: a.shape == b.shape, pre.params, state.params["backbone"])
    if not all(jax.tree.leaves(same)):
      raise ValueError("parameter shapes differ")
    params = put(state.params, pre.params, shardings.params)
    stats = put(state.batch_stats, pre.batch_stats, shardings.batch_stats)
  except ValueError as e:
    raise UsageError(f"model.init_from={pretrain_workdir!r}: its backbone does not match this "
                     f"model ({e})") from e
  print(f"initialised the backbone from {pre.path} (step {pre.step})", flush=True)
  return state.replace(params=params, batch_stats=stats, target_params=jax.tree.map(jnp.copy, params),
                       target_batch_stats=jax.tree.map(jnp.copy, stats))


# ---------------------------------------------------------------- faults

@contextlib.contextmanager
def workdir_lock(workdir: epath.Path):
  """Process 0 holds WORKDIR/run.lock (`runlock.py`) for the run; every process learns whether
  it got it, so a refused start stops all of them with one line."""
  error = None
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      try:
        stack.enter_context(runlock.hold(workdir))
      except runlock.WorkdirBusy as e:
        error = str(e)
    if jax.process_count() > 1 and int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))):
      error = error or f"{workdir} is in use by another run (process 0 names it)"
    if error:
      raise UsageError(error)
    yield


def host_batches(data_iter, start: int, last_checkpoint: Callable[[], str]):
  """(step, ids {'video', 'frames'}, host batch) for steps start + 1, start + 2, …; a dead grain
  worker becomes DataWorkerDied (one line naming the step and `last_checkpoint()`)."""
  for step in itertools.count(start + 1):
    try:
      host_batch = next(data_iter)
    except RuntimeError as e:
      if "terminated unexpectedly" not in str(e):
        raise
      raise DataWorkerDied(f"a grain data worker process died while preparing step {step} "
                           f"({str(e).split('. ')[0]}); rerun the same command to resume "
                           f"({last_checkpoint()})") from None
    ids = {k: host_batch.pop(k) for k in ("video", "frames")}
    yield step, ids, host_batch


def global_batch_hash(ids: dict[str, np.ndarray]) -> int:
  """`pipeline.batch_hash` of the global batch from this process' rows {'video', 'frames'}
  (a collective: every process calls it at the same steps)."""
  if jax.process_count() > 1:
    ids = multihost_utils.process_allgather(ids, tiled=True)
  return pipeline.batch_hash(ids["video"], ids["frames"])


def last_good(workdir: epath.Path, saved_step: int | None) -> str:
  if saved_step is None:
    return "no checkpoint was saved in this workdir yet"
  return f"the last good checkpoint is step {saved_step} ({checkpoint.checkpoint_dir(workdir)}/{saved_step})"


def _check_resume(config: ml_collections.ConfigDict):
  def check(saved: ml_collections.ConfigDict, where: str) -> None:
    try:
      config_diff.check_resume(saved, config, where)
    except ValueError as e:
      raise UsageError(str(e)) from None
  return check


# ---------------------------------------------------------------- the run

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics.

  Raises UsageError (bad config or data, a busy workdir, a changed config on resume),
  checkpoint.RestoreError (checkpoints exist and none restores; storage that does not answer),
  TrainingDiverged, DataWorkerDied, or Preempted (after saving the step SIGTERM reached).
  """
  # Before anything compiles: JAX reads the cache setting once.
  compile_cache.configure(config.get("compilation_cache_dir", ""))
  # ---- mesh and checks: any config error surfaces here, before work.
  mesh = parallel.make_mesh()
  try:
    validate(config, mesh)
    workdir = paths.resolve(workdir)
    saved = checkpoint.newest_config(workdir)
    if saved is not None:
      config_diff.check_resume(saved[1], config, saved[0])
    source = pipeline.pretrain_source(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  with workdir_lock(workdir):
    return _run(config, workdir, mesh, source)


def _restore_or_create(config, workdir, mesh, model, tx):
  """(checkpoint manager, start step or None, state, shardings, clock): the newest checkpoint
  that restores (`checkpoint.restore_newest`: damage moved aside, transient errors retried,
  never a silent start over), or a fresh state already sharded. The saved config is compared
  first: a changed one stops here."""
  abstract = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, config.seed))
  shardings = step_lib.state_shardings(abstract, mesh)
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  try:
    start, state = checkpoint.restore_newest(
        mngr, workdir, checkpoint.abstract_like(abstract, shardings), _check_resume(config),
        allow_fresh_start=config.get("allow_fresh_start", False))
  except BaseException:
    mngr.close()
    raise
  if start is not None:
    print(f"resumed from {checkpoint.checkpoint_dir(workdir)}/{start}", flush=True)
    saved = checkpoint.read_timing(workdir, start) or {}
    clock = timing.Clock(saved.get("first_start"), saved.get("productive_s", 0.0))
  else:
    state, shardings = step_lib.create_state(model, tx, config, mesh, config.seed)
    if config.model.get("init_from"):
      state = _init_backbone_from(state, config.model.init_from, shardings)
    clock = timing.Clock()
  return mngr, start, state, shardings, clock


def compile_step(train_step, state, batch) -> tuple[Callable, float]:
  """The step compiled for these arguments ahead of time, and the seconds that took (tracing,
  lowering, compiling or reading the persistent cache): `compile_s`."""
  t = time.perf_counter()
  compiled = train_step.lower(state, batch).compile() if hasattr(train_step, "lower") else train_step
  return compiled, time.perf_counter() - t


class Skips:
  """Counts skipped steps in a row from each step's `skipped` flag, read one step late (so the
  devices stay a step ahead); `max_in_a_row` of them stop the run with TrainingDiverged."""

  def __init__(self, max_in_a_row: int, last_good: Callable[[], str]):
    self.max, self.last_good = int(max_in_a_row), last_good
    self.in_a_row, self.first = 0, None

  def read(self, step: int, metrics) -> bool:
    """Whether `step` was skipped (waits for it); raises after too many in a row."""
    skipped = bool(float(metrics.get("skipped", 0.0)))
    if not skipped:
      self.in_a_row, self.first = 0, None
      return False
    self.in_a_row += 1
    self.first = self.first or step
    if self.max > 0 and self.in_a_row >= self.max:
      raise TrainingDiverged(
          f"{self.in_a_row} steps in a row ({self.first}-{step}) had a non-finite loss or "
          f"gradient and were skipped (max_consecutive_skips={self.max}); the run stops with "
          f"its state unchanged since step {self.first - 1}: {self.last_good()}")
    return True


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh, source) -> dict[str, float]:
  note = optim.warmup_note(config)
  if note and jax.process_index() == 0:
    print(note, flush=True)

  # ---- model, optimiser; the state restored or created (nothing is written before this).
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  mngr, saved_step, state, shardings, clock = _restore_or_create(config, workdir, mesh, model, tx)
  start = int(saved_step or 0)
  logging.info("mesh: %d devices over %d processes", mesh.devices.size, jax.process_count())
  train_step = step_lib.jit_train_step(model, tx, schedule, config, mesh, shardings)
  if jax.process_index() == 0:
    metrics_log.repair(workdir, start)   # each step once: drop what this run logs again
  progress = {"saved": saved_step}
  last_checkpoint = lambda: last_good(workdir, progress["saved"])

  # ---- input: this process' rows of the global batches from step start + 1 on, placed on
  # the devices two steps ahead of the one running.
  skips = pipeline.SkipReport()  # undecodable videos: replaced, counted, named, never fatal
  data_iter = iter(pipeline.make_pretrain_dataset(
      config.data, global_batch_size=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed, start_step=start, source=source,
      skip_report=skips))
  batches = prefetch.to_devices(
      itertools.islice(host_batches(data_iter, start, last_checkpoint), max(config.total_steps - start, 0)),
      lambda item: (*item, parallel.host_to_global(mesh, item[2])))

  # ---- SIGTERM (preemption): finish the step in flight, save it, exit cleanly. Several
  # processes must all stop at the same step (the step and the save are collectives), and a
  # signal reaches each at its own step: there JAX's preemption service (started by
  # jax.distributed.initialize, it catches SIGTERM itself) agrees on the step.
  stop = {"flag": False}
  multihost = jax.process_count() > 1
  if not multihost:
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))

  logger = logbook.Logger(workdir, config.total_steps)
  probe = make_affinity_probe(model, mesh) if config.viz_every_steps else None
  profile = timing.Profile(config.get("profile", {}), workdir)
  skipped = Skips(config.get("max_consecutive_skips", 10), last_checkpoint)
  hang_at = int(config.get("debug", {}).get("hang_at_step", 0))
  diagnose, diag_pairs = None, None   # built at the first logging step (real data: its batch)
  pulls = grad_cosines.make_probe(model, config, mesh)   # None: off, or fewer than two heads
  last, preempted_at, compile_s, carried, first_record = {}, None, None, None, True
  window, pending = [], None   # this log window's (step, metrics); the step not yet read
  window_start = time.perf_counter()
  dog, armed = watchdog.Watchdog(config.get("watchdog_seconds", 0)), False

  def beat(label: str) -> None:
    """Progress for the watchdog, armed once the first step and its periodic actions (the
    first compiles of the diagnostics, the first checkpoint) are done."""
    if armed:
      dog.beat(label)

  def settle() -> None:
    """Reads the pending step's `skipped` flag (waiting for it): counts it, beats the dog."""
    nonlocal pending
    if pending is not None:
      step, metrics, seconds = pending
      pending = None
      if not skipped.read(step, metrics):
        clock.productive(seconds)
      beat(f"step {step}")

  try:
    with dog:
      for step in range(start + 1, config.total_steps + 1):
        if step == hang_at:
          watchdog.hang()
        with clock.phase("data_wait"):
          _, ids, host_batch, batch = next(batches)
        if compile_s is None:
          train_step, compile_s = compile_step(train_step, state, batch)
          window_start = time.perf_counter()
        profile.before(step)
        with clock.phase("step"):
          with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_step(state, batch)
          beat(f"dispatching step {step}")
          settle()   # the step before this one: the devices stay one step ahead
        pending = (step, metrics, clock.last_phase_s)
        window.append((step, metrics))
        profile.after(step, metrics)
        if multihost:
          stop["flag"] = multihost_utils.reached_preemption_sync_point(step)

        final = step == config.total_steps
        if step % config.log_every_steps == 0 or final:
          with clock.phase("log"):   # its seconds are this record's log_s
            last, carried = logbook.logged_losses(window, carried)
            last["skipped_pairs"] = float(skips.count)
            if diagnose is None:
              diagnose = diagnostics.make_probe(model, config, parallel.replicated(mesh))
              diag_pairs = parallel.host_to_global(mesh, diagnostics.local_pair_set(
                  config, host_batch, mesh.devices.size, jax.process_index(), jax.process_count()))
            last.update(diagnostics.as_floats(diagnose(state, diag_pairs)))
            if pulls is not None:
              last.update(diagnostics.as_floats(pulls(state, batch)))
            bad = sorted(k for k, v in last.items() if not math.isfinite(v))
            if bad:
              raise TrainingDiverged(f"non-finite metrics at step {step} ({', '.join(bad)}); the "
                                     f"run stops: {last_checkpoint()}")
            hashes = global_batch_hash(ids), fingerprint.fingerprint(state)
          rate = len(window) / (time.perf_counter() - window_start)
          window_start, window = time.perf_counter(), []
          last.update(timing.memory())
          if first_record:   # every start's first record: what this start compiled
            last["compile_s"], first_record = round(compile_s, 3), False
          last.update(clock.window(), goodput=round(clock.goodput(), 4))
          with clock.phase("log"):   # writing it: the next record's log_s
            logger.log(step, last, rate, *hashes)
          beat(f"logging step {step}")

        if probe is not None and step % config.viz_every_steps == 0:
          with clock.phase("log"):
            save_affinity_figure(probe, state, batch, workdir, step)

        if step % config.checkpoint_every_steps == 0 or final or stop["flag"]:
          with clock.phase("checkpoint"):
            settle()
            logger.flush()   # the log holds every step the checkpoint holds
            try:
              checkpoint.save(mngr, step, state, config, force=True, timing=clock.commit())
            except checkpoint.NonFiniteState as e:
              raise TrainingDiverged(f"{e}: not saved, the run stops; {last_checkpoint()}") from None
            progress["saved"] = step
          beat(f"checkpoint {step}")
        armed = True
        beat(f"step {step} and its periodic actions")
        if stop["flag"]:
          print(f"SIGTERM: saved step {step}, exiting", flush=True)
          preempted_at = step
          break
      settle()
  finally:
    profile.close()
    mngr.wait_until_finished()
    mngr.close()
    if hasattr(data_iter, "close"):
      data_iter.close()   # stops grain's worker processes (also after one of them died)
    logger.close()
    save_diagnostics_figure(workdir)
    if skips.count:
      print(f"data: {skips.summary()}", flush=True)
    if compile_s is not None and jax.process_index() == 0:
      print(f"goodput {clock.goodput():.1%} (productive step time / wall time since the run "
            f"first started; compile {compile_s:.1f} s this start)", flush=True)
    if not multihost:
      signal.signal(signal.SIGTERM, previous_handler)
  if preempted_at is not None:
    raise Preempted(f"SIGTERM: saved step {preempted_at}")
  return last
