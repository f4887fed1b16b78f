"""Train-step time of the full CACL step (augment, target, online, 3 losses, LARS, EMA, queues).

  python benchmarks/train_step.py                   # demo setting + narrow variants (CPU-sized)
  python benchmarks/train_step.py --paper           # adds ResNet-18 / ResNet-50 at 224 (slow on CPU)
  python benchmarks/train_step.py --devices 8       # shard over 8 (fake) devices

Prints a table (compile seconds, ms/step, pairs/s, images/s through the backbone — two per
pair, target and online) and writes benchmarks/results/train_step.json. Synthetic uint8 pairs
on the device: this isolates the step from the input pipeline (benchmarks/input_pipeline.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def settings(paper: bool):
  rows = [
      # name, backbone, width ÷, image, batch, K, group
      ("demo (R18 ÷4, 64px)", "resnet18", 4, 64, 32, 2048, 8),
      ("R18 ÷8, 64px", "resnet18", 8, 64, 32, 2048, 8),
      ("R18 ÷4, 112px", "resnet18", 4, 112, 16, 2048, 8),
  ]
  if paper:
    rows += [("R18, 224px (paper res.)", "resnet18", 1, 224, 16, 16384, 16),
             ("R50, 224px (paper res.)", "resnet50", 1, 224, 8, 16384, 8)]
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--paper", action="store_true", help="also time full-width ResNets at 224 px")
  ap.add_argument("--devices", type=int, default=None, help="fake CPU devices to shard over")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json"))
  args = ap.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    from cacl_jax.runtime import cli  # pylint: disable=g-import-not-at-top
    cli.use_fake_cpu_devices()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cacl_jax import defaults  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib
  from cacl_jax.runtime import parallel
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  rows = []
  for name, backbone, wd, size, batch, k, group in settings(args.paper):
    c = defaults.pretrain_config()
    c.batch_size, c.data.image_size, c.queue.size = batch, size, k
    c.model.backbone, c.model.width_divisor, c.model.bn_group_size = backbone, wd, group
    c.model.dtype = args.dtype
    model = model_from_config(c.model)
    tx, schedule = optim.make_optimizer(c)
    state, shardings = step_lib.create_state(model, tx, c, mesh, seed=0)
    fn = step_lib.jit_train_step(model, tx, schedule, c, mesh, shardings)
    rng = np.random.default_rng(0)
    host = {k_: rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8) for k_ in ("v", "v_pos")}
    gbatch = parallel.host_to_global(mesh, host)
    t0 = time.perf_counter()
    compiled = fn.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, gbatch)          # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = compiled(state, gbatch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.steps
    rows.append({"setting": name, "backbone": backbone, "width_divisor": wd, "image_size": size,
                 "batch": batch, "queue": k, "dtype": args.dtype, "compile_s": round(compile_s, 2),
                 "ms_per_step": round(dt * 1e3, 1), "pairs_per_s": round(batch / dt, 1),
                 "backbone_images_per_s": round(2 * batch / dt, 1)})
    r = rows[-1]
    print(f"{name:<26} batch {batch:>3}  compile {r['compile_s']:>6.1f}s  {r['ms_per_step']:>8.1f} ms/step  "
          f"{r['pairs_per_s']:>7.1f} pairs/s", flush=True)

  info = {"devices": [str(d) for d in jax.devices()], "num_devices": mesh.devices.size,
          "platform": platform.platform(), "cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps_timed": args.steps}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": info, "rows": rows}, f, indent=1)
  print(f"\n| setting | batch | ms/step | pairs/s | compile s |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['setting']} | {r['batch']} | {r['ms_per_step']} | {r['pairs_per_s']} | {r['compile_s']} |")
  print(f"written to {args.out}")


if __name__ == "__main__":
  main()
