"""DAVIS-2017 label propagation: J and F against hand-computed cases, the propagation maths,
and `prepare_data davis` + the `propagate` program end to end on a small DAVIS tree written here.

The backbone of the end-to-end run is a random ⅛-width ResNet-18 initialised as torchvision's
`zero_init_residual` (every block's last BN scale 0: Goyal et al. 2017) with BN statistics
estimated on the test's frames. Its OS8 features are then the stem's random local texture
descriptors, which can match the moving object from frame to frame without any training. A
random network with live residual branches mixes the whole 64×96 frame into every cell and does
not track (measured while writing this test: J 5.9 on the translating object).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cacl_jax.interop import convert
from cacl_jax import defaults
from cacl_jax.data import prepare as prepare_data
from cacl_jax.runtime import viz
from cacl_jax.data import augment
from cacl_jax.data import davis as davis_data
from cacl_jax.evaluation import davis, metrics, probe, propagation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, T = 64, 96, 8


# ---------------------------------------------------------------------------- J and F


def square(shape, y, x, side):
  m = np.zeros(shape, bool)
  m[y:y + side, x:x + side] = True
  return m


def test_region_similarity_hand_computed():
  gt, pred = square((20, 20), 5, 5, 5), square((20, 20), 5, 6, 5)
  assert metrics.region_similarity(gt, pred) == pytest.approx(20 / 30)   # 5×4 shared, 30 in union
  assert metrics.region_similarity(gt, np.zeros_like(gt)) == 0.0
  assert metrics.region_similarity(np.zeros_like(gt), np.zeros_like(gt)) == 1.0   # both empty


def test_boundary_map_is_the_half_pixel_shifted_outline():
  """A square on rows/cols 5..9 has its boundary on the outline of rows/cols 4..9 (pixels
  that differ from their right, lower or lower-right neighbour): 4·6 − 4 = 20 pixels."""
  b = metrics.boundary_map(square((20, 20), 5, 5, 5))
  outline = square((20, 20), 4, 4, 6) & ~square((20, 20), 5, 5, 4)
  np.testing.assert_array_equal(b, outline)
  assert b.sum() == 20


def test_boundary_measure_hand_computed():
  gt, pred = square((20, 20), 5, 5, 5), square((20, 20), 5, 6, 5)
  # Tolerance 0: the two outlines share their top and bottom rows' 5 common pixels each
  # (10 of 20 per outline): P = R = 0.5. Tolerance 1: every pixel is within 1 of the other.
  assert metrics.boundary_measure(gt, pred, bound_th=0) == pytest.approx(0.5)
  assert metrics.boundary_measure(gt, pred, bound_th=1) == 1.0
  assert metrics.boundary_measure(gt, np.zeros_like(gt)) == 0.0   # P 1, R 0
  assert metrics.boundary_measure(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_default_tolerance_is_8_pixels_at_480p():
  """ceil(0.008 · ‖(480, 854)‖) = ceil(7.84) = 8. A 100-px square moved 8 px: every boundary
  pixel is within 8 of the other's: F = 1. Moved 9 px: of each 400-pixel outline, 100 of 101
  pixels in each horizontal edge match, 16 of the 99 inner pixels of the near vertical edge
  (the 8 closest to each corner) and none of the far one: P = R = 216 / 400."""
  assert metrics.boundary_tolerance((480, 854)) == 8
  gt = square((480, 854), 100, 300, 100)
  assert metrics.boundary_measure(gt, square((480, 854), 100, 308, 100)) == 1.0
  assert metrics.boundary_measure(gt, square((480, 854), 100, 309, 100)) == pytest.approx(0.54)


def test_sequence_scores_skip_first_and_last_frames_and_count_objects():
  gt = np.zeros((4, 10, 10), np.uint8)
  gt[:, 1:4, 1:4], gt[:, 6:9, 6:9] = 1, 2
  pred = gt.copy()
  pred[1][pred[1] == 2] = 0            # object 2 lost in frame 1 (scored)
  pred[3] = 0                          # the last frame is not scored
  j, f = metrics.davis_sequence_scores(gt, pred)
  assert j.shape == f.shape == (2, 2)  # objects 1, 2 × frames 1, 2
  np.testing.assert_array_equal(j, [[1, 1], [0, 1]])
  np.testing.assert_array_equal(f, [[1, 1], [0, 1]])


# ---------------------------------------------------------------------------- propagation


def test_context_is_the_first_frame_and_the_last_n():
  assert propagation.context_indices(1, 3) == [0, 0, 0, 0]
  assert propagation.context_indices(5, 3) == [0, 2, 3, 4]


def test_affinity_topk_matches_a_dense_reference():
  """Chunked, radius-masked top-k against the dense computation in float64 (CRW's rule: the
  radius restricts the short-term frames only, frame 0 is searched everywhere)."""
  rng = np.random.default_rng(0)
  h, w, m, c, k = 5, 7, 3, 8, 4
  feats = rng.standard_normal((m + 1, h * w, c)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  local = propagation.radius_mask(h, w, 2.5)
  assert local.sum(1).max() == 21           # offsets with dy² + dx² < 6.25: 9 + 4 + 8 cells
  weights, index = propagation.affinity_topk(feats[m], feats[:m], local, 0.1, k, 8)
  a = np.einsum("qc,mpc->qmp", feats[m].astype(np.float64), feats[:m])
  a[:, 1:] = np.where(local[:, None, :], a[:, 1:], -np.inf)
  a = a.reshape(h * w, -1) / 0.1
  top = np.argsort(-a, axis=1)[:, :k]
  np.testing.assert_array_equal(np.sort(np.asarray(index), 1), np.sort(top, 1))
  expected = np.exp(np.take_along_axis(a, np.asarray(index), 1))
  np.testing.assert_allclose(weights, expected / expected.sum(1, keepdims=True), rtol=1e-4)


def test_identical_frames_propagate_the_first_labels_exactly():
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((1, 4, 6, 16)).astype(np.float32)
  feats = np.repeat(feats / np.linalg.norm(feats, axis=-1, keepdims=True), 5, axis=0)
  first = rng.dirichlet(np.ones(3), size=(4, 6)).astype(np.float32)   # any soft labels
  soft = propagation.propagate(feats, first, context=3, topk=2, radius=1.5)
  np.testing.assert_allclose(soft, np.repeat(first[None], 5, axis=0), atol=1e-5)


# ---------------------------------------------------------------------------- end to end


def background(seed):
  """A static greenish-blue texture: smooth waves plus noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:H, 0:W]
  bg = np.stack([30 + 0 * xx, 127 + 60 * np.sin(xx / 6.0) * np.cos(yy / 9.0),
                 127 + 60 * np.cos(xx / 11.0 + yy / 7.0)], -1)
  return np.clip(bg + rng.normal(0, 12, bg.shape), 0, 255).astype(np.uint8)


def translating(seed=1, speed=8):
  """A red textured 16×16 object crossing the frame at `speed` px per frame (8: one feature
  cell), id 1, on rows 24..39 from column 8."""
  rng = np.random.default_rng(seed)
  bg = background(seed)
  obj = np.clip(np.array([210, 40, 40]) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
  frames, labels = np.repeat(bg[None], T, 0), np.zeros((T, H, W), np.uint8)
  for t in range(T):
    x = 8 + speed * t
    frames[t, 24:40, x:x + 16], labels[t, 24:40, x:x + 16] = obj, 1
  return frames, labels


def static_band():
  """A static video whose object (id 1) is a full-height band on columns 32..55: a mask that
  the OS8 grid represents exactly (bilinear upsampling rounds off a square's corners)."""
  frames, labels = translating(seed=2, speed=0)
  labels[:] = 0
  labels[:, :, 32:56] = 1
  return frames, labels


def write_davis(root, sequences, listed=None):
  palette = viz.voc_palette(256).reshape(-1).tolist()
  for name, (frames, labels) in sequences.items():
    for kind in ("JPEGImages", "Annotations"):
      os.makedirs(os.path.join(root, kind, "480p", name), exist_ok=True)
    for t, (frame, label) in enumerate(zip(frames, labels)):
      Image.fromarray(frame).save(os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}.jpg"),
                                  quality=95)
      png = Image.fromarray(label, mode="P")
      png.putpalette(palette)
      png.save(os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png"))
  os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
  with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
    f.write("\n".join(listed or sequences) + "\n")


def local_backbone(calibration_images):
  """(params, batch_stats): see the module docstring."""
  model = defaults.pretrain_config().model
  model.width_divisor = 8
  params, stats = probe.random_backbone(model, seed=0, image_size=64)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros_like(x) if (path[0].key.startswith("layer") and
                                           path[1].key == "bn2" and path[2].key == "scale") else x,
      params)
  # The random-init baseline's statistics re-estimation (probe.random_backbone), on these
  # parameters: 30 train-mode passes over the frames, statistics over the whole set.
  sync = probe.probe_backbone(model, finetune=True)

  @jax.jit
  def calibrate(params, stats, x):
    def one_pass(_, stats):
      _, updates = sync.apply({"params": params, "batch_stats": stats}, x, True,
                              mutable=["batch_stats"])
      return updates["batch_stats"]
    return jax.lax.fori_loop(0, 30, one_pass, stats)

  return params, jax.device_get(calibrate(params, stats, augment.normalize(calibration_images)))


@pytest.fixture(scope="module")
def davis_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("davis")
  raw = str(tmp / "DAVIS")
  moving, band = translating(), static_band()
  late = translating(seed=3)
  late[1][:2] = 0                                    # the object enters after frame 1
  sequences = {"static-band": band, "translate": moving, "late-object": late,
               "no-annotation": translating(seed=4), "extra-annotation": translating(seed=5)}
  write_davis(raw, sequences, listed=list(sequences) + ["ghost"])
  os.remove(os.path.join(raw, "Annotations", "480p", "no-annotation", "00003.png"))
  Image.fromarray(np.zeros((H, W), np.uint8)).save(
      os.path.join(raw, "Annotations", "480p", "extra-annotation", "00099.png"))
  entry = prepare_data.main(["davis", "--src", raw, "--out", str(tmp / "data"), "--workers", "0"])

  params, stats = local_backbone(np.concatenate([moving[0], band[0]]))
  run = str(tmp / "run")
  convert.write_workdir(run, convert.converted_config("resnet18", 8), params, stats)
  config = defaults.propagation_config()
  config.pretrained, config.data.root = run, str(tmp / "data")
  config.num_figure_sequences = 2
  results = davis.run(config, str(tmp / "propagate"))
  return {"entry": entry, "results": results, "tmp": tmp, "sequences": sequences}


def test_prepare_data_stores_sequences_and_names_broken_ones(davis_run):
  val = davis_run["entry"]["splits"]["val"]
  assert val["num_ok"] == 3 and val["num_skipped"] == 3
  assert val["skipped_by_kind"] == {"missing_annotation": 1, "frame_count_mismatch": 1,
                                    "missing_sequence": 1}
  reasons = " ".join(s["reason"] for s in val["skipped"])
  assert "no-annotation: 1 of 8 frames have no annotation" in reasons and "00003.png" in reasons
  assert "extra-annotation: 8 frames but 9 annotations" in reasons
  assert "ghost" in reasons
  source = davis_data.davis_source(str(davis_run["tmp"] / "data"), "val")
  assert source.names == ["static-band", "translate", "late-object"]
  seq = source[1]
  assert seq.frames == [f"{t:05d}" for t in range(T)]
  np.testing.assert_array_equal(seq.labels, davis_run["sequences"]["translate"][1])
  raw = os.path.join(davis_run["tmp"], "DAVIS", "JPEGImages", "480p", "translate", "00005.jpg")
  np.testing.assert_array_equal(seq.images[5], np.asarray(Image.open(raw).convert("RGB")))


def test_static_sequence_propagates_its_first_mask_exactly(davis_run):
  assert davis_run["results"]["per_sequence"]["static-band"] == {
      "j": 100.0, "f": 100.0, "j_and_f": 100.0, "num_objects": 1, "num_frames": T}


def test_translating_object_is_tracked(davis_run):
  """J and F ≥ 50 on the object that moves one feature cell (8 px) per frame, and an IoU ≥ 0.5
  on frame 6, 48 px from where it started. It cannot pass by accident: from frame 2 on the
  object no longer overlaps its first-frame position, so copying the first mask scores
  J = 5.6 (1/3 on frame 1, 0 on frames 2..6), all-background 0, all-foreground 4.2 (256 of
  6144 pixels). Measured: J 82.3, F 78.2; the ceiling at output stride 8 is J 90.6 (bilinear
  upsampling rounds off 24 of the square's 256 pixels at its corners)."""
  r = davis_run["results"]["per_sequence"]["translate"]
  print(f"translating object: J {r['j']} F {r['f']} J&F {r['j_and_f']}")
  assert r["j"] >= 50.0 and r["f"] >= 50.0
  mask = np.asarray(Image.open(davis_run["tmp"] / "propagate" / "masks" / "translate" / "00006.png"))
  truth = davis_run["sequences"]["translate"][1][6]
  assert metrics.region_similarity(truth == 1, mask == 1) >= 0.5


def test_results_file_means_and_skips(davis_run):
  out = davis_run["tmp"] / "propagate"
  with open(out / "results.json") as f:
    saved = json.load(f)
  per_seq = saved["per_sequence"]
  assert set(per_seq) == {"static-band", "translate"}
  # DAVIS' means are over objects (here one per sequence), J&F = (J + F) / 2.
  assert saved["j"] == pytest.approx(np.mean([r["j"] for r in per_seq.values()]), abs=0.06)
  assert saved["j_and_f"] == pytest.approx((saved["j"] + saved["f"]) / 2, abs=0.06)
  assert set(saved["per_object"]) == {"static-band_1", "translate_1"}
  assert saved["num_skipped"] == 1 and saved["skipped"][0]["name"] == "late-object"
  assert "no object in the first frame" in saved["skipped"][0]["reason"]
  assert sorted(os.listdir(out / "masks" / "translate")) == [f"{t:05d}.png" for t in range(T)]
  assert sorted(os.listdir(out / "figures")) == ["static-band.png", "translate.png"]


def test_cli_bad_data_root_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "cacl_jax.propagate", "--config",
       os.path.join(ROOT, "configs", "davis_propagation.py"), "--workdir", str(tmp_path / "w"),
       f"--config.pretrained={tmp_path}", f"--config.data.root={tmp_path / 'none'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().startswith(
      f"propagate: error: data.root='{tmp_path / 'none'}' is not a directory")
  with pytest.raises(FileNotFoundError, match="missing .*JPEGImages/480p: expected DAVIS-2017"):
    prepare_data.main(["davis", "--src", str(tmp_path), "--out", str(tmp_path / "o")])


def test_head_features_option_reads_the_checkpoints_head(davis_run):
  """--config.features=u: g_G on the backbone map, unit vectors of the head's dimension."""
  from cacl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  pre = checkpoint.restore_pretrained(str(davis_run["tmp"] / "run"))
  frames = davis_run["sequences"]["translate"][0][:2]
  u = np.asarray(davis.make_encoder(pre, "u")(frames))
  assert u.shape == (2, H // 8, W // 8, pre.config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="features must be"):
    davis.make_encoder(pre, "z")
