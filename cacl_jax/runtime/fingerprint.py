"""A 64-bit fingerprint of a train state (metrics.jsonl's `state_hash`): which bits a run holds.

Two runs hold the same parameters, BN statistics, optimiser state and queues at a step iff
(up to a 2^-64 chance) their fingerprints agree, whatever the arrays' sharding: each leaf's
32-bit words are mixed with their flat position and summed in uint32, and integer addition
does not depend on the order XLA or the collectives add in. So two runs can be compared step by
step from their logs alone (README "Reliability"), without keeping their checkpoints.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _words(x: jax.Array) -> jax.Array:
  """The bits of x as uint32 [size] (2-byte and 1-byte types zero-extended)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
  """uint32 [2]: two position-weighted sums of the words (each wraps mod 2^32)."""
  w = _words(x)
  i = jnp.arange(w.size, dtype=jnp.uint32)
  m = (i * np.uint32(2654435761) + _GOLDEN) | np.uint32(1)
  rotated = (w << 13) | (w >> 19)
  return jnp.stack([jnp.sum(w * m, dtype=jnp.uint32),
                    jnp.sum((rotated ^ m) * np.uint32(0x85EBCA6B), dtype=jnp.uint32)])


@jax.jit
def _digests(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.stack([_leaf_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree) -> int:
  """64-bit unsigned fingerprint of a pytree of (global) arrays; every process of a multi-host
  run must call it (it is one jitted computation over the global arrays)."""
  digests = _digests(tree)   # replicated: a full reduction of every leaf
  words = np.asarray(digests.addressable_data(0), np.uint32)
  structure = str(jax.tree.structure(tree)).encode()
  digest = hashlib.blake2b(words.tobytes() + structure, digest_size=8).digest()
  return int.from_bytes(digest, "little")
