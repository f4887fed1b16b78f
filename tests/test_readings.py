"""The paper's open readings as switches (docs/method.md §6), each against a float64 NumPy reference or
an exact property: pixel-loss negatives, the soft target's index space, where GAP sits, the
key Q_G receives, shared pixel-shuffle rolls, circular padding."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacl_jax import defaults
from cacl_jax.method import losses, pixel_shuffle
from cacl_jax.training import step as step_lib, streams
from cacl_jax.models.cacl import model_from_config
from cacl_jax.models.resnet import ResNet
from test_losses import TAU, close, maps, np_l2n, np_lse, np_softmax, rand, ref_match

pixel_loss = jax.jit(losses.pixel_loss, static_argnames=('temperature', 'match', 'negatives'))
soft_cycle_target = jax.jit(losses.soft_cycle_target, static_argnames=('temperature', 'mode'))


def ref_pixel_frame(p, p_pos, u, u_pos, queue, tau):
  """Eq. 4 with the printed denominator: the queue and every other pixel k ≠ i of the frame."""
  m = ref_match(u, u_pos)
  out = []
  for b in range(p.shape[0]):
    ph, pph = np_l2n(p[b]), np_l2n(p_pos[b])
    for i in range(p.shape[1]):
      frame = np.delete(ph @ ph[i], i)
      logits = np.concatenate([[ph[i] @ pph[m[b, i]]], np_l2n(queue) @ ph[i], frame]) / tau
      out.append(np_lse(logits) - logits[0])
  return np.mean(out)


@pytest.mark.parametrize('k', [0, 6])
def test_pixel_loss_with_frame_negatives(k):
  p, p_pos = maps(21)
  u, u_pos = maps(22)
  queue = rand(23, k, 8)
  close(pixel_loss(p, p_pos, u, u_pos, queue, TAU, negatives='queue+frame'),
        ref_pixel_frame(p, p_pos, u, u_pos, queue, TAU))


def test_frame_negatives_push_pixels_of_one_frame_apart():
  """With the frame's pixels as negatives, a constant p is no longer a minimum: the loss is
  higher for it than for the queue-only reading, and its gradient spreads the pixels."""
  p_pos = np.tile(rand(24, 1, 1, 8), (1, 12, 1))
  p = p_pos + 0.01 * rand(25, 1, 12, 8)
  u, u_pos = maps(26, b=1)
  queue = rand(27, 6, 8)
  only_queue = float(pixel_loss(p, p_pos, u, u_pos, queue, TAU))
  with_frame = float(pixel_loss(p, p_pos, u, u_pos, queue, TAU, negatives='queue+frame'))
  assert with_frame > only_queue + np.log(11) - 0.1   # 11 negatives as similar as the positive

  def within(x):
    x = np_l2n(np.asarray(x[0]))
    return (np.sum(x @ x.T) - 12) / (12 * 11)
  grad = jax.grad(lambda x: losses.pixel_loss(x, p_pos, u, u_pos, queue, TAU,
                                              negatives='queue+frame'))(p)
  assert within(p - 0.05 * grad) < within(p)


@pytest.mark.parametrize('mode', ['cross', 'self', 'cycle'])
def test_soft_cycle_target_modes(mode):
  u, u_pos = maps(28)
  t = np.asarray(soft_cycle_target(u, u_pos, TAU, mode=mode))
  for b in range(u.shape[0]):
    a, ap = np_l2n(u[b]), np_l2n(u_pos[b])
    expected = {'cross': np_softmax(a @ ap.T / TAU),
                'self': np_softmax(a @ a.T / TAU),
                'cycle': np_softmax(a @ ap.T / TAU) @ np_softmax(ap @ a.T / TAU)}[mode]
    np.testing.assert_allclose(t[b], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_self_target_peaks_at_the_pixel_itself():
  """T_self's row i is largest at i (û_i·û_i = 1 is the largest cosine): the soft target only
  spreads the identity over pixels the global head finds alike."""
  u, u_pos = maps(29, n=16)
  t = np.asarray(soft_cycle_target(u, u_pos, TAU, mode='self'))
  np.testing.assert_array_equal(t.argmax(-1), np.tile(np.arange(16), (2, 1)))


def test_bad_switch_values_raise():
  u, u_pos = maps(30)
  with pytest.raises(ValueError, match='negatives'):
    losses.pixel_loss(u, u_pos, u, u_pos, rand(1, 4, 8), TAU, negatives='frame_only')
  with pytest.raises(ValueError, match='mode'):
    losses.soft_cycle_target(u, u_pos, TAU, mode='diagonal')
  c = defaults.pretrain_config()
  c.loss.global_pool = 'middle'
  with pytest.raises(ValueError, match="loss.global_pool must be one of 'after_head', 'before_head'"):
    step_lib.check_config(c)


# ---------------------------------------------------------------- the global head

def _config(**loss):
  c = defaults.pretrain_config()
  c.batch_size, c.data.image_size = 4, 32
  c.model.width_divisor, c.model.embed_dim, c.model.bn_group_size = 8, 16, 4
  c.queue.size = 16
  for k, v in loss.items():
    c.loss[k] = v
  return c


@pytest.mark.parametrize('pool', ['after_head', 'before_head'])
def test_q_g_receives_exactly_the_loss_key(pool):
  """Row b of the block enqueued into Q_G is the global loss's k_b = l2n(mean_i u+_i) of the
  map the loss pools (docs/method.md §4), in float64: not l2n(mean_i l2n(u+_i))."""
  config = _config(global_pool=pool)
  rng = np.random.default_rng(31)
  out_pos = {k: jnp.asarray(rng.normal(size=(4, 4, 4, 16)).astype(np.float32) + 0.5)
             for k in ('u', 'p', 'c')}
  out_pos['u_gap'] = jnp.asarray(rng.normal(size=(4, 1, 1, 16)).astype(np.float32))
  keys = step_lib.new_keys(streams.step_keys(np.array([0, 0], np.uint32))[1], out_pos, config)
  source = np.asarray(out_pos['u_gap' if pool == 'before_head' else 'u'], np.float64)
  expected = np_l2n(source.reshape(4, -1, 16).mean(axis=1))
  np.testing.assert_allclose(np.asarray(keys['global']), expected, rtol=1e-5, atol=1e-6)
  # ... and the loss's positive logit uses that same k: a queue holding it scores q·k again.
  u = jnp.asarray(source.reshape(4, -1, 16), jnp.float32)
  loss_q = losses.global_loss(u, u, keys['global'][:1], TAU)
  q0 = expected[0]
  logits0 = np.array([q0 @ q0, q0 @ q0]) / TAU
  assert float(loss_q) > 0 and np.isclose(np_lse(logits0) - logits0[0], np.log(2), atol=1e-5)


def test_gap_before_head_is_the_head_on_the_pooled_map():
  config = _config()
  model = model_from_config(config.model)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(2), x, train=False)
  out = model.apply(variables, x, train=False)
  head = variables['params']['head_G']
  pooled = np.asarray(out['h'], np.float64).mean(axis=(1, 2))
  hidden = np.maximum(pooled @ np.asarray(head['fc1']['kernel'][0, 0], np.float64)
                      + np.asarray(head['fc1']['bias']), 0)
  expected = hidden @ np.asarray(head['fc2']['kernel'][0, 0], np.float64) + np.asarray(head['fc2']['bias'])
  np.testing.assert_allclose(np.asarray(out['u_gap'])[:, 0, 0], expected, rtol=1e-4, atol=1e-5)
  cfg = _config(global_pool='before_head')
  chex.assert_shape(step_lib.global_map(out, cfg), (4, 1, 16))
  chex.assert_shape(step_lib.global_map(out, _config(global_pool='after_head')), (4, 16, 16))


# ---------------------------------------------------------------- pixel shuffle and padding

def test_shared_rolls_give_both_frames_one_roll():
  config = _config()
  config.model.shuffle_rolls = 'independent'
  k1, k2 = jax.random.split(jax.random.key(3))
  rolls, rolls_pos = step_lib.pair_rolls(k1, k2, 64, 64, 64, config)
  assert np.any(np.asarray(rolls) != np.asarray(rolls_pos))   # independent (docs/method.md §2)
  config.model.shuffle_rolls = 'shared'
  rolls, rolls_pos = step_lib.pair_rolls(k1, k2, 64, 64, 64, config)
  np.testing.assert_array_equal(rolls, rolls_pos)
  assert np.all(np.asarray(rolls) % pixel_shuffle.OUTPUT_STRIDE == 0)
  config.model.pixel_shuffle = False
  assert step_lib.pair_rolls(k1, k2, 64, 64, 64, config) == (None, None)


@pytest.mark.parametrize('padding, exact', [('circular', True), ('zeros', False)])
def test_circular_padding_makes_the_network_roll_equivariant(padding, exact):
  """Circular padding: rolling the image by a multiple of 8 rolls the OS8 map exactly, so no
  absolute position exists in the features; zero padding leaks it (the paper's shortcut).
  The batch carries a zero sample after the two compared: on some CPUs XLA's convolution kernels
  round a batch's last output pixels differently (a remainder path), and a roll moves what sits
  there."""
  model = ResNet(18, 8, None, padding=padding)
  x = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
  variables = model.init(jax.random.key(5), x, train=False)
  apply = lambda x: model.apply(variables, jnp.concatenate([x, jnp.zeros_like(x[:1])]), train=False)[:-1]
  y = apply(x)
  y_rolled = apply(jnp.roll(x, (16, 40), axis=(1, 2)))
  diff = float(jnp.max(jnp.abs(jnp.roll(y, (2, 5), axis=(1, 2)) - y_rolled)))
  if exact:
    assert diff == 0.0
  else:
    assert diff > 1e-2 * float(jnp.max(jnp.abs(y)))
