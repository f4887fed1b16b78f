"""The embedded synthetic videos: determinism, label/frame consistency, motion, splits."""
import colorsys
import dataclasses

import numpy as np
import pytest

from cacl_jax.data import synthetic


def test_video_is_a_pure_function_of_seed_and_index():
  a = synthetic.SyntheticVideoSource(10, 16, 64, seed=3)
  b = synthetic.SyntheticVideoSource(1000, 16, 64, seed=3)  # length must not matter
  c = synthetic.SyntheticVideoSource(10, 16, 64, seed=4)
  np.testing.assert_array_equal(a[7].frames([0, 5]), b[7].frames([0, 5]))
  assert a[7].name == b[7].name == 'synthetic/train/3/7'
  assert np.abs(a[7].frames([0]).astype(int) - c[7].frames([0])).mean() > 10
  assert np.abs(a[7].frames([0]).astype(int) - a[6].frames([0])).mean() > 10


def test_frames_render_only_what_is_asked_and_match_full_clip():
  video = synthetic.SyntheticVideoSource(4, 12, 48, seed=0)[1]
  clip = video.frames(range(12))
  assert clip.shape == (12, 48, 48, 3) and clip.dtype == np.uint8
  np.testing.assert_array_equal(video.frames([9, 2]), clip[[9, 2]])
  labels = video.labels([9])
  assert labels.shape == (1, 48, 48) and labels.dtype == np.uint8
  with pytest.raises(IndexError, match='outside'):
    video.frames([12])


def test_labels_agree_with_pixels():
  """Background pixels equal the object-free render; object pixels wear their object's colours."""
  src = synthetic.SyntheticVideoSource(8, 40, 64, seed=1)
  for i in range(8):
    spec = src[i].spec
    for t in (0, 17, 39):
      image, label = synthetic.render(spec, t)
      empty, empty_label = synthetic.render(dataclasses.replace(spec, objects=()), t)
      assert not empty_label.any()
      np.testing.assert_array_equal(image[label == 0], empty[label == 0])
      for k in np.unique(label[label > 0]):
        allowed = np.concatenate([np.rint(o.colours) for o in spec.objects if o.label == k])
        pixels = image[label == k].astype(float)
        distance = np.abs(pixels[:, None, :] - allowed[None]).max(-1).min(-1)
        assert distance.max() <= 0.5, (i, t, k)
        # Both phases of the texture are visible on any object of a reasonable size.
        if len(pixels) > 60:
          assert len({tuple(p) for p in pixels}) >= 2, (i, t, k)


def test_classes_all_occur_several_per_frame():
  seg = synthetic.SyntheticSegmentation('train', 200, 64, seed=0)
  labels = np.stack([seg[i]['label'] for i in range(200)])
  fractions = np.bincount(labels.ravel(), minlength=7) / labels.size
  assert 0.6 < fractions[0] < 0.85, fractions  # objects cover 15-40% of the frames
  assert (fractions[1:] > 0.02).all(), fractions
  classes_per_frame = np.array([len(np.unique(x[x > 0])) for x in labels])
  assert (classes_per_frame >= 2).mean() > 0.8, classes_per_frame  # most frames: several
  assert max(len({o.label for o in synthetic.video_spec(0, 2, i, 64).objects}) -
             len(synthetic.video_spec(0, 2, i, 64).objects) for i in range(100)) == 0


def test_colour_is_a_weak_class_cue():
  """An instance's hues lie in a quarter of the circle around its class's hue; neighbouring
  classes' ranges overlap, so hue alone labels only ~2/3 of the instances (chance 1/6)."""
  hue = lambda rgb: colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0]
  centres = np.arange(6) / 6
  right = total = 0
  for i in range(300):
    for obj in synthetic.video_spec(0, 2, i, 64).objects:
      for colour in obj.colours:
        h = hue(colour)
        offset = (h - centres[obj.label - 1] + 0.5) % 1.0 - 0.5
        assert abs(offset) <= 0.125 + 1e-9, (i, obj.label, h)
        nearest = np.argmin(np.abs((h - centres + 0.5) % 1.0 - 0.5))
        right, total = right + (nearest == obj.label - 1), total + 1
  assert 0.55 < right / total < 0.75, right / total
  backgrounds = [hue(c) for i in range(300) for c in synthetic.video_spec(0, 2, i, 64).background]
  assert np.histogram(backgrounds, bins=6, range=(0, 1))[0].min() > 50  # any hue


def test_objects_move_smoothly_and_camera_pans():
  video = synthetic.SyntheticVideoSource(4, 40, 64, seed=2)[0]
  labels = video.labels([10, 11, 18]) > 0
  iou = lambda a, b: (a & b).sum() / (a | b).sum()
  assert iou(labels[0], labels[1]) > 0.6  # one frame apart: nearly the same masks
  assert iou(labels[0], labels[2]) < iou(labels[0], labels[1])  # further apart: less overlap
  spec = dataclasses.replace(video.spec, objects=())
  b0, b1 = synthetic.render(spec, 10)[0], synthetic.render(spec, 11)[0]
  assert np.abs(b0.astype(int) - b1).mean() > 0.5  # the background moves


def test_segmentation_splits_are_disjoint_and_val_is_fixed():
  train = synthetic.SyntheticSegmentation('train', 20, 64, seed=0)
  val = synthetic.SyntheticSegmentation('val', 20, 64, seed=0)
  val_again = synthetic.SyntheticSegmentation('val', 20, 64, seed=0)
  assert train.class_names == synthetic.CLASS_NAMES and len(train.class_names) == 7
  item = val[3]
  assert set(item) == {'image', 'label', 'id'} and item['id'] == 'synthetic/val/0/3'
  assert item['image'].shape == (64, 64, 3) and item['label'].shape == (64, 64)
  np.testing.assert_array_equal(item['image'], val_again[3]['image'])
  train_images = {train[i]['image'].tobytes() for i in range(20)}
  assert not train_images & {val[i]['image'].tobytes() for i in range(20)}
  pretrain = synthetic.SyntheticVideoSource(20, 64, 64, seed=0)
  assert np.abs(pretrain[3].frames([0]).astype(int) - val[3]['image']).mean() > 10


def test_bad_arguments_give_one_clear_error():
  with pytest.raises(ValueError, match='split'):
    synthetic.SyntheticSegmentation('test')
  with pytest.raises(ValueError, match='frame_size'):
    synthetic.SyntheticVideoSource(4, 8, 8)
  with pytest.raises(IndexError):
    synthetic.SyntheticVideoSource(4, 8, 32)[4]
