"""The retrieval protocol (Hummingbird): the search and label transfer against a float64 NumPy
reference, the memory's patch labels and cell sampling against the reference's rules, the sharded
search equal to the single-device one, and `linear_eval --config.protocol=retrieval` end to end on
the synthetic set and on prepared VOC and Cityscapes trees."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cacl_jax.interop import convert
from cacl_jax import defaults
from cacl_jax.runtime import parallel
from cacl_jax.data import prepare as prepare_data
from cacl_jax.evaluation import dense_nn, probe, retrieval
from tests import test_real_data as real_trees

import tiny

NUM_TRAIN, NUM_VAL = 32, 10


def reference_retrieval(queries, keys, values, valid, k, tau):
  """float64: the k most similar valid keys (stable: lower row first among ties), their
  similarities, their values and the softmax(sim / τ)-weighted label of every query."""
  q, keys, values = (np.asarray(x, np.float64) for x in (queries, keys, values))
  sims = q @ keys.T
  sims[:, ~np.asarray(valid)] = -np.inf
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(sims, order, axis=1)
  w = np.exp((top - top[:, :1]) / tau)
  w /= w.sum(axis=1, keepdims=True)
  return top, values[order], np.einsum("qk,qkl->ql", w, values[order])


def unit(rng, *shape):
  x = rng.standard_normal(shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_search_and_label_transfer_match_a_float64_reference():
  rng = np.random.default_rng(0)
  q, keys = unit(rng, 37, 16), unit(rng, 203, 16)
  values = rng.dirichlet(np.ones(5), 203).astype(np.float32)
  valid = rng.random(203) < 0.8
  keys[150] = keys[20]           # an exact tie: the lower row must win
  values[150] = np.roll(values[20], 1)
  q[0] = keys[20]
  valid[[20, 150]] = True
  ref_s, ref_v, ref_label = reference_retrieval(q, keys, values, valid, 7, 0.02)
  for block in (16, 4096):      # tiles that split queries and bank with padding; one tile
    search = jax.jit(dense_nn.topk_search, static_argnums=(4, 5))
    s, v = search(q, keys, values, valid, 7, block)
    np.testing.assert_allclose(s, ref_s, atol=2e-6)
    np.testing.assert_array_equal(v, ref_v.astype(np.float32))
    assert s[0, 0] == pytest.approx(1.0, abs=1e-6) and s[0, 1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(v[0, 0], values[20])    # row 20 before its twin, row 150
    np.testing.assert_allclose(dense_nn.transfer_labels(s, v, 0.02), ref_label, atol=2e-5)


def test_patch_labels_and_cell_sampling_follow_the_reference():
  rng = np.random.default_rng(1)
  labels = rng.choice([0, 1, 2, 3, 255], size=(2, 16, 24), p=[0.5, 0.2, 0.1, 0.1, 0.1])
  labels[0, :8, :8] = 255                             # a patch without any labelled pixel
  dist, valid = dense_nn.patch_labels(labels.astype(np.uint8), 4)
  assert dist.shape == (2, 2, 3, 4)
  for b in range(2):
    for i in range(2):
      for j in range(3):
        patch = labels[b, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1)
        counts = np.bincount(patch[patch != 255], minlength=4)
        assert valid[b, i, j] == (counts.sum() > 0)
        np.testing.assert_allclose(dist[b, i, j], counts / max(counts.sum(), 1), atol=1e-7)
  assert not valid[0, 0, 0]
  # hbird_eval.py's sample_features: a class's frequency = the patches (of this image) holding
  # it; a patch's score = Σ of its classes' frequencies × U(0, 1); the lowest scores are kept.
  dist, valid = np.asarray(dist).reshape(2, 6, 4), np.asarray(valid).reshape(2, 6)
  u = rng.random((2, 6))
  scores = np.asarray(dense_nn.cell_scores(dist, valid, u))
  for b in range(2):
    present = dist[b] > 0
    frequency = present.sum(axis=0)
    expected = np.where(valid[b], [frequency[p].sum() for p in present] * u[b], np.inf)
    np.testing.assert_allclose(scores[b], expected, rtol=1e-6)
    kept = np.asarray(dense_nn.keep_cells(scores, 4))[b]
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(expected)[:4]))
  assert 0 not in np.asarray(dense_nn.keep_cells(scores, 4))[0]   # the unlabelled patch


def test_sharded_search_equals_the_single_device_search():
  rng = np.random.default_rng(2)
  q = unit(rng, 64, 8)
  keys = unit(rng, 8, 3, 5, 8)                  # [crops, slots, cells, C], as the memory bank
  values = rng.dirichlet(np.ones(4), (8, 3, 5)).astype(np.float32)
  valid = rng.random((8, 3, 5)) < 0.9
  single_s, single_v = dense_nn.topk_search(q, keys.reshape(-1, 8), values.reshape(-1, 4),
                                            valid.reshape(-1), 6, 8)
  for n in (1, 2, 8):
    mesh = parallel.make_mesh(n)
    put = lambda x: jax.device_put(x, parallel.data_sharding(mesh))
    search = jax.jit(lambda *a: dense_nn.sharded_search(mesh, parallel.DATA, *a, k=6, block=8))
    s, v = search(put(q), put(keys), put(values), put(valid))
    assert s.sharding.spec == jax.sharding.PartitionSpec(parallel.DATA)
    np.testing.assert_allclose(s, single_s, atol=1e-6)
    np.testing.assert_array_equal(v, single_v)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """A random ⅛-width ResNet-18 and a `convert from-torch`-style workdir around it."""
  config = convert.converted_config("resnet18", 8)
  params, stats = probe.random_backbone(config.model, seed=0, image_size=64)
  workdir = str(tmp_path_factory.mktemp("converted"))
  convert.write_workdir(workdir, config, params, stats)
  return workdir, params, stats, config.model


def synthetic_config(pretrained=""):
  c = tiny.eval_config()
  c.pretrained, c.protocol = pretrained, "retrieval"
  c.batch_size = 16
  c.data.synthetic.num_train_images = NUM_TRAIN
  c.data.synthetic.num_val_images = NUM_VAL
  return c


def test_retrieval_protocol_end_to_end_on_synthetic(backbone, tmp_path):
  workdir, params, stats, model = backbone
  config = synthetic_config(workdir)
  config.retrieval.memory_size = NUM_TRAIN * 20   # the reference's sampling: 20 cells per crop
  results = probe.evaluate_checkpoint(config, str(tmp_path / "eight"))
  saved = json.load(open(tmp_path / "eight" / "results.json"))
  assert saved["mode"] == "retrieval" and saved["miou"] == results["miou"]
  # Every real val pixel once at full resolution (64 px frames padded to 72); the crops are
  # resized to the padded short side, 72 px = 9 × 9 cells, of which 20 are kept.
  assert saved["num_pixels"] == NUM_VAL * 64 * 64 and saved["image_size"] == 72
  assert saved["cells_per_crop"] == 20 and saved["memory_size"] == NUM_TRAIN * 20
  assert (saved["num_neighbours"], saved["temperature"]) == (30, 0.02)
  for name in ("confusion_matrix.png", "predictions.png"):
    assert os.path.getsize(tmp_path / "eight" / name) > 0
  # The same run on one device: the same memory (crops and cell sampling do not depend on the
  # sharding) and the same labels (measured exact: no similarity lands on a tie between tiles).
  one = retrieval.retrieval_probe(config, params, stats, model, parallel.make_mesh(1),
                                  str(tmp_path / "one"))
  assert one["memory_size"] == saved["memory_size"]
  np.testing.assert_array_equal(one["confusion_matrix"], saved["confusion_matrix"])


def test_memory_crops_are_the_reference_augmentation():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  label = np.tile(np.arange(60, dtype=np.uint8), (40, 1))     # the column index
  a = retrieval.memory_crop({"image": image, "label": label}, np.random.default_rng(7), 32)
  b = retrieval.memory_crop({"image": image, "label": label}, np.random.default_rng(7), 32)
  assert a["image"].shape == (32, 32, 3) and a["label"].shape == (32, 32)
  np.testing.assert_array_equal(a["image"], b["image"])
  # Nearest-neighbour label resampling, no flip: columns stay column indices, increasing.
  assert set(np.unique(a["label"])) <= set(range(60))
  assert (np.diff(a["label"][0].astype(int)) >= 0).all()
  # Each image's crop depends on (seed, epoch, its index) only: two processes' shards hold the
  # single process' crops, fillers (index −1) close the last batch.
  source = [{"image": image, "label": label}] * 5
  one = list(retrieval.memory_batches(source, 16, 0, 0, 4, 0))
  two = [list(retrieval.memory_batches(source, 16, 0, 0, 2, 0, p, 2)) for p in (0, 1)]
  assert [b["index"].tolist() for b in one] == [[0, 1, 2, 3], [4, -1, -1, -1]]
  assert [[b["index"].tolist() for b in p] for p in two] == [[[0, 2], [4, -1]], [[1, 3], [-1, -1]]]
  np.testing.assert_array_equal(two[1][0]["image"][1], one[0]["image"][3])
  assert (one[1]["label"][1:] == 255).all()
  # Hue shifts wrap around the uint8 hue circle, as torchvision's PIL adjust_hue.
  red = Image.fromarray(np.full((2, 2, 3), (255, 0, 0), np.uint8))
  shifted = np.asarray(retrieval._adjust_hue(red, -0.1))[0, 0]
  assert shifted[0] == 255 and shifted[2] > 100 and shifted[1] == 0    # towards magenta


def prepared_voc(root):
  """A VOCdevkit tree (3 train, 2 val images with 255 borders), prepared."""
  rng = np.random.default_rng(4)
  voc = f"{root}/raw/VOC2012"
  palette = real_trees.decode.voc_colormap().reshape(-1).tolist()
  for i in range(5):
    image_id = f"2007_{i:06d}"
    real_trees.save_jpeg(f"{voc}/JPEGImages/{image_id}.jpg", real_trees.random_image(rng, 40, 48))
    real_trees.save_png(f"{voc}/SegmentationClass/{image_id}.png",
                        real_trees.voc_label(rng, 40, 48), "P", palette)
  os.makedirs(f"{voc}/ImageSets/Segmentation")
  for split, ids in (("train", (0, 1, 2)), ("val", (3, 4))):
    with open(f"{voc}/ImageSets/Segmentation/{split}.txt", "w") as f:
      f.write("".join(f"2007_{i:06d}\n" for i in ids))
  prepare_data.main(["voc", "--src", f"{root}/raw", "--out", f"{root}/data", "--workers", "0"])
  return f"{root}/data"


def prepared_cityscapes(root):
  """A Cityscapes tree (2 train, 2 val images, 32 × 64, every labelId), prepared."""
  rng = np.random.default_rng(5)
  for split, city in (("train", "aachen"), ("val", "frankfurt")):
    for i in range(2):
      stem = f"{city}_{i:06d}_000019"
      os.makedirs(f"{root}/raw/leftImg8bit/{split}/{city}", exist_ok=True)
      Image.fromarray(real_trees.random_image(rng, 32, 64)).save(
          f"{root}/raw/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
      ids = rng.integers(0, 34, (32, 64), dtype=np.uint8)
      real_trees.save_png(f"{root}/raw/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", ids, "L")
  prepare_data.main(["cityscapes", "--src", f"{root}/raw", "--out", f"{root}/data",
                     "--workers", "0"])
  return f"{root}/data"


@pytest.mark.parametrize("name, prepare, pad, classes", [
    ("voc", prepared_voc, (48, 48), 21), ("cityscapes", prepared_cityscapes, (32, 64), 19)])
def test_retrieval_on_prepared_real_layouts(backbone, tmp_path, name, prepare, pad, classes):
  _, params, stats, model = backbone
  c = defaults.eval_config()
  c.batch_size, c.eval_batch_size, c.num_figure_images = 8, 8, 1
  c.data.name, c.data.root, c.data.eval_pad_size, c.data.num_workers = name, prepare(
      str(tmp_path)), pad, 0
  c.retrieval.num_neighbours = 5
  results = retrieval.retrieval_probe(c, params, stats, model, parallel.make_mesh(),
                                      str(tmp_path / "eval"))
  read = real_trees.real.voc_source if name == "voc" else real_trees.real.cityscapes_source
  val = read(c.data.root, "val")
  labelled = sum(int(np.sum(val[i]["label"] != 255)) for i in range(len(val)))
  assert len(results["class_names"]) == classes and results["num_images"] == 2
  assert results["num_pixels"] == labelled > 0        # 255 ignored, every other val pixel once
  # No sampling at this size: every cell of every crop that has a labelled pixel.
  side = min(pad) // 8
  assert results["cells_per_crop"] == side * side
  assert 0 < results["memory_size"] <= results["num_train_images"] * side * side
  assert 0.0 <= results["miou"] <= 100.0
