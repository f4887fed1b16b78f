"""Non-finite steps are skipped inside the jitted step, not after it (paxml `learners.py`,
MaxText `optimizers.py`).

A step whose total loss or global gradient norm is NaN or inf keeps the whole state it started
from (online and target parameters, both sets of BN statistics, the optimiser, the queues and
their pointers) while `step` and `rng` advance, so the next step reads the next batch with a
fresh key instead of replaying the one that blew up; `skipped_steps` counts such steps. The
loop (`train.py`) stops the run after `max_consecutive_skips` of them in a row.

Fault injection: `debug.nonfinite_steps=(K, ...)` multiplies the total loss of those steps by
NaN, so the loss *and* every gradient are NaN, as in a real blow-up. K counts steps as
metrics.jsonl does, from 1: step K is the one that starts from `state.step == K - 1`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax


def inject(total_loss: jax.Array, step: jax.Array, steps: Sequence[int]) -> jax.Array:
  """`total_loss` (float []), NaN at the steps in `steps` (1-based, as logged).

  step: int32 [], the state's counter before this step (`state.step`), so the logged step is
  step + 1. Call it on the loss inside the differentiated function: the NaN factor reaches the
  gradient too. With no steps (the default) the loss is returned untouched; elsewhere it is
  multiplied by exactly 1.0, which changes no bit.
  """
  if not steps:
    return total_loss
  hit = jnp.isin(step + 1, jnp.asarray(tuple(steps), jnp.int32))
  return total_loss * jnp.where(hit, jnp.nan, 1.0).astype(total_loss.dtype)


def is_finite(loss: jax.Array, grads: Any) -> jax.Array:
  """bool []: the loss and the global gradient norm are both finite (an inf or NaN anywhere in
  the gradient makes its norm non-finite)."""
  return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))


def keep_if_finite(old_state, new_state, loss: jax.Array, grads: Any):
  """`new_state` if `is_finite(loss, grads)`, else `old_state` with the new `step` and `rng`;
  `skipped_steps` is old + 1 on a skip and old otherwise.

  old_state / new_state: TrainStates of the same structure (before and after the step); loss:
  float [] (the total loss the gradient is of); grads: the parameter gradient tree. A
  `jnp.where` per leaf, so the choice happens on the devices without a host round trip.
  """
  ok = is_finite(loss, grads)
  kept = jax.tree.map(lambda old, new: jnp.where(ok, new, old), old_state, new_state)
  return kept.replace(step=new_state.step, rng=new_state.rng,
                      skipped_steps=old_state.skipped_steps + (~ok).astype(jnp.int32))


def step_metrics(old_state, new_state) -> dict[str, jax.Array]:
  """{'skipped': 1.0 if this step was skipped else 0.0, 'skipped_steps': the cumulative count}
  for the step's metrics, from the states before and after `keep_if_finite`."""
  return {"skipped": (new_state.skipped_steps - old_state.skipped_steps).astype(jnp.float32),
          "skipped_steps": new_state.skipped_steps.astype(jnp.float32)}
