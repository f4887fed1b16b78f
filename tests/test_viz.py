"""Figures: palettes, the affinity similarities behind paper Fig. 3, and that PNGs are written."""
import numpy as np
import pytest
from PIL import Image

from cacl_jax.runtime import viz


def test_voc_palette_matches_the_dataset():
  p = viz.voc_palette(21)
  np.testing.assert_array_equal(p[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
  np.testing.assert_array_equal(p[15], [192, 128, 128])     # person
  assert viz.palette_for(["road", "sidewalk", "building"] + ["x"] * 16) is viz.CITYSCAPES_PALETTE


def test_colorize_marks_ignore():
  label = np.array([[0, 1], [255, 2]], np.uint8)
  rgb = viz.colorize(label, viz.voc_palette(3))
  np.testing.assert_array_equal(rgb[1, 0], viz.IGNORE_COLOR)
  np.testing.assert_array_equal(rgb[0, 1], [128, 0, 0])


def test_affinity_maps_are_cosine_similarities():
  rng = np.random.default_rng(0)
  on_v = rng.normal(size=(4, 6, 5)).astype(np.float32)
  on_v_pos = rng.normal(size=(4, 6, 5)).astype(np.float32)
  # A pixel of v+ equal to 3x the query feature has similarity 1; its negation -1.
  query = on_v[2, 3]          # image pixel (18, 29) of a 32x48 frame is feature cell (2, 3)
  on_v_pos[0, 0] = 3 * query
  on_v_pos[1, 1] = -query
  sims = viz.affinity_maps({"pixel": (on_v, on_v_pos),
                            "cycle": np.stack([on_v, on_v_pos])}, (18, 29), (32, 48))
  for sim in sims.values():
    assert sim.shape == (4, 6)
    np.testing.assert_allclose(sim[0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(sim[1, 1], -1.0, atol=1e-6)
    unit = lambda x: x / np.linalg.norm(x)
    np.testing.assert_allclose(sim[3, 2], unit(on_v_pos[3, 2]) @ unit(query), atol=1e-6)
  with pytest.raises(ValueError, match="outside"):
    viz.affinity_maps({"pixel": (on_v, on_v_pos)}, (40, 0), (32, 48))


def test_figures_are_written(tmp_path):
  rng = np.random.default_rng(1)
  names = ["bg", "a", "b"]
  images = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
            rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)]
  labels = [rng.integers(0, 3, im.shape[:2]) for im in images]
  preds = [rng.integers(0, 3, im.shape[:2]) for im in images]
  grid = viz.segmentation_grid(images, labels, preds, names, str(tmp_path / "grid.png"))
  cm = viz.confusion_figure(np.array([[5, 1, 0], [0, 3, 2], [0, 0, 0]]), names,
                            str(tmp_path / "cm.png"))
  maps = {k: rng.normal(size=(2, 4, 4, 8)) for k in ("global", "pixel", "cycle")}
  aff = viz.affinity_figure(images[0][:16, :16], images[1], maps, (8, 8),
                            str(tmp_path / "sub" / "affinity.png"))
  for path in (grid, cm, aff):
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
  with pytest.raises(ValueError, match="does not match"):
    viz.confusion_figure(np.zeros((2, 2)), names, str(tmp_path / "bad.png"))
