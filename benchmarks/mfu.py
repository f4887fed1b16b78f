"""Throughput and model-flops utilisation (MFU) of the paper-scale train step on this machine.

  python benchmarks/mfu.py                                 # R18 and R50, 224 px, bf16, 32 per device
  python benchmarks/mfu.py --backbones resnet50 --per_device_batch 64 --steps 20
  python benchmarks/mfu.py --tiny                          # seconds: the suite's smoke test

Compiles the whole CACL step (augmentation, target, online, three losses with K-long queues,
LARS, EMA, enqueue; the defaults' losses: soft cycle, no Q_C in it) over every local device,
with the batch split over them. Flops per step come from XLA's cost analysis of the step (traced once more with the
loss's chunk loops unrolled, whose bodies it would otherwise count once), divided by the device
count; the step is timed after a warm-up (median of `--steps`). Prints pairs/s, backbone images/s (two per
pair: target and online), achieved TFLOP/s per device, and MFU against the chip's dense bf16
peak (table below; `--peak_tflops` for another chip). On a CPU there is no peak to compare
with: the table gives GFLOP/s. Writes benchmarks/results/mfu.json.

Anchor: NVIDIA's public PyTorch ResNet-50 training reference, ≈ 2,470 images/s on one A100 with
AMP, is ≈ 19 % of the A100's 312 TFLOP/s bf16 peak at ≈ 24.5 GFLOP per image (forward and
backward). The table prints this step's MFU beside it.
"""
from __future__ import annotations

import argparse
import os
import statistics

import common

# Dense bf16 peak TFLOP/s per chip (vendor data sheets; SXM parts for NVIDIA).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
                    "TPU v6 lite": 918.0, "TPU v6e": 918.0}
ANCHOR_MFU = 2470 * 24.5e9 / 312e12   # NVIDIA's PyTorch RN50 on A100, AMP


def peak_tflops(device_kind: str) -> float | None:
  """The first table key found in the device's kind string (longest keys first)."""
  for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return PEAK_BF16_TFLOPS[key]
  return None


def step_flops(config, state, batch) -> float:
  """Flops of one step per device, from XLA's cost analysis of the step traced with the loss's
  chunk loops unrolled (a loop body counts once otherwise: the streamed negatives would be
  undercounted ~K/1024-fold). Only lowered, never compiled or run."""
  import jax  # pylint: disable=g-import-not-at-top
  from cacl_jax.method import loss_kernels  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib
  from cacl_jax.runtime import parallel
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  mesh = parallel.make_mesh()
  shardings = step_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
  with loss_kernels.loops_unrolled():   # a fresh jit: its trace sees the unrolled loops
    lowered = step_lib.jit_train_step(model, tx, schedule, config, mesh, shardings).lower(state, batch)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) / mesh.devices.size


def measure(backbone, width, size, per_device_batch, queue, dtype, steps, group):
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  batch = per_device_batch * n
  config = common.step_config(backbone, width, size, batch, queue, group=min(group, batch),
                              soft_cycle=True, dtype=dtype, readings="defaults")
  compiled, state, data, compile_s = common.build_step(config)
  flops = step_flops(config, state, data)
  times, _ = common.time_steps(compiled, state, data, steps)
  dt = statistics.median(times)
  return {"backbone": backbone, "width_divisor": width, "image_size": size, "dtype": dtype,
          "devices": n, "per_device_batch": per_device_batch, "global_batch": batch, "queue": queue,
          "compile_s": round(compile_s, 1), "ms_per_step": dt * 1e3, "pairs_per_s": batch / dt,
          "images_per_s": 2 * batch / dt, "flops_per_step_per_device": flops,
          "gflop_per_pair": flops * n / batch / 1e9, "tflops_per_device": flops / dt / 1e12}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--per_device_batch", type=int, default=32)
  ap.add_argument("--queue", type=int, default=16384)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--peak_tflops", type=float, default=None, help="override the chip's bf16 peak")
  ap.add_argument("--tiny", action="store_true", help="R18 ÷8 at 32 px, K 64, 2 per device, 1 step")
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "mfu.json"))
  args = ap.parse_args(argv)
  if args.tiny:
    args.backbones, args.size, args.per_device_batch, args.queue, args.steps = ["resnet18"], 32, 2, 64, 1

  import jax  # pylint: disable=g-import-not-at-top
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or peak_tflops(kind)
  rows = []
  for backbone in args.backbones:
    row = measure(backbone, 8 if args.tiny else 1, args.size, args.per_device_batch,
                  args.queue, args.dtype, args.steps, group=32)
    row["peak_tflops"] = peak
    row["mfu"] = row["tflops_per_device"] / peak if peak else None
    rows.append(row)

  print(f"{jax.device_count()} × {kind} ({jax.devices()[0].platform}); peak bf16: "
        f"{f'{peak:g} TFLOP/s' if peak else 'unknown (CPU): GFLOP/s only'}")
  print("| backbone | px | dtype | batch/device | ms/step | pairs/s | images/s | GFLOP/pair | "
        "achieved/device | MFU |\n|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    achieved = (f"{r['tflops_per_device']:.1f} TFLOP/s" if peak
                else f"{r['tflops_per_device'] * 1e3:.1f} GFLOP/s")
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "–"
    print(f"| {r['backbone']} | {r['image_size']} | {r['dtype']} | {r['per_device_batch']} | "
          f"{r['ms_per_step']:,.0f} | {r['pairs_per_s']:.1f} | {r['images_per_s']:.1f} | "
          f"{r['gflop_per_pair']:.0f} | {achieved} | {mfu} |")
  print(f"anchor: NVIDIA's PyTorch ResNet-50 on A100 (AMP) ≈ {100 * ANCHOR_MFU:.0f} % MFU")
  common.write_results(os.path.abspath(args.out), args, anchor_mfu=ANCHOR_MFU, rows=rows)
  return rows


if __name__ == "__main__":
  main()
