"""The first measurements on an accelerator, in one run (benchmarks/device_check.sh starts it).

  python benchmarks/device_check.py                  # on a GPU: the whole check, ~7 minutes on an H200
  python benchmarks/device_check.py --tiny           # the dry run on a CPU: every part at toy size

In order, each part skipped (and named in the JSON) once `--budget_s` is spent:
  1. the demo model (configs/demo.py: R18 ⅛ width, 64 px, batch 32, `model.dtype='auto'`):
     steps/s of the compiled step;
  2. ResNet-18 and ResNet-50 at 224 px in bfloat16, the defaults' losses (soft cycle, K = 16384),
     at the largest per-device batch up to 64 that compiles and runs: step time, pairs/s,
     backbone images/s (two a pair: target and online), FLOPs per step from XLA's cost analysis
     (`mfu.step_flops`), TFLOP/s, MFU against the chip's dense bf16 peak, peak device memory;
  3. the step-1 losses of one state and one batch, ResNet-18 224 px: bfloat16 compute against
     float32, and `loss.precision` 'auto' (TF32 on a GPU) against 'float32', each head's
     relative difference;
  4. the PyTorch peer (`--peer`, `../shared/bench/torch_peer.py`) on the same device at the same
     shapes as part 2, under bfloat16 autocast (`torch_peer_gpu.py`), side by side.
Writes `--out` (default benchmarks/results/device_check.json) after every part, so a run stopped
at its limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common
import mfu

PEER = os.path.join(os.path.dirname(common.ROOT), "shared", "bench", "torch_peer.py")
# The paper-scale parts' network width divisor and queue length; --tiny shrinks them (and the
# images and batches) so that the dry run on a CPU exercises every part in minutes.
SCALE = {"width": 1, "queue": 16384}


def demo_config(batch=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("demo", os.path.join(common.ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.dtype = "auto"
  if batch:
    c.batch_size = batch
    c.model.bn_group_size = min(c.model.bn_group_size, batch)
  return c


def paper_config(backbone, size, batch, dtype, precision="auto"):
  c = common.step_config(backbone, SCALE["width"], size, batch, SCALE["queue"], readings="defaults",
                         dtype=dtype)
  c.loss.soft_cycle = True
  c.loss.precision = precision
  c.model.bn_group_size = min(32, batch)
  return c


def timed(config, steps):
  """Compile the step over every local device, run `steps` after one warm-up: a dict of figures
  and the first step's metrics."""
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, batch, compile_s = common.build_step(config)
  state, first = compiled(state, batch)
  first = {k: float(v) for k, v in first.items()}
  times, state = common.time_steps(compiled, state, batch, steps)
  ms = 1e3 * statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  mem = compiled.memory_analysis()
  row = {"batch": config.batch_size, "dtype": config.model.dtype, "compile_s": round(compile_s, 1),
         "ms_per_step": ms, "steps_per_s": 1e3 / ms, "pairs_per_s": config.batch_size * 1e3 / ms,
         "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
         "compiled_peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
         "first_step": first}
  del compiled
  return row, state, batch


def largest_fitting(backbone, size, dtype, steps, batches):
  """Part 2 for one backbone: the first batch of `batches` (largest first) that runs."""
  import jax  # pylint: disable=g-import-not-at-top
  errors = {}
  for b in batches:
    config = paper_config(backbone, size, b, dtype)
    try:
      row, state, batch = timed(config, steps)
    except Exception as e:  # pylint: disable=broad-except  (XLA's out-of-memory is a RuntimeError)
      errors[b] = str(e).splitlines()[0][:300]
      jax.clear_caches()
      continue
    n = jax.device_count()
    flops = mfu.step_flops(config, state, batch)    # per device
    peak = mfu.peak_tflops(jax.devices()[0].device_kind)
    row.update(backbone=backbone, image_size=size, devices=n, flops_per_step_per_device=flops,
               images_per_s=2 * row["pairs_per_s"],
               tflops_per_device=flops / (row["ms_per_step"] / 1e3) / 1e12,
               not_fitting=errors)
    row["mfu"] = row["tflops_per_device"] / peak if peak else None
    jax.clear_caches()
    return row
  return {"backbone": backbone, "image_size": size, "error": "no batch fitted", "not_fitting": errors}


def step_one_losses(backbone, size, batch):
  """Part 3: the same initial state and batch through four programs; each head's loss."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for name, dtype, precision in (("float32, losses float32", "float32", "float32"),
                                 ("float32, losses auto", "float32", "auto"),
                                 ("bfloat16, losses float32", "bfloat16", "float32"),
                                 ("bfloat16, losses auto", "bfloat16", "auto")):
    compiled, state, data, _ = common.build_step(paper_config(backbone, size, batch, dtype, precision=precision))
    _, metrics = compiled(state, data)
    out[name] = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
    del compiled, state
    jax.clear_caches()
  ref = out["float32, losses float32"]
  rel = {name: {k: abs(v - ref[k]) / max(abs(ref[k]), 1e-12) for k, v in losses.items()}
         for name, losses in out.items()}
  return {"backbone": backbone, "image_size": size, "batch": batch, "losses": out,
          "rel_diff_to_float32": rel}


def run_peer(peer, backbone, size, batch, steps):
  """Part 4: the PyTorch peer in its own process (JAX has released the device by then)."""
  cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer_gpu.py"),
         "--peer", peer, "--bf16", "--", "--arch", {"resnet18": "r18", "resnet50": "r50"}[backbone],
         "--width", str(SCALE["width"]), "--batch", str(batch), "--size", str(size),
         "--queue", str(SCALE["queue"]), "--steps", str(steps)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    return {"backbone": backbone, "batch": batch, "error": out.stderr.strip().splitlines()[-1:]}
  row = json.loads(out.stdout.strip().splitlines()[-1])
  row.update(backbone=backbone, pairs_per_s=batch * 1e3 / row["ms_per_step"])
  return row


def jax_parts(args, report, save):
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  left = lambda: args.budget_s - (time.perf_counter() - t0)
  report["machine"] = common.machine()
  tiny = args.tiny
  demo = demo_config(8 if tiny else None)
  if tiny:
    demo.queue.size = 256
  row, _, _ = timed(demo, 3 if tiny else 50)
  report["demo"] = row
  save()
  print(f"demo: {row['steps_per_s']:.1f} steps/s ({row['ms_per_step']:.1f} ms, batch {row['batch']}, "
        f"{row['dtype']}), compiled in {row['compile_s']} s", flush=True)
  jax.clear_caches()
  size = 64 if tiny else 224
  batches = (4, 2) if tiny else (64, 48, 32, 16)
  report["paper_scale"] = []
  for backbone in ("resnet18", "resnet50"):
    if left() < 60:
      report["skipped"].append(f"{backbone} at {size} px: budget spent")
      continue
    row = largest_fitting(backbone, size, "bfloat16", 3 if tiny else 20, batches)
    report["paper_scale"].append(row)
    save()
    if "error" not in row:
      mfu_text = f"{100 * row['mfu']:.1f} %" if row["mfu"] else "– (no peak for this device)"
      print(f"{backbone} {size} px bf16, batch {row['batch']}: {row['ms_per_step']:.1f} ms/step, "
            f"{row['pairs_per_s']:.0f} pairs/s, {row['images_per_s']:.0f} images/s, "
            f"{row['tflops_per_device']:.1f} TFLOP/s, MFU {mfu_text}, peak "
            f"{(row['peak_bytes_in_use'] or row['compiled_peak_bytes']) / 2**30:.1f} GiB", flush=True)
  if left() > 90:
    report["step_one_losses"] = step_one_losses("resnet18", size, 4 if tiny else 16)
    save()
    for name, rel in report["step_one_losses"]["rel_diff_to_float32"].items():
      print(f"step 1, {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()), flush=True)
  else:
    report["skipped"].append("step-1 losses: budget spent")
  report["jax_seconds"] = time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="toy sizes: the dry run on a CPU")
  ap.add_argument("--budget_s", type=float, default=420,
                  help="the JAX parts start no new part after this many seconds (the H200 check's "
                       "8 minutes leave ~1 minute for the peer)")
  ap.add_argument("--peer", default=PEER)
  ap.add_argument("--jax_only", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "device_check.json"))
  args = ap.parse_args(argv)
  if args.tiny:
    SCALE.update(width=8, queue=256)
  report = {"args": vars(args), "skipped": [], "scale": dict(SCALE)}

  def save():
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)

  # JAX in a child process: when it exits, the device is free for the PyTorch peer.
  if args.jax_only:
    jax_parts(args, report, save)
    save()
    return
  child = [sys.executable, os.path.abspath(__file__), "--jax_only", "--budget_s", str(args.budget_s),
           "--out", args.out] + (["--tiny"] if args.tiny else [])
  subprocess.run(child, check=False)
  with open(args.out) as f:
    report = json.load(f)
  report["args"] = vars(args)
  report["peer"] = []
  if not os.path.isfile(args.peer):
    report["skipped"].append(f"PyTorch peer: no file at {args.peer}")
  else:
    for row in report.get("paper_scale", []):
      if "error" in row:
        continue
      peer = run_peer(args.peer, row["backbone"], row["image_size"], row["batch"], 2 if args.tiny else 10)
      report["peer"].append(peer)
      save()
      if "error" not in peer:
        print(f"PyTorch peer {row['backbone']} batch {row['batch']} ({peer['device']}, bf16 autocast): "
              f"{peer['ms_per_step']:.1f} ms/step, {peer['pairs_per_s']:.0f} pairs/s; this project "
              f"{row['ms_per_step']:.1f} ms/step ({peer['ms_per_step'] / row['ms_per_step']:.2f}x)", flush=True)
      else:
        print(f"PyTorch peer {row['backbone']}: {peer['error']}", flush=True)
  save()
  print(f"\nwritten to {args.out}")


if __name__ == "__main__":
  main()
