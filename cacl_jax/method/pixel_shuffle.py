"""Pixel shuffle (paper eq. 7, docs/method.md §2): per-image cyclic rolls that hide absolute position.

Each image b is rolled by its own (a_b, c_b), independent multiples of the output stride, so
that after the network the feature map can be rolled back *exactly* by (a_b/8, c_b/8): every
pixel gets the same chance to see the zero padding and position cannot leak into the heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

OUTPUT_STRIDE = 8
# 'independent': v and v+ each draw their own roll (docs/method.md §2); 'shared': one roll per pair
# (docs/method.md §6). Either "makes pixels at every position have the same chance to contact with zero
# paddings"; only 'shared' keeps a position code learnt from the padding consistent between
# the two frames.
ROLLS = ("independent", "shared")


def draw_rolls(key: jax.Array, batch: int, height: int, width: int,
               stride: int = OUTPUT_STRIDE) -> jax.Array:
  """int32 [B, 2]: (a, b) with a ∈ {0, s, 2s, …} < H and b likewise < W, drawn independently."""
  ka, kb = jax.random.split(key)
  a = jax.random.randint(ka, (batch,), 0, height // stride) * stride
  b = jax.random.randint(kb, (batch,), 0, width // stride) * stride
  return jnp.stack([a, b], axis=-1).astype(jnp.int32)


@jax.custom_vjp
def _roll2d(x: jax.Array, shift: jax.Array) -> jax.Array:
  """x: [H, W, ...] rolled by shift int32 [2] along (H, W).

  Its gradient is the inverse roll: the same values autodiff gives (a permutation), but as a
  gather instead of autodiff's scatter-add into a zeroed [2H, W, ...] buffer, which under the
  per-image vmap cost XLA:CPU ~9 % of the ¼-width step (benchmarks/profile_step.py)."""
  return jnp.roll(x, (shift[0], shift[1]), axis=(0, 1))


def _roll2d_fwd(x, shift):
  return _roll2d(x, shift), shift


def _roll2d_bwd(shift, g):
  return _roll2d(g, -shift), None


_roll2d.defvjp(_roll2d_fwd, _roll2d_bwd)


def roll_images(x: jax.Array, rolls: jax.Array) -> jax.Array:
  """x: [B, H, W, C]. Eq. 7: X'_{i,j} = X_{(i+a) mod H, (j+b) mod W}."""
  return jax.vmap(_roll2d)(x, -rolls)


def unroll_features(f: jax.Array, rolls: jax.Array, stride: int = OUTPUT_STRIDE) -> jax.Array:
  """f: [B, h, w, C] computed on rolled images → aligned with the unrolled images again."""
  return jax.vmap(_roll2d)(f, rolls // stride)
