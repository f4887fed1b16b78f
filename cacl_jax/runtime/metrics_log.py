"""WORKDIR/metrics.jsonl: one JSON object per logged step, each step exactly once.

(The evaluation's WORKDIR/probe_metrics.jsonl is the same kind of log: every function takes the
file's `name`.)

A run appends one line per logged step. What a restart finds there is repaired before the
run appends again (`repair`, process 0):

* a last line without its newline or that does not parse (the run was killed mid-write, or
  the disk filled up) is dropped;
* steps after the checkpoint the run resumes from are dropped: the resumed run logs them
  again, so each step stays once. With no checkpoint (a crash before the first one) that is
  every step.

The rewrite replaces the file in one step (`paths.write_text_atomic`), so a kill during the
repair leaves the old file, never a truncated one. TensorBoard needs none of this: each start
writes a new events file, and TensorBoard's reader drops a restarted run's repeated steps.
"""
from __future__ import annotations

import json

from etils import epath

from cacl_jax.runtime import paths

FILE = "metrics.jsonl"


def _parse(line: str) -> dict | None:
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read(workdir: epath.Path, name: str = FILE) -> list[dict]:
  """The complete records of WORKDIR/metrics.jsonl (or WORKDIR/`name`; a partial last line is
  left out)."""
  path = epath.Path(workdir) / name
  if not path.exists():
    return []
  records = []
  for line in path.read_text().split("\n")[:-1]:   # the text after the last newline is partial
    record = _parse(line)
    if record is not None:
      records.append(record)
  return records


def repair(workdir: epath.Path, resume_step: int, name: str = FILE) -> int:
  """Keeps the complete records of steps ≤ `resume_step` (0: none); returns how many lines
  were dropped. Rewrites the file only when something must go."""
  path = epath.Path(workdir) / name
  if not path.exists():
    return 0
  text = path.read_text()
  lines = text.split("\n")
  complete, partial = lines[:-1], lines[-1]
  kept = [line for line in complete
          if (r := _parse(line)) is not None and r["step"] <= resume_step]
  dropped = len([l for l in complete if l.strip()]) - len(kept) + bool(partial.strip())
  if dropped:
    paths.write_text_atomic(path, "".join(line + "\n" for line in kept))
  return dropped


def append(workdir: epath.Path, record: dict, name: str = FILE) -> None:
  """Appends one record as one line (a single write call). Object stores cannot append
  (gcsfs has no 'a' mode): there the object is rewritten whole, a few MB over a long run."""
  path = epath.Path(workdir) / name
  line = json.dumps(record) + "\n"
  if paths.is_local(path):
    with path.open("a") as f:
      f.write(line)
  else:
    path.write_text((path.read_text() if path.exists() else "") + line)
