"""Device prefetch: the next batches are placed on the devices while the current step runs.

`to_devices(batches, put, size=2)` is flax's `prefetch_to_device` for any placement: it keeps
`size` items already `put` (an asynchronous host-to-device copy on GPUs and TPUs) ahead of the
one it yields, so the copy of batch t+2 overlaps the steps in flight. The items, their order and
their contents are those of `batches` (the batch stream, and so `batch_hash`, is unchanged);
only when each is placed moves.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator


def to_devices(batches: Iterable[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
  """Yields put(item) for each item of `batches`, `size` items ahead of the consumer."""
  queue = collections.deque()
  batches = iter(batches)

  def enqueue(n: int) -> None:
    for item in itertools.islice(batches, n):
      queue.append(put(item))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
