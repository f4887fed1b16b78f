"""Pair pipeline (grain) and augmentations: geometry, stride, the global stream, photometry."""
import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cacl_jax.data import augment
from cacl_jax.data import pipeline
from cacl_jax.data import video as video_lib


def data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name='synthetic', root='', image_size=32, frame_stride=8, pair_type='cross_frame',
      crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), num_workers=0, prefetch=2,
      synthetic=dict(num_videos=64, num_frames=16, frame_size=48, seed=0)))
  config.update(overrides)
  return config


def constant_video(values, size=24, name=''):
  """Frame t is filled with values[t]: crops of it reveal which frame (and video) they came from."""
  frames = np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                           (len(values), size, size, 3)).copy()
  return video_lib.ArrayVideo(frames, name=name)


class BrokenVideo(video_lib.Video):
  name = 'broken'
  num_frames = 10

  def frames(self, indices):
    raise OSError('moov atom not found')


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# Host geometry.
# ----------------------------------------------------------------------------------------
def test_crop_box_follows_scale_and_ratio():
  rng = np.random.default_rng(0)
  boxes = np.array([augment.random_resized_crop_box(rng, 256, 340) for _ in range(2000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 256).all() and (left + w <= 340).all()
  area = h * w / (256 * 340)
  # Boxes that do not fit are redrawn, which pulls the mean area below 0.6.
  assert area.min() > 0.19 and area.max() <= 1.0 and 0.4 < area.mean() < 0.6
  assert ((w / h > 0.73) & (w / h < 1.37)).mean() > 0.99
  # A very wide image falls back to the widest centre crop allowed by the ratio range.
  assert augment.random_resized_crop_box(rng, 10, 1000, scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_shared_crop_flip_applies_one_geometry_to_both_frames():
  rng = np.random.default_rng(0)
  gradient = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 64, 3))
  frames = np.stack([gradient, 255 - gradient])
  flips = 0
  for _ in range(50):
    a, b = augment.shared_crop_flip(rng, frames, 32)
    np.testing.assert_array_equal(a.astype(int) + b, 255)  # same box, same flip
    flips += a[0, 0, 0] > a[0, -1, 0]
  assert 10 < flips < 40


def test_pairs_share_geometry():
  """A video with two identical frames: v == v_pos before the photometric part."""
  texture = np.random.default_rng(0).integers(0, 256, (1, 40, 40, 3), np.uint8)
  source = [video_lib.ArrayVideo(np.repeat(texture, 2, axis=0), name=f'{i}') for i in range(8)]
  ds = pipeline.make_pretrain_dataset(data_config(frame_stride=1), global_batch_size=4,
                                      process_index=0, process_count=1, seed=0, source=source)
  batches = take(ds, 4)
  for batch in batches:
    assert set(batch) == {'v', 'v_pos', 'video', 'frames'}
    assert batch['v'].shape == (4, 32, 32, 3) and batch['v'].dtype == np.uint8
    np.testing.assert_array_equal(batch['v'], batch['v_pos'])
  crops = np.concatenate([b['v'] for b in batches]).reshape(16, -1)
  assert len({c.tobytes() for c in crops}) == 16  # every visit draws a new box


@pytest.mark.parametrize('pair_type,num_frames,stride,expected', [
    ('cross_frame', 40, 8, 8), ('same_frame', 40, 8, 0), ('cross_frame', 5, 8, 4),
    ('cross_frame', 1, 8, 0), ('cross_frame', 40, 0, 0)])
def test_stride_is_respected_and_short_videos_clamp(pair_type, num_frames, stride, expected):
  source = [constant_video(np.arange(num_frames) * 5 + 20) for _ in range(4)]
  config = data_config(pair_type=pair_type, frame_stride=stride)
  batch = take(pipeline.make_pretrain_dataset(config, global_batch_size=16, process_index=0,
                                              process_count=1, seed=0, source=source), 1)[0]
  t = (batch['v'][:, 0, 0, 0].astype(int) - 20) // 5
  t_pos = (batch['v_pos'][:, 0, 0, 0].astype(int) - 20) // 5
  np.testing.assert_array_equal(t_pos - t, expected)
  assert t.min() >= 0 and t_pos.max() < num_frames
  if num_frames == 40:
    assert len(set(t)) > 5  # t is drawn per visit


class CountingSource:
  """40 constant videos (video i has every pixel 3·i); records which videos are decoded."""

  def __init__(self, num_videos=40):
    self.num_videos, self.decoded = num_videos, []

  def __len__(self):
    return self.num_videos

  def __getitem__(self, index):
    return CountingVideo(self, int(index))


class CountingVideo(video_lib.Video):
  num_frames = 4

  def __init__(self, source, index):
    self.source, self.index, self.name = source, index, f'v{index}'

  def frames(self, indices):
    self.source.decoded.append(self.index)
    return np.full((len(indices), 24, 24, 3), 3 * self.index, np.uint8)


def global_batches(process_count, steps, start_step=0, num_workers=0, sources=None):
  """Steps start_step+1 .. start_step+steps, assembled from `process_count` pipelines."""
  sources = sources if sources is not None else [CountingSource() for _ in range(process_count)]
  config = data_config(num_workers=num_workers, prefetch=2)
  its = [iter(pipeline.make_pretrain_dataset(config, global_batch_size=8, process_index=i,
                                             process_count=process_count, seed=5,
                                             start_step=start_step, source=sources[i]))
         for i in range(process_count)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in ('v', 'v_pos', 'video', 'frames')})
  for it in its:
    if hasattr(it, 'close'):
      it.close()
  return out


def test_global_batch_of_step_t_is_the_same_for_any_process_count_and_resume():
  """The global batch of step t depends on (seed, t) only: 1, 2 or 4 processes assemble the
  same batches (pixels, videos, frames), a pipeline started at step 6 continues the stream
  exactly, and every epoch is a new permutation of all the videos."""
  one = global_batches(1, 15)
  for count in (2, 4):
    for a, b in zip(one, global_batches(count, 15)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(one[6:], global_batches(4, 9, start_step=6)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  videos = np.concatenate([b['video'] for b in one])   # 120 samples = 3 epochs of 40
  epochs = videos.reshape(3, 40)
  for epoch in epochs:
    assert sorted(epoch) == list(range(40))
  assert len({tuple(e) for e in epochs}) == 3
  np.testing.assert_array_equal(one[0]['v'][:, 0, 0, 0], 3 * one[0]['video'])   # ids tell the truth
  hashes = [pipeline.batch_hash(b['video'], b['frames']) for b in one]
  assert len(set(hashes)) == 15 and all(0 <= h < 2**64 for h in hashes)


def test_each_process_decodes_only_its_own_rows():
  """Two processes take 5 steps (one epoch of the 40 videos). Each decoded its own 20 rows,
  and beyond them (prefetching) only rows of its own next steps: never another process' rows."""
  sources = [CountingSource() for _ in range(2)]
  global_batches(2, 5, sources=sources)
  stream = global_batches(1, 10)
  for i, source in enumerate(sources):
    rows = [int(v) for b in stream for v in b['video'][4 * i:4 * i + 4]]   # steps 1..10
    decoded = collections.Counter(source.decoded)
    assert collections.Counter(rows[:20]) <= decoded <= collections.Counter(rows)


def test_grain_workers_give_the_same_stream():
  for a, b in zip(global_batches(1, 4), global_batches(1, 4, num_workers=2)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_same_batches():
  config = data_config()
  make = lambda seed: pipeline.make_pretrain_dataset(config, global_batch_size=4, process_index=0,
                                                     process_count=1, seed=seed)
  a, b, c = take(make(0), 2), take(make(0), 2), take(make(1), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['v_pos'], y['v_pos'])
  assert np.abs(a[0]['v'].astype(int) - c[0]['v']).mean() > 5


def test_undecodable_videos_are_skipped_counted_and_named():
  source = [constant_video(np.arange(12), name=f'ok{i}') for i in range(6)] + [BrokenVideo()] * 2
  report = pipeline.SkipReport()
  ds = pipeline.make_pretrain_dataset(data_config(), global_batch_size=8, process_index=0,
                                      process_count=1, seed=0, source=source, skip_report=report)
  batches = take(ds, 4)
  assert all(b['v'].shape == (8, 32, 32, 3) and set(b) == {'v', 'v_pos', 'video', 'frames'}
             for b in batches)
  # 32 pairs drawn from 4 epochs of 8 videos: 8 visits hit the 2 broken ones (plus retries).
  assert report.count >= 8 and set(report.names) == {'broken'}
  assert 'broken' in report.summary()
  with pytest.raises(RuntimeError, match='undecodable'):
    take(pipeline.make_pretrain_dataset(data_config(), global_batch_size=2, process_index=0,
                                        process_count=1, seed=0, source=[BrokenVideo()] * 2), 1)


def test_bad_configuration_gives_one_clear_error(tmp_path):
  kw = dict(process_index=0, process_count=3, seed=0)
  with pytest.raises(ValueError, match='does not divide'):
    pipeline.make_pretrain_dataset(data_config(), global_batch_size=8, **kw)
  with pytest.raises(ValueError, match='pair_type'):
    pipeline.make_pretrain_dataset(data_config(pair_type='x'), global_batch_size=9, **kw)
  with pytest.raises(FileNotFoundError, match='prepare_data kinetics'):
    pipeline.pretrain_source(data_config(name='kinetics', root=str(tmp_path / 'missing')))
  with pytest.raises(ValueError, match='data.name'):
    pipeline.pretrain_source(data_config(name='youtube'))
  source = pipeline.pretrain_source(data_config())
  assert len(source) == 64 and source[0].frames([15]).shape == (1, 48, 48, 3)


# ----------------------------------------------------------------------------------------
# Device photometry.
# ----------------------------------------------------------------------------------------
photometric = jax.jit(augment.photometric,
                      static_argnames=('jitter_p', 'grey_p', 'blur_p', 'strength'))


def unnormalize(x):
  return np.asarray(x) * np.array(augment.IMAGENET_STD) + np.array(augment.IMAGENET_MEAN)


def test_normalize_and_p0_identity():
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
  x = augment.normalize(images)
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x)[0, 0, 0],
                             (images[0, 0, 0] / 255 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD,
                             rtol=1e-5)
  y = photometric(jax.random.key(0), images, jitter_p=0.0, grey_p=0.0, blur_p=0.0)
  np.testing.assert_allclose(y, x, atol=1e-6)


def test_photometric_is_jittable_deterministic_and_independent_per_image():
  image = np.random.default_rng(1).integers(30, 220, (1, 32, 32, 3), np.uint8)
  batch = np.repeat(image, 64, axis=0)
  f = photometric
  y = f(jax.random.key(0), batch)
  assert y.shape == (64, 32, 32, 3) and y.dtype == jnp.float32
  np.testing.assert_array_equal(y, f(jax.random.key(0), batch))
  assert np.abs(np.asarray(y - f(jax.random.key(1), batch))).mean() > 0.05
  x = unnormalize(y)
  assert x.min() > -1e-5 and x.max() < 1 + 1e-5  # every operation stays in [0, 1]
  # Unaugmented (no jitter, no grey, no blur) copies are a minority: 0.2 * 0.8 * 0.5 = 8%.
  same = np.abs(np.asarray(y) - augment.normalize(image)).max(axis=(1, 2, 3)) < 1e-5
  assert same.sum() <= 14
  # Independent draws: the copies differ (only the few grey-only ones coincide), ~20% grey.
  assert len({np.asarray(v).tobytes() for v in y[~same]}) >= 64 - same.sum() - 4
  grey = np.abs(x - x.mean(-1, keepdims=True)).max(axis=(1, 2, 3)) < 1e-4
  assert 4 <= grey.sum() <= 24


def test_colour_jitter_follows_torchvision_semantics():
  rng = np.random.default_rng(2)
  images = rng.integers(40, 200, (128, 8, 8, 3), np.uint8)
  x = images / 255.0
  brightness = unnormalize(photometric(
      jax.random.key(0), images, jitter_p=1.0, grey_p=0.0, blur_p=0.0, strength=(0.4, 0, 0, 0)))
  factor = np.median(brightness / x, axis=(1, 2, 3))  # x * b, clipped above
  assert 0.6 - 1e-3 <= factor.min() < 0.7 and 1.3 < factor.max() <= 1.4 + 1e-3
  # Hue is a rotation: shifting red by 1/3 gives green, by 1/2 cyan; a full turn is identity.
  hue = jax.jit(augment._adjust_hue)
  red = jnp.array([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(hue(red, 1 / 3), [[[0, 1, 0]]], atol=1e-5)
  np.testing.assert_allclose(hue(red, 0.5), [[[0, 1, 1]]], atol=1e-5)
  np.testing.assert_allclose(hue(jnp.asarray(x[0], jnp.float32), 1.0), x[0], atol=1e-5)


def test_gaussian_blur_kernel_and_mass():
  assert augment.blur_kernel_size(224) == 23 and augment.blur_kernel_size(64) == 7
  delta = jnp.zeros((21, 21, 3)).at[10, 10].set(1.0)
  blur = jax.jit(augment._gaussian_blur, static_argnums=2)
  narrow, wide = blur(delta, jnp.float32(0.5), 7), blur(delta, jnp.float32(2.0), 7)
  np.testing.assert_allclose(narrow.sum((0, 1)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(wide.sum((0, 1)), 1.0, rtol=1e-5)
  assert narrow[10, 10, 0] > 0.6 > wide[10, 10, 0] > 0.03
  # Two pixels from the centre at σ = 2: exp(-2² / (2 σ²)) of the peak.
  np.testing.assert_allclose(wide[10, 12, 0] / wide[10, 10, 0], np.exp(-0.5), rtol=1e-4)
