"""The retrieval protocol (Hummingbird): the search and label transfer against a float64 NumPy
reference, the memory's patch labels and cell sampling against the reference's rules, the sharded
search against NumPy (devices with fewer than k rows, ties across devices) without a copy of the
bank, and end to end: an oracle's features give mIoU 100, a NumPy brute force of the whole
pipeline from the real crops gives our confusion matrix exactly, a memory over its budget stops
before any feature, and `linear_eval --config.protocol=retrieval` runs on the synthetic set and
on prepared VOC and Cityscapes trees."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cacl_jax.interop import convert
from cacl_jax import defaults
from cacl_jax.runtime import parallel
from cacl_jax.data import prepare as prepare_data
from cacl_jax.evaluation import dense_nn, metrics, probe, retrieval, segdata
from cacl_jax.models import resnet

import test_real_data as real_trees
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


def pad(x, rows, value=0):
  """x with its leading axis padded to `rows` (the bank's invalid padding rows)."""
  return np.pad(x, [(0, rows - len(x))] + [(0, 0)] * (x.ndim - 1), constant_values=value)


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
  search = jax.jit(dense_nn.topk_search, static_argnums=(4, 5))
  for block in (16, 4096):      # tiles that split queries and bank (13 tiles); one tile
    rows = dense_nn.padded_rows(203, block)
    assert rows == (208 if block == 16 else 203)
    s, v = search(q, pad(keys, rows), pad(values, rows), pad(valid, rows, False), 7, block)
    np.testing.assert_allclose(s, ref_s, atol=2e-6)
    np.testing.assert_array_equal(v, ref_v.astype(np.float32))
    assert s[0, 0] == pytest.approx(1.0, abs=1e-6) and s[0, 1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(v[0, 0], values[20])    # row 20 before its twin, row 150
    np.testing.assert_allclose(dense_nn.transfer_labels(s, v, 0.02), ref_label, atol=2e-5)
  with pytest.raises(ValueError, match=r"padded_rows\(203, 16\)"):   # the bank is never padded
    search(q, keys, values, valid, 7, 16)


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


def test_sharded_search_matches_numpy_with_small_shards_and_ties_across_devices():
  # 8 devices × 5 rows, k = 6: every shard is smaller than k; device 3 holds 1 valid row; the
  # key of device 1's row 2 (global row 7) is also device 6's row 4 (global row 34), with other
  # values: the tie must go to the lower device. Tiles of 5 (a block smaller than k) and 10.
  rng = np.random.default_rng(2)
  q, keys = unit(rng, 64, 8), unit(rng, 40, 8)
  values = rng.dirichlet(np.ones(4), 40).astype(np.float32)
  valid = rng.random(40) < 0.9
  valid[15:20] = [False, False, True, False, False]
  keys[34], values[34], valid[[7, 34]] = keys[7], np.roll(values[7], 1), True
  q[5] = q[40] = keys[7]
  ref_s, ref_v, _ = reference_retrieval(q, keys, values, valid, 6, 0.02)
  for n, block in ((8, 5), (8, 10), (2, 10), (1, 10)):
    mesh = parallel.make_mesh(n)
    put = lambda x: jax.device_put(x, parallel.data_sharding(mesh))
    search = jax.jit(lambda *a: dense_nn.sharded_search(mesh, parallel.DATA, *a, k=6,
                                                        block=block))
    s, v = search(put(q), put(keys), put(values), put(valid))
    assert s.sharding.spec == jax.sharding.PartitionSpec(parallel.DATA)
    np.testing.assert_allclose(s, ref_s, atol=2e-6)
    np.testing.assert_array_equal(v, ref_v.astype(np.float32))
    for i in (5, 40):      # query rows held by devices 0 and 5 (n = 8)
      np.testing.assert_array_equal(v[i, :2], [values[7], values[34]])


def test_the_search_does_not_copy_the_bank():
  # 8 devices × 4,096 rows × 64 float32 keys = 1 MiB of keys per device, searched in tiles of
  # 512: the compiled program's scratch per device holds tiles and candidates, not a bank.
  mesh = parallel.make_mesh(8)
  rows, channels = 8 * 4096, 64
  shard = parallel.data_sharding(mesh)
  args = (jax.ShapeDtypeStruct((64, channels), jnp.float32, sharding=shard),
          jax.ShapeDtypeStruct((rows, channels), jnp.float32, sharding=shard),
          jax.ShapeDtypeStruct((rows, 5), jnp.float32, sharding=shard),
          jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=shard))
  search = jax.jit(lambda *a: dense_nn.sharded_search(mesh, parallel.DATA, *a, k=30, block=512))
  memory = search.lower(*args).compile().memory_analysis()
  local_keys = 4096 * channels * 4
  assert memory.argument_size_in_bytes >= local_keys
  assert memory.temp_size_in_bytes < local_keys / 2, memory


def stripes(rng, count, side, num_classes):
  """count images of side² px whose 8 px columns each hold one class (every class in every
  image), the class written in the red channel: {'image': uint8 [count, side, side, 3],
  'label': uint8 [count, side, side], 'index': int32 [count]}."""
  cells = side // dense_nn.PATCH
  columns = np.stack([rng.permutation(np.resize(np.arange(num_classes), cells))
                      for _ in range(count)])
  label = np.repeat(np.repeat(columns[:, None, :], side, 1), dense_nn.PATCH, 2).astype(np.uint8)
  image = np.zeros((count, side, side, 3), np.uint8)
  image[..., 0] = label
  return {"image": image, "label": label, "index": np.arange(count, dtype=np.int32)}


def test_oracle_features_give_miou_100():
  # Features = the one-hot of each cell's class, through the real memorise (cell sampling: 10 of
  # 16 cells) → sharded search → label transfer → bilinear upsampling → argmax → confusion
  # matrix → mIoU. Any misaligned key / value / slot / cell or spatial transpose would cost IoU.
  rng = np.random.default_rng(6)
  classes, side, per_crop = 4, 32, 10
  mesh = parallel.make_mesh(8)
  oracle = lambda variables, images: jax.nn.one_hot(images[:, 4::8, 4::8, 0], classes)
  memorise, evaluate = retrieval.make_steps(oracle, mesh, classes, per_crop, k=30,
                                            temperature=0.02, block=32)
  slots, crops = 3, 2                           # 3 memory batches of 16 crops, 2 per device
  rows = dense_nn.padded_rows(slots * crops * per_crop, 32)
  bank = retrieval.empty_bank(mesh, rows, classes, classes)
  key = jax.random.key(0)
  for step in range(slots):
    batch = stripes(rng, 16, side, classes)
    batch["index"] += 16 * step
    bank = memorise({}, bank, jnp.int32(step), key, parallel.host_to_global(mesh, batch))
  assert int(jnp.sum(bank[2])) == slots * 16 * per_crop and rows == 64
  cm = np.zeros((classes, classes), np.int64)
  for _ in range(2):
    val = stripes(rng, 8, side, classes)
    val["label"][:, :4] = 255                                # ignored rows
    counts, predictions = evaluate({}, bank, parallel.host_to_global(
        mesh, {"image": val["image"], "label": val["label"]}))
    cm += np.asarray(counts)
    np.testing.assert_array_equal(predictions, val["image"][..., 0])
  assert cm.sum() == 2 * 8 * (side - 4) * side and (cm == np.diag(np.diag(cm))).all()
  assert metrics.metrics_from_confusion(cm, list("abcd"))["miou"] == 100.0


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


def numpy_patch_labels(label, num_classes):
  """uint8 [S, S] -> (class shares float64 [S/8 · S/8, L], valid bool [S/8 · S/8]), 255 ignored."""
  cells = label.reshape(label.shape[0] // 8, 8, label.shape[1] // 8, 8).transpose(0, 2, 1, 3)
  counts = np.stack([(cells == c).sum(axis=(2, 3)) for c in range(num_classes)], -1)
  counts = counts.reshape(-1, num_classes).astype(np.float64)
  total = counts.sum(-1)
  return counts / np.maximum(total, 1)[:, None], total > 0


def numpy_upsample(x, height, width):
  """Bilinear, half-pixel centres, edges clamped: float [h, w, L] -> [height, width, L]."""
  for axis, out in ((0, height), (1, width)):
    n = x.shape[axis]
    pos = (np.arange(out) + 0.5) * n / out - 0.5
    low = np.floor(pos).astype(int)
    frac = (pos - low).reshape([-1 if a == axis else 1 for a in range(3)])
    take = lambda i: np.take(x, np.clip(i, 0, n - 1), axis=axis)
    x = take(low) * (1 - frac) + take(low + 1) * frac
  return x


def numpy_retrieval_confusion(config, params, stats, model, num_devices):
  """The whole protocol in NumPy (float64) from the real memory crops and val batches; only the
  backbone's features and the sampling's U(0, 1) draws come from JAX."""
  embed = jax.jit(retrieval.backbone_features(resnet.backbone_from_config(model)))
  features = lambda images: np.asarray(embed({"params": params, "batch_stats": stats}, images),
                                       np.float64)
  train = segdata.segmentation_source(config.data, "train")
  val = segdata.segmentation_source(config.data, "val")
  classes, k, tau = len(val.class_names), 30, 0.02
  per_crop = retrieval.cells_per_crop(config, len(train))
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  bank = []                                              # per crop: (device, slot, crop, cells)
  for slot, batch in enumerate(retrieval.memory_batches(
      train, retrieval.crop_size(config), config.seed, 0, config.batch_size, 0)):
    f = features(batch["image"])
    for b in range(config.batch_size):
      dist, valid = numpy_patch_labels(batch["label"][b], classes)
      u = np.asarray(jax.random.uniform(jax.random.fold_in(key, batch["index"][b]), (len(dist),)))
      present = dist > 0
      score = np.where(valid, (present * present.sum(0)).sum(-1) * u, np.inf)
      keep = np.argsort(score, kind="stable")[:per_crop]
      device = b // (config.batch_size // num_devices)
      bank.append(((device, slot, b), f[b].reshape(-1, f.shape[-1])[keep], dist[keep],
                   valid[keep]))
  bank.sort(key=lambda x: x[0])
  keys, values, valid = (np.concatenate([x[i] for x in bank]) for i in (1, 2, 3))
  cm = np.zeros((classes, classes), np.int64)
  for batch in segdata.val_batches(val, config.data, config.eval_batch_size):
    f = features(batch["image"])
    for b in range(len(f)):
      sims = f[b].reshape(-1, f.shape[-1]) @ keys.T
      sims[:, ~valid] = -np.inf
      order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
      top = np.take_along_axis(sims, order, axis=1)
      w = np.exp((top - top[:, :1]) / tau)
      scores = np.einsum("qk,qkl->ql", w / w.sum(1, keepdims=True), values[order])
      label = batch["label"][b]
      pred = numpy_upsample(scores.reshape(*f.shape[1:3], classes), *label.shape).argmax(-1)
      seen = label != 255
      np.add.at(cm, (label[seen], pred[seen]), 1)
  return cm


def test_retrieval_equals_a_numpy_brute_force_of_the_whole_pipeline(backbone, tmp_path):
  _, params, stats, model = backbone
  config = synthetic_config()
  config.retrieval.memory_size = NUM_TRAIN * 20             # the reference's sampling: 20 of 81
  ours = retrieval.retrieval_probe(config, params, stats, model, parallel.make_mesh(8),
                                   str(tmp_path))
  reference = numpy_retrieval_confusion(config, params, stats, model, 8)
  assert reference.sum() == NUM_VAL * 64 * 64 and ours["cells_per_crop"] == 20
  np.testing.assert_array_equal(ours["confusion_matrix"], reference)


def test_a_memory_over_its_budget_stops_before_any_feature(backbone, tmp_path):
  workdir, _, _, model = backbone
  config = synthetic_config(workdir)
  # 5.0 MB per device; all 81 cells of each crop need 6.2 MB (the search's working set, ~4.5 MB
  # at this size, dominates the bank's 11 kB per cell per crop).
  config.retrieval.max_bank_gib = 0.0047
  # No parameters at all: any feature computed before the check would fail otherwise.
  with pytest.raises(ValueError) as error:
    retrieval.retrieval_probe(config, {}, {}, model, parallel.make_mesh(8), str(tmp_path / "a"))
  line = str(error.value)
  assert "\n" not in line and "over the budget of 0.0047 GiB (retrieval.max_bank_gib) on 8 " \
      "devices" in line
  # The largest memory that fits, on this mesh, does fit; one more cell per crop does not.
  largest = int(line.split("fits is ")[1].split(" ")[0].replace(",", ""))
  num_classes = len(segdata.segmentation_source(config.data, "val").class_names)
  layout = lambda m: retrieval.bank_layout(_with_memory(config, m), 8, NUM_TRAIN, 64, num_classes)
  assert 0 < largest < 81 * NUM_TRAIN
  assert layout(largest).bytes <= 0.0047 * 2**30 < layout(largest + 1).bytes
  assert f"{layout(0).bytes / 2**30:.3g} GiB per device" in line
  # Through linear_eval's program: the same line, and no results.json.
  with pytest.raises(ValueError, match="retrieval memory too large"):
    probe.evaluate_checkpoint(config, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "results.json")


def _with_memory(config, memory_size):
  c = config.copy_and_resolve_references()
  c.retrieval.memory_size = memory_size
  return c


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
