"""The learning diagnostics (cacl_jax/training/diagnostics.py) on hand-made cases and on the synthetic
renderer's ground truth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacl_jax import defaults
from cacl_jax.training import diagnostics
from cacl_jax.data import synthetic


def test_constant_embedding_is_collapsed_and_matches_at_chance():
  """A constant embedding: within-image cosine 1, and a match whose label agreement is the
  chance rate (the tied argmax is spread over every column)."""
  rng = np.random.default_rng(0)
  b, n = 3, 16
  x = jnp.ones((b, n, 8))
  within, cross = diagnostics.cosine_within_cross(x)
  np.testing.assert_allclose([float(within), float(cross)], [1.0, 1.0], rtol=1e-5)
  labels = jnp.asarray(rng.integers(0, 4, (b, n)))
  labels_pos = jnp.asarray(rng.integers(0, 4, (b, n)))
  affinity = jnp.zeros((b, n, n))   # û û+ᵀ of a constant embedding: every column ties
  same = labels[..., :, None] == labels_pos[..., None, :]
  rate = diagnostics.match_rate(affinity, same)
  chance = diagnostics.label_chance(labels, labels_pos, 4)
  expected = np.mean([[np.mean(np.asarray(labels_pos[i]) == np.asarray(labels[i, j]))
                       for j in range(n)] for i in range(b)])
  np.testing.assert_allclose([float(rate), float(chance)], [expected, expected], rtol=1e-6)


def test_cosines_of_orthogonal_pixels_and_of_identical_images():
  eye = jnp.eye(4)[None]                 # one image, 4 orthogonal pixels
  within, _ = diagnostics.cosine_within_cross(eye)
  assert abs(float(within)) < 1e-6
  two = jnp.concatenate([eye, eye])       # two images with the same 4 pixels
  within, cross = diagnostics.cosine_within_cross(two)
  np.testing.assert_allclose([float(within), float(cross)], [0.0, 0.25], atol=1e-6)


def test_match_true_acc_on_a_hand_made_case():
  """3×3 grid; pixel 0's match lands on the true cell's neighbour (hit), pixel 1's two cells
  away (miss), pixel 2 is tied between a hit and a miss (half), pixel 3 is invalid."""
  affinity = np.full((1, 4, 9), -1.0)
  true_cell = np.array([[4, 0, 0, 8]])
  affinity[0, 0, 8] = 1     # cell 8 = (2, 2) vs true (1, 1): Chebyshev 1 → hit
  affinity[0, 1, 8] = 1     # (2, 2) vs (0, 0): 2 → miss
  affinity[0, 2, [1, 6]] = 1  # (0, 1) hit, (2, 0) miss → 0.5
  affinity[0, 3, 0] = 1
  hits = diagnostics.cell_hits(jnp.asarray(true_cell), 3, num_cells=9)
  valid = jnp.asarray([[True, True, True, False]])
  rate = diagnostics.match_rate(jnp.asarray(affinity), hits, valid)
  np.testing.assert_allclose(float(rate), (1 + 0 + 0.5) / 3, rtol=1e-6)


def test_cell_labels_take_the_majority():
  labels = np.zeros((1, 8, 16), np.uint8)
  labels[0, :, 8:] = 3
  labels[0, :5, :3] = 2        # 15 of 64 pixels in the first cell: background still wins
  labels[0, :, 8:13] = 1       # 40 of 64 in the second cell: class 1 wins
  np.testing.assert_array_equal(diagnostics.cell_labels(labels, 8, 4), [[0, 1]])


def test_synthetic_ground_truth_follows_the_scene():
  """The renderer's correspondence: colours at the true positions in v+ agree with v far
  better than the colours at the same positions do, and identity matching scores the
  fraction of points that did not move by a cell."""
  data = defaults.pretrain_config().data
  data.image_size, data.frame_stride = 64, 4
  data.synthetic.num_frames = 24
  pairs = diagnostics.synthetic_pairs(data, 6, seed=0)
  assert pairs['v'].shape == (6, 64, 64, 3) and pairs['true_cell'].shape == (6, 64)
  assert 0.5 < pairs['valid'].mean() <= 1.0
  identity = np.where(np.eye(64, dtype=bool), 1.0, 0.0)[None].repeat(6, 0)
  hits = diagnostics.cell_hits(jnp.asarray(pairs['true_cell']), 8)
  still = float(diagnostics.match_rate(jnp.asarray(identity), hits, jnp.asarray(pairs['valid'])))
  rows, cols = np.divmod(np.arange(64), 8)
  trow, tcol = np.divmod(pairs['true_cell'], 8)
  moved_le_1 = (np.maximum(np.abs(trow - rows), np.abs(tcol - cols)) <= 1)
  np.testing.assert_allclose(still, moved_le_1[pairs['valid']].mean(), rtol=1e-6)
  spec = synthetic.video_spec(0, synthetic.STREAMS[('pretrain', 'val')], 0, 64)
  img, _ = synthetic.render(spec, 3)
  img2, _ = synthetic.render(spec, 9)
  pts = np.stack(np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5), -1).reshape(-1, 2)
  moved, valid = synthetic.correspondence(spec, 3, 9, pts)
  j = moved[valid].astype(int)
  err_true = np.abs(img.reshape(-1, 3)[valid].astype(float) - img2[j[:, 1], j[:, 0]]).mean()
  err_same = np.abs(img.reshape(-1, 3)[valid].astype(float) - img2.reshape(-1, 3)[valid]).mean()
  assert err_true < 0.3 * err_same


def test_measure_reports_every_diagnostic():
  config = defaults.pretrain_config()
  rng = np.random.default_rng(1)
  out = {k: jnp.asarray(rng.normal(size=(2, 4, 4, 8)).astype(np.float32)) for k in 'hupc'}
  truth = {'labels': jnp.zeros((2, 16), jnp.int32), 'labels_pos': jnp.zeros((2, 16), jnp.int32),
           'true_cell': jnp.tile(jnp.arange(16), (2, 1)), 'valid': jnp.ones((2, 16), bool)}
  result = diagnostics.measure(out, out, jnp.zeros((0, 8)), config, truth)
  assert set(result) == {*(f'cos_{w}_{k}' for w in ('within', 'cross') for k in 'hupc'),
                         'soft_target_entropy', 'cycle_return', 'match_true_acc', 'match_true_still',
                         'match_label_acc', 'match_label_chance', 'match_object_acc',
                         'match_object_chance', *(f'class_sep_{k}' for k in 'hupc')}
  # v = v+: every pixel matches itself, returns to itself, and all labels agree.
  for k in ('match_true_acc', 'match_label_acc', 'cycle_return'):
    assert float(result[k]) == pytest.approx(1.0)


def test_class_separation_against_pairs():
  """Against an explicit loop over every pair of object cells from two different images."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 10, 5)).astype(np.float32)
  labels = rng.integers(0, 4, (3, 10))
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  same, diff = [], []
  for b1 in range(3):
    for b2 in range(3):
      if b1 == b2:
        continue
      for i in range(10):
        for j in range(10):
          if labels[b1, i] and labels[b2, j]:
            (same if labels[b1, i] == labels[b2, j] else diff).append(xn[b1, i] @ xn[b2, j])
  got = float(diagnostics.class_separation(jnp.asarray(x), jnp.asarray(labels), 4))
  np.testing.assert_allclose(got, np.mean(same) - np.mean(diff), rtol=1e-4, atol=1e-6)
  # An embedding that is its class: maximal separation (1 - 0 for orthogonal class codes).
  onehot = np.eye(4, dtype=np.float32)[labels]
  assert float(diagnostics.class_separation(jnp.asarray(onehot), jnp.asarray(labels), 4)) == pytest.approx(1.0)


# ---------------------------------------------------------------- where the losses pull

def test_gradient_cosines_are_those_of_each_losss_own_backbone_gradient():
  """grad_cos_* (training/grad_cosines.py, jitted on 4 devices, one backward per loss from a
  shared forward) against a direct computation: per head, its own forward pass and jax.grad of
  that head's loss alone, the backbone's leaves concatenated, the cosine in float64. After one
  train step, so that the queues and the networks are not at their initialisation. A head of
  weight 0 gives no pair."""
  from cacl_jax.models.cacl import model_from_config
  from cacl_jax.runtime import parallel
  from cacl_jax.training import grad_cosines, optim, step as step_lib, streams

  c = defaults.pretrain_config()
  c.batch_size, c.data.image_size, c.queue.size = 8, 32, 64
  c.model.width_divisor, c.model.bn_group_size, c.model.embed_dim = 8, 4, 16
  c.log_grad_cosines = True
  mesh = parallel.make_mesh(4)
  model = model_from_config(c.model)
  tx, schedule = optim.make_optimizer(c)
  state, shardings = step_lib.create_state(model, tx, c, mesh, seed=0)
  rng = np.random.default_rng(0)
  big = rng.integers(0, 256, (8, 34, 35, 3)).astype(np.uint8)
  batch = parallel.host_to_global(mesh, {"v": big[:, :32, :32], "v_pos": big[:, 2:, 3:]})
  state, _ = step_lib.jit_train_step(model, tx, schedule, c, mesh, shardings)(state, batch)

  probe = grad_cosines.make_probe(model, c, mesh)
  measured = {k: float(v) for k, v in probe(state, batch).items()}
  assert set(measured) == {"grad_cos_g_p", "grad_cos_g_c", "grad_cos_p_c", "grad_norm_g",
                           "grad_norm_p", "grad_norm_c"}

  host = jax.device_get(state)
  plain = {k: np.asarray(v) for k, v in jax.device_get(batch).items()}
  _, keys = streams.step_keys(host.rng)
  v, rolls, out_pos, _ = step_lib.target_side(host, plain, keys, model, c)

  def backbone_grad(head):
    def loss(params):
      out, _ = step_lib.forward(model, params, host.batch_stats, v, rolls, None)
      return step_lib.cacl_losses(out, out_pos, host.queues, c, keys, platform="cpu")[1][f"loss_{head}"]
    leaves = jax.tree.leaves(jax.grad(loss)(host.params)["backbone"])
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])

  grads = {h: backbone_grad(h) for h in ("global", "pixel", "cycle")}
  for (a, b), name in grad_cosines.PAIRS.items():
    direct = grads[a] @ grads[b] / (np.linalg.norm(grads[a]) * np.linalg.norm(grads[b]))
    assert abs(measured[name] - direct) < 1e-5, (name, measured[name], direct)
    assert abs(direct) < 0.999   # distinct directions: a swapped or repeated gradient would show
  for h in grads:
    np.testing.assert_allclose(measured[f"grad_norm_{h[0]}"], np.linalg.norm(grads[h]), rtol=1e-5)
  assert len({round(measured[name], 4) for name in grad_cosines.PAIRS.values()}) == 3

  c.loss.weights.cycle = 0.0   # two heads: only their pair
  assert set(grad_cosines.measured_pairs(c).values()) == {"grad_cos_g_p"}
  c.loss.weights.pixel = 0.0   # MoCo-v2: nothing to measure
  assert grad_cosines.make_probe(model, c, mesh) is None
