"""Figures: the paper's Fig. 3 affinity maps, confusion matrices, image / GT / prediction grids.

Everything here runs on host NumPy arrays and writes a PNG with matplotlib's Agg backend
(no display needed) through the path layer (`paths.py`: local, file:// or gs://); each
function returns the path it wrote.
"""
from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from cacl_jax.runtime import paths  # noqa: E402

IGNORE_LABEL = 255
IGNORE_COLOR = (224, 224, 192)   # VOC's colour for the void border

# Cityscapes' own colours for its 19 trainIds (cityscapesScripts labels.py).
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
CITYSCAPES_FIRST_CLASSES = ("road", "sidewalk", "building")


def voc_palette(num_classes: int) -> np.ndarray:
  """The PASCAL VOC bit-interleaved palette: uint8 [num_classes, 3] (class 0 = black)."""
  palette = np.zeros((num_classes, 3), np.uint8)
  for c in range(num_classes):
    label, r, g, b = c, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((label >> 0) & 1) << shift
      g |= ((label >> 1) & 1) << shift
      b |= ((label >> 2) & 1) << shift
      label >>= 3
    palette[c] = (r, g, b)
  return palette


def palette_for(class_names: Sequence[str]) -> np.ndarray:
  """Cityscapes colours for the 19 Cityscapes classes, the VOC palette otherwise."""
  if (len(class_names) == len(CITYSCAPES_PALETTE)
      and tuple(class_names[:3]) == CITYSCAPES_FIRST_CLASSES):
    return CITYSCAPES_PALETTE
  return voc_palette(len(class_names))


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """int [H, W] class map (255 = ignore) -> uint8 [H, W, 3]."""
  label = np.asarray(label).astype(np.int64)
  lut = np.tile(np.array(IGNORE_COLOR, np.uint8), (256, 1))
  lut[:len(palette)] = palette
  return lut[np.clip(label, 0, 255)]


def _as_uint8_image(x: np.ndarray) -> np.ndarray:
  """uint8 images pass through; float images in [0, 1] are scaled (for display only)."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x
  return (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _save(fig, path: str) -> str:
  """Writes the figure to `path` (a local path, file:// or gs://: through `paths`), in the
  format its extension names."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(str(path))[1][1:] or "png", dpi=100,
              bbox_inches="tight")
  plt.close(fig)
  target = paths.resolve(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
  return str(path)


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], path: str) -> str:
  """Row-normalised confusion matrix (rows = ground truth, each row sums to 1) as a PNG.

  Args:
    cm: int [C, C] counts, rows = ground truth, columns = prediction.
    class_names: C names for the axes.
    path: output PNG.
  """
  cm = np.asarray(cm, np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
    raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} classes")
  rows = cm.sum(axis=1, keepdims=True)
  normalised = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  n = len(class_names)
  side = max(4.0, 0.4 * n + 2)
  fig, ax = plt.subplots(figsize=(side, side))
  im = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(n), labels=class_names, rotation=90, fontsize=8)
  ax.set_yticks(range(n), labels=class_names, fontsize=8)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth")
  ax.set_title("confusion (row-normalised)")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return _save(fig, path)


def segmentation_grid(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      predictions: Sequence[np.ndarray], class_names: Sequence[str],
                      path: str) -> str:
  """One row per sample: image | ground truth | prediction, coloured with the class palette.

  Args:
    images: n uint8 [H_i, W_i, 3] images (sizes may differ between samples).
    labels: n int [H_i, W_i] ground truth (255 = ignore).
    predictions: n int [H_i, W_i] predicted classes.
    class_names: names, to choose the palette.
    path: output PNG.
  """
  n = len(images)
  if not n or len(labels) != n or len(predictions) != n:
    raise ValueError(f"need equally many images/labels/predictions, got "
                     f"{n}/{len(labels)}/{len(predictions)}")
  palette = palette_for(class_names)
  fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
  for i in range(n):
    panels = (_as_uint8_image(images[i]), colorize(labels[i], palette),
              colorize(predictions[i], palette))
    for j, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
      axes[i, j].imshow(panel)
      axes[i, j].set_axis_off()
      if i == 0:
        axes[i, j].set_title(title)
  return _save(fig, path)


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def affinity_maps(maps: Mapping[str, object], query_yx: tuple[int, int],
                  image_hw: tuple[int, int]) -> dict[str, np.ndarray]:
  """Cosine similarity of the query pixel's feature on v with every pixel of v+.

  Args:
    maps: head name -> (features on v, features on v+), each float [h, w, D]; a stacked
      [2, h, w, D] array is accepted too.
    query_yx: the query pixel (y, x) in image coordinates of v (H x W).
    image_hw: (H, W) of v.

  Returns:
    head name -> float [h, w] similarities in [-1, 1].
  """
  height, width = image_hw
  y, x = query_yx
  if not (0 <= y < height and 0 <= x < width):
    raise ValueError(f"query pixel {query_yx} is outside the {height}x{width} frame")
  out = {}
  for name, pair in maps.items():
    on_v, on_v_pos = (np.asarray(a, np.float32) for a in pair)
    if on_v.ndim != 3 or on_v.shape != on_v_pos.shape:
      raise ValueError(f"maps[{name!r}] must be a pair of [h, w, D] arrays, got "
                       f"{on_v.shape} and {on_v_pos.shape}")
    h, w, _ = on_v.shape
    # A feature cell covers an (H/h) x (W/w) block of pixels (output stride).
    query = _l2n(on_v[y * h // height, x * w // width])
    out[name] = _l2n(on_v_pos) @ query
  return out


def affinity_figure(v: np.ndarray, v_pos: np.ndarray, maps: Mapping[str, object],
                    query_yx: tuple[int, int], path: str) -> str:
  """Paper Fig. 3: the query pixel (red cross) on v and the similarity it induces on v+.

  Args:
    v, v_pos: the two frames, uint8 [H, W, 3] (or float in [0, 1]).
    maps: head name ('global', 'pixel', 'cycle', ...) -> (features on v, features on v+),
      each [h, w, D] head outputs before normalisation (or one stacked [2, h, w, D]).
    query_yx: (y, x) of the query pixel in v's image coordinates.
    path: output PNG.

  The heatmaps are the cosine similarities (docs/method.md §3's l2n dot products) upsampled to the
  frame by nearest neighbour, colour-stretched to each map's [min, max] (in its title), and
  laid over v+ at half opacity.
  """
  v, v_pos = _as_uint8_image(v), _as_uint8_image(v_pos)
  height, width = v.shape[:2]
  sims = affinity_maps(maps, query_yx, (height, width))
  fig, axes = plt.subplots(1, 2 + len(sims), figsize=(3 * (2 + len(sims)), 3.2),
                           squeeze=False)
  axes = axes[0]
  axes[0].imshow(v)
  axes[0].plot([query_yx[1]], [query_yx[0]], marker="x", color="red", markersize=12,
               markeredgewidth=3)
  axes[0].set_title("v (query)")
  axes[1].imshow(v_pos)
  axes[1].set_title("v+")
  for ax, (name, sim) in zip(axes[2:], sims.items()):
    h, w = sim.shape
    up = sim[(np.arange(height) * h // height)[:, None], np.arange(width) * w // width]
    ax.imshow(v_pos)
    # Stretched to the map's own range (shown in the title): early in training all cosines
    # sit close to 1, and what matters is where the query's match is, not the absolute level.
    lo, hi = float(sim.min()), float(sim.max())
    ax.imshow(up, cmap="jet", vmin=lo, vmax=max(hi, lo + 1e-6), alpha=0.5)
    ax.set_title(f"{name} head [{lo:.2f}, {hi:.2f}]")
  for ax in axes:
    ax.set_axis_off()
  return _save(fig, path)


# The panels of the diagnostics figure: title -> metric keys (missing keys are skipped).
DIAGNOSTIC_PANELS = {
    "losses": ("loss", "loss_global", "loss_pixel", "loss_cycle"),
    "global-head match m(i) (eq. 4)": ("match_true_acc", "match_true_still", "match_label_acc", "match_label_chance",
                                       "match_object_acc", "match_object_chance"),
    "cosine between pixels of one image": ("cos_within_h", "cos_within_u", "cos_within_p",
                                           "cos_within_c"),
    "cosine between pixels of two images": ("cos_cross_h", "cos_cross_u", "cos_cross_p",
                                            "cos_cross_c"),
    "class separation across images": ("class_sep_h", "class_sep_u", "class_sep_p", "class_sep_c"),
    "cycle": ("cycle_return", "soft_target_entropy"),
    "cosine between the heads' backbone gradients": ("grad_cos_g_p", "grad_cos_g_c", "grad_cos_p_c"),
    "norm of each head's backbone gradient": ("grad_norm_g", "grad_norm_p", "grad_norm_c"),
    "learning rate": ("lr",),
}


def diagnostics_figure(records: Sequence[Mapping[str, float]], path: str) -> str:
  """The run's curves from metrics.jsonl records (each with 'step'): one panel per
  DIAGNOSTIC_PANELS entry, a line per key present. Returns `path`."""
  steps = np.array([r["step"] for r in records])
  panels = {t: [k for k in keys if any(k in r for r in records)]
            for t, keys in DIAGNOSTIC_PANELS.items()}
  panels = {t: keys for t, keys in panels.items() if keys}
  cols = 3
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False,
                           layout="constrained")   # titles clear of the x labels above
  for ax, (title, keys) in zip(axes.flat, panels.items()):
    for key in keys:
      ys = np.array([r.get(key, np.nan) for r in records], float)
      ax.plot(steps, ys, marker=".", label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_axis_off()
  return _save(fig, path)


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """uint8 [H, W, 3]: the image with each non-zero id of `label` [H, W] tinted in its colour."""
  image = _as_uint8_image(image).astype(np.float32)
  tint = colorize(label, palette).astype(np.float32)
  mix = np.where((np.asarray(label) > 0)[..., None], (1 - alpha) * image + alpha * tint, image)
  return mix.astype(np.uint8)


def propagation_figure(images: Sequence[np.ndarray], annotations: Sequence[np.ndarray],
                       predictions: Sequence[np.ndarray], titles: Sequence[str],
                       path: str) -> str:
  """Video object segmentation: one row per frame, ground truth | prediction overlaid on it.

  Args:
    images: n uint8 [H, W, 3] frames; annotations, predictions: n int [H, W] object ids
      (0 = background, coloured with DAVIS' palette, which is VOC's).
    titles: n row labels (e.g. 'bike-packing 00040').
    path: output PNG.
  """
  n = len(images)
  if not n or not len(annotations) == len(predictions) == len(titles) == n:
    raise ValueError("need equally many frames, annotations, predictions and titles")
  palette = voc_palette(256)
  fig, axes = plt.subplots(n, 2, figsize=(8, 2.6 * n), squeeze=False)
  for i in range(n):
    for j, (label, what) in enumerate(((annotations[i], "ground truth"),
                                       (predictions[i], "propagated"))):
      axes[i, j].imshow(overlay(images[i], label, palette))
      axes[i, j].set_title(f"{titles[i]}: {what}", fontsize=9)
      axes[i, j].set_axis_off()
  return _save(fig, path)
