"""The CACL losses (docs/method.md §3; Pang et al. 2022, eqs. 3-6) as pure functions of arrays.

Every public loss takes raw head outputs: `[B, N, D]` maps (B images, N = h·w pixels,
D channels, any float dtype), a queue `[K, D]` (K may be 0) and a temperature τ. Inputs are
cast to float32 first and all loss math runs in float32; each function L2-normalises
internally and returns a float32 scalar, the mean over its rows (images or pixels).

The `*_pos` inputs are the target network's outputs on the other frame v+. They get
`jax.lax.stop_gradient` here as well as in the train step, so a loss can never push
gradient into the target (EMA) network, whoever calls it. The queues are buffers: no
gradient either.

Batch strategy (one decision for the whole module): the per-image work is written for one
`[N, D]` map and batched with `jax.vmap`, not `jax.lax.map`. Under `jit` the batch axis is
sharded over the device mesh; `vmap` keeps every op batched along that axis so each device
works on its own B/devices images, whereas `lax.map` scans over the sharded axis and XLA's
partitioner answers that by all-gathering the whole batch and running all B iterations on
every device (checked on 8 CPU devices: an all-gather of the full batch appears in the HLO).
The price is that memory scales with the per-device batch, so the per-image footprint is
kept independent of K and small in N (`loss_kernels.py` holds the kernels):
  * the queue negatives of the global and pixel losses are streamed: an online logsumexp over
    chunks of `_QUEUE_CHUNK` queue rows with a hand-written VJP that keeps only the
    softmax-weighted mean of the keys (B×N×D), never the B×N×K logits;
  * the hard cycle keeps only vectors for the backward pass and rebuilds S1 in row chunks of
    `_ROW_CHUNK` (S2's first N columns are S1ᵀ; the queue enters through P2's row normaliser,
    a constant streamed like the negatives above);
  * the soft cycle adds M's first N columns, one N×N matmul of P1 and P2 per row chunk, and
    holds one N×N matrix (P2's first N columns); never N×N×N.
At the paper's per-device size (32 images, N = 28·28, K = 16384) value + gradient of the pixel
loss need well under a quarter of one 32×784×16384 float32 logits block (1.6 GiB), and the hard
and the soft cycle at N = 4096, K = 16384 under half of one N×(N+K) float32 matrix
(`benchmarks/cycle_loss_memory.py` measures all of this; tests/test_losses.py holds the bounds).

Matmul precision: every product takes float32 operands and accumulates in float32. The large
ones — the queue streams, the frame negatives and the cycle's N×N products — run at the
`precision` argument of each loss (`loss_kernels.PRECISIONS`; 'float32' by default, true float32
on every backend; the train step passes `loss.precision`, resolved per platform by
`loss_precision`). The products that decide a hard choice or a target — the match m(i)'s affinity
A and the soft target T — always run in true float32: on TPU the default f32 matmul is a single
bfloat16 pass, which at τ = 0.07 puts errors of a few 1e-2 on the logits and ties in argmax.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from cacl_jax.method import loss_kernels, negatives as negatives_lib

_HIGHEST = jax.lax.Precision.HIGHEST
# Queue rows per streamed chunk: bounds the transient logits block to N×1024 per image whatever
# K is (at 32 images of N = 784 per device that block is 103 MB; each chunk's matmul is still
# [25088, 128] x [128, 1024]). Read at trace time.
_QUEUE_CHUNK = 1024
# Rows of S1 per chunk in the cycle kernels: a block is _ROW_CHUNK × N per image.
_ROW_CHUNK = 1024


def l2n(x, axis=-1, eps=1e-12):
  """L2-normalises `x` along `axis`: x / max(‖x‖, eps) (torch `F.normalize` semantics).

  The norm is taken in float32 whatever the dtype; the result keeps `x`'s dtype. The eps
  floor makes an all-zero vector map to zero with a finite gradient instead of NaN.
  """
  x = jnp.asarray(x)
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Input handling.
# ----------------------------------------------------------------------------------------


def _maps(fn, name, x, x_pos):
  """Checks a pair of `[B, N, D]` maps of one shape and casts both to float32."""
  x, x_pos = jnp.asarray(x), jnp.asarray(x_pos)
  if x.ndim != 3:
    raise ValueError(f'{fn}: expected {name} as a [B, N, D] array, got shape {x.shape}')
  if x_pos.shape != x.shape:
    raise ValueError(f'{fn}: expected {name}_pos with the shape of {name} {x.shape}, '
                     f'got {x_pos.shape}')
  return x.astype(jnp.float32), x_pos.astype(jnp.float32)


def _queue(fn, queue, d):
  """Checks a `[K, D]` queue; returns it float32, unit-norm and gradient-free.

  Queues already hold unit vectors (docs/method.md §4); re-normalising is idempotent and cheap and
  keeps the losses correct for any caller.
  """
  queue = jnp.asarray(queue)
  if queue.ndim != 2 or queue.shape[1] != d:
    raise ValueError(f'{fn}: expected queue as a [K, {d}] array (K may be 0), '
                     f'got shape {queue.shape}')
  return jax.lax.stop_gradient(l2n(queue.astype(jnp.float32)))


def _temperature(fn, temperature):
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f'{fn}: expected a temperature > 0, got {temperature}')
  return temperature


def _sim(a, b, tau, precision='float32'):
  """a [..., N, D], b [..., M, D] -> a bᵀ / τ [..., N, M], float32 at `precision`."""
  return loss_kernels.einsum('...nd,...md->...nm', a, b, precision) / tau


# Which precision `loss.precision='auto'` takes on each platform, and why: the step-1 losses'
# error against a float64 reference (`benchmarks/loss_precision.py`, README "Accelerator numerics").
AUTO_PRECISION = {'cpu': 'float32', 'gpu': 'tf32', 'tpu': 'bf16_3x'}


def loss_precision(name, platform):
  """`loss.precision` → a `loss_kernels.PRECISIONS` name; 'auto' by platform (AUTO_PRECISION)."""
  if name == 'auto':
    return AUTO_PRECISION.get(platform, 'float32')
  if name not in loss_kernels.PRECISIONS:
    raise ValueError(f"loss.precision must be 'auto' or one of {', '.join(map(repr, loss_kernels.PRECISIONS))}, "
                     f'got {name!r}')
  return name


def _info_nce(pos, queue_lse, *more_lse):
  """−log softmax([pos, negatives])[0] (eq. 1) from the positive logit and the logsumexp of
  each group of negative logits: [...] each -> [...]. Equal to the concatenated form."""
  lse = pos
  for neg in (queue_lse,) + more_lse:
    lse = jnp.logaddexp(lse, neg)
  return lse - pos


def _alternative_nce(pos, neg_lses, count, tau, tau_plus):
  """eq. 1 with the negatives' terms debiased (`negatives.debiased_negatives_lse`, τ⁺ > 0):
  the logsumexps of each group of negatives and their total count N → [...]."""
  neg = neg_lses[0]
  for more in neg_lses[1:]:
    neg = jnp.logaddexp(neg, more)
  if tau_plus:
    neg = negatives_lib.debiased_negatives_lse(pos, neg, count, tau_plus, tau)
  return jnp.logaddexp(pos, neg) - pos


def _mixing(fn, mochi, key):
  """Checks a MoCHi triple (hardest N̄, mixed s, query-mixed s'); None or all zero: off."""
  if mochi is None or not any(mochi):
    return None
  if key is None:
    raise ValueError(f'{fn}: MoCHi (mochi={tuple(mochi)}) needs a PRNG key')
  return tuple(int(m) for m in mochi)


def _queue_nce_lse(x, queue, tau, precision='float32'):
  """logsumexp_k x_i·Q_k/τ, streamed (loss_kernels.queue_logsumexp): x [..., D] -> [...]."""
  return loss_kernels.queue_logsumexp(x / tau, queue, _QUEUE_CHUNK, precision)


def _fold_queue(queue, init, fn):
  """Folds `fn(carry, rows [C, D], valid [C]) -> carry` over the queue in row chunks.

  Used for row-wise reductions (logsumexp, max) over ĉ+ Qᵀ, so that block is never larger
  than N × `_QUEUE_CHUNK`. The last chunk is zero-padded; `valid` marks the real rows.
  """
  k, d = queue.shape
  if k == 0:
    return init
  if k <= _QUEUE_CHUNK:
    return fn(init, queue, jnp.ones((k,), bool))
  n = -(-k // _QUEUE_CHUNK)
  rows = queue
  if n * _QUEUE_CHUNK != k:  # pad only when needed: the copy is a K×D temporary
    rows = jnp.pad(queue, ((0, n * _QUEUE_CHUNK - k), (0, 0)))
  rows = rows.reshape(n, _QUEUE_CHUNK, d)
  valid = (jnp.arange(n * _QUEUE_CHUNK) < k).reshape(n, _QUEUE_CHUNK)
  carry, _ = jax.lax.scan(lambda c, x: (fn(c, *x), None), init, (rows, valid))
  return carry


# ----------------------------------------------------------------------------------------
# Global head (eq. 3).
# ----------------------------------------------------------------------------------------


def global_key(u):
  """l2n(mean_i u_i): [B, N, D] -> [B, D] float32, the image-level feature of eq. 3.

  q on the online side, k on the target side; the train step enqueues exactly this k into
  Q_G (docs/method.md §4), so the queue's negatives and the loss's positive are the same function of
  the target map. With `loss.global_pool='before_head'` the map is g_G(GAP(h)) with N = 1.
  """
  return l2n(jnp.mean(jnp.asarray(u).astype(jnp.float32), axis=1))


def global_loss(u, u_pos, queue, temperature, *, tau_plus=0.0, mochi=None, key=None,
                precision='float32'):
  """Global contrastive loss L_G (eq. 3, docs/method.md §3).

  q = l2n(mean_i u_i), k = l2n(mean_i u+_i),
  L_G = mean_b −log softmax([q·k, q·Q_Gᵀ] / τ)[0].

  Args:
    u: [B, N, D] online global-head map on v.
    u_pos: [B, N, D] target global-head map on v+ (no gradient).
    queue: [K, D] negatives Q_G; K may be 0.
    temperature: τ > 0.
    tau_plus: τ⁺ > 0 debiases the negatives (Chuang et al. 2020, `negatives.py`); 0: eq. 3.
    mochi: (N̄, s, s') adds MoCHi's mixed hard negatives from the queue (Kalantidis et al.
      2020, `negatives.py`; needs `key`); None or zeros: eq. 3.
    precision: of the queue products (module docstring).
  Returns:
    float32 scalar.
  """
  tau = _temperature('global_loss', temperature)
  u, u_pos = _maps('global_loss', 'u', u, u_pos)
  queue = _queue('global_loss', queue, u.shape[-1])
  mochi = _mixing('global_loss', mochi, key)
  q = global_key(u)  # [B, D]
  # Target side: the EMA network gets no gradient from any loss.
  k = global_key(jax.lax.stop_gradient(u_pos))  # [B, D]
  pos = jnp.sum(q * k, axis=-1) / tau  # [B]
  neg = [_queue_nce_lse(q, queue, tau, precision)]
  if not (tau_plus or mochi):
    return jnp.mean(_info_nce(pos, *neg))
  count = queue.shape[0]
  if mochi:
    neg.append(negatives_lib.mixed_negatives_lse(key, q, queue, tau, *mochi))
    count += mochi[1] + mochi[2]
  return jnp.mean(_alternative_nce(pos, neg, count, tau, tau_plus))


# ----------------------------------------------------------------------------------------
# Pixel head (eq. 4).
# ----------------------------------------------------------------------------------------


def global_match(u, u_pos):
  """m(i) = argmax_j û_i·û+_j (eq. 4), ties to the lowest j: [B, N, D] x2 -> [B, N] int32.

  A hard assignment: no gradient reaches u through it.
  """
  u_hat = l2n(jax.lax.stop_gradient(u))
  u_pos_hat = l2n(jax.lax.stop_gradient(u_pos))
  affinity = _sim(u_hat, u_pos_hat, 1.0)  # A [B, N, N]
  # jnp.argmax returns the first maximal index: the lowest j, as docs/method.md §3 asks.
  return jnp.argmax(affinity, axis=-1).astype(jnp.int32)


PIXEL_NEGATIVES = ('queue', 'queue+frame')


def pixel_loss(p, p_pos, u, u_pos, queue, temperature, match='global', negatives='queue', *,
               tau_plus=0.0, mochi=None, key=None, precision='float32'):
  """Pixel contrastive loss L_P (eq. 4, docs/method.md §3 and §9).

  A = û û+ᵀ, m(i) = argmax_j A_ij (ties: lowest j), p̂ = l2n(p), p̂+ = l2n(p+),
  L_P = mean_{b,i} −log softmax([p̂_i·p̂+_{m(i)}, negatives_i] / τ)[0], with negatives_i
    'queue':       p̂_i·Q_Pᵀ — pixels of other videos ("features in {p_-^i} ... are pixels
                   from other videos");
    'queue+frame': p̂_i·Q_Pᵀ and p̂_i·p̂_k for every other pixel k ≠ i of the same online
                   frame — eq. 4's printed denominator "p^k ∈ {p^i} ∪ p+^m" and "features in
                   {p^i} can all be treated as negatives". Gradient flows through both p̂_i
                   and p̂_k (both online).

  Args:
    p: [B, N, D] online pixel-head map on v.
    p_pos: [B, N, D] target pixel-head map on v+ (no gradient).
    u, u_pos: [B, N, D'] global-head maps that define the match when match='global'
      (no gradient: argmax); unused (may be None) for 'same_position'.
    queue: [K, D] negatives Q_P; K may be 0.
    temperature: τ > 0.
    match: 'global' (m(i) from the global head, as in CACL) or 'same_position'
      (m(i) = i: Table 1a's "pixel head alone").
    negatives: 'queue' or 'queue+frame' (above).
    tau_plus, mochi, key: as in `global_loss` (debiased negatives; MoCHi mixing from Q_P).
    precision: of the queue and frame products (the match's affinity is true float32).
  Returns:
    float32 scalar.
  """
  tau = _temperature('pixel_loss', temperature)
  mochi = _mixing('pixel_loss', mochi, key)
  if negatives not in PIXEL_NEGATIVES:
    raise ValueError(f'pixel_loss: expected negatives in {PIXEL_NEGATIVES}, got {negatives!r}')
  p, p_pos = _maps('pixel_loss', 'p', p, p_pos)
  queue = _queue('pixel_loss', queue, p.shape[-1])
  b, n, _ = p.shape
  if match == 'global':
    u, u_pos = _maps('pixel_loss', 'u', u, u_pos)
    if u.shape[:2] != (b, n):
      raise ValueError(f'pixel_loss: expected u as [{b}, {n}, D] like p, got {u.shape}')
    m = global_match(u, u_pos)
  elif match == 'same_position':
    m = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  else:
    raise ValueError(f"pixel_loss: expected match 'global' or 'same_position', "
                     f'got {match!r}')
  p_hat = l2n(p)
  # Target side: the EMA network gets no gradient from any loss.
  p_pos_hat = l2n(jax.lax.stop_gradient(p_pos))
  p_match = jnp.take_along_axis(p_pos_hat, m[..., None], axis=1)  # p̂+_{m(i)} [B, N, D]
  pos = jnp.sum(p_hat * p_match, axis=-1) / tau  # [B, N]
  neg = (_queue_nce_lse(p_hat, queue, tau, precision),)  # [B, N]: B×N×K logits never stored
  count = queue.shape[0]
  if negatives == 'queue+frame':
    frame = _sim(p_hat, p_hat, tau, precision)  # [B, N, N]; the diagonal (i) is no negative
    frame = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, frame)
    neg += (jax.nn.logsumexp(frame, axis=-1),)
    count += n - 1
  if not (tau_plus or mochi):
    return jnp.mean(_info_nce(pos, *neg))
  if mochi:   # MoCHi's selection forms the B×N×K similarities once (no gradient)
    neg += (negatives_lib.mixed_negatives_lse(key, p_hat, queue, tau, *mochi),)
    count += mochi[1] + mochi[2]
  return jnp.mean(_alternative_nce(pos, neg, count, tau, tau_plus))


# ----------------------------------------------------------------------------------------
# Cycle-attention head (eqs. 5-6).
# ----------------------------------------------------------------------------------------


def _queue_columns_lse(c_pos_hat, queue, tau, precision='float32'):
  """q_j = logsumexp_k ĉ+_j·Q_k / τ for each target pixel j: [..., N, D] -> [..., N].

  The queue columns of S2 enter the cycle only through P2's row normaliser; neither ĉ+ nor
  Q carries gradient, so this is a constant of the loss, streamed like the negatives.
  """
  return jax.lax.stop_gradient(_queue_nce_lse(jax.lax.stop_gradient(c_pos_hat), queue, tau, precision))


def _cycle_terms(c_hat, c_pos_hat, queue, tau):
  """The two jumps of eq. 5 for one image, in log space, restricted to columns [0, N).

  With S1 = ĉ ĉ+ᵀ/τ and S2 = ĉ+ [ĉ ; Q_C]ᵀ/τ, the first N columns of S2 are S1ᵀ, so
    log P1_ij = S1_ij − logsumexp_j' S1_ij'
    log P2_ji = S1_ij − r_j,   r_j = logsumexp(S1_:j ∪ S2[j, N:])  (row j of S2, all N+K).
  Materialises N×N matrices: used by the `cycle_back_accuracy` metric only (the loss runs
  the row-chunked kernels of `loss_kernels.py`, which compute the same quantities).

  Args: c_hat [N, D] unit online map; c_pos_hat [N, D] unit target map; queue [K, D].
  Returns: log_p1 [N, N] (log P1), log_p2_t [N, N] with log_p2_t[i, j] = log P2_ji,
    and r [N], the log row normaliser of P2 (for the queue columns).
  """
  s1 = _sim(c_hat, c_pos_hat, tau)  # [N, N]
  log_p1 = s1 - jax.nn.logsumexp(s1, axis=1, keepdims=True)
  r = jnp.logaddexp(jax.nn.logsumexp(s1, axis=0), _queue_columns_lse(c_pos_hat, queue, tau))
  log_p2_t = s1 - r[None, :]
  return log_p1, log_p2_t, r


def cycle_loss(c, c_pos, queue, temperature, soft_target: Optional[jax.Array] = None, *,
               precision='float32'):
  """Cycle-attention loss L_C (eqs. 5-6, docs/method.md §3), hard or soft.

  ĉ = l2n(c), ĉ+ = l2n(c+), S1 = ĉ ĉ+ᵀ/τ [N, N], S2 = ĉ+ [ĉ ; Q_C]ᵀ/τ [N, N+K],
  M = softmax_rows(S1) softmax_rows(S2) [N, N+K].
    hard (soft_target None): L_C = mean_{b,i} −log M_ii, with
      log M_ii = logsumexp_j (log P1_ij + log P2_ji);
    soft: L_C = mean_{b,i} Σ_{j<N} T_ij (log T_ij − log M_ij), T = `soft_target`.
  Memory per image is O(N·_ROW_CHUNK + N·_QUEUE_CHUNK) for the hard cycle, plus one N×N
  matrix for the soft one (see the module docstring); nothing of size N×N×N or
  (N×N)·(N+K) is formed.

  Args:
    c: [B, N, D] online cycle-head map on v.
    c_pos: [B, N, D] target cycle-head map on v+ (no gradient).
    queue: [K, D] negatives Q_C appended to the second jump; K may be 0.
    temperature: τ > 0.
    soft_target: None (hard cycle) or [B, N, N] row-stochastic T, e.g.
      `soft_cycle_target(u, u_pos, τ)`; treated as a constant.
    precision: of the queue and N×N products (module docstring).
  Returns:
    float32 scalar.
  """
  tau = _temperature('cycle_loss', temperature)
  c, c_pos = _maps('cycle_loss', 'c', c, c_pos)
  queue = _queue('cycle_loss', queue, c.shape[-1])
  c_hat = l2n(c)
  # Target side: the EMA network gets no gradient from any loss.
  c_pos_hat = l2n(jax.lax.stop_gradient(c_pos))
  q = _queue_columns_lse(c_pos_hat, queue, tau, precision)  # [B, N], a constant
  # τ folded into the online side: S1 = (ĉ/τ) ĉ+ᵀ.
  a = c_hat / tau
  if soft_target is None:
    per_pixel = jax.vmap(lambda x, y, z: loss_kernels.hard_cycle(x, y, z, _ROW_CHUNK, precision))(
        a, c_pos_hat, q)
  else:
    b, n, _ = c.shape
    soft_target = jnp.asarray(soft_target)
    if soft_target.shape != (b, n, n):
      raise ValueError(f'cycle_loss: expected soft_target as a [{b}, {n}, {n}] array, '
                       f'got shape {soft_target.shape}')
    target = jax.lax.stop_gradient(soft_target.astype(jnp.float32))
    per_pixel = jax.vmap(lambda x, y, z, t: loss_kernels.soft_cycle(x, y, z, t, _ROW_CHUNK, precision))(
        a, c_pos_hat, q, target)
  return jnp.mean(per_pixel)


SOFT_TARGETS = ('cross', 'self', 'cycle')


def soft_cycle_target(u, u_pos, temperature, mode='cross', identity_mix=0.0):
  """The soft-cycle target T (docs/method.md §3 and §9, "soft cycle trick"): [B, N, N].

  The paper: "modifies the one-hot target to softmax(⟨u, u+⟩/τ) ... we adopt the global head
  to describe the relationships among pixels in the frame". M = P1 P2's columns index the
  pixels of v, whereas softmax(⟨u, u+⟩/τ)'s columns index v+; the modes read this three ways:
    'cross': softmax_rows(û û+ᵀ/τ), as printed (row i over the pixels of v+);
    'self':  softmax_rows(û ûᵀ/τ), the relationships among the pixels of the frame v itself
             (row i peaks at i and spreads over pixels the global head finds alike);
    'cycle': softmax_rows(û û+ᵀ/τ) softmax_rows(û+ ûᵀ/τ), the global head's own two-jump
             walk v → v+ → v, indexed like M.
  `identity_mix` = λ returns λ·I + (1 − λ)·T: the paper calls the trick "the key idea of
  knowledge distillation (Hinton et al.)", whose loss weighs the hard labels (here the
  one-hot return to self, eq. 6) against the soft targets; CE(M, λI + (1−λ)T) is exactly
  λ·CE(M, I) + (1−λ)·CE(M, T). λ = 0 is the printed replacement.

  Args: u [B, N, D] online global-head map on v; u_pos [B, N, D] target global-head map on
    v+ (unused for 'self'); temperature τ > 0; mode as above; identity_mix λ ∈ [0, 1].
  Returns: [B, N, N] float32, rows sum to 1, gradient-stopped (it is a target).
  """
  tau = _temperature('soft_cycle_target', temperature)
  if mode not in SOFT_TARGETS:
    raise ValueError(f'soft_cycle_target: expected mode in {SOFT_TARGETS}, got {mode!r}')
  u, u_pos = _maps('soft_cycle_target', 'u', u, u_pos)
  u_hat, u_pos_hat = l2n(u), l2n(u_pos)
  if mode == 'self':
    target = jax.nn.softmax(_sim(u_hat, u_hat, tau), axis=-1)
  else:
    target = jax.nn.softmax(_sim(u_hat, u_pos_hat, tau), axis=-1)
    if mode == 'cycle':
      back = jax.nn.softmax(_sim(u_pos_hat, u_hat, tau), axis=-1)
      target = jnp.einsum('bij,bjk->bik', target, back, precision=_HIGHEST)
  if identity_mix:
    target = identity_mix * jnp.eye(target.shape[-1]) + (1.0 - identity_mix) * target
  return jax.lax.stop_gradient(target)


def cycle_back_accuracy(c, c_pos, queue, temperature):
  """Fraction of pixels i with argmax_j M_ij == i over all N+K columns (eq. 5): f32 scalar.

  A metric for the train step, no gradient. Ties go to the lowest j, so i wins a tie with
  any later column (every queue column comes after it). Each row of M is rescaled by a
  positive constant, which leaves its argmax unchanged; the queue columns are scanned in
  chunks of `_QUEUE_CHUNK` keeping only a running row max. Cost: one N×N×(N+K) matmul
  per image, so a train step may want it only on logging steps.

  Args: c, c_pos [B, N, D]; queue [K, D]; temperature τ > 0.
  """
  tau = _temperature('cycle_back_accuracy', temperature)
  c, c_pos = _maps('cycle_back_accuracy', 'c', c, c_pos)
  queue = _queue('cycle_back_accuracy', queue, c.shape[-1])
  c_hat = l2n(jax.lax.stop_gradient(c))
  c_pos_hat = l2n(jax.lax.stop_gradient(c_pos))

  def per_image(c_hat, c_pos_hat):
    n = c_hat.shape[0]
    log_p1, log_p2_t, r = _cycle_terms(c_hat, c_pos_hat, queue, tau)
    e1 = jnp.exp(log_p1 - jnp.max(log_p1, axis=1, keepdims=True))  # P1 rows × exp(−a_i)
    m_self = jnp.einsum('ij,kj->ik', e1, jnp.exp(log_p2_t), precision=_HIGHEST)  # [N, N]
    first = jnp.argmax(m_self, axis=1) == jnp.arange(n)

    def step(best, rows, valid):
      p2 = jnp.exp(_sim(c_pos_hat, rows, tau) - r[:, None])  # P2 queue block [j, k]
      m_q = jnp.einsum('ij,jk->ik', e1, p2, precision=_HIGHEST)
      return jnp.maximum(best, jnp.max(jnp.where(valid[None, :], m_q, -jnp.inf), axis=1))

    best_queue = _fold_queue(queue, jnp.full((n,), -jnp.inf, jnp.float32), step)
    return first & (jnp.diagonal(m_self) >= best_queue)

  return jnp.mean(jax.vmap(per_image)(c_hat, c_pos_hat).astype(jnp.float32))
