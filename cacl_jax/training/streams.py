"""The train step's random streams: one key per purpose, all from the state's key.

Every draw of a step comes from `step_keys(rng)[PURPOSE]`: the state's key is split once into
the next step's key and this step's key, and this step's key once into one key per purpose
(a single `split`, never `fold_in(k, i)` beside `split(k)`: with JAX's partitionable threefry,
on in the pinned JAX, `split(k)[i] == fold_in(k, i)`, and MoCHi's draws once reused the cycle
queue's pixel picks that way). A new purpose goes at the end of `PURPOSES` so that the streams
before it keep their keys.

The draws are for the *global* batch, so they are the same on any number of devices.
"""
from __future__ import annotations

import jax

PURPOSES = (
    "augment",          # photometric augmentation of v (per image, `augment.photometric`)
    "augment_pos",      # ... of v+ (independent of v's)
    "roll",             # pixel-shuffle rolls of v (eq. 7)
    "roll_pos",         # ... of v+ (unused with `model.shuffle_rolls='shared'`)
    "shuffle_bn",       # the target's BN-group permutation (shuffle-BN)
    "enqueue_pixel",    # which pixels of p̂+ enter Q_P
    "enqueue_cycle",    # which pixels of ĉ+ enter Q_C
    "mochi_global",     # MoCHi's mixing for L_G (`loss.mochi_global`)
    "mochi_pixel",      # MoCHi's mixing for L_P (`loss.mochi_pixel`)
)


def step_keys(rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """rng: the state's raw key data (uint32 [2]) → (the next step's key data, {purpose: key})."""
  carry, step = jax.random.split(jax.random.wrap_key_data(rng))
  return jax.random.key_data(carry), dict(zip(PURPOSES, jax.random.split(step, len(PURPOSES))))
