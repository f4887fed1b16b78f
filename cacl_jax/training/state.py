"""The CACL train state: what one step reads and writes, created already sharded.

TrainState holds the online parameters θo and their BN statistics, the target θt (the EMA of
θo) with its own BN statistics, the optimiser state, the three negative queues (sharded along
K over the mesh's 'data' axis) with their pointers, the key of the next step, and how many
steps were skipped (`nonfinite.py`: a step whose loss or gradient is not finite changes
nothing but `step`, `rng` and `skipped_steps`).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cacl_jax.method import queue
from cacl_jax.runtime.parallel import DATA

HEADS = ("global", "pixel", "cycle")


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 []
  params: Any                   # online θo
  batch_stats: Any              # online BN running statistics
  target_params: Any            # θt, EMA of θo
  target_batch_stats: Any       # the target's own running statistics
  opt_state: Any
  queues: dict[str, jax.Array]  # head → float32 [K, D] unit vectors, sharded along K
  queue_ptrs: dict[str, jax.Array]  # head → int32 [], the oldest entry
  rng: jax.Array                # uint32 key data
  skipped_steps: jax.Array      # int32 [], cumulative: steps whose update was not applied


def init_state(model: nn.Module, tx: optax.GradientTransformation, config, seed: int) -> TrainState:
  """A fresh state (call under jit with out_shardings to create it already sharded)."""
  key = jax.random.key(seed)
  k_init, k_q, k_state = jax.random.split(key, 3)
  size = config.data.image_size
  # The smallest batch the BN grouping accepts: init only needs shapes.
  init_batch = config.model.bn_group_size if config.model.get("bn_mode", "group") == "group" else 1
  variables = model.init(k_init, jnp.zeros((init_batch, size, size, 3)), train=True)
  params, stats = variables["params"], variables["batch_stats"]
  dim = model.embed_dim
  queues = {h: queue.init(k, config.queue.size, dim) for h, k in zip(HEADS, jax.random.split(k_q, 3))}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
      target_params=jax.tree.map(jnp.copy, params), target_batch_stats=jax.tree.map(jnp.copy, stats),
      opt_state=tx.init(params), queues=queues,
      queue_ptrs={h: jnp.zeros((), jnp.int32) for h in HEADS},
      rng=jax.random.key_data(k_state), skipped_steps=jnp.zeros((), jnp.int32))


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Replicated everywhere except the queues, which are split along K over 'data'."""
  rep = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  return shardings.replace(queues={h: NamedSharding(mesh, P(DATA, None)) for h in abstract_state.queues})


def check_queue_sharding(config, mesh: Mesh) -> None:
  n = mesh.devices.size
  if config.queue.size % n:
    raise ValueError(f"queue.size={config.queue.size} must be divisible by the {n} devices "
                     "(the queues are sharded along K)")


def create_state(model, tx, config, mesh: Mesh, seed: int) -> tuple[TrainState, TrainState]:
  """Builds the state already sharded: eval_shape → shardings → jit(init, out_shardings).
  Returns (state, its shardings)."""
  check_queue_sharding(config, mesh)
  init = lambda: init_state(model, tx, config, seed)
  shardings = state_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings
