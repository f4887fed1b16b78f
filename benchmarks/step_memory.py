"""Memory of the whole train step per device, from XLA's `memory_analysis()`, compile-only.

  python benchmarks/step_memory.py                 # R50 at 224² and 512×1024, K = 65536, 8 devices
  python benchmarks/step_memory.py --settings r50_224 --dtype bfloat16 --devices 1

Nothing big is allocated: the step is lowered with abstract shapes (`jax.eval_shape` of the
state, `jax.ShapeDtypeStruct` batches) on a mesh of `--devices` fake CPU devices (8 by default,
so that what crosses devices — shuffle-BN's statistics, the gathered queues — is in the figures;
the queues' K rows are sharded over them), so the figures are per device at a per-device batch B
(global batch devices × B). For each setting it compiles the step at two batch sizes, prints the
temporaries and the peak (arguments + outputs − donated aliases + temporaries), fits peak =
fixed + B·per_image, and finds the largest B that fits 16 GiB and 80 GiB, checked by compiling
that B. BN groups are the largest divisor of the global batch up to 32.

These are XLA:CPU's buffer assignments (fusion and scheduling differ a little on a GPU or TPU,
whose compilers also rematerialise under memory pressure). The CPU backend's LLVM optimisation
level does not change buffer assignment, so the compiles run with
--xla_backend_optimization_level=0 (checked: identical memory_analysis, 25% less compile time).
Writes benchmarks/results/step_memory.json.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8").strip()

import common  # noqa: E402  pylint: disable=g-import-not-at-top
from cacl_jax.runtime import cli  # noqa: E402  pylint: disable=g-import-not-at-top

# The scheduler every program with fake devices compiles under (XLA's default one): the
# concurrency-optimised scheduler assigns buffers for overlap and nearly doubles the peak.
cli.use_fake_cpu_devices()

GIB = 2 ** 30
# name: (backbone, height, width)
SETTINGS = {"r50_224": ("resnet50", 224, 224), "r50_512x1024": ("resnet50", 512, 1024),
            "r18_224": ("resnet18", 224, 224)}


def analyse(backbone, height, width, batch, queue, dtype, soft_cycle, devices=8):
  """memory_analysis() of the step at per-device batch `batch` on `devices` devices: a dict of
  byte counts per device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.runtime import parallel
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  total = batch * devices
  group = max(g for g in range(1, min(total, 32) + 1) if total % g == 0)
  config = common.step_config(backbone, 1, height, total, queue, group=group,
                              soft_cycle=soft_cycle, dtype=dtype, readings="defaults")
  mesh = parallel.make_mesh(devices)
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  abstract = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, 0))
  fn = step_lib.jit_train_step(model, tx, schedule, config, mesh,
                               step_lib.state_shardings(abstract, mesh))
  images = jax.ShapeDtypeStruct((total, height, width, 3), jnp.uint8)
  t0 = time.perf_counter()
  stats = fn.lower(abstract, {"v": images, "v_pos": images}).compile().memory_analysis()
  out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  out["batch"] = batch
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--settings", nargs="+", default=["r50_224", "r50_512x1024"], choices=list(SETTINGS))
  ap.add_argument("--queue", type=int, default=65536, help="queue rows (K), sharded over the devices")
  ap.add_argument("--devices", type=int, default=8, help="fake CPU devices of the mesh (at most 8)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--hard_cycle", action="store_true", help="hard cycle (default: soft, the paper's)")
  ap.add_argument("--probe", type=int, nargs=2, default=None,
                  help="the two batch sizes of the linear fit (default 8 16 at 224 px, 1 2 above)")
  ap.add_argument("--budgets", type=float, nargs="+", default=[16, 80], help="GiB")
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "step_memory.json"))
  args = ap.parse_args()

  results = []
  for name in args.settings:
    backbone, height, width = SETTINGS[name]
    probe = args.probe or ((8, 16) if height * width <= 224 * 224 else (1, 2))
    measure = lambda b: analyse(backbone, height, width, b, args.queue, args.dtype, not args.hard_cycle,
                                args.devices)
    runs = [measure(b) for b in probe]
    per_image = (runs[1]["peak"] - runs[0]["peak"]) / (probe[1] - probe[0])
    fixed = runs[0]["peak"] - probe[0] * per_image
    fits = {}
    for budget in args.budgets:
      guess = max(1, int((budget * GIB - fixed) // per_image))
      check = measure(guess)
      while check["peak"] > budget * GIB and guess > 1:   # the fit is linear; the compiler is not quite
        guess -= 1
        check = measure(guess)
      fits[f"{budget:g}GiB"] = {"batch": guess, **check}
      runs.append(check)
    row = {"setting": name, "backbone": backbone, "height": height, "width": width,
           "pixels_per_map": height * width // 64, "queue": args.queue, "dtype": args.dtype,
           "devices": args.devices,
           "cycle": "hard" if args.hard_cycle else "soft", "runs": runs,
           "fixed_bytes": fixed, "per_image_bytes": per_image, "largest_batch": fits}
    results.append(row)
    print(f"\n== {name}: {backbone} at {height}×{width} (N = {row['pixels_per_map']}), K = {args.queue}, "
          f"{args.dtype}, {row['cycle']} cycle, per device of {args.devices}")
    print(f"{'B':>4} {'temp GiB':>9} {'peak GiB':>9} {'compile s':>9}")
    for r in runs:
      print(f"{r['batch']:>4} {r['temp'] / GIB:>9.2f} {r['peak'] / GIB:>9.2f} {r['compile_s']:>9.1f}")
    print(f"peak ≈ {fixed / GIB:.2f} GiB + B × {per_image / GIB:.3f} GiB; largest B: " +
          ", ".join(f"{k}: {v['batch']}" for k, v in fits.items()), flush=True)
  common.write_results(args.out, args, results=results)


if __name__ == "__main__":
  main()
