"""ImageNet as one-frame videos, for `same_frame` pretraining (docs/method.md §1, `data.name = 'imagenet'`).

Raw layout (docs/usage.md §1): `SRC/train/<wnid>/*.JPEG` (and `SRC/val/<wnid>/*.JPEG` if present in
the same layout). Each image is fully decoded once at ingestion (broken files are skipped
and named) and stored as its original bytes: no re-encoding loss, ~110 kB per image.
Records use the frame layout of `kinetics.FrameBuilder` with one frame per "video", so
the same reader serves both datasets.
"""
from __future__ import annotations

import os
from typing import Callable

from cacl_jax.data import decode
from cacl_jax.data.builders import ingest
from cacl_jax.data.builders import kinetics

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
CHUNK = 256  # Images per cached task: small enough to resume cheaply, big enough for few files.


class CaclImagenet(kinetics.FrameBuilder):
  """ImageNet images for CACL pretraining."""

  def __init__(self, **kwargs):
    super().__init__(options="original-bytes", **kwargs)
    self._label_names: list[str] = []

  def _item_fn(self) -> Callable:
    return decode.image_item

  def _dataset_metadata(self) -> dict:
    return {"label_names": self._label_names}

  def _list_splits(self) -> dict[str, list[ingest.Task]]:
    expected = f"expected ImageNet as {self._src}/train/<wnid>/*.JPEG"
    if not os.path.isdir(os.path.join(self._src, "train")):
      raise FileNotFoundError(f"no directory {os.path.join(self._src, 'train')}: {expected}")
    listed = {}
    for split in ("train", "val"):
      folder = os.path.join(self._src, split)
      if not os.path.isdir(folder):
        continue
      classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
      listed[split] = [
          (f"{wnid}/{os.path.splitext(f)[0]}", os.path.join(folder, wnid, f), wnid)
          for wnid in classes for f in sorted(os.listdir(os.path.join(folder, wnid)))
          if f.lower().endswith(IMAGE_EXTENSIONS)]
      if not listed[split]:
        raise FileNotFoundError(f"no images under {folder}/<wnid>/: {expected}")
    self._label_names = sorted({wnid for items in listed.values() for _, _, wnid in items})
    index = {wnid: i for i, wnid in enumerate(self._label_names)}
    return {split: ingest.chunk_tasks([(i, p, index[w]) for i, p, w in items], CHUNK, "chunk")
            for split, items in listed.items()}
