"""The one train step on 1, 2, 4 and 8 fake CPU devices and on two `jax.distributed` processes:
how far each layout's losses and state drift from one device's over the first steps
(docs/method.md §2, docs/reliability.md "Same numbers on any device count").

  python benchmarks/device_invariance.py                 # the demo config, 6 steps
  python benchmarks/device_invariance.py --steps 3 --devices 1 8
  python benchmarks/device_invariance.py --images noise      # pixel-noise pairs: no exact ties
  python benchmarks/device_invariance.py --control=--xla_cpu_max_isa=AVX2 \
      --control=--xla_force_host_platform_device_count=8      # + two one-device controls

Every layout runs the demo's model, losses and first global batches from the same initial state
(`configs/demo.py` with `total_steps=6`, so step 1 already moves the parameters at lr 2.0). Per
step and layout, against one device: the largest relative difference of the four losses; of
the parameters, ‖Δ‖/‖θ‖ per leaf (largest, and the leaf), per layer (a module's leaves together:
a BN layer's scale and bias, a convolution's kernel) and over all of them together; of the whole
state (parameters, BN statistics, target, optimiser, queues), per leaf. `--images noise` feeds
pairs of pixel noise (v+ = v moved by (3, 2) pixels) instead of the demo's frames, whose flat
regions make exact ties in the argmax matches, ReLUs and max-pools. The layouts
compute the same mathematics in another float order, so these are rounding, amplified by the
step: through the argmax matches, the ReLUs, and LARS's per-layer step size. Each `--control FLAGS`
adds a layout of one device compiled with extra XLA flags, the same program on the same device
count: `--xla_cpu_max_isa=AVX2` (XLA's own kernels as another x86 CPU would get them, 8 float
lanes instead of 16), `--xla_force_host_platform_device_count=8` (the one device in a process
that has 8, as in the test suite). Each layout runs in its own process (the device count is
fixed when XLA starts). Writes benchmarks/results/device_invariance.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import common

LOSSES = ("loss", "loss_global", "loss_pixel", "loss_cycle")
PARAMS = "['params']"
PARTS = ("params", "batch_stats", "target_params", "target_batch_stats", "opt_state", "queues")


def _demo_config(steps: int):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("demo", os.path.join(common.ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.total_steps = max(steps, 6)
  return c


def noise_pairs(batch: int, size: int, seed: int) -> dict:
  """v = uniform pixel noise, v+ = the same noise moved by (3, 2) pixels (uint8 [B, S, S, 3])."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  big = np.random.default_rng(seed).integers(0, 256, (batch, size + 3, size + 2, 3)).astype(np.uint8)
  return {"v": np.ascontiguousarray(big[:, :size, :size]),
          "v_pos": np.ascontiguousarray(big[:, 3:size + 3, 2:size + 2])}


def _child(steps: int, out: str, devices: int | None, process: tuple[int, int, int] | None,
           images: str) -> None:
  """Runs `steps` steps on this process' layout; process 0 writes metrics and states (npz)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if process:
    port, index, count = process
    jax.distributed.initialize(f"127.0.0.1:{port}", count, index, cluster_detection_method="deactivate")
  from cacl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  from cacl_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  c = _demo_config(steps)
  mesh = parallel.make_mesh(devices)
  model = model_from_config(c.model)
  tx, schedule = optim.make_optimizer(c)
  state, shardings = step_lib.create_state(model, tx, c, mesh, c.seed)
  train_step = step_lib.jit_train_step(model, tx, schedule, c, mesh, shardings)
  count = jax.process_count()
  batches = iter(pipeline.make_pretrain_dataset(c.data, global_batch_size=c.batch_size,
                                                process_index=jax.process_index(),
                                                process_count=count, seed=c.seed))
  saved = {}
  for step in range(1, steps + 1):
    batch = {k: v for k, v in next(batches).items() if k in ("v", "v_pos")}
    if images == "noise":   # this process' rows of the global noise batch
      rows = c.batch_size // count
      batch = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows]
               for k, v in noise_pairs(c.batch_size, c.data.image_size, step).items()}
    state, metrics = train_step(state, parallel.host_to_global(mesh, batch))
    host = multihost_utils.process_allgather({"metrics": metrics,
                                              **{p: getattr(state, p) for p in PARTS}}, tiled=True)
    for path, leaf in jax.tree_util.tree_leaves_with_path(host):
      saved[f"{step}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  if jax.process_index() == 0:
    np.savez(out, **saved)


def _launch(steps: int, devices: int, processes: int, workdir: str, images: str, flags: str = "") -> str:
  """Runs one layout: `processes` processes of `devices` fake devices each, with extra XLA
  `flags`. Returns its npz."""
  out = os.path.join(workdir, f"{processes}x{devices}{re.sub(r'[^A-Za-z0-9]+', '_', flags)}.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {flags}".strip())
  if devices > 1:
    env["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  base = [sys.executable, __file__, "--child", "--steps", str(steps), "--out", out, "--images", images]
  if processes == 1:
    cmds = [base + ["--child_devices", str(devices)]]
  else:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    cmds = [base + ["--process", str(port), str(i), str(processes)] for i in range(processes)]
  procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for cmd in cmds]
  logs = [p.communicate()[0] for p in procs]
  if any(p.returncode for p in procs):
    sys.exit(f"device_invariance: {processes} x {devices} failed:\n" + logs[0][-3000:])
  return out


def _relative(a, b) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  norm = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / norm) if norm else float(np.linalg.norm(a))


def _by_layer(run: dict, ref: dict, names: list[str]) -> dict[str, float]:
  """‖Δ‖/‖θ‖ over each module's leaves together ('a/b/['scale']' → module 'a/b/')."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  sums = {}
  for name in names:
    layer = name.rsplit("[", 1)[0]
    a, b = np.asarray(run[name], np.float64), np.asarray(ref[name], np.float64)
    d, n = sums.get(layer, (0.0, 0.0))
    sums[layer] = (d + float(np.sum((a - b) ** 2)), n + float(np.sum(b ** 2)))
  return {k: (d / n) ** 0.5 if n else d ** 0.5 for k, (d, n) in sums.items()}


def compare(run: dict, ref: dict, steps: int) -> list[dict]:
  """Per step: the losses', the parameters' and the whole state's relative differences."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = []
  for step in range(1, steps + 1):
    keys = [k for k in ref if k.startswith(f"{step}/")]
    losses = {name: abs(float(run[f"{step}/['metrics']['{name}']"]) -
                        float(ref[f"{step}/['metrics']['{name}']"])) /
              abs(float(ref[f"{step}/['metrics']['{name}']"])) for name in LOSSES}
    leaves = {k.split("/", 1)[1]: _relative(run[k], ref[k]) for k in keys if "['metrics']" not in k}
    params = {k: v for k, v in leaves.items() if k.startswith("['params']")}
    worst_param = max(params.items(), key=lambda kv: kv[1])
    layers = _by_layer(run, ref, [f"{step}/{k}" for k in params])
    stack = lambda d, names: np.concatenate([np.ravel(d[f"{step}/{n}"]).astype(np.float64) for n in names])
    rows.append({"step": step, "losses": max(losses.values()), "each_loss": losses,
                 "params_leaf": worst_param[1], "params_leaf_name": worst_param[0],
                 "params_layer": max(layers.values()),
                 "params_layer_name": max(layers.items(), key=lambda kv: kv[1])[0].split("/", 1)[1],
                 "params_all": _relative(stack(run, params), stack(ref, params)),
                 "state_leaf": max(leaves.values()),
                 "state_leaf_name": max(leaves.items(), key=lambda kv: kv[1])[0]})
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  ap.add_argument("--processes", type=int, default=2, help="a layout of this many processes, "
                  "one device each (0: none)")
  ap.add_argument("--images", choices=("demo", "noise"), default="demo")
  ap.add_argument("--control", action="append", default=[], help="XLA flags of a control layout: "
                  "one device, the same program, compiled with these flags (repeatable)")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--child_devices", type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--process", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "device_invariance.json"))
  args = ap.parse_args(argv)
  if args.child:
    return _child(args.steps, args.out, args.child_devices, args.process, args.images)
  import numpy as np  # pylint: disable=g-import-not-at-top
  layouts = ([(n, 1, "") for n in args.devices] + ([(1, args.processes, "")] if args.processes > 1 else [])
             + [(1, 1, flags) for flags in args.control])
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    runs = {}
    for devices, processes, flags in layouts:
      name = (f"1 device, {flags}" if flags else
              f"{devices} devices" if processes == 1 else f"{processes} processes")
      runs[name] = dict(np.load(_launch(args.steps, devices, processes, tmp, args.images, flags)))
      print(f"  ran {name}", flush=True)
    ref_name = f"{args.devices[0]} devices"
    for name, run in runs.items():
      if name != ref_name:
        results[name] = compare(run, runs[ref_name], args.steps)
  print(f"\nRelative differences to {ref_name}, demo config, {args.images} images, CPU (float32):\n")
  print("| layout | step | losses (max of 4) | params, worst layer ‖Δ‖/‖θ‖ | worst leaf | all params | "
        "state, worst leaf | worst parameter leaf |\n|---|---|---|---|---|---|---|---|")
  for name, rows in results.items():
    for r in rows:
      print(f"| {name} | {r['step']} | {r['losses']:.1e} | {r['params_layer']:.1e} | "
            f"{r['params_leaf']:.1e} | {r['params_all']:.1e} | {r['state_leaf']:.1e} | "
            f"{r['params_leaf_name'][len(PARAMS):]} |")
  common.write_results(args.out, args, reference=ref_name, results=results)
  return results


if __name__ == "__main__":
  main()
