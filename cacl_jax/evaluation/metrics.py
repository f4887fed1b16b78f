"""Segmentation metrics from one confusion matrix over the whole val set (docs/evaluation.md).

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

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cacl_jax.runtime import paths

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
  """mIoU / mAcc / per-class IoU and accuracy in percent (docs/evaluation.md).

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



def log_results(results: dict, workdir: str, title: str) -> str:
  """Writes `title` and the per-class table to WORKDIR/per_class.txt, and logs one line with the
  means and that path (the table itself only at --verbosity=1). Returns the file's path."""
  table = format_table(results)
  path = paths.resolve(workdir) / "per_class.txt"
  paths.write_text_atomic(path, f"{title}\n{table}\n")
  logging.info("%s: mIoU %.1f, mAcc %.1f (per class: %s)", title, results["miou"], results["macc"], path)
  logging.debug("%s\n%s", title, table)
  return str(path)


def format_comparison(results: dict[str, dict]) -> str:
  """One table of mIoU / mAcc for several runs, e.g. {'pretrained': r1, 'random init': r2}.

  When a run carries the cluster protocol's results under 'cluster', two columns follow: its
  mIoU and pixel accuracy; under 'retrieval', the retrieval protocol's mIoU ('-' for runs
  without them).
  """
  width = max([len(n) for n in results] + [8])
  clustered = any("cluster" in r for r in results.values())
  retrieved = any("retrieval" in r for r in results.values())
  extra = (("  cluster mIoU  pixel acc" if clustered else "")
           + ("  retrieval mIoU" if retrieved else ""))
  lines = [f"{'backbone':<{width}}   mIoU   mAcc{extra}", "-" * (width + 15 + len(extra))]
  for name, r in results.items():
    line = f"{name:<{width}} {r['miou']:6.1f} {r['macc']:6.1f}"
    if clustered:
      c = r.get("cluster")
      line += f" {c['miou']:13.1f} {c['pixel_acc']:10.1f}" if c else f" {'-':>13} {'-':>10}"
    if retrieved:
      line += f" {r['retrieval']['miou']:15.1f}" if "retrieval" in r else f" {'-':>15}"
    lines.append(line)
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# DAVIS region similarity J and boundary measure F (video object segmentation).
#
# As the DAVIS benchmark defines them (Perazzi et al., CVPR 2016; Pont-Tuset et al., 2017),
# re-stated from the official davis2017-evaluation code (davis2017/metrics.py: db_eval_iou,
# f_measure, _seg2bmap; davis2017/evaluation.py: the semi-supervised protocol) and checked
# against hand-computed cases in tests/test_davis.py.
# ----------------------------------------------------------------------------------------

BOUNDARY_THRESHOLD = 0.008   # davis2017-evaluation's bound_th: a fraction of the image diagonal


def region_similarity(annotation: np.ndarray, segmentation: np.ndarray) -> float:
  """J: |A ∩ S| / |A ∪ S| of two binary masks [H, W]; 1 when both are empty."""
  a, s = np.asarray(annotation, bool), np.asarray(segmentation, bool)
  if a.shape != s.shape:
    raise ValueError(f"annotation {a.shape} and segmentation {s.shape} differ")
  union = np.sum(a | s)
  return 1.0 if union == 0 else float(np.sum(a & s) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
  """One-pixel-wide boundaries of a binary mask [H, W] (davis2017's `_seg2bmap`, after
  D. Martin's BSDS code): a pixel is on the boundary when it differs from its right, lower or
  lower-right neighbour, so boundaries sit half a pixel towards the origin."""
  seg = np.asarray(mask, bool)
  e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
  e[:, :-1] = seg[:, 1:]
  s[:-1, :] = seg[1:, :]
  se[:-1, :-1] = seg[1:, 1:]
  b = seg ^ e | seg ^ s | seg ^ se
  b[-1, :] = seg[-1, :] ^ e[-1, :]
  b[:, -1] = seg[:, -1] ^ s[:, -1]
  b[-1, -1] = False
  return b


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUNDARY_THRESHOLD) -> int:
  """The match radius in pixels: `bound_th` itself when ≥ 1, else ceil(bound_th · diagonal)
  (8 px at 480×854)."""
  return int(bound_th) if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(shape)))


def _disk(radius: int) -> np.ndarray:
  """skimage.morphology.disk(radius): x² + y² ≤ radius² on a (2r+1)² grid."""
  grid = np.arange(-radius, radius + 1)
  return grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2


def boundary_measure(annotation: np.ndarray, segmentation: np.ndarray,
                     bound_th: float = BOUNDARY_THRESHOLD) -> float:
  """F: the F-measure of boundary precision and recall [H, W] → float.

  A boundary pixel of one mask is matched when a boundary pixel of the other lies within the
  tolerance disk (`boundary_tolerance`; a binary dilation by that disk, as davis2017's
  cv2.dilate with skimage's disk). P = matched segmentation boundary / its length, R = matched
  annotation boundary / its length, F = 2PR / (P + R). Empty boundaries: both → 1; only the
  segmentation's → P 1, R 0; only the annotation's → P 0, R 1.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  a, s = np.asarray(annotation, bool), np.asarray(segmentation, bool)
  if a.shape != s.shape:
    raise ValueError(f"annotation {a.shape} and segmentation {s.shape} differ")
  disk = _disk(boundary_tolerance(a.shape, bound_th))
  fg, gt = boundary_map(s), boundary_map(a)
  n_fg, n_gt = int(fg.sum()), int(gt.sum())
  if n_fg == 0 and n_gt == 0:
    return 1.0
  if n_fg == 0 or n_gt == 0:
    precision, recall = (1.0, 0.0) if n_fg == 0 else (0.0, 1.0)
  else:
    precision = np.sum(fg & ndimage.binary_dilation(gt, disk)) / n_fg
    recall = np.sum(gt & ndimage.binary_dilation(fg, disk)) / n_gt
  return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def davis_sequence_scores(annotations: np.ndarray, predictions: np.ndarray,
                          bound_th: float = BOUNDARY_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
  """J and F of each object on each evaluated frame of one sequence (semi-supervised protocol).

  Args:
    annotations: int [T, H, W] ground-truth object ids (0 background; 255 void counts as
      background, as davis2017-evaluation does in this protocol).
    predictions: int [T, H, W] predicted ids.

  Returns:
    (J, F), each float [O, T − 2]: objects 1..O with O = the largest id in the first frame's
    annotation; frames 1..T − 2 (the given first frame and the last are not scored).
  """
  annotations = np.where(np.asarray(annotations) == IGNORE_LABEL, 0, annotations)
  predictions = np.asarray(predictions)
  if annotations.shape != predictions.shape:
    raise ValueError(f"annotations {annotations.shape} and predictions {predictions.shape} differ")
  num_objects = int(annotations[0].max())
  frames = range(1, annotations.shape[0] - 1)
  j = np.array([[region_similarity(annotations[t] == o, predictions[t] == o) for t in frames]
                for o in range(1, num_objects + 1)]).reshape(num_objects, len(frames))
  f = np.array([[boundary_measure(annotations[t] == o, predictions[t] == o, bound_th)
                 for t in frames] for o in range(1, num_objects + 1)]).reshape(num_objects, len(frames))
  return j, f
