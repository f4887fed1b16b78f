"""Sums whose float order is fixed by the expression, not by XLA or the device mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_sum(x: jax.Array, axis: int = 0) -> jax.Array:
  """Σ along `axis`, added pairwise in index order: ((x0 + x1) + (x2 + x3)) + …, a zero joining
  the last entry of an odd level. Written as adds of whole slices, so its bits depend on the
  values and on n alone, never on how XLA:CPU would split a reduction (by the shape of the
  whole array) or the devices an all-reduce."""
  while x.shape[axis] > 1:
    if x.shape[axis] % 2:
      pad = [(0, 0)] * x.ndim
      pad[axis] = (0, 1)
      x = jnp.pad(x, pad)
    n = x.shape[axis]
    x = (jax.lax.slice_in_dim(x, 0, n, 2, axis) + jax.lax.slice_in_dim(x, 1, n, 2, axis))
  return jnp.squeeze(x, axis)


def tree_mean(x: jax.Array, axis: int = 0) -> jax.Array:
  """`tree_sum` / the number of entries."""
  return tree_sum(x, axis) / x.shape[axis]
