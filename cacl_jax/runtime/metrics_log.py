"""WORKDIR/metrics.jsonl: one JSON object per logged step, each step exactly once.

(The evaluation's WORKDIR/probe_metrics.jsonl is the same kind of log: every function takes the
file's `name`.)

Records are appended, never rewritten while a run logs, and the training loop hands them to a
`Writer`, whose thread does the writing (a slow disk or bucket never stalls a step). Where the
file lives decides how "append" is done:

* a local path or file:// URL: lines appended to WORKDIR/metrics.jsonl (one write call per
  batch of records);
* an object store (gs://), where an object cannot be appended to: each batch of records is a
  new object WORKDIR/metrics.jsonl.parts/FIRST-LAST.jsonl (zero-padded steps, so names sort in
  step order), at most one every PART_SECONDS, and at every flush (before each checkpoint, at
  the end). `read` concatenates metrics.jsonl (if any) and the parts in name order.

What a restart finds is repaired before the run appends again (`repair`, process 0):

* a last line without its newline or that does not parse (the run was killed mid-write, or
  the disk filled up) is dropped;
* steps after the checkpoint the run resumes from are dropped: the resumed run logs them
  again, so each step stays once. With no checkpoint (a crash before the first one) that is
  every step.

Locally the repair replaces the file in one step (`paths.write_text_atomic`), so a kill during
it leaves the old file, never a truncated one; on an object store it deletes the parts after
the resume step and rewrites the one part that straddles it (one batch of records). TensorBoard
needs none of this: each start writes a new events file, and TensorBoard's reader drops a
restarted run's repeated steps.
"""
from __future__ import annotations

import json
import queue
import threading
import time

from etils import epath

from cacl_jax.runtime import paths

FILE = "metrics.jsonl"


PART_SECONDS = 30.0   # object stores: the shortest interval between two part objects


def _parts_dir(workdir: epath.Path, name: str) -> epath.Path:
  return epath.Path(workdir) / f"{name}.parts"


def _part_name(records: list[dict]) -> str:
  return f"{records[0]['step']:012d}-{records[-1]['step']:012d}.jsonl"


def _lines(records: list[dict]) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def _parse(line: str) -> dict | None:
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read(workdir: epath.Path, name: str = FILE) -> list[dict]:
  """The complete records of WORKDIR/metrics.jsonl (or WORKDIR/`name`; a partial last line is
  left out), followed by those of its parts (object stores) in step order."""
  path = epath.Path(workdir) / name
  texts = [path.read_text()] if path.exists() else []
  parts = _parts_dir(workdir, name)
  if parts.is_dir():
    texts += [p.read_text() for p in sorted(parts.iterdir(), key=lambda p: p.name)
              if p.name.endswith(".jsonl")]
  records = []
  for text in texts:
    for line in text.split("\n")[:-1]:   # the text after the last newline is partial
      record = _parse(line)
      if record is not None:
        records.append(record)
  return records


def repair(workdir: epath.Path, resume_step: int, name: str = FILE) -> int:
  """Keeps the complete records of steps ≤ `resume_step` (0: none); returns how many lines
  were dropped. Rewrites a file (or part) only when something in it must go."""
  dropped = 0
  path = epath.Path(workdir) / name
  if path.exists():
    kept, gone = _keep(path.read_text(), resume_step)
    if gone:
      paths.write_text_atomic(path, _lines(kept))
    dropped += gone
  parts = _parts_dir(workdir, name)
  for part in sorted(parts.iterdir(), key=lambda p: p.name) if parts.is_dir() else []:
    kept, gone = _keep(part.read_text(), resume_step)
    if gone and kept:
      part.unlink()
      (parts / _part_name(kept)).write_text(_lines(kept))
    elif gone:
      part.unlink()
    dropped += gone
  return dropped


def _keep(text: str, resume_step: int) -> tuple[list[dict], int]:
  """(the complete records of steps ≤ resume_step in `text`, how many lines go)."""
  lines = text.split("\n")
  complete, partial = lines[:-1], lines[-1]
  kept = [r for line in complete if (r := _parse(line)) is not None and r["step"] <= resume_step]
  return kept, len([l for l in complete if l.strip()]) - len(kept) + bool(partial.strip())


def append(workdir: epath.Path, record: dict, name: str = FILE) -> None:
  """Appends one record now, on the caller's thread (the probe's few records): a line locally,
  a one-record part on an object store."""
  _write(epath.Path(workdir), name, [record], paths.is_local(workdir))


def _write(workdir: epath.Path, name: str, records: list[dict], appendable: bool) -> None:
  if appendable:
    with (workdir / name).open("a") as f:
      f.write(_lines(records))   # one write call: a kill leaves at most one partial line
  else:
    parts = _parts_dir(workdir, name)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / _part_name(records)).write_text(_lines(records))


class Writer:
  """Appends records from a thread of its own: `append` never waits for the file system.

  `flush()` returns when everything appended so far is written (before a checkpoint, so that
  a checkpoint's steps are in the log; at the end); `close()` flushes and stops the thread. A
  write that fails is raised again on the caller's thread by the next `append`, `flush` or
  `close`. `appendable` (default: whether WORKDIR is local) picks lines or part objects.
  """

  def __init__(self, workdir: epath.Path, name: str = FILE, appendable: bool | None = None,
               part_seconds: float = PART_SECONDS):
    self.workdir, self.name = epath.Path(workdir), name
    self.appendable = paths.is_local(workdir) if appendable is None else appendable
    self.part_seconds = part_seconds
    self._queue: queue.Queue = queue.Queue()
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
    self._thread.start()

  def append(self, record: dict) -> None:
    self._raise()
    self._queue.put(record)

  def flush(self) -> None:
    done = threading.Event()
    self._queue.put(done)
    done.wait()
    self._raise()

  def close(self) -> None:
    if self._thread.is_alive():
      self._queue.put(None)
      self._thread.join()
    self._raise()

  def _raise(self) -> None:
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def _run(self) -> None:
    while True:
      records, events, closing = self._take()
      if records and self._error is None:
        try:
          _write(self.workdir, self.name, records, self.appendable)
        except Exception as e:  # pylint: disable=broad-exception-caught
          self._error = e
      for event in events:
        event.set()
      if closing:
        return

  def _take(self) -> tuple[list[dict], list[threading.Event], bool]:
    """Blocks for the next item, then takes what is queued (on an object store: for up to
    `part_seconds`, unless a flush or close comes): (records, flush events, closing)."""
    records, events = [], []
    item = self._queue.get()
    deadline = time.monotonic() + (0 if self.appendable else self.part_seconds)
    while True:
      if item is None:
        return records, events, True
      if isinstance(item, threading.Event):
        events.append(item)
        return records, events, False
      records.append(item)
      try:
        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0)) \
            if deadline > time.monotonic() else self._queue.get_nowait()
      except queue.Empty:
        return records, events, False
