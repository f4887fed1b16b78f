"""Input pipeline throughput, and the host-vs-device cost of each augmentation piece.

    python benchmarks/input_pipeline.py [--batches 20]  # -> benchmarks/results/input_pipeline.json

Measures, on this machine's CPU:
  * pairs/s of `pipeline.make_pretrain_dataset` with 0 and 2 grain workers, and pairs/s per
    core (workers, or 1 for in-process), at demo settings (synthetic 64 px videos, 64 px
    crops) and paper settings (224 px crops from in-memory JPEG `EncodedVideo`s of 340x256
    frames standing in for prepared Kinetics clips);
  * per-piece costs: synthetic render, JPEG decode, shared crop+resize on the host (Pillow)
    vs on the device (jitted `jax.image.scale_and_translate`), and the photometric chain on
    the host (Pillow, as torchvision/MoCo-v2 do) vs on the device (`augment.photometric`).
Prints a table and writes JSON. Numbers vary with machine load: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cacl_jax.data import augment  # noqa: E402
from cacl_jax.data import pipeline  # noqa: E402
from cacl_jax.data import synthetic  # noqa: E402
from cacl_jax.data import video as video_lib  # noqa: E402


class Cost(tuple):
  """(wall ms, CPU ms) per call; CPU time (all threads of this process) is what a core pays
  and stays meaningful on a loaded machine, wall time is what a step waits for."""

  def __truediv__(self, n):
    return Cost((self[0] / n, self[1] / n))


def per_call_ms(fn, repeats: int) -> Cost:
  fn()  # warm-up (compilation, caches)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    fn()
  return Cost(((time.perf_counter() - wall) / repeats * 1e3,
               (time.process_time() - cpu) / repeats * 1e3))


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------
class JpegClips:
  """In-memory stand-in for prepared Kinetics: clips of JPEG-encoded 340x256 frames."""

  def __init__(self, num_videos: int, num_frames: int):
    rng = np.random.default_rng(0)
    frames = []
    for seed in range(8):  # 8 distinct rendered scenes, upscaled to 340x256 (natural-ish JPEGs)
      spec = synthetic.video_spec(seed, 0, 0, 128)
      clip = [synthetic.render(spec, t)[0] for t in range(num_frames)]
      frames.append([_jpeg(Image.fromarray(f).resize((340, 256), Image.BILINEAR)) for f in clip])
    self._clips = [frames[i % 8] for i in rng.permutation(num_videos)]

  def __len__(self):
    return len(self._clips)

  def __getitem__(self, i):
    return video_lib.EncodedVideo(self._clips[i], name=f'jpeg/{i}')


def _jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def data_config(image_size: int, num_workers: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='synthetic', root='', image_size=image_size, frame_stride=8, pair_type='cross_frame',
      crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), num_workers=num_workers, prefetch=2,
      synthetic=dict(num_videos=100_000, num_frames=32, frame_size=64, seed=0)))


def pipeline_rate(config, source, batch_size: int, batches: int) -> float:
  """Pairs/s of the host pipeline, after the first batch (worker start-up excluded)."""
  it = iter(pipeline.make_pretrain_dataset(config, global_batch_size=batch_size, process_index=0,
                                           process_count=1, seed=0, source=source))
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch_size / (time.perf_counter() - start)
  it.close()
  return rate


# ----------------------------------------------------------------------------------------
# Host / device alternatives for each piece.
# ----------------------------------------------------------------------------------------
def host_photometric(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
  """The MoCo-v2 chain on Pillow (torchvision's PIL path), for comparison only."""
  if rng.random() < 0.8:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    hsv = np.array(image.convert('HSV'))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-0.1, 0.1) * 255)) % 256
    image = Image.fromarray(hsv, 'HSV').convert('RGB')
  if rng.random() < 0.2:
    image = ImageOps.grayscale(image).convert('RGB')
  if rng.random() < 0.5:
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
  x = np.asarray(image, np.float32) / 255.0
  mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
  return ((x - mean) / std).astype(np.float32)


def device_crop_resize(frames: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """[B, H, W, 3] uint8 frames, [B, 4] (top, left, h, w) -> [B, size, size, 3] float32."""
  def one(frame, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / h, size / w])
    return jax.image.scale_and_translate(frame.astype(jnp.float32), (size, size, 3), (0, 1),
                                         scale, -jnp.stack([top, left]) * scale, 'linear')
  return jax.vmap(one)(frames, boxes.astype(jnp.float32))


def piece_costs(batch: int) -> dict[str, Cost]:
  rng = np.random.default_rng(0)
  costs = {}
  spec64 = synthetic.video_spec(0, 0, 0, 64)
  spec96 = synthetic.video_spec(0, 0, 0, 96)
  t = iter(range(10 ** 9))
  costs['synthetic_render_64px'] = per_call_ms(lambda: synthetic.render(spec64, next(t)), 200)
  costs['synthetic_render_96px'] = per_call_ms(lambda: synthetic.render(spec96, next(t)), 100)
  clip = JpegClips(1, 2)[0]
  costs['jpeg_decode_340x256'] = per_call_ms(lambda: clip.frames([0]), 100)
  for name, frame_hw, size in (('demo', (64, 64), 64), ('paper', (256, 340), 224)):
    frames = rng.integers(0, 256, (2, *frame_hw, 3), np.uint8)
    costs[f'{name}_host_crop_pair'] = per_call_ms(
        lambda: augment.shared_crop_flip(rng, frames, size), 100)
    many = jnp.asarray(rng.integers(0, 256, (batch, *frame_hw, 3), np.uint8))
    boxes = jnp.asarray([augment.random_resized_crop_box(rng, *frame_hw) for _ in range(batch)])
    crop = jax.jit(device_crop_resize, static_argnums=2)
    costs[f'{name}_device_crop_image'] = per_call_ms(
        lambda: crop(many, boxes, size).block_until_ready(), 5) / batch
    crops = rng.integers(0, 256, (batch, size, size, 3), np.uint8)
    pil = [Image.fromarray(c) for c in crops[:16]]
    costs[f'{name}_host_photometric_image'] = per_call_ms(
        lambda: [host_photometric(p, rng) for p in pil], 5) / len(pil)
    photometric = jax.jit(augment.photometric)
    device_crops = jnp.asarray(crops)
    keys = iter(jax.random.split(jax.random.key(0), 100))
    costs[f'{name}_device_photometric_image'] = per_call_ms(
        lambda: photometric(next(keys), device_crops).block_until_ready(), 5) / batch
  return costs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'input_pipeline.json'))
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()

  rows = []
  settings = (('demo', 64, None, 32), ('paper', 224, JpegClips(512, 32), 32))
  for name, size, source, batch in settings:
    for workers in (0, 2):
      rate = pipeline_rate(data_config(size, workers), source, batch, args.batches)
      rows.append(dict(setting=name, image_size=size, workers=workers, pairs_per_s=rate,
                       pairs_per_s_per_core=rate / max(1, workers)))
  costs = piece_costs(batch=32)

  print(f'{"setting":8} {"crop":>5} {"workers":>7} {"pairs/s":>9} {"pairs/s/core":>13}')
  for r in rows:
    print(f'{r["setting"]:8} {r["image_size"]:5d} {r["workers"]:7d} {r["pairs_per_s"]:9.1f} '
          f'{r["pairs_per_s_per_core"]:13.1f}')
  print()
  print(f'{"per item":40} {"wall ms":>8} {"cpu ms":>8}')
  for key, (wall, cpu) in costs.items():
    print(f'{key:40} {wall:8.3f} {cpu:8.3f}')
  result = dict(machine=dict(cpus=os.cpu_count(), load_avg=os.getloadavg(),
                             jax_backend=jax.default_backend()),
                batches=args.batches, pipeline=rows,
                pieces_ms={k: dict(wall=w, cpu=c) for k, (w, c) in costs.items()})
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'\nwrote {args.out}')


if __name__ == '__main__':
  main()
