"""Segmentation input pipelines for the linear protocol and fine-tuning (docs/evaluation.md), on grain.

Items come from a segmentation source (`cacl_jax.data`): dicts
`{'image': uint8 [H, W, 3], 'label': uint8 [H, W] (255 = ignore), 'id': str}`.

* Train: random scale in [0.5, 2.0], random `image_size`² crop (images smaller than the crop
  are padded with the ImageNet mean colour, labels with 255), horizontal flip. Infinite,
  reshuffled every epoch; each process reads its own disjoint shard (`indices[p::P]`).
* Val: full resolution. Every image is padded bottom/right to one fixed `data.eval_pad_size`
  (a multiple of the output stride, so the backbone accepts it and batches shard over the
  mesh) with label 255 in the padding; the logits are upsampled to that padded size, so every
  real label pixel is scored at its own resolution and the padding is ignored. Each process
  reads a disjoint shard and all processes run the same number of steps: missing samples are
  all-255 fillers that add nothing to the confusion matrix.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from cacl_jax.data import pipeline

IGNORE_LABEL = 255
# ImageNet mean colour: normalises to ~0, so padding looks like "no signal" to the network.
MEAN_RGB = (124, 116, 104)


# ----------------------------------------------------------------------------- sources


def segmentation_source(data_config, split: str):
  """The segmentation source named by `data.name` ('synthetic' | 'voc' | 'cityscapes').

  split: 'train' or 'val'; 'train' reads the prepared split `data.train_split` (default
  'train', which for VOC is SBD trainaug, 10,582 images, when `prepare_data voc` had it).
  """
  name = data_config.name
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if name == "synthetic":
    from cacl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    syn = data_config.synthetic
    return synthetic.SyntheticSegmentation(
        split=split,
        num_images=syn.num_train_images if split == "train" else syn.num_val_images,
        frame_size=syn.frame_size, seed=syn.seed)
  from cacl_jax.data import real  # pylint: disable=g-import-not-at-top
  real_split = data_config.get("train_split", "train") if split == "train" else "val"
  if name == "voc":
    return real.voc_source(data_config.root, real_split)
  if name == "cityscapes":
    return real.cityscapes_source(data_config.root, real_split)
  raise ValueError(f"data.name must be 'synthetic', 'voc' or 'cityscapes', got {name!r}")


def subset_indices(num_images: int, fraction: float, seed: int) -> np.ndarray:
  """Indices of a `fraction` subset of the train split for limited-sample fine-tuning.

  One fixed permutation per seed; a subset is its first ceil(fraction·n) entries, so subsets
  of the same seed are nested (1% ⊂ 5% ⊂ 10% ⊂ 100%). Returned sorted, int64.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"finetune_fraction must be in (0, 1], got {fraction}")
  if num_images <= 0:
    raise ValueError(f"the train split is empty ({num_images} images)")
  order = np.random.default_rng(seed).permutation(num_images)
  count = max(1, math.ceil(fraction * num_images - 1e-9))
  return np.sort(order[:count]).astype(np.int64)


class Subset:
  """The items `indices` of a random-access source, as a random-access source (picklable)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
      raise ValueError(f"subset indices must lie in [0, {len(source)})")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


# ----------------------------------------------------------------------------- train


def _check_item(item: dict) -> tuple[np.ndarray, np.ndarray]:
  image, label = np.asarray(item["image"]), np.asarray(item["label"])
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image {item.get('id')!r}: want uint8 [H, W, 3], got {image.dtype} {image.shape}")
  if label.shape != image.shape[:2]:
    raise ValueError(f"label {item.get('id')!r}: want [H, W] = {image.shape[:2]}, got {label.shape}")
  return image, label.astype(np.uint8)


def scale_crop_flip(item: dict, rng: np.random.Generator, image_size: int,
                    scale_range: tuple[float, float] = (0.5, 2.0)) -> dict:
  """The linear protocol's train augmentation for one sample.

  Scales the image by s ~ U(scale_range) (bilinear; labels nearest), takes a random
  `image_size`² window (padding with the mean colour / 255 where the scaled image is smaller)
  and flips horizontally with p = 0.5. Only the window's source region is resampled.

  Returns {'image': uint8 [S, S, 3], 'label': uint8 [S, S]}.
  """
  image, label = _check_item(item)
  height, width = label.shape
  s = rng.uniform(*scale_range)
  sh, sw = max(1, round(height * s)), max(1, round(width * s))
  ch, cw = min(image_size, sh), min(image_size, sw)
  y0 = int(rng.integers(0, sh - ch + 1))
  x0 = int(rng.integers(0, sw - cw + 1))
  # The crop window in source coordinates; PIL resamples just this box.
  box = (x0 * width / sw, y0 * height / sh, (x0 + cw) * width / sw, (y0 + ch) * height / sh)
  crop_image = np.asarray(Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box))
  crop_label = np.asarray(Image.fromarray(label).resize((cw, ch), Image.NEAREST, box=box))
  out_image = np.empty((image_size, image_size, 3), np.uint8)
  out_image[:] = MEAN_RGB
  out_label = np.full((image_size, image_size), IGNORE_LABEL, np.uint8)
  # Place the window at a random offset inside the padded canvas.
  py = int(rng.integers(0, image_size - ch + 1))
  px = int(rng.integers(0, image_size - cw + 1))
  out_image[py:py + ch, px:px + cw] = crop_image
  out_label[py:py + ch, px:px + cw] = crop_label
  if rng.random() < 0.5:
    out_image, out_label = out_image[:, ::-1], out_label[:, ::-1]
  return {"image": np.ascontiguousarray(out_image), "label": np.ascontiguousarray(out_label)}


@dataclasses.dataclass(frozen=True)
class _TrainAugment(grain.transforms.RandomMap):
  """Picklable wrapper so grain worker processes can run `scale_crop_flip`."""
  image_size: int
  scale_range: tuple[float, float]

  def random_map(self, element, rng: np.random.Generator):
    return scale_crop_flip(element, rng, self.image_size, self.scale_range)


def _read_options(num_workers: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=max(1, num_workers) * 2, prefetch_buffer_size=8)


def _prefetch(ds: grain.IterDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
  """`num_workers` grain worker processes, which leave signals to this process and hand
  their batches over out of shared memory (`pipeline.worker_init`, `pipeline.in_own_memory`)."""
  if num_workers <= 0:
    return ds
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch),
                        worker_init_fn=pipeline.worker_init).map(pipeline.in_own_memory)


def train_dataset(source, data_config, batch_size: int, seed: int,
                  indices: Sequence[int] | None = None, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0) -> grain.IterDataset:
  """An infinite iterator of augmented train batches for this process, from batch
  `start_step` + 1 on: batch t is a function of (seed, t) alone, so a probe resumed after
  step S sees the batches an uninterrupted one would have.

  Args:
    source: segmentation source (random access, len, items as in the module doc).
    data_config: `data.image_size`, optional `data.scale_range` (default (0.5, 2.0)),
      `data.num_workers`, `data.prefetch`.
    batch_size: this process' share of the global batch.
    seed: shuffling / augmentation seed (shared by all processes; shards are disjoint).
    indices: the train subset (limited-sample fine-tuning); None = the whole split.
    process_index, process_count: this process' shard is `indices[process_index::process_count]`.

  Yields {'image': uint8 [batch_size, S, S, 3], 'label': uint8 [batch_size, S, S]}.
  """
  if indices is not None:
    source = Subset(source, indices)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"process {process_index} has {len(ds)} train images, fewer than its "
                     f"batch of {batch_size}; lower batch_size")
  scale_range = tuple(data_config.get("scale_range", (0.5, 2.0)))
  ds = (ds.seed(seed).shuffle().repeat()
        .random_map(_TrainAugment(int(data_config.image_size), scale_range))
        .batch(batch_size, drop_remainder=True)[int(start_step):])
  num_workers = int(data_config.get("num_workers", 0))
  return _prefetch(ds.to_iter_dataset(_read_options(num_workers)), num_workers,
                   int(data_config.get("prefetch", 2)))


# ----------------------------------------------------------------------------- val


def pad_for_eval(item: dict, pad_size: tuple[int, int]) -> dict:
  """Pads one val sample bottom/right to `pad_size` = (H_pad, W_pad); labels with 255.

  Returns {'image': uint8 [H_pad, W_pad, 3], 'label': uint8 [H_pad, W_pad], 'id': str,
  'size': int32 [2] (the original H, W)}.
  """
  image, label = _check_item(item)
  height, width = label.shape
  ph, pw = pad_size
  if height > ph or width > pw:
    raise ValueError(f"val image {item.get('id')!r} is {height}x{width}, larger than "
                     f"data.eval_pad_size {ph}x{pw}")
  out_image = np.empty((ph, pw, 3), np.uint8)
  out_image[:] = MEAN_RGB
  out_image[:height, :width] = image
  out_label = np.full((ph, pw), IGNORE_LABEL, np.uint8)
  out_label[:height, :width] = label
  return {"image": out_image, "label": out_label, "id": str(item.get("id", "")),
          "size": np.array([height, width], np.int32)}


@dataclasses.dataclass(frozen=True)
class _PadForEval(grain.transforms.Map):
  pad_size: tuple[int, int]

  def map(self, element):
    return pad_for_eval(element, self.pad_size)


def eval_pad_size(data_config) -> tuple[int, int]:
  """`data.eval_pad_size` as (H, W), checked to be multiples of the output stride 8."""
  size = data_config.get("eval_pad_size", None)
  if size is None or len(size) != 2:
    raise ValueError("data.eval_pad_size must be (H, W), at least the largest val image")
  ph, pw = int(size[0]), int(size[1])
  if ph % 8 or pw % 8:
    raise ValueError(f"data.eval_pad_size {ph}x{pw} must be multiples of the output stride 8")
  return ph, pw


def num_val_steps(num_images: int, batch_size: int, process_count: int = 1) -> int:
  """Steps every process runs: enough for the largest per-process shard (ceil(n / P))."""
  return math.ceil(math.ceil(num_images / process_count) / batch_size)


def val_batches(source, data_config, batch_size: int, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, Any]]:
  """This process' val batches at full resolution, padded to `data.eval_pad_size`.

  Args:
    source: segmentation source.
    data_config: `data.eval_pad_size`, `data.num_workers`, `data.prefetch`.
    batch_size: this process' share of the global eval batch.
    process_index, process_count: the shard is `source[process_index::process_count]`.

  Yields `num_val_steps(len(source), batch_size, process_count)` dicts
  {'image': uint8 [b, H_pad, W_pad, 3], 'label': uint8 [b, H_pad, W_pad],
   'size': int32 [b, 2], 'id': list of b str}. Filler samples (beyond this shard) have an
  all-255 label, size (0, 0) and id ''.
  """
  pad = eval_pad_size(data_config)
  ds = grain.MapDataset.source(source)[process_index::process_count].map(_PadForEval(pad))
  num_workers = int(data_config.get("num_workers", 0))
  it = iter(_prefetch(ds.to_iter_dataset(_read_options(num_workers)), num_workers,
                      int(data_config.get("prefetch", 2))))
  filler = {"image": np.full((*pad, 3), MEAN_RGB, np.uint8),
            "label": np.full(pad, IGNORE_LABEL, np.uint8), "id": "",
            "size": np.zeros(2, np.int32)}
  try:
    for _ in range(num_val_steps(len(source), batch_size, process_count)):
      items = [next(it, filler) for _ in range(batch_size)]
      yield {"image": np.stack([x["image"] for x in items]),
             "label": np.stack([x["label"] for x in items]),
             "size": np.stack([x["size"] for x in items]),
             "id": [x["id"] for x in items]}
  finally:
    # Stops grain's worker processes now rather than at interpreter shutdown.
    if hasattr(it, "close"):
      it.close()
