"""PASCAL VOC 2012 (+ SBD trainaug) and Cityscapes for evaluation (docs/evaluation.md).

One record per image: {'image': original encoded bytes (VOC JPEG / Cityscapes PNG),
'label': class-index PNG (VOC indices or Cityscapes trainIds, 255 = ignore), 'id'}.
Labels are converted at ingestion (palette → indices, labelIds → trainIds), so readers
only decode. Pairs whose label is missing, unreadable, or of another size than the image
are skipped and named.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from cacl_jax.data import decode
from cacl_jax.data.builders import base
from cacl_jax.data.builders import ingest

CHUNK = 64  # Images per cached task.


class SegmentationBuilder(base.OrderedBuilder, skip_registration=True):
  """(image, label) records in id order."""

  CLASS_NAMES: tuple[str, ...] = ()

  def __init__(self, **kwargs):
    super().__init__(options="v1", **kwargs)

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded RGB image
        "label": tfds.features.Tensor(shape=(), dtype=np.object_),  # uint8 index PNG
        "id": tfds.features.Text(),
    })

  def _records(self, summary: dict, payload: dict, index: int) -> Iterator[dict]:
    yield {"image": payload["image"], "label": payload["label"], "id": summary["id"]}

  def _dataset_metadata(self) -> dict:
    return {"class_names": list(self.CLASS_NAMES)}


def _read_list(path: str) -> list[str]:
  """Image ids from a VOC list file; also accepts DeepLab's '/JPEGImages/x.jpg /...png' lines."""
  with open(path) as f:
    return [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]


class CaclVoc(SegmentationBuilder):
  """PASCAL VOC 2012: 'train' = SBD trainaug (10,582) when SBD is present, else train; 'val'.

  Expected under SRC (a VOCdevkit root): VOC2012/JPEGImages/*.jpg,
  VOC2012/SegmentationClass/*.png (palette PNGs), VOC2012/ImageSets/Segmentation/{train,val}.txt;
  optional SBD: VOC2012/SegmentationClassAug/*.png (or SRC/SegmentationClassAug) with the list
  VOC2012/ImageSets/Segmentation/trainaug.txt (or train_aug.txt, in either place).
  """

  CLASS_NAMES = decode.VOC_CLASS_NAMES

  def _item_fn(self) -> Callable:
    return decode.voc_item

  def _find_sbd(self, voc: str) -> tuple[str, str] | None:
    labels = [d for d in (os.path.join(voc, "SegmentationClassAug"),
                          os.path.join(self._src, "SegmentationClassAug")) if os.path.isdir(d)]
    if not labels:
      return None
    names = ("trainaug.txt", "train_aug.txt")
    lists = [os.path.join(d, n) for d in (os.path.join(voc, "ImageSets", "Segmentation"), self._src,
                                          voc) for n in names]
    found = [p for p in lists if os.path.isfile(p)]
    if not found:
      raise FileNotFoundError(f"found {labels[0]} but no trainaug list; expected one of {lists}")
    return labels[0], found[0]

  def _list_splits(self) -> dict[str, list[ingest.Task]]:
    voc = os.path.join(self._src, "VOC2012")
    seg_sets = os.path.join(voc, "ImageSets", "Segmentation")
    expected = (f"expected a VOCdevkit root with {voc}/JPEGImages, {voc}/SegmentationClass and "
                f"{seg_sets}/{{train,val}}.txt")
    for path in (os.path.join(voc, "JPEGImages"), os.path.join(voc, "SegmentationClass"),
                 os.path.join(seg_sets, "train.txt"), os.path.join(seg_sets, "val.txt")):
      if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}: {expected}")
    val_ids = _read_list(os.path.join(seg_sets, "val.txt"))
    sbd = self._find_sbd(voc)
    if sbd is None:
      train_ids = _read_list(os.path.join(seg_sets, "train.txt"))
      label_dir = os.path.join(voc, "SegmentationClass")
      self.train_list = "train"
    else:
      label_dir, list_path = sbd
      train_ids = _read_list(list_path)
      self.train_list = "trainaug"
    # Evaluating on images seen in training would inflate mIoU: drop them and say so.
    val_set = set(val_ids)
    for i in train_ids:
      if i in val_set:
        self.listing_skips["train"].append(
            {"name": i, "kind": "in_val", "reason": f"{i}: train list id also in val.txt"})
    train = [(i, os.path.join(voc, "JPEGImages", i + ".jpg"), os.path.join(label_dir, i + ".png"))
             for i in train_ids if i not in val_set]
    val = [(i, os.path.join(voc, "JPEGImages", i + ".jpg"),
            os.path.join(voc, "SegmentationClass", i + ".png")) for i in val_ids]
    return {"train": ingest.chunk_tasks(train, CHUNK, "chunk"),
            "val": ingest.chunk_tasks(val, CHUNK, "chunk")}

  def _dataset_metadata(self) -> dict:
    return {**super()._dataset_metadata(), "train_list": getattr(self, "train_list", "train")}


class CaclCityscapes(SegmentationBuilder):
  """Cityscapes fine annotations, 19 trainIds (docs/evaluation.md); splits 'train' (2975) and 'val' (500).

  Expected under SRC: leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and
  gtFine/<split>/<city>/<name>_gtFine_labelIds.png.
  """

  CLASS_NAMES = decode.CITYSCAPES_CLASS_NAMES

  def _item_fn(self) -> Callable:
    return decode.cityscapes_item

  def _list_splits(self) -> dict[str, list[ingest.Task]]:
    expected = (f"expected Cityscapes as {self._src}/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png "
                f"and {self._src}/gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png")
    splits = {}
    for split in ("train", "val"):
      images_dir = os.path.join(self._src, "leftImg8bit", split)
      labels_dir = os.path.join(self._src, "gtFine", split)
      for d in (images_dir, labels_dir):
        if not os.path.isdir(d):
          raise FileNotFoundError(f"missing {d}: {expected}")
      images = sorted(glob.glob(os.path.join(images_dir, "*", "*_leftImg8bit.png")))
      if not images:
        raise FileNotFoundError(f"no *_leftImg8bit.png under {images_dir}/<city>/: {expected}")
      items = []
      for path in images:
        city = os.path.basename(os.path.dirname(path))
        image_id = os.path.basename(path)[:-len("_leftImg8bit.png")]
        items.append((image_id, path,
                      os.path.join(labels_dir, city, image_id + "_gtFine_labelIds.png")))
      splits[split] = ingest.chunk_tasks(items, CHUNK, "chunk")
    return splits
