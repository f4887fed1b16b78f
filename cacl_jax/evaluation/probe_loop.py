"""The probe's training loop (linear protocol, fine-tuning, the demo's supervised ceiling):
steps, logs, checkpoints, preemption and resume.

A probe can be as long as pretraining (the paper's linear protocol is 300 epochs, its
limited-sample fine-tuning 1,000), so it keeps its own checkpoints, through the project's one
Orbax module (`checkpoint.py`):

  WORKDIR/checkpoints/S/        the ProbeState after step S (head; backbone and BN statistics,
                                which fine-tuning trains; optimiser; step) and the evaluation
                                config, with the starting backbone's fingerprint
  WORKDIR/probe_metrics.jsonl   one line per logged step, each step once (`metrics_log`)

A checkpoint is saved every `checkpoint_every_steps` steps, after the last step, and when
SIGTERM arrives; then `parallel.Preempted` is raised and the entry exits 0. The same call on
the same WORKDIR resumes from the newest checkpoint: the train batch of step t is a function of
(seed, t) alone (`segdata.train_dataset(start_step=...)`), so a resumed probe takes exactly the
steps an uninterrupted one would have and ends with the same numbers. A checkpoint resumes only
under the config it was saved with (MAY_CHANGE aside) and from the same starting backbone: a
probe of another pretraining checkpoint (or another random init) is refused in one line.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cacl_jax.runtime import checkpoint, config_diff, metrics_log, parallel, paths

LOG = "probe_metrics.jsonl"
# A probe's progress line on the console at most this often (every logged step is in LOG).
CONSOLE_SECONDS = 30
KEEP = 2   # the newest checkpoint, and the one before should the newest not restore
# Keys that change nothing the probe's training computes: cadences, figures, the val batch,
# where the data is read from, other protocols' and other runs' sections (the demo's ceiling
# is built from `supervised` into the top-level keys, which are compared). The backbone is
# compared by its fingerprint, not by the path it was read from.
MAY_CHANGE = ("log_every_steps", "checkpoint_every_steps", "num_figure_images", "eval_batch_size",
              "data.root", "data.num_workers", "data.prefetch", "pretrained", "checkpoint_step",
              "supervised", "cluster", "retrieval", "backbone_fingerprint")


def backbone_fingerprint(params: Any, batch_stats: Any) -> str:
  """16 hex digits: BLAKE2b of the backbone's variables (host bytes in tree order)."""
  digest = hashlib.blake2b(digest_size=8)
  for x in jax.tree.leaves({"params": params, "batch_stats": batch_stats}):
    x = np.asarray(jax.device_get(x))
    digest.update(f"{x.dtype}{x.shape}".encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


def run_config(config: ml_collections.ConfigDict, fingerprint: str) -> ml_collections.ConfigDict:
  """The config saved with each checkpoint: the evaluation config and `backbone_fingerprint`."""
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.backbone_fingerprint = fingerprint
  return saved


def manager(workdir: str) -> ocp.CheckpointManager:
  return checkpoint.manager(workdir, max_to_keep=KEEP)


def resume(mngr: ocp.CheckpointManager, workdir: str, state: Any,
           config: ml_collections.ConfigDict) -> tuple[int, Any]:
  """(steps already taken, state): the newest checkpoint in WORKDIR restored onto the shardings
  of `state` (a fresh probe's state), or (0, state) for a fresh WORKDIR.

  Raises ValueError (one line) if the checkpoint was saved with another config (`run_config`)
  or from another starting backbone. Process 0 drops from probe_metrics.jsonl the steps after
  the checkpoint (the resumed probe logs them again).
  """
  def check(saved: ml_collections.ConfigDict, where: str) -> None:
    was, now = saved.get("backbone_fingerprint"), config.backbone_fingerprint
    if was != now:
      raise ValueError(f"{where} continues a probe of another backbone (fingerprint {was}, now "
                       f"{now}: another pretraining checkpoint or seed): pass another --workdir")
    config_diff.check_resume(saved, config, where, MAY_CHANGE)

  shardings = jax.tree.map(lambda x: x.sharding, state)
  start, restored = checkpoint.restore_newest(mngr, workdir, checkpoint.abstract_like(state, shardings),
                                              check)
  if jax.process_index() == 0:
    metrics_log.repair(paths.resolve(workdir), int(start or 0), LOG)
    if start is not None:
      print(f"resumed the probe from {checkpoint.checkpoint_dir(workdir)}/{start}", flush=True)
  return (0, state) if start is None else (int(start), restored)


def train(state: Any, start: int, train_step, batches, mesh, total_steps: int,
          config: ml_collections.ConfigDict, workdir: str, lr_schedule,
          mngr: ocp.CheckpointManager) -> tuple[Any, float]:
  """Steps `start` + 1 … `total_steps`; returns the final state and the last logged loss.

  Logs loss, learning rate, speed and ETA every `log_every_steps` to WORKDIR/probe_metrics.jsonl
  (process 0), and on the console at most every CONSOLE_SECONDS (and at the last step); saves (state, `config`) every `checkpoint_every_steps`, after the
  last step and on SIGTERM, which then raises `parallel.Preempted`. A non-finite loss stops the
  probe with a clear error (FloatingPointError).
  """
  log_every = max(1, int(config.get("log_every_steps", 50)))
  save_every = max(1, int(config.get("checkpoint_every_steps", 1000)))
  workdir_path = paths.resolve(workdir)
  logged = metrics_log.read(workdir_path, LOG) if start else []
  loss = float(logged[-1]["loss"]) if logged else float("nan")   # a probe resumed at its end
  t_start = t_console = None
  with parallel.StopOnSigterm() as stop:
    for step in range(start + 1, total_steps + 1):
      state, loss_arr = train_step(state, parallel.host_to_global(mesh, next(batches)))
      if t_start is None:
        loss_arr.block_until_ready()
        t_start = t_console = time.time()   # after compilation: the ETA measures steady steps
      if step % log_every == 0 or step == total_steps:
        loss = float(loss_arr)
        if not math.isfinite(loss):
          raise FloatingPointError(f"probe loss is {loss} at step {step}; lower learning_rate")
        rate = (step - start - 1) / max(time.time() - t_start, 1e-9)
        eta = (total_steps - step) / rate if rate > 0 else float("nan")
        record = {"step": step, "loss": loss, "lr": float(lr_schedule(step - 1)),
                  "steps_per_s": round(rate, 3)}
        if jax.process_index() == 0 and (step == total_steps
                                         or time.time() - t_console >= CONSOLE_SECONDS):
          t_console = time.time()
          logging.info("probe step %d/%d  loss %.4f  lr %.4g  %.2f steps/s  ETA %s", step,
                       total_steps, loss, record["lr"], rate, _hms(eta))
        if jax.process_index() == 0:
          metrics_log.append(workdir_path, record, LOG)
      stopping = stop.after(step)
      if step % save_every == 0 or step == total_steps or stopping:
        checkpoint.save(mngr, step, state, config, force=True)
      if stopping:
        mngr.wait_until_finished()
        print(f"SIGTERM: saved probe step {step} ({checkpoint.checkpoint_dir(workdir)}/{step}), "
              "exiting", flush=True)
        raise parallel.Preempted(f"SIGTERM: saved probe step {step}")
  mngr.wait_until_finished()
  return state, loss


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
