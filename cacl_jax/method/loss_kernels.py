"""Memory-bounded kernels under the CACL losses (`losses.py`): nothing of size N×K is stored.

Three functions, each with a hand-written VJP that keeps only O(N·D) residuals and rebuilds
what it needs block by block (flash-attention style):

  queue_logsumexp(x, queue)   logsumexp_k x_i·Q_k over a queue streamed in row chunks (the
                              negatives of eqs. 3 and 4). The gradient of a logsumexp is the
                              softmax-weighted mean of the keys, x̄_i = Σ_k softmax_ik Q_k; the
                              forward rule accumulates it in the same pass as the logsumexp
                              (online rescaling), so training costs the two N×K×D matmuls that
                              plain autodiff costs, and memory holds one N×chunk block, not
                              the N×K logits.
  hard_cycle(a, b, q)         −log M_ii of eqs. 5-6 for one image, over row chunks of S1.
  soft_cycle(a, b, q, t)      Σ_j T_ij (log T_ij − log M_ij), j < N, for one image.

Notation of the cycle (one image; τ already folded into a):
  a = ĉ/τ [N, D] (online, differentiated), b = ĉ+ [N, D] (target, constant),
  S = a bᵀ [N, N] (= S1, and S2's first N columns transposed),
  A_i = logsumexp_k S_ik (log normaliser of P1's row i),
  C_k = logsumexp_i S_ik, r_k = logaddexp(C_k, q_k) (log normaliser of P2's row k, where
  q_k = logsumexp of ĉ+_k against the queue: a constant, from `queue_logsumexp`),
  log P1_ik = S_ik − A_i, log P2_kj = S_jk − r_k (j < N),
  log M_ij = logsumexp_k (log P1_ik + log P2_kj).
The cycle kernels are written for one image and batched with `jax.vmap` (see `losses.py`).
Rows are processed in chunks of `row_chunk`; the column reductions (C, and in the backward
pass Σ_i over rows) are carried across chunks, so the peak is a few row_chunk × N blocks
(plus, for the soft cycle, one N×N matrix: P2's first N columns).
Every matmul's inputs are float32 and it accumulates in float32; how the hardware multiplies
them is the `precision` argument of each kernel (`PRECISIONS`, the config's `loss.precision`):
true float32 by default, TF32 or bfloat16 passes on accelerators where their error was measured
(`benchmarks/loss_precision.py`).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# `loss.precision` → the dot algorithm of the losses' large products. 'float32' is true float32
# everywhere (on a TPU six bfloat16 passes); the others name one algorithm on every backend that
# has it: 'tf32' (NVIDIA tensor cores, 10-bit mantissas), 'bf16_3x' (three bfloat16 products,
# ≈ 16-bit mantissas: a TPU's HIGH), 'bf16' (one bfloat16 product: a TPU's DEFAULT).
PRECISIONS = ("float32", "tf32", "bf16_3x", "bf16")
_ALGORITHMS = {"tf32": "TF32_TF32_F32", "bf16_3x": "BF16_BF16_F32_X3", "bf16": "BF16_BF16_F32"}
_TINY = float(jnp.finfo(jnp.float32).tiny)
_UNROLL = False   # see `loops_unrolled`


@contextlib.contextmanager
def loops_unrolled():
  """Traces the chunk loops unrolled, for counting flops only (benchmarks/mfu.py).

  XLA's cost analysis counts a loop body once, whatever its trip count. Unrolled, the count is
  exact, but XLA then keeps every chunk's block alive at once (12x the memory of the pixel
  loss at the paper's size), so training never runs this way. Trace a fresh function inside.
  """
  global _UNROLL
  _UNROLL = True
  try:
    yield
  finally:
    _UNROLL = False


def _round_mantissa(x, bits):
  """float32 x rounded to `bits` explicit mantissa bits, to nearest (ties to even)."""
  w = jax.lax.bitcast_convert_type(x, jnp.uint32)
  drop = 23 - bits
  w = w + ((jnp.uint32(1) << (drop - 1)) - 1) + ((w >> drop) & 1)
  return jax.lax.bitcast_convert_type(w & ~((jnp.uint32(1) << drop) - 1), jnp.float32)


def _emulated_pairs(name, a, b):
  """The float32 operand pairs whose true-float32 products sum to the emulated product:
  TF32 or bfloat16 rounding of both, or bf16_3x's hi·hi + hi·lo + lo·hi (x = hi + lo)."""
  if name == "tf32":
    return [(_round_mantissa(a, 10), _round_mantissa(b, 10))]
  bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  a_hi, b_hi = bf16(a), bf16(b)
  if name == "bf16":
    return [(a_hi, b_hi)]
  return [(a_hi, b_hi), (a_hi, bf16(b - b_hi)), (bf16(a - a_hi), b_hi)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _emulated(spec, name, a, b):
  products = [jnp.einsum(spec, x, y, precision=_HIGHEST) for x, y in _emulated_pairs(name, a, b)]
  return sum(products[1:], 0.0) + products[0]   # the small terms first


def _emulated_fwd(spec, name, a, b):
  return _emulated(spec, name, a, b), (a, b)


def _emulated_bwd(spec, name, residuals, g):
  """The backward products as the hardware computes them: each is itself an emulated product,
  of the cotangent with the other operand (both rounded)."""
  a, b = residuals
  product = lambda x, y: jnp.einsum(spec, x, y, precision=_HIGHEST)
  grad_a = sum(jax.vjp(lambda x: product(x, y), a)[1](gx)[0] for gx, y in _emulated_pairs(name, g, b))
  grad_b = sum(jax.vjp(lambda y: product(x, y), b)[1](gy)[0] for x, gy in _emulated_pairs(name, a, g))
  return grad_a, grad_b


_emulated.defvjp(_emulated_fwd, _emulated_bwd)


def einsum(spec, a, b, precision="float32"):
  """jnp.einsum of two float32 operands at `precision` (`PRECISIONS`), accumulating in float32.

  'emulated_<name>' computes the same rounding on any backend, a CPU included, forward and
  backward: operands rounded to TF32 (10 mantissa bits) or bfloat16 (7), or for 'bf16_3x' the
  three products of the split x = hi + lo (hi·hi + hi·lo + lo·hi), each backward product of the
  cotangent with the other operand rounded the same way — so that the losses' error at each
  precision can be measured against a float64 reference where the hardware is absent
  (`benchmarks/loss_precision.py`).
  """
  if precision == "float32":
    return jnp.einsum(spec, a, b, precision=_HIGHEST)
  if precision in _ALGORITHMS:
    return jnp.einsum(spec, a, b, precision=_ALGORITHMS[precision],
                      preferred_element_type=jnp.float32)
  name = precision.removeprefix("emulated_")
  if not precision.startswith("emulated_") or name not in _ALGORITHMS:
    raise ValueError(f"loss.precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
  return _emulated(spec, name, a, b)


def _dot(a, b, precision="float32"):
  """a [..., D] · b [M, D] → [..., M], float32 at `precision`."""
  return einsum('...d,md->...m', a, b, precision)


def _plan(rows, size):
  """(n chunks, rows per chunk) for `rows` rows in chunks of at most `size`: the same number of
  chunks as `size` gives, with as little padding as possible."""
  size = max(1, min(size, rows))
  n = -(-rows // size)
  return n, -(-rows // n)


def _pad_rows(x, rows):
  """x [R, ...] zero-padded to `rows` rows; no copy when R already is."""
  if x.shape[0] == rows:
    return x
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _chunked(x, size):
  """Rows of x [R, ...] → ([n, size, ...] zero-padded, valid [n, size] or None, n), size ≤ R.

  `valid` is None when no row is padding (then nothing needs masking)."""
  rows = x.shape[0]
  n, size = _plan(rows, size)
  valid = None
  if n * size != rows:
    x = _pad_rows(x, n * size)
    valid = (jnp.arange(n * size) < rows).reshape(n, size)
  return x.reshape((n, size) + x.shape[1:]), valid, n


def _lse_parts(logits):
  """(max m, exp(logits − m), logsumexp) along the last axis, one exp pass. Every row has a
  finite entry here (a chunk always holds at least one real row), so m is finite."""
  m = jnp.max(logits, axis=-1)
  e = jnp.exp(logits - m[..., None])
  return m, e, m + jnp.log(jnp.sum(e, axis=-1))


def _scan(body, carry, xs, n):
  """lax.scan, or one plain call when there is one chunk (no loop in the HLO)."""
  if n == 1:
    carry, out = body(carry, jax.tree.map(lambda t: t[0], xs))
    return carry, jax.tree.map(lambda t: t[None], out)
  return jax.lax.scan(body, carry, xs, unroll=True if _UNROLL else 1)


def _unchunk(y, rows):
  """[n, size, ...] → [rows, ...] (drops the padding)."""
  return y.reshape((-1,) + y.shape[2:])[:rows]


# ----------------------------------------------------------------------------------------
# Streaming logsumexp over a queue (eqs. 3, 4).
# ----------------------------------------------------------------------------------------


def _stream(x, queue, chunk, with_mean, precision):
  """(logsumexp_k x·Q_k [...], softmax-weighted mean of Q [..., D] or None)."""
  rows, valid, n = _chunked(queue, chunk)
  lead = x.shape[:-1]

  def body(carry, block):
    lse, mean = carry
    keys, ok = block
    logits = _dot(x, keys, precision)                     # [..., chunk]
    if ok is not None:
      logits = jnp.where(ok, logits, -jnp.inf)
    m, e, block_lse = _lse_parts(logits)
    new = jnp.logaddexp(lse, block_lse)
    if with_mean:
      # This block's softmax-weighted mean, merged with the running one by their weights
      # (the exponent of (block_lse − new) absorbs this block's exp(m) normaliser).
      block_sum = einsum('...c,cd->...d', e, keys, precision)
      mean = mean * jnp.exp(lse - new)[..., None] + block_sum * jnp.exp(m - new)[..., None]
    return (new, mean), None

  init = (jnp.full(lead, -jnp.inf, jnp.float32),
          jnp.zeros(x.shape, jnp.float32) if with_mean else None)
  (lse, mean), _ = _scan(body, init, (rows, valid), n)
  return lse, mean


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _queue_lse(x, queue, chunk, precision):
  return _stream(x, queue, chunk, False, precision)[0]


def _queue_lse_fwd(x, queue, chunk, precision):
  lse, mean = _stream(x, queue, chunk, True, precision)
  return lse, (mean, queue)


def _queue_lse_bwd(chunk, precision, residuals, g):
  del chunk, precision
  mean, queue = residuals
  # d/dx_i logsumexp_k x_i·Q_k = Σ_k softmax_ik Q_k. The queue is a buffer: no gradient.
  return g[..., None] * mean, jnp.zeros_like(queue)


_queue_lse.defvjp(_queue_lse_fwd, _queue_lse_bwd)


def queue_logsumexp(x, queue, chunk, precision="float32"):
  """logsumexp_k x_i·Q_k: x [..., D], queue [K, D] → [...] float32 (−inf where K = 0).

  Streams the queue in chunks of `chunk` rows; differentiable in x only (the queue gets a
  zero cotangent). The last chunk is zero-padded and masked. `precision`: of the x·Q products
  and the softmax-weighted mean (`einsum`).
  """
  x = x.astype(jnp.float32)
  if queue.shape[0] == 0:
    return jnp.full(x.shape[:-1], -jnp.inf, jnp.float32)
  return _queue_lse(x, queue.astype(jnp.float32), int(chunk), precision)


# ----------------------------------------------------------------------------------------
# The cycle, one image (eqs. 5-6).
# ----------------------------------------------------------------------------------------


def _normalisers(a, b, row_chunk, precision):
  """One pass over row chunks of S: A [N] (row logsumexp) and C [N] (column logsumexp)."""
  n_rows = a.shape[0]
  rows, valid, n = _chunked(a, row_chunk)

  def body(col, block):
    a_blk, ok = block
    s = _dot(a_blk, b, precision)                                    # [R, N]
    s_real = s if ok is None else jnp.where(ok[:, None], s, -jnp.inf)   # padded rows: no column
    col = jnp.logaddexp(col, jax.nn.logsumexp(s_real, axis=0))
    return col, jax.nn.logsumexp(s, axis=1)

  col, row = _scan(body, jnp.full(b.shape[:1], -jnp.inf, jnp.float32), (rows, valid), n)
  return _unchunk(row, n_rows), col


def _hard_rows(a, b, r, row_chunk, precision):
  """L_i = logsumexp_j (2 S_ij − r_j) for every row i: [N]."""
  rows, valid, n = _chunked(a, row_chunk)
  _, out = _scan(lambda c, blk: (c, jax.nn.logsumexp(2.0 * _dot(blk[0], b, precision) - r, axis=1)),
                 None, (rows, valid), n)
  return _unchunk(out, a.shape[0])


def _hard_forward(a, b, q, row_chunk, precision):
  big_a, col = _normalisers(a, b, row_chunk, precision)
  r = jnp.logaddexp(col, q)
  # log M_ii = logsumexp_j (log P1_ij + log P2_ji) = logsumexp_j (2 S_ij − r_j) − A_i.
  big_l = _hard_rows(a, b, r, row_chunk, precision)
  return big_a - big_l, (big_a, r, big_l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _hard(a, b, q, row_chunk, precision):
  return _hard_forward(a, b, q, row_chunk, precision)[0]


def _hard_fwd(a, b, q, row_chunk, precision):
  loss, (big_a, r, big_l) = _hard_forward(a, b, q, row_chunk, precision)
  return loss, (a, b, q, big_a, r, big_l)


def _hard_bwd(row_chunk, precision, residuals, g):
  """Gradient in a only. With W_ij = exp(2 S_ij − r_j − L_i) (rows sum to 1) and
  ω_j = Σ_i g_i W_ij, the loss Σ_i g_i (A_i − L_i) has
    ∂/∂S_ij = g_i P1_ij − 2 g_i W_ij + ω_j exp(S_ij − r_j),
  the last term through r_j = logaddexp(C_j, q_j), C_j = logsumexp_i S_ij. Two passes over
  row chunks: ω first, then ∂S and ∂a = ∂S b."""
  a, b, q, big_a, r, big_l = residuals
  n_rows = a.shape[0]
  rows, valid, n = _chunked(a, row_chunk)
  g_rows, _, _ = _chunked(g, row_chunk)          # zero on padded rows: they contribute nothing
  l_rows, _, _ = _chunked(big_l, row_chunk)
  a_rows, _, _ = _chunked(big_a, row_chunk)

  def omega_body(omega, blk):
    a_blk, g_blk, l_blk = blk
    w = jnp.exp(2.0 * _dot(a_blk, b, precision) - r - l_blk[:, None])
    return omega + jnp.einsum('i,ij->j', g_blk, w, precision=_HIGHEST), None

  omega, _ = _scan(omega_body, jnp.zeros(b.shape[:1], jnp.float32), (rows, g_rows, l_rows), n)

  def grad_body(c, blk):
    a_blk, g_blk, l_blk, big_a_blk = blk
    s = _dot(a_blk, b, precision)
    ds = (g_blk[:, None] * (jnp.exp(s - big_a_blk[:, None]) - 2.0 * jnp.exp(2.0 * s - r - l_blk[:, None]))
          + omega * jnp.exp(s - r))
    return c, einsum('ij,jd->id', ds, b, precision)

  _, da = _scan(grad_body, None, (rows, g_rows, l_rows, a_rows), n)
  del valid
  return _unchunk(da, n_rows), jnp.zeros_like(b), jnp.zeros_like(q)


_hard.defvjp(_hard_fwd, _hard_bwd)


def hard_cycle(a, b, q, row_chunk, precision="float32"):
  """−log M_ii for one image: a = ĉ/τ [N, D], b = ĉ+ [N, D], q [N] → [N] (module docstring).

  Differentiable in a only; b and q are constants (target network, queue). `precision`: of
  the products with b (`einsum`)."""
  return _hard(a.astype(jnp.float32), b.astype(jnp.float32), q.astype(jnp.float32), int(row_chunk),
               precision)


def _block(x, i, size, axis=0):
  """Chunk i of x along `axis`, sliced in place. The soft cycle indexes its N×N arrays this
  way instead of scanning over a [n, size, N] stack: under `jax.vmap` a stack puts the batch
  after the chunk axis, and XLA copies the whole array to transpose it."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _p2_first_n(a, b, r, row_chunk, precision):
  """Ṽ_jk = exp(S_jk − r_k − β_j) = P2_kj·exp(−β_j), β_j = max_k (S_jk − r_k).

  Returns Ṽ [n·size, N] (rows past N are zero) and β [N]. The first N columns of P2,
  transposed and shifted by their column max so that the product P1 P2 never underflows to
  0 for τ ≳ 0.05 (each factor's largest term is 1). Written chunk by chunk into one buffer."""
  rows = a.shape[0]
  n, size = _plan(rows, row_chunk)
  a_p = _pad_rows(a, n * size)

  def block(i):
    l2 = _dot(_block(a_p, i, size), b, precision) - r
    beta = jnp.max(l2, axis=1)
    v_blk = jnp.exp(l2 - beta[:, None])
    if n * size != rows:   # zero the padded rows
      v_blk = jnp.where(((i * size + jnp.arange(size)) < rows)[:, None], v_blk, 0.0)
    return v_blk, beta

  if n == 1:
    return block(0)

  def body(v, i):
    v_blk, beta = block(i)
    return jax.lax.dynamic_update_slice_in_dim(v, v_blk, i * size, axis=0), beta

  v, beta = _scan(body, jnp.zeros((n * size, rows), jnp.float32), jnp.arange(n), n)
  return v, _unchunk(beta, rows)


def _soft_block(a_blk, b, big_a_blk, v, beta, precision):
  """For a row chunk: P̃ = exp(S − max_k S) [R, N], M̃ = P̃ Ṽᵀ [R, N], log M [R, N]."""
  s = _dot(a_blk, b, precision)
  n = s.shape[1]
  smax = jnp.max(s, axis=1, keepdims=True)
  p1_shift = jnp.exp(s - smax)
  m_shift = einsum('ik,jk->ij', p1_shift, v, precision)[:, :n]
  # log M_ij = (max_k S_ik − A_i) + β_j + log M̃_ij; the floor only guards τ < 0.05.
  log_m = smax - big_a_blk[:, None] + beta + jnp.log(jnp.maximum(m_shift, _TINY))
  return s, p1_shift, m_shift, log_m


def _row_blocks(row_chunk, *xs):
  """(n, size, i → the rows of chunk i of each x): per-row inputs [N, ...], padded once and
  sliced in place. Padded rows of g and T are 0, so they add nothing to the loss or gradient."""
  n, size = _plan(xs[0].shape[0], row_chunk)
  padded = [_pad_rows(x, n * size) for x in xs]
  return n, size, lambda i: [_block(x, i, size) for x in padded]


def _soft_forward(a, b, q, t, row_chunk, precision):
  big_a, col = _normalisers(a, b, row_chunk, precision)
  r = jnp.logaddexp(col, q)
  v, beta = _p2_first_n(a, b, r, row_chunk, precision)
  n, _, chunk = _row_blocks(row_chunk, a, t, big_a)

  def body(c, i):
    a_blk, t_blk, big_a_blk = chunk(i)
    log_m = _soft_block(a_blk, b, big_a_blk, v, beta, precision)[3]
    # T log T with 0 log 0 = 0; T is a constant, so this only offsets the value to a KL.
    t_log_t = jnp.where(t_blk > 0, t_blk * jnp.log(jnp.where(t_blk > 0, t_blk, 1.0)), 0.0)
    return c, jnp.sum(t_log_t - t_blk * log_m, axis=1)

  _, out = _scan(body, None, jnp.arange(n), n)
  return _unchunk(out, a.shape[0]), (big_a, col, r, v, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _soft(a, b, q, t, row_chunk, precision):
  return _soft_forward(a, b, q, t, row_chunk, precision)[0]


def _soft_fwd(a, b, q, t, row_chunk, precision):
  loss, (big_a, col, r, v, beta) = _soft_forward(a, b, q, t, row_chunk, precision)
  return loss, (a, b, q, t, big_a, col, r, v, beta)


def _soft_bwd(row_chunk, precision, residuals, g):
  """Gradient in a only, for Σ_i g_i Σ_j T_ij (log T_ij − log M_ij).

  With ∂M̃ = −g_i T_ij / M̃_ij (0 where the floor is active):
    log P1 side:  e = P̃ ⊙ (∂M̃ Ṽ),      ∂S += e − P1 · rowsum(e)       (softmax over k)
    log P2 side:  f = Ṽ ⊙ (∂M̃ᵀ P̃),     ∂S += f,  ∂r = −colsum(f)
    r's column logsumexp:  ∂C = ∂r·exp(C − r),  ∂S += ∂C · exp(S − C)
  then ∂a = ∂S b. f is linear in ∂M̃, so each row chunk i of ∂M̃ adds its share of f, block
  by block over chunks j of Ṽ's rows: nothing N×N but Ṽ itself is held (no ∂Ṽ). Two passes:
  row chunks for both sides (an inner loop over j for f), then row chunks for C."""
  a, b, q, t, big_a, col, r, v, beta = residuals
  rows = a.shape[0]
  n, size, chunk = _row_blocks(row_chunk, a, g, t, big_a)

  def row_body(carry, i):
    dr, da2 = carry
    a_blk, g_blk, t_blk, big_a_blk = chunk(i)
    s, p1_shift, m_shift, _ = _soft_block(a_blk, b, big_a_blk, v, beta, precision)
    dm = jnp.where(m_shift > _TINY, -g_blk[:, None] * t_blk / jnp.maximum(m_shift, _TINY), 0.0)
    dm = _pad_rows(dm.T, n * size).T                                   # [R, n·size]
    e = p1_shift * einsum('ij,jk->ik', dm, v, precision)
    ds = e - jnp.exp(s - big_a_blk[:, None]) * jnp.sum(e, axis=1, keepdims=True)

    def f_body(dr, j):   # this row chunk's share of the P2 side, for Ṽ's rows in chunk j
      dm_j = _block(dm, j, size, axis=1)                               # [R, size]
      f = _block(v, j, size) * einsum('ij,ik->jk', dm_j, p1_shift, precision)
      return dr - jnp.sum(f, axis=0), einsum('jk,kd->jd', f, b, precision)

    dr, da2_blk = _scan(f_body, dr, jnp.arange(n), n)
    return (dr, da2 + _unchunk(da2_blk, rows)), einsum('ik,kd->id', ds, b, precision)

  (dr, da2), da1 = _scan(row_body, (jnp.zeros_like(r), jnp.zeros_like(a)), jnp.arange(n), n)
  dcol = dr * jnp.exp(col - r)
  rows_a, _, _ = _chunked(a, row_chunk)

  def col_body(c, a_blk):
    return c, einsum('ik,kd->id', dcol * jnp.exp(_dot(a_blk, b, precision) - col), b, precision)

  _, da3 = _scan(col_body, None, rows_a, n)
  da = _unchunk(da1, rows) + da2 + _unchunk(da3, rows)
  return da, jnp.zeros_like(b), jnp.zeros_like(q), jnp.zeros_like(t)


_soft.defvjp(_soft_fwd, _soft_bwd)


def soft_cycle(a, b, q, t, row_chunk, precision="float32"):
  """Σ_{j<N} T_ij (log T_ij − log M_ij) for one image: a = ĉ/τ, b = ĉ+ [N, D], q [N],
  t [N, N] → [N]. Differentiable in a only (b, q and the target T are constants).
  `precision`: of the N×N products (`einsum`)."""
  f32 = lambda x: x.astype(jnp.float32)
  return _soft(f32(a), f32(b), f32(q), f32(t), int(row_chunk), precision)
