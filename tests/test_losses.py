"""cacl_jax.losses against a plain float64 NumPy reference of docs/method.md §3 (eqs. 3-6)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacl_jax.method import loss_kernels, losses

TAU = 0.07

# Jitted once per shape: eager dispatch of the many small ops costs more than compiling.
global_loss = jax.jit(losses.global_loss, static_argnames='temperature')
pixel_loss = jax.jit(losses.pixel_loss, static_argnames=('temperature', 'match', 'negatives'))
cycle_loss = jax.jit(losses.cycle_loss, static_argnames='temperature')
soft_cycle_target = jax.jit(losses.soft_cycle_target, static_argnames=('temperature', 'mode'))
cycle_back_accuracy = jax.jit(losses.cycle_back_accuracy, static_argnames='temperature')


# ----------------------------------------------------------------------------------------
# Float64 NumPy reference, written straight from the formulas of docs/method.md §3 (explicit M).
# ----------------------------------------------------------------------------------------


def np_l2n(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_lse(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_softmax(x):
  return np.exp(x - np_lse(x)[..., None])


def ref_global(u, u_pos, queue, tau):
  out = []
  for b in range(u.shape[0]):
    q, k = np_l2n(u[b].mean(0)), np_l2n(u_pos[b].mean(0))
    logits = np.concatenate([[q @ k], np_l2n(queue) @ q]) / tau
    out.append(np_lse(logits) - logits[0])
  return np.mean(out)


def ref_match(u, u_pos):
  """m(i) = argmax_j A_ij; np.argmax returns the first (lowest j) maximum."""
  return np.stack([np.argmax(np_l2n(a) @ np_l2n(b).T, axis=1) for a, b in zip(u, u_pos)])


def ref_pixel(p, p_pos, u, u_pos, queue, tau, match, negatives='queue'):
  b_, n, _ = p.shape
  m = ref_match(u, u_pos) if match == 'global' else np.tile(np.arange(n), (b_, 1))
  out = []
  for b in range(b_):
    ph, pph = np_l2n(p[b]), np_l2n(p_pos[b])
    for i in range(n):
      negs = [np_l2n(queue) @ ph[i]]
      if negatives == 'queue+frame':  # the other pixels k != i of the same online frame
        negs.append(np.delete(ph @ ph[i], i))
      logits = np.concatenate([[ph[i] @ pph[m[b, i]]], *negs]) / tau
      out.append(np_lse(logits) - logits[0])
  return np.mean(out)


def ref_m(c, c_pos, queue, tau):
  """Explicit M = softmax(S1) softmax(S2) for one image: [N, N+K]."""
  ch, cph = np_l2n(c), np_l2n(c_pos)
  p1 = np_softmax(ch @ cph.T / tau)
  p2 = np_softmax(cph @ np.concatenate([ch, np_l2n(queue)]).T / tau)
  return p1 @ p2


def ref_cycle(c, c_pos, queue, tau, soft_target=None):
  out = []
  for b in range(c.shape[0]):
    m = ref_m(c[b], c_pos[b], queue, tau)
    n = c.shape[1]
    if soft_target is None:
      out.append(-np.log(np.diag(m)))
    else:
      t = np.asarray(soft_target[b], np.float64)
      out.append(np.sum(t * (np.log(t) - np.log(m[:, :n])), axis=1))
  return np.mean(out)


def ref_soft_target(u, u_pos, tau, mode='cross'):
  out = []
  for a, b in zip(np_l2n(u), np_l2n(u_pos)):
    if mode == 'self':
      out.append(np_softmax(a @ a.T / tau))
    elif mode == 'cross':
      out.append(np_softmax(a @ b.T / tau))
    else:  # 'cycle': v -> v+ -> v
      out.append(np_softmax(a @ b.T / tau) @ np_softmax(b @ a.T / tau))
  return np.stack(out)


def ref_cycle_back(c, c_pos, queue, tau):
  hits = [np.argmax(ref_m(a, b, queue, tau), axis=1) == np.arange(c.shape[1])
          for a, b in zip(c, c_pos)]
  return np.mean(hits)


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------


def rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def maps(seed, b=2, n=12, d=8):
  """Online / target maps with some correlation, as two frames of one video give."""
  x = rand(seed, b, n, d)
  return x, x + 0.8 * rand(seed + 100, b, n, d)


def close(actual, expected, rtol=2e-5, atol=2e-5):
  chex.assert_shape(actual, ())
  chex.assert_type(actual, jnp.float32)
  np.testing.assert_allclose(float(actual), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# Values against the reference.
# ----------------------------------------------------------------------------------------


def test_l2n():
  x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(losses.l2n(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  assert losses.l2n(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  g = jax.grad(lambda v: jnp.sum(losses.l2n(v)))(jnp.zeros((1, 3)))
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize('k', [0, 6])
def test_global_loss(k):
  u, u_pos = maps(0)
  queue = rand(1, k, 8)
  close(global_loss(u, u_pos, queue, TAU), ref_global(u, u_pos, queue, TAU))


def test_global_loss_without_queue_is_zero():
  # One logit only: −log softmax([x])[0] = 0.
  u, u_pos = maps(0)
  close(global_loss(u, u_pos, np.zeros((0, 8)), TAU), 0.0)


@pytest.mark.parametrize('match', ['global', 'same_position'])
@pytest.mark.parametrize('k', [0, 6])
def test_pixel_loss(k, match):
  p, p_pos = maps(2)
  u, u_pos = maps(3, d=5)
  queue = rand(4, k, 8)
  expected = ref_pixel(p, p_pos, u, u_pos, queue, TAU, match)
  close(pixel_loss(p, p_pos, u, u_pos, queue, TAU, match=match), expected)
  # The negatives are the queue only (docs/method.md §3): without one, L_P is identically 0.
  assert expected > 0.1 if k else expected == 0.0


def test_pixel_loss_matches_differ_from_same_position():
  p, p_pos = maps(2)
  u, u_pos = maps(3, d=5)
  queue = rand(4, 6, 8)
  glob = pixel_loss(p, p_pos, u, u_pos, queue, TAU, match='global')
  same = pixel_loss(p, p_pos, None, None, queue, TAU, match='same_position')
  assert abs(float(glob) - float(same)) > 1e-3


def test_pixel_match_ties_go_to_lowest_j():
  # One-hot u+ with duplicated rows: A has exact ties (all dot products are 0 or 1).
  eye = np.eye(4, dtype=np.float32)
  u_pos = eye[[2, 0, 2, 1, 0, 3]][None]  # rows 0 and 2 tie, rows 1 and 4 tie
  u = eye[[2, 0, 1, 3, 0, 2]][None]
  u = np.concatenate([u, np.zeros((1, 1, 4), np.float32)], axis=1)  # all-zero row: all tie
  u_pos = np.concatenate([u_pos, eye[[3]][None]], axis=1)
  expected_m = np.array([[0, 1, 3, 5, 1, 0, 0]])
  np.testing.assert_array_equal(ref_match(u, u_pos), expected_m)
  np.testing.assert_array_equal(losses.global_match(u, u_pos), expected_m)
  # The loss picks exactly those positives.
  p, p_pos = rand(5, 1, 7, 8), rand(6, 1, 7, 8)
  queue = rand(7, 3, 8)
  close(pixel_loss(p, p_pos, u, u_pos, queue, TAU),
        ref_pixel(p, p_pos, u, u_pos, queue, TAU, 'global'))


@pytest.mark.parametrize('k', [0, 6])
def test_pixel_loss_with_frame_negatives(k):
  p, p_pos = maps(2)
  u, u_pos = maps(3, d=5)
  queue = rand(4, k, 8)
  expected = ref_pixel(p, p_pos, u, u_pos, queue, TAU, 'global', negatives='queue+frame')
  close(pixel_loss(p, p_pos, u, u_pos, queue, TAU, negatives='queue+frame'), expected)
  # The frame's other pixels are negatives even without a queue.
  assert expected > ref_pixel(p, p_pos, u, u_pos, queue, TAU, 'global') + 0.1


@pytest.mark.parametrize('k', [0, 6])
def test_hard_cycle_loss(k):
  c, c_pos = maps(9)
  queue = rand(10, k, 8)
  expected = ref_cycle(c, c_pos, queue, TAU)
  close(cycle_loss(c, c_pos, queue, TAU), expected, rtol=1e-4)
  assert expected > 0.1


def test_soft_cycle_target():
  u, u_pos = maps(11, d=5)
  t = soft_cycle_target(u, u_pos, TAU)
  chex.assert_shape(t, (2, 12, 12))
  chex.assert_type(t, jnp.float32)
  np.testing.assert_allclose(t, ref_soft_target(u, u_pos, TAU), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.sum(t, -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('mode', ['self', 'cycle'])
def test_soft_cycle_target_modes(mode):
  u, u_pos = maps(11, d=5)
  t = soft_cycle_target(u, u_pos, TAU, mode=mode)
  np.testing.assert_allclose(t, ref_soft_target(u, u_pos, TAU, mode), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.sum(t, -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('k', [0, 6])
def test_soft_cycle_loss(k):
  c, c_pos = maps(12)
  u, u_pos = maps(13, d=5)
  queue = rand(14, k, 8)
  t = soft_cycle_target(u, u_pos, TAU)
  expected = ref_cycle(c, c_pos, queue, TAU, soft_target=np.asarray(t))
  close(cycle_loss(c, c_pos, queue, TAU, soft_target=t), expected, rtol=1e-4)


def test_soft_cycle_loss_with_zero_entries_in_target():
  # T = I: Σ_j T_ij (log T_ij − log M_ij) = −log M_ii, the hard loss (0·log 0 = 0).
  c, c_pos = maps(15)
  queue = rand(16, 6, 8)
  eye = np.broadcast_to(np.eye(12, dtype=np.float32), (2, 12, 12))
  close(cycle_loss(c, c_pos, queue, TAU, soft_target=eye),
        ref_cycle(c, c_pos, queue, TAU), rtol=1e-4)


def test_soft_cycle_loss_small_temperature_stays_finite():
  # τ = 0.03: terms down to exp(−4/τ) ≈ 1e-58 underflow in float32; the floor keeps it finite.
  c, c_pos = maps(17)
  t = soft_cycle_target(c, c_pos, 0.03)
  out = cycle_loss(c, c_pos, rand(18, 6, 8), 0.03, soft_target=t)
  assert np.isfinite(float(out))


@pytest.mark.parametrize('soft', [False, True])
def test_cycle_queue_chunking(monkeypatch, soft):
  # K = 10 in chunks of 4: two full chunks and a padded one.
  monkeypatch.setattr(losses, '_QUEUE_CHUNK', 4)
  c, c_pos = maps(19)
  queue = rand(20, 10, 8)
  t = soft_cycle_target(c, c_pos, TAU) if soft else None
  expected = ref_cycle(c, c_pos, queue, TAU, None if t is None else np.asarray(t))
  # A fresh trace: the chunk size is read at trace time, a cached trace would hide it.
  loss = jax.jit(lambda *a: losses.cycle_loss(*a, TAU, soft_target=t))
  close(loss(c, c_pos, queue), expected, rtol=1e-4)


def _directional_check(grad, ref64, x, seeds, h=1e-4, rtol=2e-3, atol=1e-5):
  """<grad, v> against the central difference of the float64 reference along random v."""
  x64 = x.astype(np.float64)
  for seed in seeds:
    v = rand(seed, *x.shape).astype(np.float64)
    fd = (ref64(x64 + h * v) - ref64(x64 - h * v)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * v), fd, rtol=rtol, atol=atol)


@pytest.mark.parametrize('negatives', ['queue', 'queue+frame'])
def test_streamed_negatives_in_chunks(monkeypatch, negatives):
  # K = 10 in chunks of 4 (two full chunks and a padded one), in a fresh trace: values and
  # the hand-written gradient of the streamed logsumexp against the float64 reference.
  monkeypatch.setattr(losses, '_QUEUE_CHUNK', 4)
  p, p_pos = maps(24)
  u, u_pos = maps(25, d=5)
  queue = rand(26, 10, 8)
  pixel = lambda x: losses.pixel_loss(x, p_pos, u, u_pos, queue, TAU, negatives=negatives)
  value, grad = jax.jit(jax.value_and_grad(pixel))(p)
  ref = lambda x: ref_pixel(x, p_pos, u, u_pos, queue, TAU, 'global', negatives)
  close(value, ref(p))
  _directional_check(grad, ref, p, seeds=(27, 28))
  glob = lambda x: losses.global_loss(x, p_pos, queue, TAU)
  value, grad = jax.jit(jax.value_and_grad(glob))(p)
  close(value, ref_global(p, p_pos, queue, TAU))
  _directional_check(grad, lambda x: ref_global(x, p_pos, queue, TAU), p, seeds=(29,))


@pytest.mark.parametrize('soft', [False, True])
def test_cycle_in_row_chunks(monkeypatch, soft):
  # N = 10 rows in chunks of 4 (three chunks, the last padded) and K = 10 in chunks of 4:
  # the column reductions carried across chunks must give the one-block numbers.
  monkeypatch.setattr(losses, '_ROW_CHUNK', 4)
  monkeypatch.setattr(losses, '_QUEUE_CHUNK', 4)
  # τ = 0.5 keeps every S entry within [−2, 2], so a padded row leaking into a column
  # normaliser (exp(0) = 1) would move the loss far beyond the tolerance.
  tau = 0.5
  c, c_pos = maps(44, n=10)
  queue = rand(45, 10, 8)
  t = np.asarray(soft_cycle_target(*maps(46, n=10), tau)) if soft else None
  loss = lambda x: losses.cycle_loss(x, c_pos, queue, tau, soft_target=t)
  value, grad = jax.jit(jax.value_and_grad(loss))(c)
  ref = lambda x: ref_cycle(x, c_pos, queue, tau, t)
  close(value, ref(c), rtol=1e-4)
  _directional_check(grad, ref, c, seeds=(47, 48))


def test_cycle_back_accuracy(monkeypatch):
  c, c_pos = maps(21, b=3, n=16)
  # Queue rows near the target pixels make some queue columns of M win over M_ii.
  queue = np.concatenate([c_pos[0, :5] + 0.1 * rand(22, 5, 8), rand(23, 5, 8)])
  expected = ref_cycle_back(c, c_pos, queue, 0.2)
  expected_no_queue = ref_cycle_back(c, c_pos, queue[:0], 0.2)
  assert 0.0 < expected < expected_no_queue  # the queue matters
  close(cycle_back_accuracy(c, c_pos, queue, 0.2), expected)
  close(cycle_back_accuracy(c, c_pos, queue[:0], 0.2), expected_no_queue)
  # K = 10 in chunks of 4, in a fresh trace (the chunk size is read at trace time).
  monkeypatch.setattr(losses, '_QUEUE_CHUNK', 4)
  close(jax.jit(lambda *a: losses.cycle_back_accuracy(*a, 0.2))(c, c_pos, queue), expected)


def test_cycle_back_accuracy_identity():
  # Orthogonal pixels, c = c+: each pixel's two jumps come straight back.
  c = np.eye(8, dtype=np.float32)[None]
  close(cycle_back_accuracy(c, c, np.zeros((0, 8)), TAU), 1.0)


# ----------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------


def _loss_fns():
  u, u_pos = maps(30, d=5)
  t = losses.soft_cycle_target(u, u_pos, TAU)
  return {
      'global': lambda x, x_pos, q: global_loss(x, x_pos, q, TAU),
      'pixel': lambda x, x_pos, q: pixel_loss(x, x_pos, u, u_pos, q, TAU),
      'pixel_same': lambda x, x_pos, q: pixel_loss(
          x, x_pos, None, None, q, TAU, match='same_position'),
      'cycle_hard': lambda x, x_pos, q: cycle_loss(x, x_pos, q, TAU),
      'cycle_soft': lambda x, x_pos, q: cycle_loss(x, x_pos, q, TAU, soft_target=t),
  }


def _assert_online_gradient_only(g, g_pos, g_queue):
  assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 1e-4
  np.testing.assert_array_equal(g_pos, 0.0)
  np.testing.assert_array_equal(g_queue, 0.0)


@pytest.mark.parametrize('name', ['global', 'pixel', 'pixel_same'])
def test_gradients_reach_online_side_only(name):
  # With K = 0 these two losses are identically 0, so only K > 0 is informative.
  fn = _loss_fns()[name]
  x, x_pos = maps(31)
  _assert_online_gradient_only(*jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(
      x, x_pos, rand(32, 6, 8)))


def test_pixel_loss_no_gradient_to_the_match():
  p, p_pos = maps(33)
  u, u_pos = maps(34, d=5)
  g_u = jax.grad(lambda u: pixel_loss(p, p_pos, u, u_pos, rand(35, 6, 8), TAU))(u)
  np.testing.assert_array_equal(g_u, 0.0)


@pytest.mark.parametrize('k', [0, 5])
@pytest.mark.parametrize('soft', [False, True])
def test_cycle_gradient_matches_finite_differences(soft, k):
  # ĉ must get gradient through both S1 (rows) and S2 (columns): dropping either path
  # changes the directional derivative well beyond the tolerance. ĉ+ and Q get none.
  c, c_pos = maps(36, b=1, n=10)
  queue = rand(37, k, 8)
  t = soft_cycle_target(*maps(38, b=1, n=10), TAU) if soft else None
  t_np = None if t is None else np.asarray(t)
  grads = jax.jit(jax.grad(lambda *a: losses.cycle_loss(*a, TAU, soft_target=t),
                           argnums=(0, 1, 2)))(c, c_pos, queue)
  _assert_online_gradient_only(*grads)
  h = 1e-4
  for seed in range(3):
    v = rand(40 + seed, *c.shape).astype(np.float64)
    c64 = c.astype(np.float64)
    fd = (ref_cycle(c64 + h * v, c_pos, queue, TAU, t_np)
          - ref_cycle(c64 - h * v, c_pos, queue, TAU, t_np)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(grads[0], np.float64) * v), fd,
                               rtol=2e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Dtypes.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(_loss_fns()))
def test_bfloat16_inputs(name):
  fn = _loss_fns()[name]
  x, x_pos = maps(50)
  queue = rand(51, 6, 8)
  out16 = fn(*(jnp.asarray(a, jnp.bfloat16) for a in (x, x_pos, queue)))
  chex.assert_type(out16, jnp.float32)
  # The math is float32 after the cast: identical to float32 on the rounded inputs ...
  rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, x_pos, queue)]
  np.testing.assert_allclose(float(out16), float(fn(*rounded)), rtol=1e-6)
  # ... and close to float32 on the originals (bf16 rounding of the inputs only).
  np.testing.assert_allclose(float(out16), float(fn(x, x_pos, queue)), rtol=3e-2)


# ----------------------------------------------------------------------------------------
# Matmul precision (`loss.precision`): accelerators' products, emulated on this CPU.
# ----------------------------------------------------------------------------------------


def test_emulated_bfloat16_product_is_xlas_bfloat16_dot():
  """The emulation rounds as a bfloat16 dot with float32 accumulation does (XLA's, on this CPU)."""
  a, b = rand(70, 40, 128), rand(71, 64, 128)
  emulated = loss_kernels.einsum('nd,md->nm', a, b, 'emulated_bf16')
  xla = jnp.einsum('nd,md->nm', jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16),
                   preferred_element_type=jnp.float32)
  np.testing.assert_allclose(np.asarray(emulated), np.asarray(xla), rtol=1e-6, atol=1e-5)
  # TF32 keeps 10 mantissa bits: round to nearest, ties to even (1 + 2^-11 ties down to 1).
  x = jnp.asarray([1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -12], jnp.float32)
  np.testing.assert_array_equal(np.asarray(loss_kernels._round_mantissa(x, 10)),
                                [1.0, 1.0 + 2.0 ** -9, 1.0])


@pytest.mark.parametrize('precision', ['tf32', 'bf16_3x'])
def test_losses_at_the_accelerators_precisions_stay_within_the_tolerance(precision):
  """'auto' takes TF32 on GPUs and three bfloat16 passes on TPUs because every loss stays within
  1e-4 of the float64 value there (benchmarks/loss_precision.py measures the step-1 losses)."""
  x, x_pos = maps(72, b=2, n=16, d=32)
  queue = rand(73, 64, 32)
  target = ref_soft_target(x, x_pos, TAU, 'self')
  name = f'emulated_{precision}'
  pairs = [(losses.global_loss(x, x_pos, queue, TAU, precision=name), ref_global(x, x_pos, queue, TAU)),
           (losses.pixel_loss(x, x_pos, x, x_pos, queue, TAU, negatives='queue+frame', precision=name),
            ref_pixel(x, x_pos, x, x_pos, queue, TAU, 'global', 'queue+frame')),
           (losses.cycle_loss(x, x_pos, queue, TAU, jnp.asarray(target, jnp.float32), precision=name),
            ref_cycle(x, x_pos, queue, TAU, target))]
  for value, ref in pairs:
    assert abs(float(value) - ref) <= 1e-4 * max(abs(ref), 1.0), (precision, float(value), ref)


def test_emulated_precision_gradient_is_the_rounded_backward_product():
  """Backward products round the cotangent and the other operand too, as the hardware does:
  close to the float32 gradient, not equal to it."""
  a, b = rand(74, 8, 32), rand(75, 16, 32)
  loss = lambda a, p: jnp.sum(jnp.sin(loss_kernels.einsum('nd,md->nm', a, b, p)))
  g32 = np.asarray(jax.grad(loss)(a, 'float32'))
  g16 = np.asarray(jax.grad(loss)(a, 'emulated_bf16'))
  assert 0 < np.abs(g16 - g32).max() <= 0.05 * np.abs(g32).max()


def test_precision_names():
  assert losses.loss_precision('auto', 'cpu') == 'float32'
  assert losses.loss_precision('auto', 'gpu') == 'tf32'
  assert losses.loss_precision('auto', 'tpu') == 'bf16_3x'
  assert losses.loss_precision('bf16', 'cpu') == 'bf16'
  with pytest.raises(ValueError, match='loss.precision'):
    losses.loss_precision('half', 'gpu')
  with pytest.raises(ValueError, match='loss.precision'):
    loss_kernels.einsum('nd,md->nm', jnp.ones((2, 3)), jnp.ones((2, 3)), 'emulated_fp8')


# ----------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------


def test_bad_input_raises():
  x, x_pos = maps(60)
  q = rand(61, 6, 8)
  with pytest.raises(ValueError, match=r'\[B, N, D\]'):
    losses.cycle_loss(x[0], x_pos[0], q, TAU)
  with pytest.raises(ValueError, match='c_pos'):
    losses.cycle_loss(x, x_pos[:, :5], q, TAU)
  with pytest.raises(ValueError, match='queue'):
    losses.global_loss(x, x_pos, q[:, :4], TAU)
  with pytest.raises(ValueError, match='match'):
    losses.pixel_loss(x, x_pos, x, x_pos, q, TAU, match='nearest')
  with pytest.raises(ValueError, match='soft_target'):
    losses.cycle_loss(x, x_pos, q, TAU, soft_target=np.ones((2, 12, 11)))
  with pytest.raises(ValueError, match='temperature'):
    losses.global_loss(x, x_pos, q, 0.0)


# ----------------------------------------------------------------------------------------
# Memory at paper-like size: compiled only, nothing big is allocated.
# ----------------------------------------------------------------------------------------

N_BIG, K_BIG, D_BIG = 4096, 16384, 128
ONE_MATRIX = N_BIG * (N_BIG + K_BIG) * 4  # one N×(N+K) float32 matrix: 335.5 MB


def _temp_bytes(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('with_grad', [False, True])
def test_cycle_memory(with_grad, soft):
  # Issue bound: value + gradient within half of one N×(N+K) float32 matrix (measured 0.13×
  # hard, 0.45× soft: the soft cycle holds P2's first N columns, one N×N matrix = 0.2×).
  fn = lambda c, c_pos, q, *t: losses.cycle_loss(c, c_pos, q, TAU, *t)
  if with_grad:
    fn = jax.value_and_grad(fn)
  shapes = [(1, N_BIG, D_BIG), (1, N_BIG, D_BIG), (K_BIG, D_BIG)] + soft * [(1, N_BIG, N_BIG)]
  temp = _temp_bytes(fn, *shapes)
  print(f'\n{"soft" if soft else "hard"} cycle {"value_and_grad" if with_grad else "forward"} '
        f'N={N_BIG} K={K_BIG}: temp {temp / 2**20:.1f} MiB = {temp / ONE_MATRIX:.2f} x one '
        f'N x (N+K) f32 matrix')
  assert 0 < temp <= 0.5 * ONE_MATRIX


def test_pixel_loss_memory_does_not_hold_the_logits():
  # The paper's per-device size: 32 images of N = 28·28 pixels, K = 16384. Issue bound: value +
  # gradient within a quarter of one B×N×K float32 logits block (1.6 GiB; measured 0.17×).
  b, n = 32, 784
  logits = b * n * K_BIG * 4
  fn = jax.value_and_grad(lambda p, p_pos, q: losses.pixel_loss(p, p_pos, p_pos, p_pos, q, TAU))
  temp = _temp_bytes(fn, (b, n, D_BIG), (b, n, D_BIG), (K_BIG, D_BIG))
  print(f'\npixel value_and_grad B={b} N={n} K={K_BIG}: temp {temp / 2**20:.1f} MiB = '
        f'{temp / logits:.2f} x one B x N x K f32 block')
  assert 0 < temp <= 0.25 * logits
