"""PixPro's pixel-to-propagation consistency as the pixel head's loss (`loss.pixel_loss='pixpro'`).

Xie et al., CVPR 2021, "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised
Visual Representation Learning" (seed 001), adapted from two crops of one image to two frames:

* The pixel propagation module (eqs. 3-4) smooths the online map p of frame v:
    y_i = Σ_j s(p_i, p_j) · g(p_j),   s(p_i, p_j) = max(cos(p_i, p_j), 0)^γ   (γ = 2),
  with g a 1×1 linear layer (`model.ppm_transform`, PixPro's best; identity without it) whose
  output is L2-normalised, as in PixPro's code, and y L2-normalised before the loss.
* Positive pairs (eq. 1): PixPro pairs the pixels of two views whose centres, warped back to the
  image, lie within T = 0.7 of a feature cell's diagonal. Two frames have no known warp; their
  correspondence is the match the pixel head already uses, m(i) = argmax_j A_ij from the
  affinity of `loss.affinity`. Pixel j of v+ is a positive of i when its cell lies within
  T cell diagonals of m(i)'s cell: a *set* of positives around the correspondent, and no
  negatives at all, so pixels of one object are never pushed apart.
* The consistency loss (eq. 5, PixPro's `regression_loss`): per image the mean cosine over the
  positive pairs, L = −2 · mean_b [Σ_ij A_ij cos(y_i, p̂+_j) / Σ_ij A_ij]. PixPro sums it over
  both directions of its two views; CACL's step has one online frame (v) and one target frame
  (v+), so one direction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cacl_jax.method import losses

_HIGHEST = jax.lax.Precision.HIGHEST


def propagate(p: jax.Array, p_value: jax.Array, gamma: float = 2.0) -> jax.Array:
  """The pixel propagation module (PixPro eqs. 3-4): [B, N, D] x2 → unit y [B, N, D].

  p: the online pixel-head map; p_value: g(p) (= p when g is the identity).
  """
  x = losses.l2n(p.astype(jnp.float32))
  s = jnp.maximum(jnp.einsum("bid,bjd->bij", x, x, precision=_HIGHEST), 0.0) ** gamma
  v = losses.l2n(p_value.astype(jnp.float32))
  return losses.l2n(jnp.einsum("bij,bjd->bid", s, v, precision=_HIGHEST))


def positive_pairs(match: jax.Array, grid: tuple[int, int], threshold: float) -> jax.Array:
  """A [B, N, N] float32: A_ij = 1 iff cell j lies within `threshold` cell diagonals of cell
  m(i) (PixPro eq. 1, distances in units of a cell's diagonal). match: int [B, N] = m(i)."""
  h, w = grid
  yx = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij"), -1).reshape(-1, 2)
  yx = yx.astype(jnp.float32)
  centre = yx[match]                                                     # [B, N, 2]: m(i)'s cell
  dist = jnp.sqrt(jnp.sum(jnp.square(centre[:, :, None] - yx[None, None]), -1)) / jnp.sqrt(2.0)
  return (dist <= threshold).astype(jnp.float32)


def pixpro_loss(p, p_value, p_pos, u, u_pos, grid: tuple[int, int], threshold: float = 1.4,
                gamma: float = 2.0):
  """PixPro's pixel-to-propagation consistency between frames v and v+ (module docstring).

  Args:
    p: [B, N, D] online pixel-head map on v; p_value: g(p) [B, N, D].
    p_pos: [B, N, D] target pixel-head map on v+ (no gradient).
    u, u_pos: [B, N, D'] the maps that define the match m(i) (no gradient).
    grid: (h, w) with h·w = N, the feature grid of both frames.
    threshold: T in cell diagonals; gamma: the propagation's sharpness γ.
  Returns:
    float32 scalar in [−2, 2].
  """
  p, p_pos = losses._maps("pixpro_loss", "p", p, p_pos)   # pylint: disable=protected-access
  if grid[0] * grid[1] != p.shape[1]:
    raise ValueError(f"pixpro_loss: grid {grid} does not hold the map's {p.shape[1]} pixels")
  match = losses.global_match(u, u_pos)
  y = propagate(p, p_value, gamma)
  k = losses.l2n(jax.lax.stop_gradient(p_pos))
  cos = jnp.einsum("bid,bjd->bij", y, k, precision=_HIGHEST)
  pairs = jax.lax.stop_gradient(positive_pairs(match, grid, threshold))
  per_image = jnp.sum(cos * pairs, axis=(1, 2)) / (jnp.sum(pairs, axis=(1, 2)) + 1e-6)
  return -2.0 * jnp.mean(per_image)
