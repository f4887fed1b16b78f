"""LARS with the SPEC §5 schedule: lr = base_lr · B / base_batch, optional warm-up, cosine to 0."""
from __future__ import annotations

import jax
import optax


def decay_mask(params):
  """True for conv / dense kernels; biases and BN scale / bias (1-D) are excluded from weight
  decay and from the trust ratio (SPEC §5)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(config) -> optax.Schedule:
  peak = config.optim.base_lr * config.batch_size / config.optim.base_batch
  warmup = int(config.optim.get("warmup_steps", 0))
  total = int(config.total_steps)
  if warmup >= total:
    raise ValueError(f"optim.warmup_steps={warmup} must be smaller than total_steps={total}")
  if warmup:
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
  return optax.cosine_decay_schedule(peak, total, alpha=0.0)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(config)
  tx = optax.lars(schedule, weight_decay=config.optim.weight_decay, weight_decay_mask=decay_mask,
                  trust_coefficient=config.optim.trust_coefficient, trust_ratio_mask=decay_mask,
                  momentum=config.optim.momentum)
  return tx, schedule
