"""DAVIS-2017 (semi-supervised video object segmentation): ingestion unit and reader.

Raw layout read by `python -m cacl_jax.prepare_data davis --src RAW --out DATA` (the official
'DAVIS-2017-trainval-480p' archive):

    RAW/JPEGImages/480p/<sequence>/00000.jpg ...
    RAW/Annotations/480p/<sequence>/00000.png ...   palette PNGs: index = object id, 0 = background
    RAW/ImageSets/2017/val.txt (and train.txt)      one sequence name per line

Each frame is one record (the original JPEG bytes, the annotation as an index PNG, the sequence
and frame names), a sequence's frames consecutive, in frame order (`builders/davis.py`). A
sequence whose frames and annotations do not pair up one to one (a frame without its
annotation, a frame-count mismatch), whose files do not decode, or whose annotation differs in
size from its frame is skipped and named in `prepare_report.json`: the evaluation needs every
frame's ground truth.

This module imports neither TFDS nor JAX (ingestion workers import it).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from cacl_jax.data import decode

RESOLUTION = "480p"


def sequence_item(item: tuple[str, str, str]) -> tuple[dict, dict]:
  """item = (sequence, its JPEG folder, its annotation folder) -> (summary, payload).

  payload = {'jpegs': [bytes], 'labels': [index PNG bytes], 'frames': [names]}. Raises
  `decode.Skip` ('missing_annotation', 'frame_count_mismatch', 'unreadable_*',
  'size_mismatch', 'no_frames') naming what is wrong.
  """
  name, image_dir, label_dir = item
  if not os.path.isdir(image_dir):
    raise decode.Skip("missing_sequence", f"{image_dir}: no frames folder for {name}", image_dir)
  images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(".jpg"))
  labels = sorted(f for f in os.listdir(label_dir) if f.lower().endswith(".png")) \
      if os.path.isdir(label_dir) else []
  if not images:
    raise decode.Skip("no_frames", f"{image_dir}: no .jpg frames", image_dir)
  stems = [os.path.splitext(f)[0] for f in images]
  label_stems = {os.path.splitext(f)[0] for f in labels}
  missing = [s for s in stems if s not in label_stems]
  if missing:
    raise decode.Skip("missing_annotation",
                      f"{name}: {len(missing)} of {len(stems)} frames have no annotation in "
                      f"{label_dir} (first: {missing[0]}.png)", label_dir)
  if len(labels) != len(images):
    raise decode.Skip("frame_count_mismatch",
                      f"{name}: {len(images)} frames but {len(labels)} annotations in {label_dir}",
                      label_dir)
  jpegs, pngs, size = [], [], None
  for stem, image_file in zip(stems, images):
    image_path = os.path.join(image_dir, image_file)
    label_path = os.path.join(label_dir, stem + ".png")
    data = decode._read_bytes(image_path)  # pylint: disable=protected-access
    with decode._open_verified(image_path, data, "image") as im:  # pylint: disable=protected-access
      frame_size = (im.height, im.width)
    label_bytes = decode._read_bytes(label_path)  # pylint: disable=protected-access
    with decode._open_verified(label_path, label_bytes, "label") as lab:  # pylint: disable=protected-access
      try:
        label = decode.voc_label_from_image(lab)   # DAVIS' palette is VOC's: P PNG = ids
      except ValueError as e:
        raise decode.Skip("bad_label", f"{label_path}: {e}", label_path) from e
    if label.shape != frame_size:
      raise decode.Skip("size_mismatch", f"{label_path}: annotation {label.shape[0]}x"
                        f"{label.shape[1]} != frame {frame_size[0]}x{frame_size[1]}", label_path)
    if size is not None and frame_size != size:
      raise decode.Skip("size_mismatch", f"{image_path}: {frame_size[0]}x{frame_size[1]}, the "
                        f"sequence's first frame is {size[0]}x{size[1]}", image_path)
    size = frame_size
    jpegs.append(data)
    pngs.append(decode.encode_label_png(label))
  summary = {"id": name, "num_frames": len(jpegs), "height": size[0], "width": size[1],
             "bytes": sum(map(len, jpegs)) + sum(map(len, pngs))}
  return summary, {"jpegs": jpegs, "labels": pngs, "frames": stems}


def list_split(src: str, split: str) -> list[tuple[str, str, str]]:
  """(sequence, JPEG folder, annotation folder) of `split` (ImageSets/2017/<split>.txt)."""
  with open(os.path.join(src, "ImageSets", "2017", f"{split}.txt")) as f:
    names = [line.strip() for line in f if line.strip()]
  return [(n, os.path.join(src, "JPEGImages", RESOLUTION, n),
           os.path.join(src, "Annotations", RESOLUTION, n)) for n in names]


@dataclasses.dataclass
class Sequence:
  """One video: `images` uint8 [T, H, W, 3], `labels` uint8 [T, H, W] (object ids, 0 = bg)."""
  name: str
  frames: list[str]
  images: np.ndarray
  labels: np.ndarray


class DavisSource:
  """The prepared sequences of one split, in list order; `source[i]` decodes sequence i."""

  def __init__(self, records, table: dict):
    self._records = records
    self.names = list(table["ids"])
    self.num_frames = np.asarray(table["num_frames"], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self.num_frames)[:-1]]).astype(np.int64)
    if int(self.num_frames.sum()) != len(records):
      raise ValueError(f"metadata lists {int(self.num_frames.sum())} frames but the split has "
                       f"{len(records)} records: re-run prepare_data davis")

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> Sequence:
    start, count = int(self._starts[index]), int(self.num_frames[index])
    records = self._records.__getitems__(list(range(start, start + count)))
    frames = [r["frame"].decode() if isinstance(r["frame"], bytes) else str(r["frame"])
              for r in records]
    return Sequence(self.names[index], frames,
                    np.stack([decode.decode_image(r["image"]) for r in records]),
                    np.stack([decode.decode_label_png(r["label"]) for r in records]))


def davis_source(root: str, split: str = "val") -> DavisSource:
  """DAVIS-2017 `split` prepared by `prepare_data davis` under `root` (= DATA)."""
  from cacl_jax.data import real  # pylint: disable=g-import-not-at-top
  records, metadata = real._open(root, "davis", split)  # pylint: disable=protected-access
  return DavisSource(records, metadata[split])
