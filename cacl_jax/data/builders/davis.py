"""DAVIS-2017 480p for the label-propagation evaluation (`python -m cacl_jax.propagate`).

One record per frame, {'image': the original JPEG bytes, 'label': object ids as an index PNG,
'sequence', 'frame'}, a sequence's frames consecutive and in order; `metadata.json` holds per
split the sequence names and frame counts. Splits: 'val' (required) and 'train' when
ImageSets/2017/train.txt exists. See `cacl_jax.data.davis` for the raw layout and the checks.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from cacl_jax.data import davis
from cacl_jax.data.builders import base
from cacl_jax.data.builders import ingest


class CaclDavis2017(base.OrderedBuilder):
  """DAVIS-2017 semi-supervised VOS, 480p (`data.name = 'davis'`)."""

  def __init__(self, **kwargs):
    super().__init__(options=davis.RESOLUTION, **kwargs)

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # JPEG bytes
        "label": tfds.features.Tensor(shape=(), dtype=np.object_),  # uint8 index PNG
        "sequence": tfds.features.Text(),
        "frame": tfds.features.Text(),
    })

  def _item_fn(self) -> Callable:
    return davis.sequence_item

  def _records(self, summary: dict, payload: dict, index: int) -> Iterator[dict]:
    for frame, image, label in zip(payload["frames"], payload["jpegs"], payload["labels"]):
      yield {"image": image, "label": label, "sequence": summary["id"], "frame": frame}

  def _split_metadata(self, summaries: list[dict]) -> dict:
    return {"ids": [s["id"] for s in summaries],
            "num_frames": [s["num_frames"] for s in summaries],
            "sizes": [[s["height"], s["width"]] for s in summaries]}

  def _list_splits(self) -> dict[str, list[ingest.Task]]:
    src, res = self._src, davis.RESOLUTION
    expected = (f"expected DAVIS-2017 as {src}/JPEGImages/{res}/<sequence>/*.jpg, "
                f"{src}/Annotations/{res}/<sequence>/*.png and {src}/ImageSets/2017/val.txt")
    for path in (os.path.join(src, "JPEGImages", res), os.path.join(src, "Annotations", res),
                 os.path.join(src, "ImageSets", "2017", "val.txt")):
      if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}: {expected}")
    splits = {}
    for split in ("train", "val"):
      if not os.path.exists(os.path.join(src, "ImageSets", "2017", f"{split}.txt")):
        continue
      items = davis.list_split(src, split)
      if not items:
        raise ValueError(f"{src}/ImageSets/2017/{split}.txt lists no sequence")
      splits[split] = [ingest.Task(ingest.safe_key(item[0]), (item,)) for item in items]
    return splits
