"""A watchdog that turns a hang into an exit code a scheduler understands.

A stalled collective, a data read that never returns or a wedged device leave a process alive
and idle: the run lock's heartbeat (a thread of its own) keeps beating and the pod stays
billed. The loop calls `beat()` whenever a step completes; once armed by the first beat, a
thread checks that the last one is less than `seconds` old. When it is not, the thread writes
one line saying why to stderr, then every thread's Python stack (`faulthandler`: where the
loop is stuck), and ends the process with `os._exit(EXIT_CODE)` — no cleanup, which may itself
hang — so that SLURM, a queued resource or a Kubernetes Job restarts it; the restart resumes
from the last checkpoint.

Fault injection: `hang()` sleeps forever (`debug.hang_at_step`).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_CODE = 3   # distinct from 1 (a one-line error) so logs and schedulers can tell them apart


class Watchdog:
  """`with Watchdog(seconds, what) as dog: ... dog.beat() ...`; `seconds` <= 0 disables it."""

  def __init__(self, seconds: float, what: str = "training step"):
    self.seconds = float(seconds)
    self.what = what
    self.last = None           # time.monotonic() of the last beat; None until the first
    self.label = ""            # what the last beat said (e.g. "step 12")
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> "Watchdog":
    if self.seconds > 0:
      self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def beat(self, label: str = "") -> None:
    """Progress: arms the watchdog (first call) and restarts its count."""
    self.last, self.label = time.monotonic(), label

  def _watch(self) -> None:
    period = min(5.0, max(self.seconds / 10, 0.05))
    while not self._stop.wait(period):
      last = self.last
      if last is not None and time.monotonic() - last > self.seconds:
        self._fire(time.monotonic() - last)

  def _fire(self, idle: float) -> None:
    after = f" after {self.label}" if self.label else ""
    sys.stderr.write(f"watchdog: no {self.what} completed for {idle:.0f} s{after} "
                     f"(watchdog_seconds={self.seconds:g}); the stacks of every thread follow; "
                     f"exiting with code {EXIT_CODE} so that the scheduler restarts the run, "
                     "which resumes from its last checkpoint\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_CODE)  # pylint: disable=protected-access


def hang() -> None:
  """Never returns (`debug.hang_at_step`): what a stalled collective looks like to the loop."""
  while True:
    time.sleep(3600)
