"""How the negatives enter InfoNCE (eq. 1): plain, debiased, or with mixed hard negatives.

Two alternatives from the seeds' related work (seed 001), each a switch of `global_loss` and
`pixel_loss` (`loss.debiased_tau_plus`, `loss.mochi_global`, `loss.mochi_pixel`):

* Debiased contrast (Chuang et al., NeurIPS 2020, "Debiased Contrastive Learning", eq. 7 and
  their code's `Ng`): a drawn negative shares the anchor's class with prior τ⁺, so the mean of
  the N negative terms over-counts same-class pairs; the estimate of the true negatives' mean
    g = max( (1/N Σ_k e^{s_k} − τ⁺ e^{s_pos}) / (1 − τ⁺),  e^{−1/t} )
  (the floor is the smallest e^{cos/t}) replaces it, and L = −log e^{s_pos} / (e^{s_pos} + N g).
  τ⁺ = 0 is plain InfoNCE. Gradient flows through s_pos in both places, as in their code.
* Hard negative mixing, MoCHi (Kalantidis et al., NeurIPS 2020, "Hard Negative Mixing for
  Contrastive Learning", eqs. 3-4): for each query q, the N̄ negatives most similar to it are
  Q̃; s synthetic negatives h = l2n(α n_i + (1 − α) n_j), n_i, n_j ∈ Q̃, α ~ U(0, 1), and s'
  harder ones h' = l2n(β q + (1 − β) n_j), β ~ U(0, 0.5), join the denominator. As in the
  paper, no gradient flows through the synthetic points (q·h still trains q).

Everything is in log space (logsumexps) and float32, like `losses.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def debiased_negatives_lse(pos: jax.Array, neg_lse: jax.Array, count: int, tau_plus: float,
                           temperature: float) -> jax.Array:
  """log(N·g), the debiased log-sum of the negative terms (Chuang et al. 2020, eq. 7).

  Args: pos [...] positive logits s_pos = q·k/t; neg_lse [...] logsumexp of the N negative
    logits; count N; tau_plus τ⁺ ∈ [0, 1); temperature t (the floor is N·e^{−1/t}).
  Returns [...]: log max(N (mean_k e^{s_k} − τ⁺ e^{s_pos}) / (1 − τ⁺), N e^{−1/t}).
  """
  if not 0.0 <= tau_plus < 1.0:
    raise ValueError(f"debiased contrast: tau_plus must lie in [0, 1), got {tau_plus}")
  floor = jnp.log(float(count)) - 1.0 / temperature
  if tau_plus == 0.0:
    return jnp.maximum(neg_lse, floor)
  # log(Σ e^{s_k} − N τ⁺ e^{s_pos}), −inf where the difference is not positive.
  d = jnp.log(count * tau_plus) + pos - neg_lse
  safe = jnp.where(d < 0, d, -1.0)
  diff = jnp.where(d < 0, neg_lse + jnp.log1p(-jnp.exp(safe)), -jnp.inf)
  return jnp.maximum(diff - jnp.log1p(-tau_plus), floor)


def mixing_draws(key: jax.Array, rows: int, hardest: int, mixed: int, query_mixed: int
                 ) -> dict[str, jax.Array]:
  """MoCHi's random choices for `rows` queries: positions in each query's hardest-N̄ list and
  the mixing coefficients. {'i', 'j': int32 [rows, s], 'alpha': [rows, s] ~ U(0, 1),
  'jq': int32 [rows, s'], 'beta': [rows, s'] ~ U(0, 0.5)}."""
  k_i, k_j, k_a, k_jq, k_b = jax.random.split(key, 5)
  return {"i": jax.random.randint(k_i, (rows, mixed), 0, hardest),
          "j": jax.random.randint(k_j, (rows, mixed), 0, hardest),
          "alpha": jax.random.uniform(k_a, (rows, mixed)),
          "jq": jax.random.randint(k_jq, (rows, query_mixed), 0, hardest),
          "beta": jax.random.uniform(k_b, (rows, query_mixed), maxval=0.5)}


def hardest_negatives(q: jax.Array, queue: jax.Array, hardest: int) -> jax.Array:
  """Indices of the N̄ queue entries most similar to each query: int32 [R, N̄] (q [R, D]);
  no gradient."""
  sims = jnp.einsum("rd,kd->rk", jax.lax.stop_gradient(q), queue, precision=_HIGHEST)
  return jax.lax.top_k(sims, hardest)[1]


def mixed_logits(q: jax.Array, queue: jax.Array, top: jax.Array, draws: dict[str, jax.Array],
                 temperature: float) -> jax.Array:
  """q·h/τ for MoCHi's synthetic negatives (eqs. 3-4): [R, s + s'].

  h = l2n(α n_i + (1 − α) n_j) and h' = l2n(β q + (1 − β) n_j), with n = queue[top[r, ·]];
  h and h' are constants (stop-gradient), q is differentiated.
  """
  q_const = jax.lax.stop_gradient(q)
  take = lambda pos: queue[jnp.take_along_axis(top, pos, axis=1)]          # [R, ·, D]
  a, b = draws["alpha"][..., None], draws["beta"][..., None]
  h = jnp.concatenate([a * take(draws["i"]) + (1 - a) * take(draws["j"]),
                       b * q_const[:, None] + (1 - b) * take(draws["jq"])], axis=1)
  h = jax.lax.stop_gradient(h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, -1, keepdims=True), 1e-24)))
  return jnp.einsum("rd,rsd->rs", q, h, precision=_HIGHEST) / temperature


def mixed_negatives_lse(key: jax.Array, q: jax.Array, queue: jax.Array, temperature: float,
                        hardest: int, mixed: int, query_mixed: int) -> jax.Array:
  """logsumexp of q [..., D] (unit) against MoCHi's s + s' synthetic negatives → [...].

  key: fresh every step; queue [K, D] unit negatives; hardest N̄ (at most K), mixed s,
  query_mixed s'. The [..., K] similarities are formed once to pick each query's N̄ hardest.
  """
  k, d = queue.shape
  hardest = min(hardest, k)
  if hardest < 1 or mixed + query_mixed < 1:
    raise ValueError(f"MoCHi needs hardest >= 1 and mixed + query_mixed >= 1, got "
                     f"({hardest}, {mixed}, {query_mixed}) with a queue of {k}")
  flat = q.reshape(-1, d)
  draws = mixing_draws(key, flat.shape[0], hardest, mixed, query_mixed)
  logits = mixed_logits(flat, queue, hardest_negatives(flat, queue, hardest), draws, temperature)
  return jax.nn.logsumexp(logits, axis=-1).reshape(q.shape[:-1])
