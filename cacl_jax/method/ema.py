"""The momentum (EMA) target network (docs/method.md §2; MoCo / BYOL). Pure functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def momentum_at(step: jax.Array, total_steps: int, base: float, cosine: bool) -> jax.Array:
  """m = base, or BYOL's cosine ramp m_k = 1 − (1 − base)·(cos(πk/K) + 1)/2 from base to 1."""
  if not cosine:
    return jnp.asarray(base, jnp.float32)
  frac = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def update(target, online, momentum: jax.Array):
  """θt ← m·θt + (1 − m)·θo, leaf by leaf. The target never receives gradients."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)
