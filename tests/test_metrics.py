"""The confusion matrix and docs/evaluation.md metrics against hand-computed numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cacl_jax.runtime import parallel
from cacl_jax.evaluation import metrics

# Five classes. Class 3 is absent from GT and prediction, class 2 is never predicted, class 4
# is predicted but absent from GT, and one pixel is labelled 255 (its prediction, 2, must not
# count as a prediction of class 2).
LABELS = np.array([0, 0, 1, 1, 2, 2, 255, 0, 1], np.uint8)
PREDS = np.array([0, 1, 1, 1, 0, 1, 2, 0, 4], np.uint8)
NAMES = ["a", "b", "c", "d", "e"]
HAND_CM = np.array([[2, 1, 0, 0, 0],
                    [0, 2, 0, 0, 1],
                    [1, 1, 0, 0, 0],
                    [0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(LABELS, PREDS, 5)
  assert cm.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cm), HAND_CM)
  np.testing.assert_array_equal(metrics.confusion_matrix_np(LABELS, PREDS, 5), HAND_CM)


def test_metrics_by_hand():
  m = metrics.metrics_from_confusion(HAND_CM, NAMES)
  # IoU: a 2/(3+3-2), b 2/(3+4-2), c 0/2, e 0/1; d has none (absent from GT and prediction).
  assert m["per_class_iou"] == {"a": 50.0, "b": 40.0, "c": 0.0, "d": None, "e": 0.0}
  assert m["miou"] == 22.5                  # (50 + 40 + 0 + 0) / 4
  # Acc over GT classes only: a 2/3, b 2/3, c 0; d and e have no GT pixels.
  assert m["per_class_acc"] == {"a": 66.7, "b": 66.7, "c": 0.0, "d": None, "e": None}
  assert m["macc"] == 44.4                  # (66.67 + 66.67 + 0) / 3
  assert m["pixel_acc"] == 50.0             # 4 of 8 valid pixels
  assert m["num_pixels"] == 8
  table = metrics.format_table(m)
  assert "mean" in table and "22.5" in table and "44.4" in table
  both = metrics.format_comparison({"pretrained": m, "random init": {"miou": 3.0, "macc": 7.25}})
  assert both.splitlines()[2].split() == ["pretrained", "22.5", "44.4"]
  assert both.splitlines()[3].split() == ["random", "init", "3.0", "7.2"]


def test_perfect_and_all_ignored():
  labels = np.array([[0, 1], [2, 255]])
  m = metrics.metrics_from_confusion(metrics.confusion_matrix_np(labels, labels, 3))
  assert (m["miou"], m["macc"], m["pixel_acc"]) == (100.0, 100.0, 100.0)
  empty = metrics.metrics_from_confusion(np.zeros((3, 3), np.int64))
  assert (empty["miou"], empty["macc"], empty["num_pixels"]) == (0.0, 0.0, 0)


def test_sharded_batch_sums_every_device():
  """On 8 devices, one jitted call over a batch-sharded array counts every pixel once."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, (8, 16, 16)).astype(np.uint8)
  labels[labels == 5] = 255
  preds = rng.integers(0, 5, (8, 16, 16)).astype(np.uint8)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  sharding = NamedSharding(mesh, P("data"))
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2,
               out_shardings=NamedSharding(mesh, P()))(
                   jax.device_put(labels, sharding), jax.device_put(preds, sharding), 5)
  expected = metrics.confusion_matrix_np(labels, preds, 5)
  np.testing.assert_array_equal(np.asarray(cm), expected)
  assert expected.sum() == np.sum(labels != 255)


def test_bad_input():
  with pytest.raises(ValueError, match="differ"):
    metrics.confusion_matrix(jnp.zeros((2, 3)), jnp.zeros((3, 2)), 4)
  with pytest.raises(ValueError, match="square"):
    metrics.metrics_from_confusion(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="class names"):
    metrics.metrics_from_confusion(np.zeros((2, 2)), ["only_one"])
