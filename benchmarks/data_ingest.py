r"""Ingestion and read throughput of the real-data path, and bytes stored per Kinetics video.

  python benchmarks/data_ingest.py [--videos 8] [--seconds 10] [--height 360] [--width 640]

1. Writes `--videos` h264 mp4s shaped like Kinetics CVDF clips (default 640x360, 30 fps,
   10 s), whose frames pan and zoom over a photograph (matplotlib's grace_hopper.jpg), so
   that JPEG sizes are those of natural images rather than of flat test patterns.
2. Ingestion: `prepare_data kinetics` at the default storage settings (short side 256,
   JPEG q90, every frame of the first 10 s) with 1 and with all worker processes ->
   videos/s, videos/s per core, bytes per video, and the estimate for Kinetics-400 train
   (240k videos; the estimate scales the measured bytes/frame to 300 frames/video).
3. Reading: pairs/s from `cacl_jax.data.real.kinetics_source` alone (two JPEG decodes per
   pair) and through the grain pair pipeline (`cacl_jax.data.pipeline`, crops at 224) with
   0 and with N grain worker processes.
Prints a table and writes benchmarks/results/data_ingest.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINETICS_TRAIN_VIDEOS = 240_000
KINETICS_FRAMES_PER_VIDEO = 300  # 10 s at 30 fps, the common case


def photo() -> np.ndarray:
  import matplotlib.cbook  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
    return np.asarray(im.convert("RGB"))


def write_clip(path: str, seconds: float, height: int, width: int, fps: int, seed: int) -> None:
  """A panning/zooming view of the photograph, h264, like a handheld camera clip."""
  import av  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  base = Image.fromarray(photo()).resize((int(width * 1.6), int(height * 1.6)))
  rng = np.random.default_rng(seed)
  start, direction = rng.uniform(0, 0.3, 2), rng.uniform(-1, 1, 2)
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "23"}
    n = int(seconds * fps)
    for i in range(n):
      u = i / n
      zoom = 1.0 - 0.2 * u
      w, h = base.width * 0.6 * zoom, base.height * 0.6 * zoom
      x = (base.width - w) * np.clip(start[0] + 0.5 * direction[0] * u, 0, 1)
      y = (base.height - h) * np.clip(start[1] + 0.5 * direction[1] * u, 0, 1)
      frame = base.resize((width, height), box=(x, y, x + w, y + h))
      for packet in stream.encode(av.VideoFrame.from_image(frame)):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def time_prepare(src: str, out: str, workers: int, short_side: int,
                 quality: int) -> tuple[float, dict]:
  from cacl_jax.data import prepare as prepare_data  # pylint: disable=g-import-not-at-top
  shutil.rmtree(out, ignore_errors=True)
  t0 = time.perf_counter()
  entry = prepare_data.main(["kinetics", "--src", src, "--out", out, "--workers", str(workers),
                             "--short_side", str(short_side), "--quality", str(quality)])
  return time.perf_counter() - t0, entry


def time_source_reads(root: str, num_pairs: int, stride: int = 8) -> float:
  from cacl_jax.data import real  # pylint: disable=g-import-not-at-top
  source = real.kinetics_source(root)
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for _ in range(num_pairs):
    video = source[int(rng.integers(len(source)))]
    t = int(rng.integers(video.num_frames - stride))
    video.frames([t, t + stride])
  return num_pairs / (time.perf_counter() - t0)


def time_pipeline(root: str, num_workers: int, batches: int, batch_size: int) -> float:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from cacl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      name="kinetics", root=root, image_size=224, frame_stride=8, pair_type="cross_frame",
      crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), num_workers=num_workers, prefetch=2))
  it = iter(pipeline.make_pretrain_dataset(config, global_batch_size=batch_size, process_index=0,
                                           process_count=1, seed=0))
  next(it)  # worker start-up is not throughput
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--videos", type=int, default=8)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--height", type=int, default=360)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--fps", type=int, default=30)
  parser.add_argument("--batches", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--short_side", type=int, default=256)
  parser.add_argument("--quality", type=int, default=90)
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain reads its absl flags; this script has no absl app
  cores = os.cpu_count() or 1
  work = args.workdir or tempfile.mkdtemp(prefix="cacl_ingest_")
  src, out = os.path.join(work, "raw"), os.path.join(work, "data")

  t0 = time.perf_counter()
  for i in range(args.videos):
    path = f"{src}/train/class{i % 4}/clip{i}.mp4"
    if not os.path.exists(path):  # a reused --workdir keeps its clips
      os.makedirs(os.path.dirname(path), exist_ok=True)
      write_clip(path, args.seconds, args.height, args.width, args.fps, seed=i)
  print(f"clips ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  raw_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)

  rows, results = [], {"cores": cores, "videos": args.videos,
                       "clip": f"{args.width}x{args.height} {args.fps} fps {args.seconds:g} s h264",
                       "short_side": args.short_side, "quality": args.quality}
  for workers in sorted({1, cores}):
    seconds, entry = time_prepare(src, out, workers, args.short_side, args.quality)
    rate = args.videos / seconds
    results[f"ingest_videos_per_s_workers{workers}"] = rate
    rows.append((f"ingest, {workers} worker(s)", f"{rate:.2f} videos/s",
                 f"{rate / workers:.2f} videos/s/core"))
  train = entry["splits"]["train"]
  frames = args.videos * int(args.seconds * args.fps)
  bytes_per_video = train["stored_bytes"] / train["num_ok"]
  bytes_per_frame = train["stored_bytes"] / frames
  full = bytes_per_frame * KINETICS_FRAMES_PER_VIDEO * KINETICS_TRAIN_VIDEOS
  results.update(bytes_per_video=bytes_per_video, bytes_per_frame=bytes_per_frame,
                 raw_mp4_bytes_per_video=raw_bytes / args.videos,
                 kinetics400_train_estimate_bytes=full)
  rows.append(("stored per video", f"{bytes_per_video / 2**20:.2f} MiB",
               f"{bytes_per_frame / 1024:.1f} KiB/frame (raw mp4 {raw_bytes / args.videos / 2**20:.2f} MiB)"))
  rows.append(("Kinetics-400 train estimate", f"{full / 1e12:.2f} TB",
               f"240k videos x {KINETICS_FRAMES_PER_VIDEO} frames"))

  rate = time_source_reads(out, 400)
  results["source_pairs_per_s"] = rate
  rows.append(("read pair (2 JPEG decodes)", f"{rate:.0f} pairs/s", "1 core, no augmentation"))
  for workers in sorted({0, cores}):
    rate = time_pipeline(out, workers, args.batches, args.batch_size)
    results[f"pipeline_pairs_per_s_workers{workers}"] = rate
    per_core = rate / max(workers, 1)
    rows.append((f"grain pairs (224 crops), {workers} workers", f"{rate:.0f} pairs/s",
                 f"{per_core:.0f} pairs/s/core"))

  width = max(len(r[0]) for r in rows)
  print(f"\n{results['clip']}, {args.videos} clips, {cores} cores, stored at short side "
        f"{args.short_side}, JPEG q{args.quality}")
  for name, value, note in rows:
    print(f"{name:<{width}}  {value:>14}  {note}")
  os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
  suffix = "" if (args.short_side, args.quality) == (256, 90) else f"_s{args.short_side}_q{args.quality}"
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"data_ingest{suffix}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {path}")
  if not args.workdir:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
