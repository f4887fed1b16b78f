"""The grain pipeline of training pairs (SPEC §1): videos -> (v, v+) crops -> host batches.

    MapDataset.source(videos) -> [process_index::process_count] -> seed().shuffle() -> repeat()
      -> random_map(PairSampler) -> batch(global // processes) -> to_iter_dataset()
      [-> mp_prefetch(num_workers)] -> map(SkipReport)

Batches are `{'v': uint8 [b, S, S, 3], 'v_pos': uint8 [b, S, S, 3]}` with b the per-process
batch; the photometric part runs on the device (`augment.photometric`). The iterator of the
returned dataset is checkpointable with `grain.checkpoint.CheckpointSave/CheckpointRestore`.

Decisions:
* t is drawn per visit from the element's own RNG (grain seeds it from the pipeline seed
  and the element's position in the repeated stream), so each epoch sees a new pair and a
  restored iterator continues with exactly the pairs an uninterrupted run would have seen.
* Short videos are clamped, not skipped: a video of T frames uses s' = min(s, T - 1), so a
  1-frame video (an image) gives a same-frame pair and a 5-frame video a stride-4 pair.
  Dropping them would bias the sampling for no gain; with the prepared Kinetics clips (~250
  frames at the default s = 8) it never happens.
* An undecodable video (its `frames` raises) never stops a run: the sampler replaces it with
  another video of this process's shard, drawn from the same RNG (deterministic), and the
  name rides along with the pair to the main process, where `SkipReport` counts it, logs
  it once and drops it from the batch. After `MAX_TRIES` failures in a row the data is
  broken rather than noisy, and the sampler raises.
"""
from __future__ import annotations

import collections
import os
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


class PairSampler(grain.transforms.RandomMap):
  """Video -> {'v', 'v_pos': uint8 [S, S, 3], '_skipped': str}: frames t and t + s, shared crop.

  `fallback` is this process's shard of videos, used to replace undecodable ones.
  """

  def __init__(self, fallback: grain.MapDataset, image_size: int, stride: int,
               crop_scale: tuple[float, float] = (0.2, 1.0),
               crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    self.fallback = fallback
    self.image_size, self.stride = image_size, stride
    self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

  def _frames(self, video: video_lib.Video, rng: np.random.Generator) -> np.ndarray:
    if video.num_frames < 1:
      raise ValueError('a video without frames')
    stride = min(self.stride, video.num_frames - 1)
    t = int(rng.integers(0, video.num_frames - stride))
    return video.frames([t, t + stride])

  def random_map(self, video: video_lib.Video, rng: np.random.Generator) -> dict[str, Any]:
    skipped = []
    while True:
      try:
        crops = augment.shared_crop_flip(rng, self._frames(video, rng), self.image_size,
                                         self.crop_scale, self.crop_ratio)
        break
      except Exception:  # pylint: disable=broad-exception-caught
        # Any decoder error or malformed frame: the name travels to SkipReport.
        skipped.append(getattr(video, 'name', '') or repr(video))
        if len(skipped) == MAX_TRIES:
          raise RuntimeError(f'{MAX_TRIES} undecodable videos in a row, the last '
                             f'{skipped[-1]!r}: the data looks broken') from None
        video = self.fallback[int(rng.integers(len(self.fallback)))]
    return {'v': crops[0], 'v_pos': crops[1], _SKIPPED: '\n'.join(skipped)}


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
                          process_count: int, seed: int, source: Any = None,
                          skip_report: SkipReport | None = None) -> grain.IterDataset:
  """This process's infinite stream of pair batches (see the module docstring).

  Args:
    data_config: the `data` ConfigDict (name, image_size, frame_stride, pair_type,
      crop_scale, crop_ratio, num_workers, prefetch, ...).
    global_batch_size: pairs per step over all processes; must divide by process_count.
    process_index, process_count: this process reads videos process_index::process_count.
    seed: the pipeline seed (shuffle order, t, crops).
    source: the video source; default `pretrain_source(data_config)`.
    skip_report: receives the names of undecodable videos; a fresh one by default (it
      still logs every new name).
  Returns:
    grain IterDataset of {'v', 'v_pos': uint8 [global_batch_size // process_count, S, S, 3]};
    `iter()` of it gives the checkpointable iterator.
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
  if len(source) < process_count:
    raise ValueError(f'{len(source)} videos cannot be shared by {process_count} processes')

  videos = grain.MapDataset.source(source)[process_index::process_count]
  sampler = PairSampler(videos, data_config.image_size, stride,
                        tuple(data_config.get('crop_scale', (0.2, 1.0))),
                        tuple(data_config.get('crop_ratio', (3 / 4, 4 / 3))))
  ds = (videos.seed(seed).shuffle().repeat()
        .random_map(sampler)
        .batch(global_batch_size // process_count, drop_remainder=True))
  num_workers = data_config.get('num_workers', 0)
  prefetch = data_config.get('prefetch', 2)
  # Workers make whole batches; in-process, a few threads overlap Pillow's GIL-free resizes.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 2,
                                            prefetch_buffer_size=prefetch))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch))
  return ds.map(skip_report if skip_report is not None else SkipReport())
