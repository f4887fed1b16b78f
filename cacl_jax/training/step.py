"""The CACL train state and the one jitted, sharded train step (docs/method.md §2–§5).

One step, in order (MoCo-v2 order; the EMA of step t−1 is the target of step t):
  1. device-side photometric augmentation of v and v+ (independent per image and frame);
  2. target on v+ — pixel shuffle, forward with the EMA parameters and BN in training mode
     over shuffle-BN's permuted groups (its own running statistics move), roll back;
     stop-gradient: the target gets no gradient;
  3. online on v — pixel shuffle, forward, roll back; the three losses against the queues;
  4. LARS update of the online parameters; EMA of the target parameters;
  5. enqueue k, and `queue.pixels_per_image` random pixels of p̂+ / ĉ+ per image;
  6. if the loss or the global gradient norm is not finite, keep the state of before the step
     (only the step counter and the key advance, `nonfinite.py`).

All randomness is drawn from the state's key for the *global* batch, one key per purpose
(`streams.py`), and BN statistics are taken over fixed sample groups (`model.bn_group_size`), so
the step computes the same numbers on any number of devices up to float reduction order:
sharding only decides where the work runs. It is one program on every platform: one
value_and_grad over the batch, XLA's reductions and all-reduce; a platform may change a
precision (`loss.precision`) or a compiler setting (`xla_cpu.py`), never the program.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cacl_jax.method import ema, losses, pixel_shuffle, pixpro, queue
from cacl_jax.data import augment
from cacl_jax.models.resnet import DTYPES, PADDINGS
from cacl_jax.training import nonfinite, streams, xla_cpu
# The state's constructors are the step's: callers (and the outside checks, which find
# `jit_train_step` by name) build the step's state from this one module.
from cacl_jax.training.state import HEADS, TrainState, create_state, init_state, state_shardings  # noqa: F401
from cacl_jax.runtime.parallel import DATA

# Where GAP sits for L_G (docs/method.md §6): 'after_head' q = l2n(mean_i g_G(h)_i); 'before_head'
# q = l2n(g_G(mean_i h_i)), MoCo-v2's order. u = g_G(h) per pixel defines A and T either way.
GLOBAL_POOLS = ("after_head", "before_head")
# Which map defines the affinity A (eq. 4's match) and the soft cycle target: the global head's
# u (the paper: "we adopt global head's features") or, not the paper, the backbone map h
# (DenseCL's choice) — a diagnostic reading that locates where the paper's reading fails.
AFFINITIES = ("global_head", "backbone")
# The pixel head's loss: eq. 4's contrast, or (not the paper) PixPro's pixel-to-propagation
# consistency with a positive set around m(i) (`pixpro.py`).
PIXEL_LOSSES = ("contrast", "pixpro")


def affinity_maps(out: dict[str, jax.Array], out_pos: dict[str, jax.Array], config):
  """(map on v, map on v+) [B, N, ·] that define A and T (`loss.affinity`); no gradient."""
  key = "h" if config.loss.affinity == "backbone" else "u"
  return (jax.lax.stop_gradient(_flat(out[key])), jax.lax.stop_gradient(_flat(out_pos[key])))




def enqueue_counts(config) -> dict[str, int]:
  """Rows each queue receives per step: B for Q_G, B·pixels_per_image for Q_P and Q_C."""
  b, ppi = config.batch_size, config.queue.pixels_per_image
  return {"global": b, "pixel": b * ppi, "cycle": b * ppi}


def check_config(config) -> None:
  for head, n in enqueue_counts(config).items():
    queue.check_size(config.queue.size, n, head)
  size = config.data.image_size
  if size % pixel_shuffle.OUTPUT_STRIDE:
    raise ValueError(f"data.image_size={size} must be a multiple of the output stride 8")
  if config.model.get("bn_mode", "group") == "group" and config.batch_size % config.model.bn_group_size:
    raise ValueError(f"model.bn_group_size={config.model.bn_group_size} must divide "
                     f"batch_size={config.batch_size}")
  choices = {"loss.pixel_match": ("global", "same_position"),
             "loss.pixel_negatives": losses.PIXEL_NEGATIVES,
             "loss.soft_target": losses.SOFT_TARGETS,
             "loss.global_pool": GLOBAL_POOLS,
             "loss.affinity": AFFINITIES,
             "loss.pixel_loss": PIXEL_LOSSES,
             "model.shuffle_rolls": pixel_shuffle.ROLLS,
             "model.padding": PADDINGS,
             "model.dtype": DTYPES}
  for dotted, allowed in choices.items():
    section, key = dotted.split(".")
    if config[section].get(key, allowed[0]) not in allowed:
      raise ValueError(f"{dotted} must be one of {', '.join(map(repr, allowed))}, "
                       f"got {config[section][key]!r}")
  losses.loss_precision(config.loss.get("precision", "auto"), "cpu")   # a known name
  if not 0.0 <= config.loss.soft_target_identity <= 1.0:
    raise ValueError(f"loss.soft_target_identity must lie in [0, 1], got {config.loss.soft_target_identity}")
  if not 0.0 <= config.loss.get("debiased_tau_plus", 0.0) < 1.0:
    raise ValueError(f"loss.debiased_tau_plus must lie in [0, 1), got {config.loss.debiased_tau_plus}")
  for head in ("global", "pixel"):
    mochi = tuple(config.loss.get(f"mochi_{head}", (0, 0, 0)))
    if any(mochi) and (len(mochi) != 3 or mochi[0] < 1 or mochi[1] + mochi[2] < 1 or min(mochi) < 0):
      raise ValueError(f"loss.mochi_{head} must be (hardest >= 1, mixed, query_mixed) with "
                       f"mixed + query_mixed >= 1, or (0, 0, 0), got {mochi}")
  if not any(config.loss.weights[h] for h in HEADS):
    raise ValueError("loss.weights: at least one head needs a non-zero weight")




def _flat(x: jax.Array) -> jax.Array:
  """[B, h, w, D] → [B, N, D]."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


def forward(model: nn.Module, params, batch_stats, x: jax.Array, rolls: jax.Array | None,
            perm: jax.Array | None) -> tuple[dict[str, jax.Array], Any]:
  """One network pass in training mode with pixel shuffle and (optionally) shuffle-BN.

  x: float [B, H, W, 3]; rolls: int32 [B, 2] or None; perm: int32 [B] or None.
  Returns the maps {'h','u','p','c'} aligned with x, and the updated BN statistics.

  Shuffle-BN normalises each sample with the statistics of its group in x[perm], but x itself
  is never permuted: on a mesh, x[perm] would gather the whole global image batch onto every
  device, which would then run the network on all of it. Only the groups' BN sums move
  (`resnet.GroupBatchNorm`); the numbers are those of permuting the samples.
  """
  if rolls is not None:
    x = pixel_shuffle.roll_images(x, rolls)
  out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                             perm=perm, mutable=["batch_stats"])
  if rolls is not None:
    out = {k: pixel_shuffle.unroll_features(v, rolls) for k, v in out.items()}
  return out, mutated["batch_stats"]


def global_map(out: dict[str, jax.Array], config) -> jax.Array:
  """The map L_G pools: u [B, N, D] ('after_head') or g_G(GAP(h)) [B, 1, D] ('before_head')."""
  return _flat(out["u_gap"] if config.loss.global_pool == "before_head" else out["u"])


def cacl_losses(out: dict[str, jax.Array], out_pos: dict[str, jax.Array], queues, config,
                keys: dict[str, jax.Array] | None = None, platform: str | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = w_G·L_G + w_P·L_P + w_C·L_C (docs/method.md §3, the §9 readings and the seeds' alternatives
  per config). A head with weight 0 is not computed. `keys`: the step's streams
  (`streams.step_keys`), of which MoCHi's mixing (if on) draws 'mochi_global' and 'mochi_pixel';
  `platform` resolves `loss.precision='auto'` (default: JAX's default backend)."""
  p, c = (_flat(out[k]) for k in "pc")
  p_pos, c_pos = (jax.lax.stop_gradient(_flat(out_pos[k])) for k in "pc")
  w, tau = config.loss.weights, config.loss.temperature
  tau_plus = config.loss.get("debiased_tau_plus", 0.0)
  k_global, k_pixel = (keys["mochi_global"], keys["mochi_pixel"]) if keys else (None, None)
  precision = losses.loss_precision(config.loss.get("precision", "auto"),
                                    platform or jax.default_backend())
  zero = jnp.zeros((), jnp.float32)
  terms = {h: zero for h in HEADS}
  if w["global"]:
    terms["global"] = losses.global_loss(global_map(out, config),
                                         jax.lax.stop_gradient(global_map(out_pos, config)),
                                         queues["global"], tau["global"], tau_plus=tau_plus,
                                         mochi=config.loss.get("mochi_global"), key=k_global,
                                         precision=precision)
  a, a_pos = affinity_maps(out, out_pos, config)
  if w["pixel"] and config.loss.get("pixel_loss", "contrast") == "pixpro":
    terms["pixel"] = pixpro.pixpro_loss(p, _flat(out.get("p_value", out["p"])), p_pos, a, a_pos,
                                        out["p"].shape[1:3], config.loss.pixpro.threshold,
                                        config.loss.pixpro.gamma)
  elif w["pixel"]:
    terms["pixel"] = losses.pixel_loss(p, p_pos, a, a_pos, queues["pixel"], tau["pixel"],
                                       match=config.loss.pixel_match,
                                       negatives=config.loss.pixel_negatives, tau_plus=tau_plus,
                                       mochi=config.loss.get("mochi_pixel"), key=k_pixel,
                                       precision=precision)
  if w["cycle"]:
    q_c = queues["cycle"] if config.loss.cycle_negatives else queues["cycle"][:0]
    soft = (losses.soft_cycle_target(a, a_pos, tau["cycle"], mode=config.loss.soft_target,
                                     identity_mix=config.loss.soft_target_identity)
            if config.loss.soft_cycle else None)
    terms["cycle"] = losses.cycle_loss(c, c_pos, q_c, tau["cycle"], soft_target=soft,
                                       precision=precision)
  total = sum(w[h] * terms[h] for h in HEADS)
  return total, {f"loss_{h}": terms[h] for h in HEADS}


def _pick_pixels(key: jax.Array, x: jax.Array, count: int) -> jax.Array:
  """count random pixels per image of x [B, N, D] → [B·count, D] (image-major order)."""
  idx = jax.random.randint(key, (x.shape[0], count), 0, x.shape[1])
  return jnp.take_along_axis(x, idx[..., None], axis=1).reshape(-1, x.shape[-1])


def new_keys(keys: dict[str, jax.Array], out_pos: dict[str, jax.Array], config) -> dict[str, jax.Array]:
  """docs/method.md §4: Q_G ← k, exactly the global loss's key; Q_P, Q_C ← random pixels of p̂+ / ĉ+
  (drawn from the streams 'enqueue_pixel' and 'enqueue_cycle', `streams.py`)."""
  p_pos, c_pos = (_flat(out_pos[k]).astype(jnp.float32) for k in "pc")
  ppi = config.queue.pixels_per_image
  return {"global": losses.global_key(global_map(out_pos, config)),
          "pixel": _pick_pixels(keys["enqueue_pixel"], losses.l2n(p_pos), ppi),
          "cycle": _pick_pixels(keys["enqueue_cycle"], losses.l2n(c_pos), ppi)}


def pair_rolls(key: jax.Array, key_pos: jax.Array, batch: int, height: int, width: int, config
               ) -> tuple[jax.Array | None, jax.Array | None]:
  """Pixel-shuffle rolls (eq. 7) for v and v+: int32 [B, 2] each, None without pixel shuffle;
  `model.shuffle_rolls='shared'` gives both frames of a pair the same roll."""
  if not config.model.pixel_shuffle:
    return None, None
  rolls = pixel_shuffle.draw_rolls(key, batch, height, width)
  if config.model.shuffle_rolls == "shared":
    return rolls, rolls
  return rolls, pixel_shuffle.draw_rolls(key_pos, batch, height, width)


def gathered(tree, mesh: Mesh | None):
  """Every leaf replicated on `mesh` (no-op without one): one all-gather per sharded leaf."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def target_side(state: TrainState, batch: dict[str, jax.Array], keys: dict[str, jax.Array],
                model: nn.Module, config):
  """Steps 1–2 (module docstring): the augmented online input and the target's side.

  Returns (v float [B, S, S, 3] augmented, the rolls of v (int32 [B, 2] or None), the target's
  maps {'h','u','p','c'} on v+ (no gradient), the target's updated BN statistics)."""
  # Named scopes label every HLO op with its phase (benchmarks/profile_step.py reads them).
  with jax.named_scope("augment"):
    v = augment.photometric(keys["augment"], batch["v"])
    v_pos = augment.photometric(keys["augment_pos"], batch["v_pos"])
  b, hgt, wid = v.shape[:3]
  rolls, rolls_pos = pair_rolls(keys["roll"], keys["roll_pos"], b, hgt, wid, config)
  # Target on v+: no gradient ever reaches θt (stop_gradient here and inside the losses).
  perm = (jax.random.permutation(keys["shuffle_bn"], b)
          if config.model.get("bn_mode", "group") == "group" else None)
  with jax.named_scope("target"):
    out_pos, target_stats = forward(model, state.target_params, state.target_batch_stats,
                                    v_pos, rolls_pos, perm)
  return v, rolls, jax.lax.stop_gradient(out_pos), target_stats


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, config,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """batch: {'v', 'v_pos'}: uint8 [B, S, S, 3] (host-cropped pairs). Pure; jit it.
  `mesh`: the mesh the step is sharded over (`jit_train_step`), where the queues are gathered."""
  # The queues live sharded along K; every loss reads all of their rows, so each is gathered
  # once, here ([K, D]), not chunk by chunk inside the losses' loops, where XLA's partitioner
  # split the loops over device pairs and gathered the feature maps instead.
  queues_full = gathered(state.queues, mesh)
  rng, keys = streams.step_keys(state.rng)
  platform = mesh.devices.flat[0].platform if mesh is not None else None
  v, rolls, out_pos, target_stats = target_side(state, batch, keys, model, config)

  def loss_fn(params):
    with jax.named_scope("online"):
      out, stats = forward(model, params, state.batch_stats, v, rolls, None)
    with jax.named_scope("losses"):
      total, terms = cacl_losses(out, out_pos, queues_full, config, keys, platform=platform)
    injected = tuple(config.get("debug", {}).get("nonfinite_steps", ()))   # fault injection
    total = nonfinite.inject(total, state.step, injected)
    return total, (terms, stats)

  (total, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  with jax.named_scope("optimizer"):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  with jax.named_scope("ema"):
    m = ema.momentum_at(state.step, config.total_steps, config.model.ema_momentum,
                        config.model.get("ema_cosine", False))
    target_params = ema.update(state.target_params, params, m)

  with jax.named_scope("queues"):
    queues, ptrs = dict(queues_full), dict(state.queue_ptrs)
    for head, rows in new_keys(keys, out_pos, config).items():
      queues[head], ptrs[head] = queue.enqueue(queues[head], ptrs[head], rows)

  # Only what costs nothing is measured here; the diagnostics that need extra matmuls
  # (cycle-back rate, matches, cosines) run on logging steps in `diagnostics.py`.
  metrics = {"loss": total, **terms, "lr": schedule(state.step), "ema_momentum": m}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            target_params=target_params, target_batch_stats=target_stats,
                            opt_state=opt_state, queues=queues, queue_ptrs=ptrs,
                            rng=rng)
  # A non-finite loss or gradient changes no state; the step and the data advance (nonfinite.py).
  new_state = nonfinite.keep_if_finite(state, new_state, total, grads)
  metrics.update(nonfinite.step_metrics(state, new_state))
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


# ---------------------------------------------------------------- sharding & jit

def jit_train_step(model, tx, schedule, config, mesh: Mesh, shardings: TrainState) -> Callable:
  """jit(train_step) over the mesh: batch split on 'data', state donated, metrics replicated.
  The same program on every platform; `xla_cpu.compiler_options` may pick a CPU convolution
  library for full-width backbones (same arithmetic)."""
  batch_sharding = NamedSharding(mesh, P(DATA))
  step = lambda s, b: train_step(s, b, model=model, tx=tx, schedule=schedule, config=config, mesh=mesh)
  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0,
                 compiler_options=xla_cpu.compiler_options(config, mesh))
