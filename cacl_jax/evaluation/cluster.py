"""The cluster probe: label-free segmentation evaluation of a frozen backbone (the unsupervised
protocol of STEGO, Hamilton et al. ICLR 2022, and Leopart, Ziegler & Asano CVPR 2022).

1. Features: the frozen backbone's OS8 map (BatchNorm in inference mode), L2-normalised, on
   the val images at full resolution (padded as in the linear protocol; padding is never
   sampled).
2. Clusters: spherical k-means (cosine similarity; k-means++ seeding, Lloyd iterations, best
   of `num_restarts` by total similarity) on up to `fit_pixels` feature cells drawn at random
   from the val images, with k = the number of classes, or more (`num_clusters`:
   over-clustering). No label is used to fit.
3. Every val pixel gets the cluster of highest cosine similarity, the similarities being
   upsampled bilinearly to the label resolution first (as the linear protocol's logits: labels
   are never downsampled); one (class × cluster) count matrix over the whole val set.
4. Matching on the whole val set: with k = classes, the Hungarian assignment (one cluster per
   class) that maximises the matched pixels; with k > classes, each cluster goes to the class
   it overlaps most (Leopart's many-to-one matching for over-clustering).
5. The mapped predictions give the usual confusion matrix: mIoU, mAcc, pixel accuracy
   (`metrics.metrics_from_confusion`, docs/evaluation.md).
"""
from __future__ import annotations

import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cacl_jax.runtime import parallel
from cacl_jax.runtime import paths
from cacl_jax.runtime import viz
from cacl_jax.data import augment
from cacl_jax.evaluation import metrics as metrics_lib
from cacl_jax.evaluation import segdata
from cacl_jax.models import resnet


def _l2n(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit
def _plus_plus(key: jax.Array, x: jax.Array, centroids: jax.Array) -> jax.Array:
  """k-means++ seeding on the cosine distance 1 − cos: [k, C] from unit rows x [n, C]."""
  k = centroids.shape[0]
  first = jax.random.randint(key, (), 0, x.shape[0])
  centroids = centroids.at[0].set(x[first])
  nearest = 1.0 - x @ x[first]

  def pick(i, carry):
    centroids, nearest, key = carry
    key, sub = jax.random.split(key)
    p = jnp.maximum(nearest, 0.0) ** 2
    j = jax.random.choice(sub, x.shape[0], p=p / jnp.maximum(p.sum(), 1e-12))
    centroids = centroids.at[i].set(x[j])
    return centroids, jnp.minimum(nearest, 1.0 - x @ x[j]), key

  centroids, _, _ = jax.lax.fori_loop(1, k, pick, (centroids, nearest, key))
  return centroids


@jax.jit
def _lloyd(x: jax.Array, centroids: jax.Array, num_iters: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Spherical k-means iterations; an emptied cluster keeps its centroid. Returns
  (centroids [k, C], total similarity Σ_i max_c ⟨x_i, c⟩)."""
  k = centroids.shape[0]

  def step(_, centroids):
    assign = jnp.argmax(x @ centroids.T, axis=1)
    sums = jax.ops.segment_sum(x, assign, k)
    counts = jax.ops.segment_sum(jnp.ones(x.shape[0]), assign, k)
    return jnp.where(counts[:, None] > 0, _l2n(sums), centroids)

  centroids = jax.lax.fori_loop(0, num_iters, step, centroids)
  return centroids, jnp.sum(jnp.max(x @ centroids.T, axis=1))


def kmeans(x: np.ndarray, k: int, seed: int = 0, num_iters: int = 50,
           num_restarts: int = 5) -> np.ndarray:
  """Spherical k-means of unit rows x float [n, C] → centroids float32 [k, C] (unit rows)."""
  if x.shape[0] < k:
    raise ValueError(f"{x.shape[0]} feature cells cannot make {k} clusters")
  x = jnp.asarray(x, jnp.float32)
  best, best_score = None, -np.inf
  for key in jax.random.split(jax.random.key(seed), num_restarts):
    centroids, score = _lloyd(x, _plus_plus(key, x, jnp.zeros((k, x.shape[1]), jnp.float32)),
                              num_iters)
    if float(score) > best_score:
      best, best_score = centroids, float(score)
  return np.asarray(best)


def match_clusters(counts: np.ndarray) -> np.ndarray:
  """Cluster → class from the (class × cluster) pixel counts [C, k], k ≥ C: the Hungarian
  one-to-one assignment maximising matched pixels when k = C, else each cluster's majority
  class. Returns int64 [k]."""
  num_classes, k = counts.shape
  if k < num_classes:
    raise ValueError(f"{k} clusters for {num_classes} classes: num_clusters must be ≥ classes")
  if k == num_classes:
    from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
    classes, clusters = linear_sum_assignment(counts, maximize=True)
    mapping = np.empty(k, np.int64)
    mapping[clusters] = classes
    return mapping
  return np.argmax(counts, axis=0).astype(np.int64)


def class_confusion(counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
  """(class × cluster) counts [C, k] → the confusion matrix [C, C] of the mapped prediction."""
  return counts @ np.eye(counts.shape[0], dtype=np.int64)[mapping]


def make_steps(backbone: resnet.ResNet, mesh, num_classes: int, num_clusters: int):
  """Jitted (features, counts, predict) over `mesh`; batches sharded along 'data'.

  features(variables, images uint8 [B,H,W,3]) -> float32 [B, H/8, W/8, C], unit vectors
  counts(variables, centroids, batch) -> int32 [C, k] (class × cluster), summed over the mesh
  predict(variables, centroids, images) -> int32 [B, H, W] cluster ids
  """
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  size = max(num_classes, num_clusters)

  def features(variables, images):
    h = backbone.apply(variables, augment.normalize(images), False)
    return _l2n(h.astype(jnp.float32))

  def predict(variables, centroids, images):
    sims = features(variables, images) @ centroids.T          # [B, h, w, k] cosine "logits"
    b, height, width = images.shape[:3]
    sims = jax.image.resize(sims, (b, height, width, sims.shape[-1]), method="bilinear")
    return jnp.argmax(sims, axis=-1)

  def counts(variables, centroids, batch):
    # Square over max(classes, k) so the shared confusion-matrix code counts it; labels ≥
    # classes (255) are ignored, and clusters fill columns [0, k).
    cm = metrics_lib.confusion_matrix(batch["label"], predict(variables, centroids, batch["image"]),
                                      size)
    return cm[:num_classes, :num_clusters]

  return (jax.jit(features, in_shardings=(repl, data), out_shardings=data),
          jax.jit(counts, in_shardings=(repl, repl, data), out_shardings=repl),
          jax.jit(predict, in_shardings=(repl, repl, data), out_shardings=data))


def _local_rows(x: jax.Array) -> np.ndarray:
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _fit_sample(features_fn, variables, val_source, config, mesh, per_image: int,
                rng: np.random.Generator) -> np.ndarray:
  """Up to `per_image` random feature cells of every val image of this process (cells whose
  8×8 patch starts inside the image, so padding is never drawn), gathered from all processes."""
  per_process = config.eval_batch_size // jax.process_count()
  picked = []
  for batch in segdata.val_batches(val_source, config.data, per_process, jax.process_index(),
                                   jax.process_count()):
    feats = _local_rows(features_fn(variables, parallel.host_to_global(mesh, batch["image"])))
    for f, (h, w) in zip(feats, batch["size"]):
      if h == 0:
        continue                                         # a filler sample
      cells = f[:math.ceil(h / 8), :math.ceil(w / 8)].reshape(-1, f.shape[-1])
      take = rng.choice(len(cells), min(per_image, len(cells)), replace=False)
      picked.append(cells[np.sort(take)])
  sample = np.concatenate(picked)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Equal counts per process are not guaranteed: pad to the largest and drop the padding.
    n = multihost_utils.process_allgather(np.array([len(sample)]))
    padded = np.zeros((int(n.max()), sample.shape[1]), sample.dtype)
    padded[:len(sample)] = sample
    gathered = multihost_utils.process_allgather(padded)
    sample = np.concatenate([g[:int(c)] for g, c in zip(gathered, n.reshape(-1))])
  return sample


def cluster_probe(config: ml_collections.ConfigDict, backbone_params: Any,
                  backbone_batch_stats: Any, model_config: ml_collections.ConfigDict, mesh,
                  workdir: str) -> dict:
  """Fits k-means on the val features, matches clusters to classes, scores the val set.

  Same arguments as `probe.run_probe`. Returns {'miou', 'macc', 'pixel_acc', 'per_class_iou',
  'per_class_acc' (percent), 'num_pixels', 'num_images', 'mode': 'cluster', 'num_clusters',
  'cluster_to_class' (class name per cluster), 'cluster_counts' ([classes][clusters] pixels),
  'num_fit_pixels', 'class_names', 'confusion_matrix' (after matching), 'figures'}.
  """
  parallel.check_batch_size(config.eval_batch_size, mesh)
  if config.get("finetune", False):
    raise ValueError("protocol='cluster' evaluates a frozen backbone: set finetune=False")
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  val_source = segdata.segmentation_source(config.data, "val")
  class_names = list(val_source.class_names)
  cc = config.cluster
  k = int(cc.num_clusters) or len(class_names)
  if k < len(class_names):
    raise ValueError(f"cluster.num_clusters={k} is below the {len(class_names)} classes")
  backbone = resnet.backbone_from_config(model_config)
  variables = jax.device_put({"params": backbone_params, "batch_stats": backbone_batch_stats},
                             parallel.replicated(mesh))
  features_fn, counts_fn, predict_fn = make_steps(backbone, mesh, len(class_names), k)

  per_image = max(1, math.ceil(int(cc.fit_pixels) / len(val_source)))
  rng = np.random.default_rng([config.seed, jax.process_index()])
  sample = _fit_sample(features_fn, variables, val_source, config, mesh, per_image, rng)
  centroids = kmeans(sample, k, config.seed, int(cc.num_iters), int(cc.num_restarts))
  if jax.process_index() == 0:
    logging.info("cluster probe: k-means with k=%d on %d feature cells of %d val images", k,
                 len(sample), len(val_source))

  centroids_dev = jax.device_put(centroids, parallel.replicated(mesh))
  per_process = config.eval_batch_size // jax.process_count()
  counts = np.zeros((len(class_names), k), np.int64)
  first = None
  for batch in segdata.val_batches(val_source, config.data, per_process, jax.process_index(),
                                   jax.process_count()):
    arrays = parallel.host_to_global(mesh, {"image": batch["image"], "label": batch["label"]})
    counts += np.asarray(jax.device_get(counts_fn(variables, centroids_dev, arrays)), np.int64)
    if first is None:
      first = (batch, _local_rows(predict_fn(variables, centroids_dev, arrays["image"])))
  mapping = match_clusters(counts)
  cm = class_confusion(counts, mapping)
  results = metrics_lib.metrics_from_confusion(cm, class_names)
  results.update({
      "num_images": len(val_source), "mode": "cluster", "num_clusters": k,
      "cluster_to_class": [class_names[c] for c in mapping], "num_fit_pixels": int(len(sample)),
      "cluster_counts": counts.tolist(),
      "class_names": class_names, "confusion_matrix": cm.tolist(), "figures": {}})
  if jax.process_index() == 0:
    results["figures"]["confusion"] = viz.confusion_figure(
        cm, class_names, os.path.join(workdir, "confusion_matrix.png"))
    batch, clusters = first
    shown = [j for j in range(len(clusters)) if batch["size"][j][0]][:int(config.get("num_figure_images", 4))]
    if shown:
      crop = lambda a, j: a[j, :batch["size"][j][0], :batch["size"][j][1]]
      results["figures"]["predictions"] = viz.segmentation_grid(
          [crop(batch["image"], j) for j in shown], [crop(batch["label"], j) for j in shown],
          [mapping[crop(clusters, j)] for j in shown], class_names,
          os.path.join(workdir, "predictions.png"))
    metrics_lib.log_results(results, workdir, f"cluster probe (k={k})")
  return results
