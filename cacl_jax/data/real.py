"""Readers of the prepared real datasets: grain random-access sources over TFDS ArrayRecord.

    kinetics_source(DATA, 'train')[i]   -> RecordVideo  (Video: frames decoded on demand)
    imagenet_source(DATA, 'train')[i]   -> RecordVideo  (one frame)
    voc_source(DATA, 'train' | 'val')[i]        -> {'image', 'label', 'id'}
    cityscapes_source(DATA, 'train' | 'val')[i] -> {'image', 'label', 'id'}

`DATA` is the `--out` of `python -m cacl_jax.prepare_data`. Sources are picklable (grain
workers re-open the ArrayRecord files lazily) and do no sharding themselves: the
pipeline picks each process' rows of the global batch (docs/usage.md §4 multi-host). Reading uses `tfds` only through
its TensorFlow-free ArrayRecord data source.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from cacl_jax.data import decode
from cacl_jax.data import video as video_lib

# data.name -> (TFDS dataset directory under DATA, prepare_data argument).
NAMES = {
    "kinetics": "cacl_kinetics400",
    "imagenet": "cacl_imagenet",
    "voc": "cacl_voc",
    "cityscapes": "cacl_cityscapes",
    "davis": "cacl_davis2017",
}


def _open(root: str, dataset: str, split: str):
  """(ArrayRecord data source of `split`, metadata dict) of a prepared dataset.

  Raises FileNotFoundError naming the `prepare_data` command when it is not there.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  name = NAMES[dataset]
  command = f"python -m cacl_jax.prepare_data {dataset} --src RAW_DIR --out {root}"
  base = os.path.join(root, name)
  # Version-named directories (`1.0.0`) only: TFDS writes a build into a temporary sibling
  # directory and renames it when done, so a build killed after writing dataset_info.json leaves
  # that temporary directory behind; it is never read (prepare_data removes it on the rerun).
  versions = sorted((v for v in (os.listdir(base) if os.path.isdir(base) else ())
                     if re.fullmatch(r"\d+\.\d+\.\d+", v)
                     and os.path.exists(os.path.join(base, v, "dataset_info.json"))),
                    key=lambda v: tuple(int(x) for x in v.split(".")))
  if not versions:
    raise FileNotFoundError(f"no prepared {dataset} dataset in {base}; run `{command}` first")
  builder = tfds.builder_from_directory(os.path.join(base, versions[-1]))
  if split not in builder.info.splits:
    raise FileNotFoundError(f"{dataset} in {base} has splits {sorted(builder.info.splits)}, not "
                            f"{split!r}; prepare it with `{command}` from a source that has it")
  return builder.as_data_source(split), dict(builder.info.metadata)


class RecordVideo(video_lib.Video):
  """A video stored as consecutive frame records [start, start + num_frames) of `records`.

  Decodes only the frames asked for (a pair reads two records). Picklable.
  """

  def __init__(self, records, start: int, num_frames: int, name: str = "", label: int = -1):
    self._records = records
    self._start = start
    self._num_frames = num_frames
    self.name = name
    self.label = label

  @property
  def num_frames(self) -> int:
    return self._num_frames

  def encoded(self, indices: Sequence[int]) -> list[bytes]:
    """The stored JPEG bytes of the given frames."""
    indices = [int(i) for i in indices]
    for i in indices:
      if not 0 <= i < self._num_frames:
        raise IndexError(f"frame {i} out of range for {self.name!r} ({self._num_frames} frames)")
    return [r["jpeg"] for r in self._records.__getitems__([self._start + i for i in indices])]

  def frames(self, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]."""
    return np.stack([decode.decode_image(b) for b in self.encoded(indices)])

  def __repr__(self) -> str:
    return f"RecordVideo({self.name!r}, num_frames={self._num_frames})"


class FrameVideoSource:
  """grain RandomAccessDataSource of `RecordVideo`s over an ordered frame-record split.

  Attributes: `label_names` (class names, for reference; pretraining ignores labels),
  `num_frames` int64 [len] (frames per video).
  """

  def __init__(self, records, table: dict, label_names: Sequence[str]):
    self._records = records
    self._ids = list(table["ids"])
    self._labels = np.asarray(table["labels"], np.int64)
    self.num_frames = np.asarray(table["num_frames"], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self.num_frames)[:-1]]).astype(np.int64)
    self.label_names = tuple(label_names)
    if int(self.num_frames.sum()) != len(records):
      raise ValueError(f"metadata lists {int(self.num_frames.sum())} frames but the split has "
                       f"{len(records)} records: the prepared data is inconsistent, re-run prepare_data")

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index: int) -> RecordVideo:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"video {index} out of range ({len(self)} videos)")
    index %= len(self)
    return RecordVideo(self._records, int(self._starts[index]), int(self.num_frames[index]),
                       self._ids[index], int(self._labels[index]))

  def __repr__(self) -> str:
    return f"FrameVideoSource({len(self)} videos, {len(self._records)} frames)"


class SegmentationSource:
  """grain RandomAccessDataSource of {'image': uint8 [H, W, 3], 'label': uint8 [H, W], 'id': str}."""

  def __init__(self, records, class_names: Sequence[str]):
    self._records = records
    self.class_names = tuple(class_names)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[int(index)]
    image_id = record["id"]
    return {"image": decode.decode_image(record["image"]),
            "label": decode.decode_label_png(record["label"]),
            "id": image_id.decode() if isinstance(image_id, bytes) else str(image_id)}

  def __repr__(self) -> str:
    return f"SegmentationSource({len(self)} images, {len(self.class_names)} classes)"


def _video_source(root: str, dataset: str, split: str) -> FrameVideoSource:
  records, metadata = _open(root, dataset, split)
  return FrameVideoSource(records, metadata[split], metadata.get("label_names", ()))


def kinetics_source(root: str, split: str = "train") -> FrameVideoSource:
  """Kinetics-400 videos prepared by `prepare_data kinetics`; items are `RecordVideo`s."""
  return _video_source(root, "kinetics", split)


def imagenet_source(root: str, split: str = "train") -> FrameVideoSource:
  """ImageNet images as one-frame `RecordVideo`s (for `same_frame` pairs)."""
  return _video_source(root, "imagenet", split)


def voc_source(root: str, split: str) -> SegmentationSource:
  """PASCAL VOC 2012: 'train' (= SBD trainaug when prepared with it, else train) or 'val'.

  21 classes (background + 20), label 255 = ignore.
  """
  records, metadata = _open(root, "voc", split)
  return SegmentationSource(records, metadata["class_names"])


def cityscapes_source(root: str, split: str) -> SegmentationSource:
  """Cityscapes fine 'train' or 'val' with the 19 trainIds (docs/evaluation.md), 255 = ignore."""
  records, metadata = _open(root, "cityscapes", split)
  return SegmentationSource(records, metadata["class_names"])
