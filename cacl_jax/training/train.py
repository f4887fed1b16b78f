"""Pretraining: the one thin stateful loop around the pure train step.

Reads top to bottom in sections: validate → mesh → input → model and state → restore →
loop (step, log, figure, checkpoint, SIGTERM) → finish. Everything numeric lives in
`step.py`, `losses.py`, `queue.py`, `ema.py`; this file only moves data and writes files.

WORKDIR is a local path or a URL (`paths.py`: file://, gs://). Files in it:
  checkpoints/S/      Orbax (state + config); the newest N are kept
  checkpoints_damaged/S/  a checkpoint that did not restore, moved aside (never deleted)
  run.lock            the live run writing here (`runlock.py`)
  metrics.jsonl       one JSON object per logged step (`metrics_log.py`): step, loss, loss_global,
                      loss_pixel, loss_cycle, lr, steps_per_sec, batch_hash (which data the step
                      saw, `pipeline.batch_hash`), state_hash (which bits the state holds after
                      it, `fingerprint.py`), skipped_pairs, and the diagnostics of
                      `diagnostics.py` (match_true_acc, match_label_acc, cos_within_*, ...)
  events.out.tfevents.*  TensorBoard scalars (tensorboardX, no TensorFlow)
  figures/affinity_S.png  the paper's Fig. 3 for the current networks
  figures/diagnostics.png the diagnostics' curves over the run (redrawn at the end)
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cacl_jax.runtime import checkpoint, config_diff, fingerprint, metrics_log, parallel, paths, runlock, viz
from cacl_jax.training import diagnostics, optim, state as state_lib, step as step_lib
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


# ---------------------------------------------------------------- logging

class Logger:
  """metrics.jsonl + TensorBoard + console (process 0 only)."""

  def __init__(self, workdir: epath.Path, total_steps: int):
    self.active = jax.process_index() == 0
    self.total = total_steps
    self.workdir = workdir
    self.writer = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.fspath(workdir))

  def log(self, step: int, metrics: dict[str, float], rate: float, batch_hash: int,
          state_hash: int) -> None:
    if not self.active:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "steps_per_sec": rate}
    metrics_log.append(self.workdir, {**record, "batch_hash": batch_hash, "state_hash": state_hash})
    for k, v in record.items():
      if k != "step":
        self.writer.add_scalar(f"train/{k}", v, step)
    self.writer.flush()
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    heads = " ".join(f"{h[0].upper()}={record['loss_' + h]:.3f}" for h in step_lib.HEADS)
    within = "/".join(f"{record.get('cos_within_' + k, float('nan')):.2f}" for k in diagnostics.MAPS)
    match = (f" match true {record['match_true_acc']:.2f} label {record['match_label_acc']:.2f}"
             if "match_true_acc" in record else "")
    print(f"[{step:>7d}/{self.total}] loss {record['loss']:.4f} ({heads}) "
          f"cos-within h/u/p/c {within}{match} return {record.get('cycle_return', float('nan')):.2f} "
          f"lr {record['lr']:.4g} | {rate:.2f} steps/s, ETA {_duration(eta)}", flush=True)

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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


def next_batch(data_iter, step: int, last_checkpoint: str) -> dict:
  """The host batch of `step`; a dead grain worker becomes DataWorkerDied (one line)."""
  try:
    return next(data_iter)
  except RuntimeError as e:
    if "terminated unexpectedly" not in str(e):
      raise
    raise DataWorkerDied(f"a grain data worker process died while preparing step {step} "
                         f"({str(e).split('. ')[0]}); rerun the same command to resume "
                         f"({last_checkpoint})") from None


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
  TrainingDiverged, DataWorkerDied, or Preempted (after saving the step SIGTERM reached).
  """
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


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh, source) -> dict[str, float]:
  logging.info("mesh: %d devices over %d processes", mesh.devices.size, jax.process_count())
  note = optim.warmup_note(config)
  if note and jax.process_index() == 0:
    print(note, flush=True)

  # ---- model, optimiser; restore the newest checkpoint that restores, or create the state
  # already sharded. The saved config is compared first: a changed one stops here.
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  abstract = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, config.seed))
  shardings = step_lib.state_shardings(abstract, mesh)
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  start, state = checkpoint.restore_newest(mngr, workdir, checkpoint.abstract_like(abstract, shardings),
                                           _check_resume(config))
  if start is not None:
    print(f"resumed from {checkpoint.checkpoint_dir(workdir)}/{start}", flush=True)
  else:
    state, shardings = step_lib.create_state(model, tx, config, mesh, config.seed)
    if config.model.get("init_from"):
      state = _init_backbone_from(state, config.model.init_from, shardings)
  saved_step, start = start, int(start or 0)
  train_step = step_lib.jit_train_step(model, tx, schedule, config, mesh, shardings)
  if jax.process_index() == 0:
    metrics_log.repair(workdir, start)   # each step once: drop what this run logs again

  # ---- input: this process' rows of the global batches from step start + 1 on.
  skips = pipeline.SkipReport()  # undecodable videos: replaced, counted, named, never fatal
  data_iter = iter(pipeline.make_pretrain_dataset(
      config.data, global_batch_size=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed, start_step=start, source=source,
      skip_report=skips))

  # ---- SIGTERM (preemption): finish the step in flight, save it, exit cleanly. Several
  # processes must all stop at the same step (the step and the save are collectives), and a
  # signal reaches each at its own step: there JAX's preemption service (started by
  # jax.distributed.initialize, it catches SIGTERM itself) agrees on the step.
  stop = {"flag": False}
  multihost = jax.process_count() > 1
  if not multihost:
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))

  logger = Logger(workdir, config.total_steps)
  probe = make_affinity_probe(model, mesh) if config.viz_every_steps else None
  diagnose, diag_pairs = None, None   # built at the first logging step (real data: its batch)
  last, preempted_at = {}, None
  window_start, window_steps = time.perf_counter(), 0
  try:
    for step in range(start + 1, config.total_steps + 1):
      host_batch = next_batch(data_iter, step, last_good(workdir, saved_step))
      ids = {k: host_batch.pop(k) for k in ("video", "frames")}
      batch = parallel.host_to_global(mesh, host_batch)
      state, metrics = train_step(state, batch)
      window_steps += 1
      if multihost:
        stop["flag"] = multihost_utils.reached_preemption_sync_point(step)

      if step % config.log_every_steps == 0 or step == config.total_steps:
        last = {k: float(v) for k, v in parallel.to_host(metrics).items()}
        last["skipped_pairs"] = float(skips.count)
        if diagnose is None:
          diagnose = diagnostics.make_probe(model, config, parallel.replicated(mesh))
          diag_pairs = parallel.host_to_global(mesh, diagnostics.local_pair_set(
              config, host_batch, mesh.devices.size, jax.process_index(), jax.process_count()))
        last.update(diagnostics.as_floats(diagnose(state, diag_pairs)))
        bad = sorted(k for k, v in last.items() if not math.isfinite(v))
        if bad:
          raise TrainingDiverged(f"non-finite metrics at step {step} ({', '.join(bad)}); the run "
                                 f"stops: {last_good(workdir, saved_step)}")
        rate = window_steps / (time.perf_counter() - window_start)
        logger.log(step, last, rate, global_batch_hash(ids), fingerprint.fingerprint(state))
        window_start, window_steps = time.perf_counter(), 0

      if probe is not None and step % config.viz_every_steps == 0:
        save_affinity_figure(probe, state, batch, workdir, step)

      final = step == config.total_steps
      if step % config.checkpoint_every_steps == 0 or final or stop["flag"]:
        loss = float(parallel.to_host(metrics)["loss"])
        try:
          if not math.isfinite(loss):
            raise checkpoint.NonFiniteState(f"the loss of step {step} is {loss}")
          checkpoint.save(mngr, step, state, config, force=True)
        except checkpoint.NonFiniteState as e:
          raise TrainingDiverged(f"{e}: not saved, the run stops; "
                                 f"{last_good(workdir, saved_step)}") from None
        saved_step = step
      if stop["flag"]:
        print(f"SIGTERM: saved step {step}, exiting", flush=True)
        preempted_at = step
        break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if hasattr(data_iter, "close"):
      data_iter.close()   # stops grain's worker processes (also after one of them died)
    save_diagnostics_figure(workdir)
    if skips.count:
      print(f"data: {skips.summary()}", flush=True)
    logger.close()
    if not multihost:
      signal.signal(signal.SIGTERM, previous_handler)
  if preempted_at is not None:
    raise Preempted(f"SIGTERM: saved step {preempted_at}")
  return last
