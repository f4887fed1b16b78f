"""One run per workdir: WORKDIR/run.lock names the process that writes there.

Two runs on one workdir would truncate each other's metrics and delete each other's Orbax
temporary directories. A run takes the lock before it writes anything and gives it back when
it ends; a second run stops at once with one line naming the holder. The lock is a small JSON
file (it works on object stores too, where there are no file locks):

    {"host", "pid", "boot_id", "command", "started", "heartbeat"}

A lock whose holder is gone never blocks a restart (a SIGKILLed or preempted run cannot clean
up): on the same machine (same host name and boot id) the holder is alive iff its pid is; on
another machine, iff it refreshed `heartbeat` (every HEARTBEAT_S seconds, from a thread) within
STALE_S seconds. Taking the lock writes it, waits, and reads it back, so of two runs that
start together only the one whose write landed last goes on.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

from etils import epath

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
SETTLE_S = 0.2   # between writing the lock and reading it back


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _me() -> dict:
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
          "command": " ".join(sys.argv), "started": now, "heartbeat": now}


def _read(path: epath.Path) -> dict | None:
  try:
    holder = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}   # half-written or unreadable: a holder that died mid-write
  return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True   # exists, owned by another user
  return True


def is_alive(holder: dict, me: dict) -> bool:
  """Whether the process `holder` describes may still be running (see the module docstring)."""
  if not holder:
    return False
  same_machine = holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"]
  if same_machine:
    return holder.get("pid") != me["pid"] and _pid_alive(int(holder.get("pid", -1)))
  return time.time() - float(holder.get("heartbeat", 0)) < STALE_S


def _ours(holder: dict | None, me: dict) -> bool:
  return bool(holder) and all(holder.get(k) == me[k] for k in ("host", "pid", "boot_id", "started"))


def describe(holder: dict) -> str:
  age = time.time() - float(holder.get("started", time.time()))
  return (f"pid {holder.get('pid')} on {holder.get('host')} (started {age:.0f} s ago: "
          f"{holder.get('command', '?')})")


@contextlib.contextmanager
def hold(workdir: epath.Path) -> Iterator[None]:
  """Holds WORKDIR/run.lock for the duration of the `with` block.

  Raises WorkdirBusy, naming the holder, if another live run holds it. Creates `workdir`.
  """
  path = epath.Path(workdir) / LOCK_FILE
  me = _me()
  holder = _read(path)
  if holder is not None and is_alive(holder, me):
    raise WorkdirBusy(f"{workdir} is in use by {describe(holder)}: wait for it, stop it "
                      f"(kill -TERM {holder.get('pid')}), or pass another --workdir")
  if holder:
    print(f"{path}: taking over the lock of {describe(holder)}, which is no longer running",
          flush=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(me))
  time.sleep(SETTLE_S)
  landed = _read(path)
  if not _ours(landed, me):
    raise WorkdirBusy(f"{workdir} was taken at the same moment by "
                      f"{describe(landed or {})}: pass another --workdir")
  stop = threading.Event()

  def heartbeat():
    while not stop.wait(HEARTBEAT_S):
      me["heartbeat"] = time.time()
      with contextlib.suppress(OSError):
        if _ours(_read(path), me):   # never overwrite a run that took over meanwhile
          path.write_text(json.dumps(me))
  thread = threading.Thread(target=heartbeat, name="runlock-heartbeat", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    with contextlib.suppress(OSError):
      if _ours(_read(path), me):
        path.unlink()
