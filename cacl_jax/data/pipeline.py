"""The grain pipeline of training pairs (docs/method.md §1): videos -> (v, v+) crops -> host batches.

The data stream is global and a function of (seed, step) alone (elastic: any process count):

    sample g (g = 0, 1, ...) = pair drawn from video perm_e(g mod V), e = g div V, with the
        element RNG of g        (perm_e: a fresh permutation of the V videos every epoch e)
    global batch of step t (1-based) = samples [(t-1)·B, t·B)
    process i of P reads rows [i·B/P, (i+1)·B/P) of each global batch, and decodes only those

    MapDataset.range(∞) -> random_map(PairSampler) -> batch(B/P) -> [(start·P + i)::P]
      -> to_iter_dataset() [-> mp_prefetch(num_workers) -> map(in_own_memory)] -> map(SkipReport)

so 1, 2 or 256 processes assemble the same global batches (`make_array_from_process_local_data`
puts process i's rows where its devices sit), and a run resumed at step S on any number of
processes continues the stream with `start_step=S`: the checkpoint needs no iterator state.

Batches are `{'v', 'v_pos': uint8 [b, S, S, 3], 'video': int64 [b], 'frames': int32 [b, 2]}`
with b = B/P: the pairs, and which video and frames (t, t + s) each came from, the identity
`batch_hash` digests. The photometric part runs on the device (`augment.photometric`).

Decisions:
* t is drawn per visit from the element's own RNG (grain seeds it from `seed` and g), so
  each epoch sees a new pair, and the pair of sample g does not depend on who decodes it.
* Short videos are clamped, not skipped: a video of T frames uses s' = min(s, T - 1), so a
  1-frame video (an image) gives a same-frame pair and a 5-frame video a stride-4 pair.
  Dropping them would bias the sampling for no gain; with the prepared Kinetics clips (~250
  frames at the default s = 8) it never happens.
* An undecodable video (its `frames` raises) never stops a run: the sampler replaces it with
  another video of the source drawn from the same RNG (deterministic, whoever decodes it),
  and the name rides along with the pair to the main process, where `SkipReport` counts it,
  logs it once and drops it from the batch. After `MAX_TRIES` failures in a row the data is
  broken rather than noisy, and the sampler raises.
"""
from __future__ import annotations

import collections
import hashlib
import os
import signal
import sys
import threading
import time
from typing import Any

import grain
import numpy as np
from absl import logging

from cacl_jax.data import augment
from cacl_jax.data import synthetic
from cacl_jax.data import video as video_lib

MAX_TRIES = 16
_SKIPPED = '_skipped'  # per-pair '\n'-joined names of the videos replaced; popped by SkipReport
PAIR_TYPES = ('cross_frame', 'same_frame')


def pretrain_source(data_config: Any, split: str = 'train') -> Any:
  """The random-access source of `Video`s named by `data.name`.

  'synthetic' reads `data.synthetic.{num_videos, num_frames, frame_size}` and optional
  `seed` (default 0) and `num_objects` ((min, max) objects per video, default (3, 5)); 'kinetics' / 'imagenet' read the prepared
  data under `data.root` through `cacl_jax.data.real`.
  """
  name = data_config.name
  if name == 'synthetic':
    cfg = data_config.synthetic
    return synthetic.SyntheticVideoSource(
        num_videos=cfg.num_videos, num_frames=cfg.num_frames, frame_size=cfg.frame_size,
        seed=cfg.get('seed', 0), split=split, num_objects=tuple(cfg.get('num_objects', (3, 5))))
  if name in ('kinetics', 'imagenet'):
    root = data_config.get('root') or ''
    if not os.path.isdir(root):
      raise FileNotFoundError(
          f'data.root={root!r} is not a directory: expected the output of '
          f'`python -m cacl_jax.prepare_data {name} --src RAW_DIR --out DATA_DIR`')
    from cacl_jax.data import real  # pylint: disable=g-import-not-at-top
    make = real.kinetics_source if name == 'kinetics' else real.imagenet_source
    return make(root, split)
  raise ValueError(f"data.name must be 'synthetic', 'kinetics' or 'imagenet', got {name!r}")


def video_of_sample(g: int, num_videos: int, seed: int) -> int:
  """The video sample g is drawn from: position g mod V of epoch g div V's own permutation."""
  epoch, position = divmod(int(g), num_videos)
  return grain.experimental.index_shuffle(position, max_index=num_videos - 1,
                                          seed=(seed + epoch) % 2**32, rounds=4)


class PairSampler(grain.transforms.RandomMap):
  """Sample g -> {'v', 'v_pos': uint8 [S, S, 3], 'video': int64, 'frames': int32 [2],
  '_skipped': str}: frames t and t + s of `video_of_sample(g)`, one shared crop.

  Undecodable videos are replaced by others of `source`, drawn from the element RNG.
  """

  def __init__(self, source: Any, seed: int, image_size: int, stride: int,
               crop_scale: tuple[float, float] = (0.2, 1.0),
               crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    self.source, self.seed = source, seed
    self.image_size, self.stride = image_size, stride
    self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

  def _frames(self, video: video_lib.Video, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    if video.num_frames < 1:
      raise ValueError('a video without frames')
    stride = min(self.stride, video.num_frames - 1)
    t = int(rng.integers(0, video.num_frames - stride))
    return [t, t + stride], video.frames([t, t + stride])

  def random_map(self, g: int, rng: np.random.Generator) -> dict[str, Any]:
    index = video_of_sample(g, len(self.source), self.seed)
    skipped = []
    while True:
      video = self.source[index]
      try:
        frames, pixels = self._frames(video, rng)
        crops = augment.shared_crop_flip(rng, pixels, self.image_size, self.crop_scale,
                                         self.crop_ratio)
        break
      except Exception:  # pylint: disable=broad-exception-caught
        # Any decoder error or malformed frame: the name travels to SkipReport.
        skipped.append(getattr(video, 'name', '') or repr(video))
        if len(skipped) == MAX_TRIES:
          raise RuntimeError(f'{MAX_TRIES} undecodable videos in a row, the last '
                             f'{skipped[-1]!r}: the data looks broken') from None
        index = int(rng.integers(len(self.source)))
    return {'v': crops[0], 'v_pos': crops[1], 'video': np.int64(index),
            'frames': np.asarray(frames, np.int32), _SKIPPED: '\n'.join(skipped)}


def batch_hash(video: np.ndarray, frames: np.ndarray) -> int:
  """The identity of a global batch: a 64-bit BLAKE2b digest (unsigned int) of its rows
  (video index, t, t + s) in batch order. video: int [B]; frames: int [B, 2]."""
  rows = np.concatenate([np.asarray(video, np.int64)[:, None], np.asarray(frames, np.int64)], 1)
  digest = hashlib.blake2b(np.ascontiguousarray(rows, '<i8').tobytes(), digest_size=8).digest()
  return int.from_bytes(digest, 'little')


class SkipReport(grain.transforms.Map):
  """Main-process end of the pipeline: pops the skip record from each batch, counts, logs.

  `count` is the number of undecodable videos replaced so far, `names` their Counter.
  """

  def __init__(self):
    self.count = 0
    self.names: collections.Counter[str] = collections.Counter()

  def map(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    for record in batch.pop(_SKIPPED):
      for name in str(record).split('\n') if record else ():
        self.count += 1
        if not self.names[name]:
          logging.warning('Skipped undecodable video %s (%d skips so far).', name, self.count)
        self.names[name] += 1
    return batch

  def summary(self) -> str:
    return f'{self.count} skipped pairs from {len(self.names)} videos: {sorted(self.names)}'


def make_pretrain_dataset(data_config: Any, *, global_batch_size: int, process_index: int,
                          process_count: int, seed: int, start_step: int = 0, source: Any = None,
                          skip_report: SkipReport | None = None) -> grain.IterDataset:
  """This process's rows of the run's global batches, from step `start_step` + 1 on.

  Args:
    data_config: the `data` ConfigDict (name, image_size, frame_stride, pair_type,
      crop_scale, crop_ratio, num_workers, prefetch, ...).
    global_batch_size: B, pairs per step over all processes; must divide by process_count.
    process_index, process_count: this process reads rows [i·B/P, (i+1)·B/P) of each batch.
    seed: the stream's seed (video order, t, crops).
    start_step: steps already taken (a resumed run's checkpoint step): the first batch is
      that of step start_step + 1, as an uninterrupted run would have seen it.
    source: the video source; default `pretrain_source(data_config)`.
    skip_report: receives the names of undecodable videos; a fresh one by default (it
      still logs every new name).
  Returns:
    grain IterDataset of {'v', 'v_pos': uint8 [B/P, S, S, 3], 'video': int64 [B/P],
    'frames': int32 [B/P, 2]}.
  """
  if global_batch_size % process_count:
    raise ValueError(f'batch_size={global_batch_size} does not divide by the number of '
                     f'processes {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} outside [0, {process_count})')
  pair_type = data_config.get('pair_type', 'cross_frame')
  if pair_type not in PAIR_TYPES:
    raise ValueError(f'data.pair_type must be one of {PAIR_TYPES}, got {pair_type!r}')
  stride = data_config.get('frame_stride', 8) if pair_type == 'cross_frame' else 0
  if stride < 0:
    raise ValueError(f'data.frame_stride must be >= 0, got {stride}')
  source = pretrain_source(data_config) if source is None else source
  if not len(source):
    raise ValueError('the pretraining source holds no videos')

  sampler = PairSampler(source, seed, data_config.image_size, stride,
                        tuple(data_config.get('crop_scale', (0.2, 1.0))),
                        tuple(data_config.get('crop_ratio', (3 / 4, 4 / 3))))
  # Row block k of the stream holds samples [k·b, (k+1)·b); step t's global batch is blocks
  # [(t-1)·P, t·P), of which this process takes block (t-1)·P + i: grain slices lazily, so
  # only those samples are ever decoded here.
  local = global_batch_size // process_count
  ds = (grain.MapDataset.range(sys.maxsize)
        .random_map(sampler, seed=seed)
        .batch(local, drop_remainder=True)
        [int(start_step) * process_count + process_index::process_count])
  num_workers = data_config.get('num_workers', 0)
  prefetch = data_config.get('prefetch', 2)
  # Workers make whole batches; in-process, a few threads overlap Pillow's GIL-free resizes.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 2,
                                            prefetch_buffer_size=prefetch))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch),
                        worker_init_fn=worker_init).map(in_own_memory)
  return ds.map(skip_report if skip_report is not None else SkipReport())


def in_own_memory(batch: dict[str, Any]) -> dict[str, Any]:
  """A batch from grain's workers, copied out of shared memory (the blocks go at once).

  A worker hands its arrays over in shared-memory blocks, unlinked only when the last array
  viewing one is garbage-collected. The trainer keeps views of one batch for the whole run
  (the diagnostics' pairs; a CPU device array may alias host memory), and a block still viewed
  when the interpreter exits is never unlinked: Python's resource tracker removes it and warns
  of "leaked shared_memory objects". One memcpy per batch makes every block short-lived.
  """
  return {k: np.array(v) if isinstance(v, grain.multiprocessing.SharedMemoryArray) else v
          for k, v in batch.items()}


def worker_init(worker_index: int, worker_count: int) -> None:
  """Start-up of each grain worker process (`mp_prefetch(worker_init_fn=...)`).

  Signals are the parent's: a preempted job (SLURM, GCE, Kubernetes) and Ctrl-C signal the
  whole process group, and a worker that died of it would take the batches it holds in shared
  memory with it, never unlinked (Python's resource tracker warns of "leaked shared_memory
  objects" at shutdown), and could make the parent's next batch fail before it saves. So a
  worker ignores SIGTERM and SIGINT and lives until the parent closes the iterator, which
  stops it and unlinks every buffered batch. Should the parent die without closing it
  (SIGKILL), the worker exits by itself within a second.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                   name='exit-with-parent').start()


def _exit_with_parent(parent: int) -> None:
  while os.getppid() == parent:   # an orphan is re-parented (to init or a subreaper)
    time.sleep(1.0)
  os._exit(0)   # pylint: disable=protected-access
