"""FIFO rings of negative keys, one per head (docs/method.md §4). Pure functions.

A queue is a float32 [K, D] array of unit vectors plus an int32 pointer to the oldest entry.
The train step shards the array along K over the mesh ('data'); these functions are
sharding-agnostic and jit-friendly. K is a multiple of the per-step enqueue count n, so a
write of n rows never wraps: the ring after any number of steps holds exactly the last K keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_size(size: int, per_step: int, name: str) -> None:
  if size and (per_step <= 0 or size % per_step):
    raise ValueError(f"queue.size={size} for the {name} queue must be a multiple of the per-step "
                     f"enqueue count {per_step}")


def init(key: jax.Array, size: int, dim: int) -> jax.Array:
  """Random unit vectors [K, D] (MoCo's initialisation)."""
  q = jax.random.normal(key, (size, dim), jnp.float32)
  return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes keys [n, D] at ptr (overwriting the oldest n) and advances ptr by n mod K."""
  size = queue.shape[0]
  if size == 0:
    return queue, ptr
  keys = keys.astype(queue.dtype)
  queue = jax.lax.dynamic_update_slice_in_dim(queue, keys, ptr, axis=0)
  return queue, (ptr + keys.shape[0]) % size


def ordered(queue: jax.Array, ptr: jax.Array) -> jax.Array:
  """The ring's rows oldest → newest (for tests and inspection)."""
  return jnp.roll(queue, -ptr, axis=0)
