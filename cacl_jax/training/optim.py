"""LARS with the docs/method.md §5 schedule: lr = base_lr · B / base_batch, optional warm-up, cosine to 0.

Short runs: a warm-up as long as the run or longer (`--config.total_steps=6` on a config with
`optim.warmup_steps=50`) shrinks with the run to WARMUP_FRACTION of it, so shortening any
config just works; `warmup_note` says so in one line, which the trainer prints once. A warm-up
shorter than the run is used as configured.
"""
from __future__ import annotations

import jax
import optax

WARMUP_FRACTION = 0.1


def decay_mask(params):
  """True for conv / dense kernels; biases and BN scale / bias (1-D) are excluded from weight
  decay and from the trust ratio (docs/method.md §5)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def warmup_steps(config) -> int:
  """The warm-up the schedule uses: optim.warmup_steps, or ⌊WARMUP_FRACTION · total_steps⌋
  when that is not shorter than the run."""
  warmup, total = int(config.optim.get("warmup_steps", 0)), int(config.total_steps)
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}")
  return warmup if warmup < total else int(WARMUP_FRACTION * total)


def warmup_note(config) -> str | None:
  """One line when the warm-up was shortened, else None."""
  configured, used = int(config.optim.get("warmup_steps", 0)), warmup_steps(config)
  if configured == used:
    return None
  return (f"optim.warmup_steps={configured} is not shorter than total_steps={config.total_steps}: "
          f"the warm-up is {used} steps ({WARMUP_FRACTION:.0%} of the run)")


def learning_rate_schedule(config) -> optax.Schedule:
  peak = config.optim.base_lr * config.batch_size / config.optim.base_batch
  warmup, total = warmup_steps(config), int(config.total_steps)
  if warmup:
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
  return optax.cosine_decay_schedule(peak, total, alpha=0.0)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(config)
  tx = optax.lars(schedule, weight_decay=config.optim.weight_decay, weight_decay_mask=decay_mask,
                  trust_coefficient=config.optim.trust_coefficient, trust_ratio_mask=decay_mask,
                  momentum=config.optim.momentum)
  return tx, schedule
