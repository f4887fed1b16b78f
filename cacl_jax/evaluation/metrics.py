"""Segmentation metrics from one confusion matrix over the whole val set (SPEC §6).

The confusion matrix `cm[g, p]` counts pixels with ground truth class g predicted as p;
label 255 (and any label outside [0, num_classes)) is ignored. Per class c:

    IoU_c = TP / (TP + FP + FN),      Acc_c = TP / (TP + FN)

mIoU is the mean of IoU_c over classes that occur in the ground truth or in the prediction
(a class absent from both has no IoU); mAcc is the mean of Acc_c over classes present in the
ground truth. Everything is reported in percent, rounded to one decimal like the paper.

`confusion_matrix` is jittable and, applied to a global (sharded) batch inside `jax.jit`, it
sums over every device and process of the mesh; `metrics_from_confusion` runs on the host in
int64, so the whole-val-set sum cannot overflow.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def confusion_matrix(labels: jax.Array, predictions: jax.Array,
                     num_classes: int) -> jax.Array:
  """Counts (ground truth, prediction) pairs.

  Args:
    labels: int [...] ground-truth classes; 255 / out-of-range values are ignored.
    predictions: int [...] predicted classes in [0, num_classes), same shape as labels.
    num_classes: C.

  Returns:
    int32 [C, C], rows = ground truth, columns = prediction. int32 is exact for any one
    batch below 2^31 pixels; whole-set totals are accumulated by the caller in int64.
  """
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ")
  labels = labels.astype(jnp.int32).reshape(-1)
  predictions = predictions.astype(jnp.int32).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  # Ignored pixels go to index 0 with weight 0, so the bincount length stays static.
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes**2)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def confusion_matrix_np(labels: np.ndarray, predictions: np.ndarray,
                        num_classes: int) -> np.ndarray:
  """NumPy twin of `confusion_matrix` (int64), for host-side checks."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  predictions = np.asarray(predictions, np.int64).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  index = labels[valid] * num_classes + predictions[valid]
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict:
  """mIoU / mAcc / per-class IoU and accuracy in percent (SPEC §6).

  Args:
    cm: [C, C] counts, rows = ground truth, columns = prediction.
    class_names: C names; defaults to 'class_<i>'.

  Returns:
    {'miou', 'macc', 'pixel_acc': float percent (1 decimal),
     'per_class_iou', 'per_class_acc': {name: percent or None when undefined},
     'num_pixels': int}. A class absent from both GT and prediction has IoU None;
    a class absent from GT has accuracy None.
  """
  cm = np.asarray(cm, np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"confusion matrix must be square [C, C], got {cm.shape}")
  num_classes = cm.shape[0]
  if class_names is None:
    class_names = [f"class_{i}" for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for a {num_classes}-class matrix")
  tp = np.diag(cm).astype(np.float64)
  gt = cm.sum(axis=1).astype(np.float64)     # TP + FN
  pred = cm.sum(axis=0).astype(np.float64)   # TP + FP
  union = gt + pred - tp
  in_union = union > 0
  in_gt = gt > 0
  iou = np.where(in_union, tp / np.maximum(union, 1), np.nan)
  acc = np.where(in_gt, tp / np.maximum(gt, 1), np.nan)
  total = cm.sum()

  def pct(x):
    return round(float(100 * x), 1)

  return {
      "miou": pct(iou[in_union].mean()) if in_union.any() else 0.0,
      "macc": pct(acc[in_gt].mean()) if in_gt.any() else 0.0,
      "pixel_acc": pct(tp.sum() / total) if total else 0.0,
      "per_class_iou": {n: (pct(v) if ok else None)
                        for n, v, ok in zip(class_names, iou, in_union)},
      "per_class_acc": {n: (pct(v) if ok else None)
                        for n, v, ok in zip(class_names, acc, in_gt)},
      "num_pixels": int(total),
  }


def format_table(metrics: dict) -> str:
  """A console table: one row per class with IoU and accuracy, then the means."""
  names = list(metrics["per_class_iou"])
  width = max([len(n) for n in names] + [5])

  def cell(v):
    return f"{v:6.1f}" if v is not None else "     -"

  lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 14)]
  for n in names:
    lines.append(f"{n:<{width}} {cell(metrics['per_class_iou'][n])} "
                 f"{cell(metrics['per_class_acc'][n])}")
  lines.append("-" * (width + 14))
  lines.append(f"{'mean':<{width}} {cell(metrics['miou'])} {cell(metrics['macc'])}")
  return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
  """One table of mIoU / mAcc for several runs, e.g. {'pretrained': r1, 'random init': r2}."""
  width = max([len(n) for n in results] + [8])
  lines = [f"{'backbone':<{width}}   mIoU   mAcc", "-" * (width + 15)]
  for name, r in results.items():
    lines.append(f"{name:<{width}} {r['miou']:6.1f} {r['macc']:6.1f}")
  return "\n".join(lines)
