"""Readers of prepared real data: VOC / Cityscapes / ImageNet trees in their real layouts,
pixel-exact label decoding, and pairs drawn from a prepared Kinetics directory."""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cacl_jax.data import prepare as prepare_data
from cacl_jax.data import decode
from cacl_jax.data import real
import test_prepare_data as videos

# docs/evaluation.md, written out independently of the code under test.
SPEC_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def save_jpeg(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path, quality=95)


def save_png(path, array, mode, palette=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(array, mode="L")
  if mode == "P":
    im = im.convert("P")
    im.putpalette(palette)
  im.save(path)


def decoded_file(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def random_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def voc_label(rng, h, w):
  label = rng.integers(0, 21, (h, w), dtype=np.uint8)
  label[:, :3] = 255  # object boundaries are 255 in VOC
  return label


def test_voc_colormap_known_entries():
  cmap = decode.voc_colormap()
  assert tuple(cmap[0]) == (0, 0, 0)
  assert tuple(cmap[1]) == (128, 0, 0)
  assert tuple(cmap[15]) == (192, 128, 128)  # person
  assert tuple(cmap[20]) == (0, 64, 128)  # tvmonitor
  assert tuple(cmap[255]) == (224, 224, 192)  # the ignore/boundary colour


def test_voc_rgb_label_maps_back_through_palette():
  label = np.array([[0, 1, 15], [20, 255, 7]], np.uint8)
  rgb = decode.voc_colormap()[label]
  np.testing.assert_array_equal(decode.voc_label_from_image(Image.fromarray(rgb)), label)
  rgb[0, 0] = (1, 2, 3)
  with pytest.raises(ValueError, match="outside the VOC palette"):
    decode.voc_label_from_image(Image.fromarray(rgb))


def test_cityscapes_mapping_is_the_spec_table():
  ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
  expected = np.array([SPEC_TRAIN_IDS.get(i, 255) for i in range(256)], np.uint8).reshape(16, 16)
  np.testing.assert_array_equal(decode.cityscapes_to_train_ids(ids), expected)
  assert len(decode.CITYSCAPES_CLASS_NAMES) == 19 and decode.CITYSCAPES_CLASS_NAMES[0] == "road"


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  """A VOCdevkit tree with SBD: palette PNGs (val), grey SegmentationClassAug (trainaug),
  and broken files. Returns (out, labels by id, images by id, report entry)."""
  rng = np.random.default_rng(0)
  src = str(tmp_path_factory.mktemp("voc_raw"))
  voc_dir = f"{src}/VOC2012"
  palette = decode.voc_colormap().reshape(-1).tolist()
  labels, images = {}, {}
  for i in range(8):
    image_id = f"2007_{i:06d}"
    h, w = 40 + 2 * i, 48
    images[image_id] = f"{voc_dir}/JPEGImages/{image_id}.jpg"
    labels[image_id] = voc_label(rng, h, w)
    save_jpeg(images[image_id], random_image(rng, h, w))
    save_png(f"{voc_dir}/SegmentationClass/{image_id}.png", labels[image_id], "P", palette)
    save_png(f"{voc_dir}/SegmentationClassAug/{image_id}.png", labels[image_id], "L")
  # Broken: an unreadable image, a label of the wrong size, a missing label.
  with open(f"{voc_dir}/JPEGImages/2007_000002.jpg", "wb") as f:
    f.write(b"\xff\xd8 not really a jpeg")
  save_png(f"{voc_dir}/SegmentationClassAug/2007_000003.png", voc_label(rng, 10, 10), "L")
  os.remove(f"{voc_dir}/SegmentationClassAug/2007_000004.png")
  sets = f"{voc_dir}/ImageSets/Segmentation"
  os.makedirs(sets)
  with open(f"{sets}/train.txt", "w") as f:
    f.write("2007_000000\n2007_000001\n")
  with open(f"{sets}/val.txt", "w") as f:
    f.write("2007_000006\n2007_000007\n")
  with open(f"{sets}/trainaug.txt", "w") as f:  # DeepLab-style lines; one val id leaks in
    f.write("".join(f"/JPEGImages/2007_{i:06d}.jpg /SegmentationClassAug/2007_{i:06d}.png\n"
                    for i in (0, 1, 2, 3, 4, 5, 7)))
  out = str(tmp_path_factory.mktemp("voc_data"))
  entry = prepare_data.main(["voc", "--src", src, "--out", out, "--workers", "0"])
  return out, labels, images, entry


def test_voc_trainaug_labels_pixel_exact_and_broken_files_named(voc):
  out, labels, images, entry = voc
  train = entry["splits"]["train"]
  assert train["num_ok"] == 3
  assert {s["name"].split("/")[-1]: s["kind"] for s in train["skipped"]} == {
      "2007_000002.jpg": "unreadable_image", "2007_000003.png": "size_mismatch",
      "2007_000004.png": "missing_label", "2007_000007": "in_val"}
  source = real.voc_source(out, "train")
  assert len(source) == 3 and len(source.class_names) == 21
  assert source.class_names[0] == "background" and source.class_names[15] == "person"
  for i, image_id in enumerate(["2007_000000", "2007_000001", "2007_000005"]):
    item = source[i]
    assert item["id"] == image_id
    np.testing.assert_array_equal(item["label"], labels[image_id])
    # The original JPEG bytes are stored: decoding equals decoding the source file.
    np.testing.assert_array_equal(item["image"], decoded_file(images[image_id]))


def test_voc_val_reads_palette_pngs_as_indices(voc):
  out, labels, _, entry = voc
  assert entry["splits"]["val"]["num_ok"] == 2
  val = real.voc_source(out, "val")
  for item in (val[0], val[1]):
    np.testing.assert_array_equal(item["label"], labels[item["id"]])
    assert 255 in item["label"]


def test_cityscapes_tree_trainids_pixel_exact(tmp_path):
  rng = np.random.default_rng(1)
  src, out = str(tmp_path / "raw"), str(tmp_path / "data")
  expected = {}
  for split, city, n in (("train", "aachen", 3), ("val", "frankfurt", 2)):
    for i in range(n):
      image_id = f"{city}_{i:06d}_000019"
      h, w = 32, 64
      label_ids = rng.integers(0, 34, (h, w), dtype=np.uint8)
      label_ids[0, :34] = np.arange(34)  # every labelId occurs
      os.makedirs(f"{src}/leftImg8bit/{split}/{city}", exist_ok=True)
      Image.fromarray(random_image(rng, h, w)).save(f"{src}/leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png")
      save_png(f"{src}/gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png", label_ids, "L")
      expected[image_id] = np.vectorize(lambda v: SPEC_TRAIN_IDS.get(int(v), 255))(label_ids).astype(np.uint8)
  # Broken: a zero-byte image and a label of another size.
  open(f"{src}/leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png", "wb").close()
  save_png(f"{src}/gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png",
           np.zeros((16, 64), np.uint8), "L")
  entry = prepare_data.main(["cityscapes", "--src", src, "--out", out, "--workers", "0"])
  assert entry["splits"]["train"]["skipped_by_kind"] == {"zero_bytes": 1}
  assert entry["splits"]["val"]["skipped_by_kind"] == {"size_mismatch": 1}
  train, val = real.cityscapes_source(out, "train"), real.cityscapes_source(out, "val")
  assert train.class_names == decode.CITYSCAPES_CLASS_NAMES
  assert [train[i]["id"] for i in range(len(train))] == ["aachen_000000_000019", "aachen_000002_000019"]
  for source in (train, val):
    for i in range(len(source)):
      item = source[i]
      np.testing.assert_array_equal(item["label"], expected[item["id"]])
      assert item["image"].shape == (32, 64, 3)


def test_imagenet_images_are_one_frame_videos(tmp_path):
  rng = np.random.default_rng(2)
  src, out = str(tmp_path / "raw"), str(tmp_path / "data")
  originals = {}
  for wnid in ("n01440764", "n01443537"):
    for i in range(3):
      originals[f"{wnid}/{wnid}_{i}"] = f"{src}/train/{wnid}/{wnid}_{i}.JPEG"
      save_jpeg(originals[f"{wnid}/{wnid}_{i}"], random_image(rng, 30 + i, 40))
  with open(f"{src}/train/n01443537/n01443537_1.JPEG", "wb") as f:
    f.write(b"garbage")
  entry = prepare_data.main(["imagenet", "--src", src, "--out", out, "--workers", "0"])
  assert entry["splits"]["train"]["skipped_by_kind"] == {"unreadable_image": 1}
  source = real.imagenet_source(out)
  assert len(source) == 5 and source.label_names == ("n01440764", "n01443537")
  video = source[4]
  assert (video.name, video.label, video.num_frames) == ("n01443537/n01443537_2", 1, 1)
  frame = video.frames([0])
  assert frame.shape == (1, 32, 40, 3)
  np.testing.assert_array_equal(frame[0], decoded_file(originals[video.name]))


@pytest.fixture(scope="module")
def kinetics_dir(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("pairs_raw"))
  for i, n in enumerate((20, 24, 28, 30)):
    videos.write_video(f"{src}/train/class{i % 2}/v{i}.mp4", num_frames=n)
  out = str(tmp_path_factory.mktemp("pairs_data"))
  prepare_data.main(["kinetics", "--src", src, "--out", out, "--workers", "0"])
  return out


def test_successive_epochs_draw_new_pairs_at_the_stride(kinetics_dir):
  from cacl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  stride = 5
  config = ml_collections.ConfigDict(dict(
      name="kinetics", root=kinetics_dir, image_size=32, frame_stride=stride,
      pair_type="cross_frame", crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3),
      num_workers=0, prefetch=1))
  source = real.kinetics_source(kinetics_dir)
  # One batch = one epoch (batch size = number of videos).
  ds = pipeline.make_pretrain_dataset(config, global_batch_size=len(source), process_index=0,
                                      process_count=1, seed=3)
  it = iter(ds)
  epochs = []
  for _ in range(4):
    batch = next(it)
    # Frame i of a test video has red level 8·i, which crops and flips keep.
    t = videos.red_levels(batch["v"])
    t_pos = videos.red_levels(batch["v_pos"])
    np.testing.assert_array_equal(t_pos - t, stride)
    epochs.append(tuple(sorted(t)))
  assert len(set(epochs)) == 4, epochs


def test_pretraining_runs_a_few_steps_from_prepared_kinetics(kinetics_dir, tmp_path):
  import tiny  # pylint: disable=g-import-not-at-top  (tests/tiny.py: the trainer tests' shapes, compile-cached)
  from cacl_jax.training import train  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  with config.unlocked():
    config.data.name = "kinetics"
    config.data.root = kinetics_dir
    config.data.num_workers = 0
    config.total_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.viz_every_steps = 0
    if "eval_after" in config:
      config.eval_after = ml_collections.ConfigDict()
  workdir = str(tmp_path / "work")
  metrics = train.run(config, workdir)
  assert np.isfinite(metrics["loss"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2]
