"""Where the losses pull: cosines between the backbone gradients of L_G, L_P and L_C.

On logging steps only (`log_grad_cosines`), for the heads with a non-zero weight:

  grad_cos_g_p = ⟨∇_θb L_G, ∇_θb L_P⟩ / (‖∇_θb L_G‖·‖∇_θb L_P‖),  likewise grad_cos_g_c, grad_cos_p_c,

θb the online backbone's parameters (all its leaves as one vector), L_h the unweighted loss of
head h (a positive weight does not change a cosine). −1: the two losses pull the shared backbone
in opposite directions; 0: independent; 1: the same way. Measured on the step's batch at the
state after the step, with that state's random streams (augmentation, rolls, shuffle-BN): one
forward of each network and one backward per loss (`jax.vjp` with the cotangent e_h), nothing
on other steps. A pair with a head of weight 0 is not measured (absent from the record).
Beside them, grad_norm_g / grad_norm_p / grad_norm_c = ‖∇_θb L_X‖ (unweighted): which loss
dominates the backbone's update where two point the same way.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cacl_jax.training import step as step_lib, streams

# (head, head) → metric name, in metrics.jsonl and figures/diagnostics.png.
PAIRS = {("global", "pixel"): "grad_cos_g_p", ("global", "cycle"): "grad_cos_g_c",
         ("pixel", "cycle"): "grad_cos_p_c"}


def active_heads(config) -> tuple[str, ...]:
  """The heads whose loss is computed (non-zero weight), in HEADS order."""
  return tuple(h for h in step_lib.HEADS if config.loss.weights[h])


def measured_pairs(config) -> dict[tuple[str, str], str]:
  heads = active_heads(config)
  return {pair: name for pair, name in PAIRS.items() if set(pair) <= set(heads)}


def tree_cosine(a, b) -> jax.Array:
  """Cosine between two pytrees of equal structure, as flat float32 vectors."""
  dot = sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return dot / jnp.maximum(tree_norm(a) * tree_norm(b), 1e-30)


def head_gradients(state, batch: dict[str, jax.Array], *, model, config, mesh=None
                   ) -> dict[str, object]:
  """{head: ∇_θb L_head} for the active heads: the backbone's gradient tree of each unweighted
  loss, from one forward and one backward per head. batch: {'v', 'v_pos'} uint8 [B, S, S, 3]."""
  _, keys = streams.step_keys(state.rng)
  platform = mesh.devices.flat[0].platform if mesh is not None else None
  v, rolls, out_pos, _ = step_lib.target_side(state, batch, keys, model, config)
  queues = step_lib.gathered(state.queues, mesh)
  heads = active_heads(config)

  def losses_of(params) -> jax.Array:
    out, _ = step_lib.forward(model, params, state.batch_stats, v, rolls, None)
    _, terms = step_lib.cacl_losses(out, out_pos, queues, config, keys, platform=platform)
    return jnp.stack([terms[f"loss_{h}"] for h in heads])   # [H]

  _, backward = jax.vjp(losses_of, state.params)
  eye = jnp.eye(len(heads), dtype=jnp.float32)
  return {h: backward(eye[i])[0]["backbone"] for i, h in enumerate(heads)}


def tree_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def gradient_cosines(state, batch, *, model, config, mesh=None) -> dict[str, jax.Array]:
  """{grad_cos_…: scalar} for every pair of active heads, and {grad_norm_X: ‖∇_θb L_X‖} for
  every active head X ∈ {g, p, c} (module docstring)."""
  grads = head_gradients(state, batch, model=model, config=config, mesh=mesh)
  return {**{name: tree_cosine(grads[a], grads[b]) for (a, b), name in measured_pairs(config).items()},
          **{f"grad_norm_{h[0]}": tree_norm(g) for h, g in grads.items()}}


def make_probe(model, config, mesh) -> Callable | None:
  """jit: (state, batch) -> {grad_cos_…: scalar}, replicated; None where fewer than two heads
  are active (MoCo-v2) or `log_grad_cosines` is off."""
  if not (config.get("log_grad_cosines", False) and measured_pairs(config)):
    return None
  fn = lambda state, batch: gradient_cosines(state, batch, model=model, config=config, mesh=mesh)
  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))
