"""The cluster probe (label-free segmentation evaluation): k-means, the Hungarian / majority
matching, and `linear_eval --config.protocol=cluster` end to end on the synthetic set."""
import itertools
import json
import os

import jax
import numpy as np
import pytest

from cacl_jax.interop import convert
from cacl_jax import defaults
from cacl_jax.runtime import parallel
from cacl_jax.evaluation import cluster, metrics, probe

NUM_VAL = 10


def blobs(rng, k, per, dim, noise=0.05):
  """`per` noisy unit vectors around each of k random unit directions, and their labels."""
  centres = rng.standard_normal((k, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  x = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((k * per, dim))
  return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(k), per), centres


def test_kmeans_recovers_separated_directions():
  x, labels, centres = blobs(np.random.default_rng(0), 5, 40, 16)
  found = cluster.kmeans(x, 5, seed=0, num_iters=20, num_restarts=3)
  assert found.shape == (5, 16)
  np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-5)
  # Each true direction has exactly one centroid within cosine 0.99 of it.
  close = centres @ found.T > 0.99
  assert (close.sum(axis=1) == 1).all() and (close.sum(axis=0) == 1).all()
  np.testing.assert_array_equal(found, cluster.kmeans(x, 5, seed=0, num_iters=20, num_restarts=3))


def test_hungarian_beats_greedy_and_overclustering_takes_majorities():
  # Greedy (each cluster to its biggest class) would send both clusters to class 0 (5 and 4);
  # the one-to-one optimum is cluster 0 → class 1, cluster 1 → class 0: 4 + 4 = 8 > 5 + 0.
  counts = np.array([[5, 4], [4, 0]])
  mapping = cluster.match_clusters(counts)
  np.testing.assert_array_equal(mapping, [1, 0])
  np.testing.assert_array_equal(cluster.class_confusion(counts, mapping), [[4, 5], [0, 4]])
  over = np.array([[5, 0, 1], [1, 3, 2]])
  np.testing.assert_array_equal(cluster.match_clusters(over), [0, 1, 1])
  with pytest.raises(ValueError, match="num_clusters must be"):
    cluster.match_clusters(np.ones((3, 2)))


def test_separable_features_score_full_marks():
  """Features whose directions are the classes: k-means + matching recover the labels, so the
  confusion matrix is diagonal and mIoU = pixel accuracy = 100 (whatever the cluster order)."""
  x, labels, _ = blobs(np.random.default_rng(1), 4, 50, 8)
  centroids = cluster.kmeans(x, 4, seed=3)
  assign = np.argmax(x @ centroids.T, axis=1)
  counts = metrics.confusion_matrix_np(labels, assign, 4)
  result = metrics.metrics_from_confusion(
      cluster.class_confusion(counts, cluster.match_clusters(counts)))
  assert result["miou"] == result["pixel_acc"] == 100.0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A workdir as `convert from-torch` writes it, around a random ⅛-width ResNet-18."""
  model = defaults.pretrain_config().model
  model.width_divisor = 8
  params, stats = probe.random_backbone(model, seed=0, image_size=64)
  workdir = str(tmp_path_factory.mktemp("converted"))
  convert.write_workdir(workdir, convert.converted_config("resnet18", 8), params, stats)
  return workdir, params, stats, model


def eval_config(pretrained_dir, num_clusters=0):
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "linear_eval_synthetic", os.path.join(root, "configs", "linear_eval_synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.pretrained, c.protocol = pretrained_dir, "cluster"
  c.eval_batch_size, c.num_figure_images = 8, 2
  c.data.eval_pad_size = (72, 72)
  c.data.synthetic.frame_size = 64
  c.data.synthetic.num_val_images = NUM_VAL
  c.cluster.num_clusters, c.cluster.num_iters, c.cluster.num_restarts = num_clusters, 10, 2
  return c


def test_cluster_protocol_end_to_end(pretrained, tmp_path):
  """`linear_eval --config.protocol=cluster --config.pretrained=DIR` on a converted DIR."""
  results = probe.evaluate_checkpoint(eval_config(pretrained[0]), str(tmp_path))
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  for key in ("miou", "macc", "pixel_acc", "per_class_iou", "num_images", "checkpoint_step",
              "cluster_to_class", "cluster_counts", "confusion_matrix"):
    assert key in saved, key
  assert saved["mode"] == "cluster" and saved["num_clusters"] == 7 == len(saved["class_names"])
  # Every real val pixel at full resolution, once; padding and fillers ignored. The fit
  # sample: ceil(100000 / 10) cells asked per image, all 8 × 8 = 64 of each image drawn.
  assert saved["num_pixels"] == NUM_VAL * 64 * 64 and saved["num_fit_pixels"] == NUM_VAL * 64
  counts = np.array(saved["cluster_counts"])
  assert counts.sum() == NUM_VAL * 64 * 64
  # One cluster per class, and the matching is the optimum over all 7! assignments.
  assert sorted(saved["cluster_to_class"]) == sorted(saved["class_names"])
  best = max(sum(counts[p[j], j] for j in range(7)) for p in itertools.permutations(range(7)))
  assert np.trace(np.array(saved["confusion_matrix"])) == best
  assert saved["pixel_acc"] == pytest.approx(100 * best / counts.sum(), abs=0.051)
  assert results["miou"] == saved["miou"]
  for name in ("confusion_matrix.png", "predictions.png"):
    assert os.path.getsize(tmp_path / name) > 0


def test_overclustering_maps_many_clusters_to_a_class(pretrained, tmp_path):
  workdir, params, stats, model = pretrained
  mesh = parallel.make_mesh()
  results = cluster.cluster_probe(eval_config(workdir, num_clusters=14), params, stats, model,
                                  mesh, str(tmp_path))
  counts = np.array(results["cluster_counts"])
  assert counts.shape == (7, 14) and results["num_clusters"] == 14
  names = results["class_names"]
  assert results["cluster_to_class"] == [names[c] for c in counts.argmax(axis=0)]
  np.testing.assert_array_equal(
      np.array(results["confusion_matrix"]),
      cluster.class_confusion(counts, counts.argmax(axis=0)))
  with pytest.raises(ValueError, match="below the 7 classes"):
    cluster.cluster_probe(eval_config(workdir, num_clusters=3), params, stats, model, mesh,
                          str(tmp_path / "few"))
