"""What the step benchmarks share: one setting → a config, a compiled step, a state and a batch.

Imported by the scripts beside it (`python benchmarks/X.py` puts this folder on sys.path).
"""
from __future__ import annotations

import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)

from cacl_jax.runtime import cli  # noqa: E402  pylint: disable=g-import-not-at-top

cli.reuse_host_memory()   # as in every entry point's process: a CPU step reuses its memory


def step_config(backbone="resnet18", width_divisor=1, image_size=112, batch=16, queue=16384,
                group=None, soft_cycle=False, dtype="float32", readings="peer"):
  """The CACL pretraining config at one benchmark shape (defaults: the PyTorch peer's shape:
  hard cycle, three heads, K = 16384, BN over the whole batch of one device).

  readings: 'peer' — the losses of the PyTorch peer (`../shared/bench/torch_peer.py`), docs/method.md §3's
  first readings (GAP after g_G, queue-only pixel negatives, Q_C in the cycle's second jump), so
  that both sides compute the same thing; 'defaults' — `cacl_jax.defaults` (no Q_C in the
  cycle, N×N frame negatives beside the N×K queue ones), what a run trains.
  """
  from cacl_jax import defaults  # pylint: disable=g-import-not-at-top
  c = defaults.pretrain_config()
  if readings == "peer":
    c.loss.global_pool, c.loss.pixel_negatives, c.loss.cycle_negatives = "after_head", "queue", True
    c.model.shuffle_rolls = "independent"
  elif readings != "defaults":
    raise ValueError(f"readings must be 'peer' or 'defaults', got {readings!r}")
  c.batch_size, c.data.image_size, c.queue.size = batch, image_size, queue
  c.model.backbone, c.model.width_divisor = backbone, width_divisor
  c.model.bn_group_size = group or batch
  c.model.dtype = dtype
  c.loss.soft_cycle = soft_cycle
  return c


def build_step(config, mesh=None, seed=0):
  """(compiled step, fresh state, synthetic uint8 batch on the mesh, compile seconds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.runtime import parallel
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  mesh = mesh or parallel.make_mesh()
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  state, shardings = step_lib.create_state(model, tx, config, mesh, seed=seed)
  fn = step_lib.jit_train_step(model, tx, schedule, config, mesh, shardings)
  rng = np.random.default_rng(seed)
  size, b = config.data.image_size, config.batch_size
  host = {k: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for k in ("v", "v_pos")}
  batch = parallel.host_to_global(mesh, host)
  t0 = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  return compiled, state, batch, time.perf_counter() - t0


def time_steps(compiled, state, batch, steps):
  """Runs `steps` steps after one warm-up; returns (per-step seconds, final state)."""
  import jax  # pylint: disable=g-import-not-at-top
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return times, state


def machine():
  """The facts a reader needs to compare two result files."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
          "platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_avg": os.getloadavg()}


def write_results(path: str, args, **payload) -> None:
  """benchmarks/results/X.json: the machine, the script's arguments and its results."""
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"machine": machine(), "args": vars(args), **payload}, f, indent=1)
  print(f"\nwritten to {path}")
