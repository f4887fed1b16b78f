"""Where a run's time goes: per log window and over the whole run, across restarts.

The loop runs each part of an iteration inside `clock.phase(name)`: 'data_wait' (the next
batch: host decoding and its placement on the devices), 'step' (dispatching the step and
waiting for the one before it), 'checkpoint', 'log' (metrics, diagnostics, figures). `window()`
returns each phase's seconds since the previous call (`data_wait_s`, `step_s`, `checkpoint_s`,
`log_s` of a metrics.jsonl record).

Goodput = productive step time ÷ wall time since the run first started (SPEC §8). Productive
is the step time of steps that were applied (not skipped) and are kept: a checkpoint commits
the productive time so far into its `timing` item, and a restart continues from the committed
count, so the steps it replays (after the last checkpoint) and the time it was down count as
wall time only.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import Iterator

import jax

PHASES = ("data_wait", "step", "checkpoint", "log")


class Clock:
  """Phase timers, goodput bookkeeping; `first_start` (epoch s) and `productive_s` come from
  the checkpoint a run resumes from (`state()`), or start now and at 0."""

  def __init__(self, first_start: float | None = None, productive_s: float = 0.0):
    self.first_start = time.time() if first_start is None else float(first_start)
    self.committed_s = float(productive_s)   # in the newest checkpoint
    self.pending_s = 0.0                      # applied steps since it
    self._window = dict.fromkeys(PHASES, 0.0)
    self.last_phase_s = 0.0

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.last_phase_s = time.perf_counter() - start
      self._window[name] += self.last_phase_s

  def window(self) -> dict[str, float]:
    """{'data_wait_s', 'step_s', 'checkpoint_s', 'log_s'} since the last call; restarts them."""
    out = {f"{k}_s": round(v, 6) for k, v in self._window.items()}
    self._window = dict.fromkeys(PHASES, 0.0)
    return out

  def productive(self, seconds: float) -> None:
    """A step of `seconds` was applied."""
    self.pending_s += seconds

  def commit(self) -> dict[str, float]:
    """The productive time so far is in a checkpoint now: its `timing` item."""
    self.committed_s += self.pending_s
    self.pending_s = 0.0
    return {"first_start": self.first_start, "productive_s": self.committed_s}

  def goodput(self) -> float:
    wall = time.time() - self.first_start
    return (self.committed_s + self.pending_s) / wall if wall > 0 else 0.0


def memory() -> dict[str, float]:
  """The devices' memory in use and its peak (GiB, the most loaded local device) where the
  backend reports it (GPUs, TPUs); otherwise this process' resident host memory and its peak."""
  stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
  if stats and "bytes_in_use" in stats[0]:
    gib = lambda key: max(s.get(key, 0) for s in stats) / 2**30
    return {"device_memory_gib": round(gib("bytes_in_use"), 4),
            "device_peak_memory_gib": round(gib("peak_bytes_in_use"), 4)}
  return {"host_rss_gib": round(_rss_bytes() / 2**30, 4),
          "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 4)}


def _rss_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):   # not Linux: the peak is what there is
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Profile:
  """A jax.profiler trace of steps start_step … start_step + num_steps − 1 into
  WORKDIR/profile (TensorBoard's profile plugin and Perfetto read it), on process 0 unless
  `all_processes`. `before(step)` starts it, `after(step, outputs)` waits for the last traced
  step's outputs and stops it; `close()` stops a trace the run ended inside."""

  def __init__(self, config, workdir):
    self.start = int(config.get("start_step", 0))
    self.stop = self.start + max(int(config.get("num_steps", 1)), 1) - 1
    self.on = self.start > 0 and (config.get("all_processes", False) or jax.process_index() == 0)
    self.dir = os.fspath(workdir / "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.on and step == self.start:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step >= self.stop:
      jax.block_until_ready(outputs)
      self.close()
      print(f"profile: steps {self.start}-{self.stop} traced in {self.dir}", flush=True)

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
