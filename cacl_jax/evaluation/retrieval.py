"""The retrieval protocol: dense nearest-neighbour label transfer from a memory of labelled train
crops (the Hummingbird evaluation of Balazevic et al., NeurIPS 2023). No head is trained.

    python -m cacl_jax.linear_eval --config configs/linear_eval_voc.py --workdir DIR \
        --config.pretrained=RUN --config.protocol=retrieval [--config.retrieval.memory_size=M]

Settings follow the open re-implementation vpariza/open-hummingbird-eval (`hbird/hbird_eval.py`,
`hbird/utils/transforms.py`, `eval.py`; docs/evaluation.md, "Dense retrieval protocol (Hummingbird)" gives the sources):

1. Memory: every train image, `retrieval.augmentation_epochs` times (reference default 1), as a
   crop: ColorJitter brightness / contrast / saturation / hue 0.1, each applied with p = 0.5,
   then one RandomResizedCrop (area scale 0.5–2.0, aspect 3/4–4/3, torchvision's sampler) of
   image and label, resized to `retrieval.image_size`² (bilinear / nearest; 0 = the short side of
   `data.eval_pad_size`: the reference resizes crops and val images to one input size, and our
   val images keep their size); no flip. The frozen backbone's OS8 cells, L2-normalised, are the
   keys; each cell's value is the class distribution of its 8×8 label patch (`dense_nn`).
2. Bank size `retrieval.memory_size` (0 = every labelled cell): the reference keeps
   memory_size // (train images × epochs) cells per crop, chosen by its class-rarity score times
   U(0, 1) (`dense_nn.cell_scores`); default 10,240,000 = 1024·10⁴, the paper's largest memory.
3. Every val cell (full resolution, padded as in the other protocols) retrieves its
   `retrieval.num_neighbours` = 30 nearest keys by cosine, exactly (blocked matmuls, bank sharded
   over the mesh); the softmax of their similarities / `retrieval.temperature` = 0.02 weighs their
   values; the class scores are upsampled bilinearly to label resolution and argmax'd.
4. One confusion matrix over the whole val set, the same mIoU / mAcc as the linear protocol (the
   reference's Hungarian re-matching of predicted to true classes is not applied: labels are
   transferred, not discovered).

Memory: the bank is allocated once, sharded over the mesh and already padded to the search block
(`make_steps`), so neither memorising nor searching copies it. Its bytes per device (keys
[rows, C] in `retrieval.keys_dtype`, values float32 [rows, L], valid, and the search's working
set) are checked before any feature is computed against `retrieval.max_bank_gib` or the devices'
reported memory (`check_memory`); a bank that does not fit stops the run with one line naming
its size, the budget and the largest `retrieval.memory_size` that fits.

Deterministic: the crops and the cell sampling depend on (seed, epoch, image index) only, not on
the number of devices or processes; nothing is trained, so there is nothing to checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageEnhance

from cacl_jax.runtime import parallel
from cacl_jax.runtime import paths
from cacl_jax.runtime import viz
from cacl_jax.data import augment
from cacl_jax.evaluation import dense_nn
from cacl_jax.evaluation import metrics as metrics_lib
from cacl_jax.evaluation import segdata
from cacl_jax.models import resnet

IGNORE_LABEL = 255
# The reference's memory augmentation (hbird/utils/transforms.py, get_hbird_train_transforms).
JITTER_STRENGTH, JITTER_P = 0.1, 0.5
CROP_SCALE, CROP_RATIO = (0.5, 2.0), (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------- memory crops


def _adjust_hue(image: Image.Image, shift: float) -> Image.Image:
  """torchvision's PIL adjust_hue: H of HSV (uint8) shifted by shift·255, wrapping around."""
  h, s, v = image.convert("HSV").split()
  # int() truncates toward zero, as torchvision's float → uint8 cast of shift·255.
  h = (np.asarray(h, np.int16) + int(shift * 255)) % 256
  return Image.merge("HSV", (Image.fromarray(h.astype(np.uint8), "L"), s, v)).convert("RGB")


def memory_crop(item: dict, rng: np.random.Generator, size: int) -> dict:
  """One memory crop of a train sample, as the reference makes it (module doc, step 1).

  ColorJitter as torchvision applies it to PIL images (ImageEnhance; brightness, contrast,
  saturation, hue in this order, each its own coin), then RandomResizedCrop of image and label.
  Returns {'image': uint8 [size, size, 3], 'label': uint8 [size, size]}.
  """
  image = Image.fromarray(np.asarray(item["image"], np.uint8))
  label = Image.fromarray(np.asarray(item["label"], np.uint8))
  s = JITTER_STRENGTH
  for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
    if rng.random() < JITTER_P:
      image = enhance(image).enhance(rng.uniform(1 - s, 1 + s))
  if rng.random() < JITTER_P:
    image = _adjust_hue(image, rng.uniform(-s, s))
  top, left, h, w = augment.random_resized_crop_box(rng, label.height, label.width, CROP_SCALE,
                                                     CROP_RATIO)
  box = (left, top, left + w, top + h)
  return {"image": np.asarray(image.resize((size, size), Image.BILINEAR, box=box)),
          "label": np.asarray(label.resize((size, size), Image.NEAREST, box=box))}


@dataclasses.dataclass(frozen=True)
class _MemoryCrop(grain.transforms.MapWithIndex):
  """Picklable: the crop of global image `process_index + i·process_count` in `epoch`."""
  size: int
  seed: int
  epoch: int
  process_index: int
  process_count: int

  def map_with_index(self, i: int, element):
    index = self.process_index + i * self.process_count
    crop = memory_crop(element, np.random.default_rng([self.seed, self.epoch, index]), self.size)
    return {**crop, "index": np.int32(index)}


def memory_batches(source, size: int, seed: int, epoch: int, batch_size: int, num_workers: int,
                   process_index: int = 0, process_count: int = 1):
  """This process' memory crops of one epoch, in order, in batches of `batch_size`.

  Yields `segdata.num_val_steps(len(source), batch_size, process_count)` dicts {'image': uint8
  [b, S, S, 3], 'label': uint8 [b, S, S], 'index': int32 [b] (the image's index in `source`)};
  the last batches are filled with all-255 crops (index −1), which add nothing to the memory.
  """
  ds = grain.MapDataset.source(source)[process_index::process_count].map_with_index(
      _MemoryCrop(size, seed, epoch, process_index, process_count))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_workers) * 2))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  it = iter(it)
  filler = {"image": np.full((size, size, 3), segdata.MEAN_RGB, np.uint8),
            "label": np.full((size, size), IGNORE_LABEL, np.uint8), "index": np.int32(-1)}
  try:
    for _ in range(segdata.num_val_steps(len(source), batch_size, process_count)):
      items = [next(it, filler) for _ in range(batch_size)]
      yield {key: np.stack([x[key] for x in items]) for key in ("image", "label", "index")}
  finally:
    if hasattr(it, "close"):
      it.close()


# ----------------------------------------------------------------------------- settings


def crop_size(config: ml_collections.ConfigDict) -> int:
  """The memory crops' side: `retrieval.image_size`, or the short side of data.eval_pad_size."""
  size = int(config.retrieval.image_size) or min(segdata.eval_pad_size(config.data))
  if size % dense_nn.PATCH:
    raise ValueError(f"retrieval.image_size {size} must be a multiple of the output stride 8")
  return size


def cells_per_crop(config: ml_collections.ConfigDict, num_train: int) -> int:
  """Cells kept per memory crop: all when memory_size is 0 or large enough, else the reference's
  memory_size // (train images × augmentation epochs)."""
  cells = (crop_size(config) // dense_nn.PATCH) ** 2
  memory, epochs = int(config.retrieval.memory_size), int(config.retrieval.augmentation_epochs)
  if epochs < 1:
    raise ValueError(f"retrieval.augmentation_epochs must be ≥ 1, got {epochs}")
  if memory == 0:
    return cells
  per_crop = memory // (num_train * epochs)
  if per_crop < 1:
    raise ValueError(f"retrieval.memory_size={memory} is below one cell per crop "
                     f"({num_train} train images × {epochs} epochs)")
  return min(per_crop, cells)


# ----------------------------------------------------------------------------- steps


KEY_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Where the devices report their memory, the bank and its search may take this share of it; the
# rest is left to the parameters and the backbone's activations on a val batch.
DEVICE_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class BankLayout:
  """The memory bank of one run, per device (module `make_steps`).

  slots: memory batches (augmentation epochs × batches per epoch); crops: crops of a memory
  batch per device; per_crop: cells kept per crop; rows: slots × crops × per_crop, the rows that
  memorise fills; padded: the rows allocated (`dense_nn.padded_rows`: a multiple of the search
  block, the extra rows invalid); bank / search: bytes of the bank and of its search's working
  set (`dense_nn.bank_bytes`, `dense_nn.search_bytes`).
  """
  slots: int
  crops: int
  per_crop: int
  rows: int
  padded: int
  bank: int
  search: int

  @property
  def bytes(self) -> int:
    return self.bank + self.search


def bank_layout(config: ml_collections.ConfigDict, num_devices: int, num_train: int,
                channels: int, num_classes: int, per_crop: int | None = None) -> BankLayout:
  """The bank's rows and bytes per device for this config on `num_devices` devices (pure
  arithmetic: nothing is allocated). `per_crop` overrides `cells_per_crop` (to find what fits)."""
  rc = config.retrieval
  per_crop = cells_per_crop(config, num_train) if per_crop is None else per_crop
  pc = jax.process_count()
  slots = int(rc.augmentation_epochs) * segdata.num_val_steps(
      num_train, config.batch_size // pc, pc)
  crops = config.batch_size // num_devices
  rows = slots * crops * per_crop
  block = int(rc.block_size)
  padded = dense_nn.padded_rows(rows, block)
  key_bytes = jnp.dtype(keys_dtype(config)).itemsize
  height, width = segdata.eval_pad_size(config.data)
  queries = config.eval_batch_size * (height // dense_nn.PATCH) * (width // dense_nn.PATCH)
  return BankLayout(slots, crops, per_crop, rows, padded,
                    dense_nn.bank_bytes(padded, channels, num_classes, key_bytes),
                    dense_nn.search_bytes(queries, channels, num_classes,
                                          int(rc.num_neighbours), block,
                                          dense_nn.search_block(padded, block)))


def keys_dtype(config: ml_collections.ConfigDict):
  """The bank keys' dtype, `retrieval.keys_dtype`: float32, or bfloat16 (half the bank)."""
  name = config.retrieval.get("keys_dtype", "float32")
  if name not in KEY_DTYPES:
    raise ValueError(f"retrieval.keys_dtype must be 'float32' or 'bfloat16', got {name!r}")
  return KEY_DTYPES[name]


def memory_budget(config: ml_collections.ConfigDict, mesh) -> tuple[int, str]:
  """Bytes per device that the bank and its search may take, and where the figure comes from.

  The smaller of `retrieval.max_bank_gib` (when > 0) and what the devices report
  (`memory_stats()`: DEVICE_SHARE × bytes_limit, the least over this process' devices; the limit,
  not what is free now, so that every process of a run reaches the same verdict). Where no device
  reports (XLA:CPU) and no budget is set: the host's physical memory shared by its devices.
  """
  budgets = []
  gib = float(config.retrieval.get("max_bank_gib", 0.0))
  if gib > 0:
    budgets.append((int(gib * 2**30), "retrieval.max_bank_gib"))
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  stats = [d.memory_stats() for d in local]
  if all(s and "bytes_limit" in s for s in stats):
    limit = min(s["bytes_limit"] for s in stats)
    budgets.append((int(DEVICE_SHARE * limit), f"{DEVICE_SHARE:.0%} of the device's memory"))
  elif not budgets:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budgets.append((host // len(local), f"host memory / {len(local)} devices"))
  return min(budgets)


def check_memory(config: ml_collections.ConfigDict, mesh, num_train: int, channels: int,
                 num_classes: int) -> BankLayout:
  """The bank's layout on `mesh`, or one ValueError line naming its size, the budget
  (`memory_budget`) and the largest `retrieval.memory_size` that fits on this mesh."""
  layout = bank_layout(config, mesh.devices.size, num_train, channels, num_classes)
  budget, source = memory_budget(config, mesh)
  if layout.bytes <= budget:
    return layout
  fits = lambda p: bank_layout(config, mesh.devices.size, num_train, channels, num_classes,
                               p).bytes <= budget
  low, high = 0, layout.per_crop        # the most cells per crop that fit (bytes grow with it)
  while low < high:
    mid = (low + high + 1) // 2
    low, high = (mid, high) if fits(mid) else (low, mid - 1)
  epochs = int(config.retrieval.augmentation_epochs)
  largest = (f"the largest retrieval.memory_size that fits is {(low + 1) * num_train * epochs - 1:,}"
             f" ({low} cells per crop)" if low else
             "no retrieval.memory_size fits (not even one cell per crop)")
  gib = lambda b: f"{b / 2**30:.3g} GiB"
  raise ValueError(
      f"retrieval memory too large: {gib(layout.bytes)} per device ({layout.padded:,} rows of "
      f"{channels} {jnp.dtype(keys_dtype(config)).name} keys + {num_classes} values: "
      f"{gib(layout.bank)}, search {gib(layout.search)}) over the budget of {gib(budget)} "
      f"({source}) on {mesh.devices.size} devices; {largest}")


def check_run_memory(config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict,
                     mesh) -> BankLayout:
  """`check_memory` for a retrieval run of `config` with a backbone of `model_config`: what a
  chained evaluation (the demo's) calls before its first protocol computes any feature."""
  train_source = segdata.segmentation_source(config.data, "train")
  return check_memory(config, mesh, len(train_source),
                      resnet.backbone_from_config(model_config).num_features,
                      len(segdata.segmentation_source(config.data, "val").class_names))


def make_steps(embed, mesh, num_classes: int, per_crop: int, k: int, temperature: float,
               block: int):
  """Jitted (memorise, evaluate) over `mesh`; batches and the bank sharded on 'data'.

  embed(variables, images uint8 [B, H, W, 3]) -> float32 [B, H/8, W/8, C], the features (the
  frozen backbone's, `backbone_features`; a test passes an oracle).
  The bank is (keys [n·R, C], values float32 [n·R, L], valid bool [n·R]) over n devices
  (`empty_bank`): device d's R rows hold the cells of the crops it embedded, in the order
  (slot, crop, cell) — slot s is memory batch s — then the padding rows, invalid, that make R a
  multiple of the search block: the search tiles the bank where it lies, without a copy.
  memorise(variables, bank, step, key, batch) -> bank with slot `step` written in place (bank
    donated); the cells of image i are sampled with the key fold_in(key, i)
  evaluate(variables, bank, batch) -> (int32 [L, L] summed over the mesh, uint8 [B, H, W]
    predictions): one program for both, the predictions being read for the figure only
  """
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

  def write(keys, values, valid, f, v, ok, step):
    # Per device: its crops' kept cells into its slot `step`, rows (crop, cell).
    f = f.reshape(-1, f.shape[-1]).astype(keys.dtype)
    start = step * f.shape[0]
    put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)
    return put(keys, f), put(values, v.reshape(-1, v.shape[-1])), put(valid, ok.reshape(-1))

  def memorise(variables, bank, step, key, batch):
    f = embed(variables, batch["image"])
    b, h, w, c = f.shape
    f = f.reshape(b, h * w, c)
    values, valid = dense_nn.patch_labels(batch["label"], num_classes)
    values, valid = values.reshape(b, h * w, num_classes), valid.reshape(b, h * w)
    if per_crop < h * w:
      # One key per image (not per batch position): the same cells whatever the batches hold.
      uniform = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (h * w,)))(
          batch["index"])
      scores = dense_nn.cell_scores(values, valid, uniform)
      keep = dense_nn.keep_cells(scores, per_crop)
      f = jnp.take_along_axis(f, keep[..., None], axis=1)
      values = jnp.take_along_axis(values, keep[..., None], axis=1)
      valid = jnp.take_along_axis(valid, keep, axis=1)
    spec = P(parallel.DATA)
    return jax.shard_map(write, mesh=mesh, in_specs=(spec,) * 6 + (P(),),
                         out_specs=(spec,) * 3)(*bank, f, values, valid, step)

  def class_scores(variables, bank, images):
    f = embed(variables, images)
    b, h, w, c = f.shape
    sims, values = dense_nn.sharded_search(mesh, parallel.DATA, f.reshape(b * h * w, c), *bank,
                                           k=k, block=block)
    scores = dense_nn.transfer_labels(sims, values, temperature).reshape(b, h, w, num_classes)
    return jax.image.resize(scores, (b, *images.shape[1:3], num_classes), method="bilinear")

  def evaluate(variables, bank, batch):
    predictions = jnp.argmax(class_scores(variables, bank, batch["image"]), axis=-1)
    return (metrics_lib.confusion_matrix(batch["label"], predictions, num_classes),
            predictions.astype(jnp.uint8))

  bank_shardings = (data, data, data)
  return (jax.jit(memorise, in_shardings=(repl, bank_shardings, repl, repl, data),
                  out_shardings=bank_shardings, donate_argnums=1),
          jax.jit(evaluate, in_shardings=(repl, bank_shardings, data), out_shardings=(repl, data)))


def backbone_features(backbone: resnet.ResNet):
  """`make_steps`' embed: the frozen backbone's OS8 cells, L2-normalised (float32)."""
  def embed(variables, images):
    h = backbone.apply(variables, augment.normalize(images), False)
    return dense_nn.l2n(h.astype(jnp.float32))
  return embed


def empty_bank(mesh, rows: int, channels: int, num_classes: int, dtype=jnp.float32):
  """The bank (module `make_steps`) with `rows` rows per device (`BankLayout.padded`), all
  invalid, created sharded along 'data' (no device ever holds more than its own rows)."""
  n = mesh.devices.size
  shapes = (((n * rows, channels), dtype), ((n * rows, num_classes), jnp.float32),
            ((n * rows,), jnp.bool_))
  make = jax.jit(lambda: tuple(jnp.zeros(shape, t) for shape, t in shapes),
                 out_shardings=(parallel.data_sharding(mesh),) * 3)
  return make()


def _local_rows(x: jax.Array) -> np.ndarray:
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


# ----------------------------------------------------------------------------- the protocol


def retrieval_probe(config: ml_collections.ConfigDict, backbone_params: Any,
                    backbone_batch_stats: Any, model_config: ml_collections.ConfigDict, mesh,
                    workdir: str) -> dict:
  """Builds the memory from the train split, labels the val split by retrieval, scores it.

  Same arguments as `probe.run_probe`. Returns {'miou', 'macc', 'pixel_acc', 'per_class_iou',
  'per_class_acc' (percent), 'num_pixels', 'num_images', 'mode': 'retrieval', 'memory_size'
  (labelled cells in the bank), 'cells_per_crop', 'num_train_images', 'num_neighbours',
  'temperature', 'augmentation_epochs', 'image_size', 'class_names', 'confusion_matrix',
  'figures', 'seconds' (wall time of this protocol)}.
  """
  start = time.time()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh)
  if config.get("finetune", False):
    raise ValueError("protocol='retrieval' evaluates a frozen backbone: set finetune=False")
  rc = config.retrieval
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  train_source = segdata.segmentation_source(config.data, "train")
  val_source = segdata.segmentation_source(config.data, "val")
  class_names = list(val_source.class_names)
  size, per_crop = crop_size(config), cells_per_crop(config, len(train_source))
  epochs, k = int(rc.augmentation_epochs), int(rc.num_neighbours)
  backbone = resnet.backbone_from_config(model_config)
  # Before any feature: a bank that cannot fit stops here, with the memory_size that would.
  layout = check_memory(config, mesh, len(train_source), backbone.num_features, len(class_names))
  variables = jax.device_put({"params": backbone_params, "batch_stats": backbone_batch_stats},
                             parallel.replicated(mesh))
  memorise, evaluate = make_steps(backbone_features(backbone), mesh, len(class_names), per_crop,
                                  k, float(rc.temperature), int(rc.block_size))

  # The memory: one slot per (epoch, batch) of this run's global memory batches.
  pi, pc = jax.process_index(), jax.process_count()
  per_process = config.batch_size // pc
  bank = empty_bank(mesh, layout.padded, backbone.num_features, len(class_names),
                    keys_dtype(config))
  step = 0
  for epoch in range(epochs):
    key = jax.random.fold_in(jax.random.key(config.seed), epoch)
    for batch in memory_batches(train_source, size, config.seed, epoch, per_process,
                                int(config.data.get("num_workers", 0)), pi, pc):
      bank = memorise(variables, bank, jnp.int32(step), key, parallel.host_to_global(mesh, batch))
      step += 1
  assert step == layout.slots, (step, layout.slots)
  memory = int(jnp.sum(bank[2]))
  if memory < k:
    raise ValueError(f"the memory holds {memory} labelled cells, fewer than num_neighbours={k}")
  if pi == 0:
    logging.info("retrieval: a memory of %d cells (%d per %d px crop, %d train images × %d "
                 "epochs; %.3g GiB per device with its search), %d neighbours, τ = %g", memory,
                 per_crop, size, len(train_source), epochs, layout.bytes / 2**30, k,
                 rc.temperature)

  cm = np.zeros((len(class_names),) * 2, np.int64)
  first = None
  for batch in segdata.val_batches(val_source, config.data, config.eval_batch_size // pc, pi, pc):
    arrays = parallel.host_to_global(mesh, {"image": batch["image"], "label": batch["label"]})
    counts, predictions = evaluate(variables, bank, arrays)
    cm += np.asarray(jax.device_get(counts), np.int64)
    if first is None and pi == 0 and int(config.get("num_figure_images", 4)):
      first = (batch, _local_rows(predictions))
  results = metrics_lib.metrics_from_confusion(cm, class_names)
  results.update({
      "num_images": len(val_source), "mode": "retrieval", "memory_size": memory,
      "cells_per_crop": per_crop, "num_train_images": len(train_source), "num_neighbours": k,
      "keys_dtype": jnp.dtype(keys_dtype(config)).name, "bank_bytes_per_device": layout.bytes,
      "temperature": float(rc.temperature), "augmentation_epochs": epochs, "image_size": size,
      "class_names": class_names, "confusion_matrix": cm.tolist(), "figures": {},
      "seconds": round(time.time() - start, 1)})
  if pi == 0:
    results["figures"]["confusion"] = viz.confusion_figure(
        cm, class_names, os.path.join(workdir, "confusion_matrix.png"))
    if first is not None:
      batch, preds = first
      shown = [j for j in range(len(preds)) if batch["size"][j][0]]
      shown = shown[:int(config.get("num_figure_images", 4))]
      crop = lambda a, j: a[j, :batch["size"][j][0], :batch["size"][j][1]]
      results["figures"]["predictions"] = viz.segmentation_grid(
          [crop(batch["image"], j) for j in shown], [crop(batch["label"], j) for j in shown],
          [crop(preds, j) for j in shown], class_names, os.path.join(workdir, "predictions.png"))
    metrics_lib.log_results(results, workdir, f"retrieval ({k} neighbours, memory {memory}, "
                                              f"{results['seconds']:.0f} s)")
  return results
