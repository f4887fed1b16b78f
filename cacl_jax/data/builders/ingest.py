"""Parallel, resumable ingestion: a process pool that caches one file pair per task.

A *task* is a named list of items (one video, or a chunk of images). A worker runs the
item function on each item and writes `CACHE/<task>.bin` (the bytes) then
`CACHE/<task>.json` (small summaries and skips); a task counts as done once its `.json`
exists and its `.bin` starts with the format's magic; both files are written atomically, so a
run killed at any point resumes by redoing only unfinished tasks. The TFDS builders then
stream the cached payloads into ArrayRecord. This module imports neither TFDS nor JAX, so
spawned workers start fast.

The `.bin` format is data, never code (the cache may sit in a shared, writable DATA dir, and
unpickling a planted file would run it): MAGIC, the byte length of a JSON header, the header,
then the concatenated blobs. The header is the payload list with every `bytes` value replaced
by {"$bytes": [offset, length]} and every NumPy array by {"$array": [offset, length, dtype,
shape]}; everything else in a payload must be JSON (str, int, float, bool, None, lists, dicts
with str keys not starting with '$').
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tqdm

from cacl_jax.data import decode


@dataclasses.dataclass(frozen=True)
class Task:
  """`key` names the cache files (unique within a split); `items` go to the item function."""
  key: str
  items: tuple


@dataclasses.dataclass
class TaskResult:
  """Per-item outcome of one task: `summaries[i]` is None where item i was skipped."""
  key: str
  summaries: list[dict | None]
  skips: list[dict]


def safe_key(name: str) -> str:
  """A file-name-safe cache key for a relative path or id ('a/b c.mp4' -> 'a__b_c.mp4')."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace(os.sep, "__"))


def chunk_tasks(items: Sequence[tuple], chunk_size: int, prefix: str) -> list[Task]:
  """Groups small items (images) into tasks; a key hashes its items, so a changed source
  listing never reuses a stale chunk."""
  tasks = []
  for start in range(0, len(items), chunk_size):
    chunk = tuple(items[start:start + chunk_size])
    digest = hashlib.sha1(repr(chunk).encode()).hexdigest()[:10]
    tasks.append(Task(f"{prefix}{start // chunk_size:06d}_{digest}", chunk))
  return tasks


MAGIC = b"CACL-INGEST-CACHE-1\n"
PAYLOAD_SUFFIX = ".bin"


def encode_payloads(payloads: list) -> bytes:
  """The `.bin` bytes of a task's payloads (see the module docstring)."""
  blobs, size = [], [0]

  def blob(data: bytes) -> list[int]:
    blobs.append(data)
    size[0] += len(data)
    return [size[0] - len(data), len(data)]

  def walk(x):
    if isinstance(x, (bytes, bytearray, memoryview)):
      return {"$bytes": blob(bytes(x))}
    if isinstance(x, np.ndarray):
      if x.dtype.hasobject:
        raise TypeError("ingestion payloads hold no object arrays")
      return {"$array": [*blob(np.ascontiguousarray(x).tobytes()), x.dtype.str, list(x.shape)]}
    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, dict):
      if any(not isinstance(k, str) or k.startswith("$") for k in x):
        raise TypeError(f"payload dict keys must be str not starting with '$': {list(x)}")
      return {k: walk(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [walk(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
      return x
    raise TypeError(f"ingestion payloads hold bytes, arrays and JSON values, not {type(x).__name__}")

  header = json.dumps(walk(payloads)).encode()
  return MAGIC + len(header).to_bytes(8, "little") + header + b"".join(blobs)


def decode_payloads(data: bytes) -> list:
  """Inverse of `encode_payloads`. Raises ValueError for anything else."""
  if not data.startswith(MAGIC):
    raise ValueError("not an ingestion cache file")
  start = len(MAGIC) + 8
  end = start + int.from_bytes(data[len(MAGIC):start], "little")
  blobs = memoryview(data)[end:]

  def walk(x):
    if isinstance(x, dict):
      if "$bytes" in x:
        offset, length = x["$bytes"]
        return bytes(blobs[offset:offset + length])
      if "$array" in x:
        offset, length, dtype, shape = x["$array"]
        return np.frombuffer(blobs[offset:offset + length], dtype=np.dtype(dtype)).reshape(shape).copy()
      return {k: walk(v) for k, v in x.items()}
    if isinstance(x, list):
      return [walk(v) for v in x]
    return x

  return walk(json.loads(bytes(data[start:end])))


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _run_task(item_fn: Callable, cache_dir: str, task: Task) -> TaskResult:
  """Worker body: runs `item_fn` over the task's items and writes the cache files."""
  summaries, payloads, skips = [], [], []
  for item in task.items:
    summary, payload, skip = decode.run_item(item_fn, item)
    summaries.append(summary)
    payloads.append(payload)
    if skip is not None:
      skips.append(skip)
  base = os.path.join(cache_dir, task.key)
  _write_atomic(base + PAYLOAD_SUFFIX, encode_payloads(payloads))
  _write_atomic(base + ".json", json.dumps({"summaries": summaries, "skips": skips}).encode())
  return TaskResult(task.key, summaries, skips)


def _load_result(cache_dir: str, key: str) -> TaskResult | None:
  """The cached result of task `key`, or None when it must be (re)done: files missing, or a
  payload file that is not in this format (a foreign or planted file is redone, never read)."""
  path = os.path.join(cache_dir, key + ".json")
  payload = os.path.join(cache_dir, key + PAYLOAD_SUFFIX)
  if not os.path.exists(path) or not os.path.exists(payload):
    return None
  with open(payload, "rb") as f:
    if f.read(len(MAGIC)) != MAGIC:
      return None
  try:
    with open(path) as f:
      blob = json.load(f)
    return TaskResult(key, blob["summaries"], blob["skips"])
  except (ValueError, KeyError, TypeError):
    return None


def load_payloads(cache_dir: str, key: str) -> list[dict | None]:
  """The cached payloads of one task, aligned with its items (None = skipped)."""
  with open(os.path.join(cache_dir, key + PAYLOAD_SUFFIX), "rb") as f:
    return decode_payloads(f.read())


def run(tasks: Sequence[Task], item_fn: Callable[[Any], tuple[dict, dict]], cache_dir: str,
        num_workers: int, desc: str) -> list[TaskResult]:
  """Runs every task not already cached in `cache_dir`; returns all results in task order.

  Args:
    tasks: the work, in the order the dataset will be written.
    item_fn: picklable `item -> (summary, payload)`, raising `decode.Skip` on bad input.
    cache_dir: where the per-task files live (created).
    num_workers: processes in the pool; 0 runs in this process (debugging, tests).
    desc: progress-bar label.
  """
  keys = [t.key for t in tasks]
  if len(set(keys)) != len(keys):
    raise ValueError(f"{desc}: duplicate task keys; ids must be unique within a split")
  os.makedirs(cache_dir, exist_ok=True)
  results = {t.key: _load_result(cache_dir, t.key) for t in tasks}
  todo = [t for t in tasks if results[t.key] is None]
  cached = len(tasks) - len(todo)
  bar = tqdm.tqdm(total=len(tasks), initial=cached, desc=desc, unit=" tasks",
                  file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
  work = functools.partial(_run_task, item_fn, cache_dir)
  for result in _map(work, todo, num_workers):
    results[result.key] = result
    bar.update(1)
  bar.close()
  if cached:
    print(f"{desc}: reused {cached} of {len(tasks)} tasks from {cache_dir}", file=sys.stderr)
  return [results[k] for k in keys]


def _map(work: Callable[[Task], TaskResult], tasks: Sequence[Task],
         num_workers: int) -> Iterator[TaskResult]:
  """Yields work(task) for every task, in completion order.

  At most 4 tasks per worker are in flight, so 240k videos never become 240k futures.
  'spawn' keeps workers clean of the parent's threads (JAX, grain) that fork would copy.
  """
  if num_workers <= 0:
    yield from map(work, tasks)
    return
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
    pending = iter(tasks)
    in_flight = set()
    for task in pending:
      in_flight.add(pool.submit(work, task))
      if len(in_flight) >= 4 * num_workers:
        done, in_flight = concurrent.futures.wait(
            in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          yield future.result()
    for future in concurrent.futures.as_completed(in_flight):
      yield future.result()
