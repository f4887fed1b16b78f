"""The seeds' pixel-level alternatives as switches (docs/demo.md), each against a float64 NumPy
reference written from its own paper's equations: debiased contrast (Chuang et al. 2020),
hard negative mixing (MoCHi, Kalantidis et al. 2020), PixPro's pixel-to-propagation
consistency (Xie et al. 2021); and how the train step wires them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacl_jax import defaults
from cacl_jax.method import losses, negatives, pixpro
from cacl_jax.training import step as step_lib, streams
from cacl_jax.models.cacl import model_from_config
from test_losses import (TAU, _directional_check, close, maps, np_l2n, np_lse, rand, ref_global,
                         ref_match, ref_pixel)

global_loss = jax.jit(losses.global_loss, static_argnames=('temperature', 'tau_plus', 'mochi'))
pixel_loss = jax.jit(losses.pixel_loss,
                     static_argnames=('temperature', 'match', 'negatives', 'tau_plus', 'mochi'))


# ---------------------------------------------------------------- debiased contrast

def ref_debiased(logits, tau, tau_plus):
  """Chuang et al. 2020, eq. 7 with one positive (logits[0]) and N = len(logits) − 1
  negatives, as their code's `Ng`: −log e^pos / (e^pos + max(N (mean e^neg − τ⁺ e^pos) /
  (1 − τ⁺), N e^{−1/t}))."""
  pos, neg = logits[0], logits[1:]
  n = len(neg)
  ng = max((np.sum(np.exp(neg)) - n * tau_plus * np.exp(pos)) / (1 - tau_plus), n * np.exp(-1 / tau))
  return -np.log(np.exp(pos) / (np.exp(pos) + ng))


def ref_global_debiased(u, u_pos, queue, tau, tau_plus):
  out = []
  for b in range(u.shape[0]):
    q, k = np_l2n(u[b].mean(0)), np_l2n(u_pos[b].mean(0))
    out.append(ref_debiased(np.concatenate([[q @ k], np_l2n(queue) @ q]) / tau, tau, tau_plus))
  return np.mean(out)


def ref_pixel_debiased(p, p_pos, u, u_pos, queue, tau, tau_plus):
  m = ref_match(u, u_pos)
  out = []
  for b in range(p.shape[0]):
    ph, pph = np_l2n(p[b]), np_l2n(p_pos[b])
    for i in range(p.shape[1]):
      logits = np.concatenate([[ph[i] @ pph[m[b, i]]], np_l2n(queue) @ ph[i],
                               np.delete(ph @ ph[i], i)]) / tau
      out.append(ref_debiased(logits, tau, tau_plus))
  return np.mean(out)


@pytest.mark.parametrize('tau_plus', [0.1, 0.3])
def test_debiased_global_and_pixel_losses_are_chuang_et_als_eq_7(tau_plus):
  u, u_pos = maps(31)
  queue = rand(32, 6, 8)
  glob = lambda x: losses.global_loss(x, u_pos, queue, TAU, tau_plus=tau_plus)
  value, grad = jax.jit(jax.value_and_grad(glob))(u)
  ref = lambda x: ref_global_debiased(x, u_pos, queue, TAU, tau_plus)
  close(value, ref(u), rtol=1e-4)
  _directional_check(grad, ref, u, seeds=(33,))

  p, p_pos = maps(34)
  pix = lambda x: losses.pixel_loss(x, p_pos, u, u_pos, queue, TAU, negatives='queue+frame',
                                    tau_plus=tau_plus)
  value, grad = jax.jit(jax.value_and_grad(pix))(p)
  ref = lambda x: ref_pixel_debiased(x, p_pos, u, u_pos, queue, TAU, tau_plus)
  close(value, ref(p), rtol=1e-4)
  _directional_check(grad, ref, p, seeds=(35, 36))


def test_debiased_floor_holds_when_the_positive_outweighs_the_negatives():
  """τ⁺ large and every negative far: N (mean e^neg − τ⁺ e^pos) < 0, so g is its floor e^{−1/t}
  and the gradient stays finite."""
  u = np.tile(rand(37, 1, 1, 8), (1, 4, 1))
  queue = -np_l2n(u[0, :1]).astype(np.float32) + 0.01 * rand(38, 5, 8)
  value, grad = jax.value_and_grad(lambda x: losses.global_loss(x, u, queue, TAU, tau_plus=0.5))(u)
  close(value, ref_global_debiased(u, u, queue, TAU, 0.5), rtol=1e-4)
  assert np.isfinite(np.asarray(grad)).all()


def test_tau_plus_zero_is_the_plain_loss_bit_for_bit():
  u, u_pos = maps(39)
  queue = rand(40, 6, 8)
  np.testing.assert_array_equal(global_loss(u, u_pos, queue, TAU, tau_plus=0.0),
                                global_loss(u, u_pos, queue, TAU))
  close(global_loss(u, u_pos, queue, TAU, tau_plus=0.0), ref_global(u, u_pos, queue, TAU))


# ---------------------------------------------------------------- MoCHi

def ref_mochi_lse(q, queue, top, draws, tau):
  """MoCHi eqs. 3-4 in float64 for the draws the code made: per query, h = l2n(α n_i + (1−α)
  n_j) and h' = l2n(β q + (1−β) n_j) over its hardest negatives; logsumexp of q·h/τ."""
  q, queue = np_l2n(q), np_l2n(queue)
  out = []
  for r in range(len(q)):
    hard = queue[top[r]]
    h = [a * hard[i] + (1 - a) * hard[j] for i, j, a in zip(draws['i'][r], draws['j'][r], draws['alpha'][r])]
    h += [b * q[r] + (1 - b) * hard[j] for j, b in zip(draws['jq'][r], draws['beta'][r])]
    out.append(np_lse(np_l2n(np.stack(h)) @ q[r] / tau))
  return np.array(out)


def test_mochi_picks_the_hardest_negatives_and_mixes_them_as_eqs_3_4():
  q = np_l2n(rand(41, 5, 8)).astype(np.float32)
  queue = np_l2n(rand(42, 20, 8)).astype(np.float32)
  top = np.asarray(negatives.hardest_negatives(q, queue, 6))
  want = np.argsort(-(q.astype(np.float64) @ queue.T.astype(np.float64)), axis=1)[:, :6]
  np.testing.assert_array_equal(np.sort(top, 1), np.sort(want, 1))
  draws = jax.tree.map(np.asarray, negatives.mixing_draws(jax.random.key(0), 5, 6, 7, 3))
  assert draws['i'].shape == (5, 7) and draws['jq'].shape == (5, 3)
  assert draws['i'].max() < 6 and draws['jq'].min() >= 0
  assert 0 < draws['alpha'].min() and draws['alpha'].max() < 1 and draws['beta'].max() < 0.5
  logits = negatives.mixed_logits(q, queue, top, draws, TAU)
  np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(logits, -1)),
                             ref_mochi_lse(q, queue, top, draws, TAU), rtol=1e-5)
  # Harder than the queue: the synthetic negatives are closer to their query than its average
  # negative is (h' mixes in q itself).
  assert np.mean(np.asarray(logits)) * TAU > np.mean(q @ queue.T)


def test_mochi_adds_its_negatives_to_global_and_pixel_losses():
  """The loss with MoCHi = eq. 1 with the synthetic logits joining the denominator, the
  synthetic points constant (their gradient reaches q only through q·h)."""
  u, u_pos = maps(43)
  queue = rand(44, 10, 8)
  key = jax.random.key(1)
  mochi = (4, 3, 2)
  value, grad = jax.value_and_grad(
      lambda x: losses.global_loss(x, u_pos, queue, TAU, mochi=mochi, key=key))(u)
  q = np.asarray(losses.global_key(u))
  draws = jax.tree.map(np.asarray, negatives.mixing_draws(key, 2, *mochi))
  top = np.asarray(negatives.hardest_negatives(q, np_l2n(queue).astype(np.float32), 4))
  extra = ref_mochi_lse(q, queue, top, draws, TAU)
  want = []
  for b in range(2):
    qq, kk = np_l2n(u[b].mean(0)), np_l2n(u_pos[b].mean(0))
    logits = np.concatenate([[qq @ kk], np_l2n(queue) @ qq]) / TAU
    want.append(np.logaddexp(np_lse(logits), extra[b]) - logits[0])
  close(value, np.mean(want), rtol=1e-4)
  assert value > global_loss(u, u_pos, queue, TAU) and np.isfinite(np.asarray(grad)).all()

  p, p_pos = maps(45)
  plain = pixel_loss(p, p_pos, u, u_pos, queue, TAU, negatives='queue+frame')
  mixed = losses.pixel_loss(p, p_pos, u, u_pos, queue, TAU, negatives='queue+frame',
                            mochi=mochi, key=key)
  assert mixed > plain
  with pytest.raises(ValueError, match='needs a PRNG key'):
    losses.global_loss(u, u_pos, queue, TAU, mochi=mochi)


# ---------------------------------------------------------------- PixPro

def ref_pixpro(p, p_value, p_pos, u, u_pos, grid, threshold, gamma):
  """PixPro eqs. 1, 3-5 in float64: y = l2n(Σ_j max(cos(p_i, p_j), 0)^γ l2n(g(p_j))); A_ij = 1
  iff cell j is within T cell diagonals of m(i); −2 · mean_b of the mean cos(y_i, p̂+_j) over
  the pairs of A."""
  h, w = grid
  cells = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij'), -1).reshape(-1, 2)
  m = ref_match(u, u_pos)
  out = []
  for b in range(p.shape[0]):
    x = np_l2n(p[b])
    s = np.maximum(x @ x.T, 0) ** gamma
    y = np_l2n(s @ np_l2n(p_value[b]))
    cos = y @ np_l2n(p_pos[b]).T
    dist = np.linalg.norm(cells[m[b]][:, None] - cells[None], axis=-1) / np.sqrt(2)
    pairs = (dist <= threshold).astype(np.float64)
    out.append(np.sum(cos * pairs) / (np.sum(pairs) + 1e-6))
  return -2 * np.mean(out)


@pytest.mark.parametrize('threshold', [0.7, 1.4])
def test_pixpro_loss_is_propagation_to_a_positive_set(threshold):
  p, p_pos = maps(46, n=12)
  p_value = rand(47, 2, 12, 8)
  u, u_pos = maps(48, n=12)
  loss = lambda x, v: pixpro.pixpro_loss(x, v, p_pos, u, u_pos, (3, 4), threshold)
  value, (gp, gv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, p_value)
  ref = lambda x, v: ref_pixpro(x, v, p_pos, u, u_pos, (3, 4), threshold, 2.0)
  close(value, ref(p, p_value), rtol=1e-4)
  _directional_check(gp, lambda x: ref(x, p_value), p, seeds=(49,))
  _directional_check(gv, lambda v: ref(p, v), p_value, seeds=(50,))


def test_pixpro_positive_set_sizes():
  """0.7 cell diagonals keeps m(i) alone (same-scale frames); 1.4 its 3×3 neighbourhood."""
  match = jnp.array([[5, 0]])   # a cell inside the 4×4 grid, and a corner
  for threshold, sizes in ((0.7, (1, 1)), (1.4, (9, 4))):
    pairs = np.asarray(pixpro.positive_pairs(match, (4, 4), threshold))
    assert tuple(pairs[0].sum(-1)) == sizes
  assert pairs[0, 0, 5] == 1 and pairs[0, 0, 15] == 0


def test_pixpro_variant_builds_the_propagation_layer_and_its_loss_runs_in_the_step():
  c = defaults.pretrain_config()
  c.batch_size, c.data.image_size = 8, 32
  c.model.width_divisor, c.model.bn_group_size, c.model.embed_dim = 8, 4, 16
  c.model.ppm_transform, c.loss.pixel_loss = True, "pixpro"
  step_lib.check_config(c)
  model = model_from_config(c.model)
  variables = model.init(jax.random.key(0), jnp.zeros((4, 32, 32, 3)), train=False)
  assert variables["params"]["head_PPM"]["kernel"].shape == (1, 1, 16, 16)
  out = model.apply(variables, jax.random.normal(jax.random.key(1), (4, 32, 32, 3)), train=False)
  assert out["p_value"].shape == out["p"].shape == (4, 4, 4, 16)
  queues = {h: np_l2n(rand(51, 8, 16)).astype(np.float32) for h in step_lib.HEADS}
  total, terms = step_lib.cacl_losses(out, out, queues, c, streams.step_keys(np.array([0, 2], np.uint32))[1])
  want = pixpro.pixpro_loss(*(out[k].reshape(4, 16, 16) for k in ("p", "p_value", "p", "u", "u")),
                            (4, 4), c.loss.pixpro.threshold, c.loss.pixpro.gamma)
  np.testing.assert_allclose(terms["loss_pixel"], want, rtol=1e-6)
  assert -2.0 <= float(terms["loss_pixel"]) <= 2.0
  c.loss.pixel_loss = "no_such_loss"
  with pytest.raises(ValueError, match="loss.pixel_loss must be one of"):
    step_lib.check_config(c)
