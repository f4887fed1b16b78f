"""Kinetics-400 as frame records: every frame of the first 10 s, JPEG, short side 256.

Raw layouts (docs/usage.md §1), per split in {train, val}:
  * class folders: `SRC/<split>/<label>/*.mp4`;
  * flat CVDF: `SRC/<split>/*.mp4` named `<youtube_id>_<start:06d>_<end:06d>.mp4`, with
    labels from `SRC/annotations/<split>.csv` (columns label, youtube_id, time_start,
    time_end); a file absent from the csv is skipped as 'not_in_annotations'.

Storage scheme. One ArrayRecord record per *frame* ({'jpeg', 'video', 'frame'}), written
in order, so video v occupies records [start_v, start_v + num_frames_v) with the table
(ids, labels, num_frames, fps) in `metadata.json`. Drawing a pair (t, t + s) reads and
decodes exactly two ~30 kB records instead of a whole clip, which is what lets a TPU host
stream pairs from network disks. Frames are kept at the native frame rate (the stride is
in frames, docs/method.md §1), resized to short side 256 (`VideoOptions.short_side`), JPEG quality
90, first `max_seconds` = 10 s (a whole Kinetics clip).

Randomness kept: all of it within the first 10 s. Every frame is stored, so t is uniform
over all num_frames − s positions exactly as when decoding the full video; lost are only
time beyond 10 s (none for Kinetics' 10 s clips) and resolution above short side 256 (the
224 crops are taken from it, as in the paper's pipeline).

Bytes per video (`benchmarks/data_ingest.py`, 640x360 30 fps 10 s clips of a natural
photograph): 32.6 KiB per 256x455 frame at q90, 9.6 MiB per 300-frame video, i.e. about
2.4 TB for the 240k-video train split (3.5x the source mp4s). `--quality`, `--short_side`
and `--max_seconds` trade this down linearly-ish (see the benchmark's JSON).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from cacl_jax.data import decode
from cacl_jax.data.builders import base
from cacl_jax.data.builders import ingest

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
SPLITS = ("train", "val")


class FrameBuilder(base.OrderedBuilder, skip_registration=True):
  """Videos (or images, as one-frame videos) stored one frame per record, in order."""

  def _features(self):
    return tfds.features.FeaturesDict({
        "jpeg": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded frame bytes
        "video": tfds.features.Scalar(dtype=np.int32),  # index into the split's table
        "frame": tfds.features.Scalar(dtype=np.int32),  # frame index within the video
    })

  def _records(self, summary: dict, payload: dict, index: int) -> Iterator[dict]:
    for f, jpeg in enumerate(payload["jpegs"]):
      yield {"jpeg": jpeg, "video": index, "frame": f}

  def _split_metadata(self, summaries: list[dict]) -> dict:
    return {"ids": [s["id"] for s in summaries],
            "labels": [s["label"] for s in summaries],
            "num_frames": [s["num_frames"] for s in summaries]}


class CaclKinetics400(FrameBuilder):
  """Kinetics-400 frames for CACL pretraining (`data.name = 'kinetics'`)."""

  def __init__(self, *, options: decode.VideoOptions | None = None, **kwargs):
    super().__init__(options=options or decode.VideoOptions(), **kwargs)
    self._label_names: list[str] = []

  def _item_fn(self) -> Callable:
    return functools.partial(decode.video_item, options=self._options)

  def _dataset_metadata(self) -> dict:
    return {"label_names": self._label_names,
            "options": {k: getattr(self._options, k) for k in
                        ("short_side", "quality", "max_seconds", "min_frames")}}

  def _split_metadata(self, summaries: list[dict]) -> dict:
    table = super()._split_metadata(summaries)
    table["fps"] = [s["fps"] for s in summaries]
    return table

  def _list_splits(self) -> dict[str, list[ingest.Task]]:
    listed = list_kinetics(self._src)
    self._label_names = sorted({label for videos in listed.values() for _, _, label in videos
                                if label is not None})
    label_index = {name: i for i, name in enumerate(self._label_names)}
    splits = {}
    for split, videos in listed.items():
      for _, path, label in videos:
        if label is None:
          self.listing_skips[split].append({
              "name": path, "kind": "not_in_annotations",
              "reason": f"{path}: not listed in {self._src}/annotations/{split}.csv"})
      splits[split] = [ingest.Task(source_key(video_id, path), ((video_id, path, label_index[label]),))
                       for video_id, path, label in videos if label is not None]
    return splits


def source_key(video_id: str, path: str) -> str:
  """The cache key of one video: its id and its file's size and mtime, so a video replaced
  under the same name is decoded again, never served from the cache of the old file."""
  stat = os.stat(path)
  stamp = hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
  return f"{ingest.safe_key(video_id)}-{stamp}"


def _video_files(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def _cvdf_labels(csv_path: str) -> dict[str, str]:
  """CVDF annotation csv -> {'<youtube_id>_<start:06d>_<end:06d>': label}."""
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    needed = {"label", "youtube_id", "time_start", "time_end"}
    if not needed <= set(reader.fieldnames or ()):
      raise ValueError(f"{csv_path}: expected columns {sorted(needed)}, got {reader.fieldnames}")
    return {f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}":
            r["label"] for r in reader}


def list_kinetics(src: str) -> dict[str, list[tuple[str, str, str | None]]]:
  """Split -> [(video_id, path, label_name)] for the splits present under `src`.

  Raises FileNotFoundError naming the expected layouts when neither is found.
  """
  expected = (f"expected Kinetics-400 as {src}/{{train,val}}/<label>/*.mp4, or "
              f"{src}/{{train,val}}/*.mp4 with {src}/annotations/{{train,val}}.csv")
  if not os.path.isdir(src):
    raise FileNotFoundError(f"no directory {src}: {expected}")
  listed = {}
  for split in SPLITS:
    folder = os.path.join(src, split)
    if not os.path.isdir(folder):
      continue
    flat = _video_files(folder)
    csv_path = os.path.join(src, "annotations", f"{split}.csv")
    if flat:
      if not os.path.exists(csv_path):
        raise FileNotFoundError(f"{folder} holds videos directly but {csv_path} is missing: {expected}")
      labels = _cvdf_labels(csv_path)
      listed[split] = [(os.path.splitext(f)[0], os.path.join(folder, f),
                        labels.get(os.path.splitext(f)[0])) for f in flat]
    else:
      videos = []
      for label in sorted(os.listdir(folder)):
        class_dir = os.path.join(folder, label)
        if os.path.isdir(class_dir):
          videos += [(f"{label}/{os.path.splitext(f)[0]}", os.path.join(class_dir, f), label)
                     for f in _video_files(class_dir)]
      if not videos:
        raise FileNotFoundError(f"no videos under {folder}: {expected}")
      listed[split] = videos
  if not listed:
    raise FileNotFoundError(f"no train/ or val/ under {src}: {expected}")
  return listed
