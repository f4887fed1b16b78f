"""Throughput of the evaluation program's parts: input pipeline, probe steps, metrics.

  python benchmarks/eval_throughput.py [--backbone resnet18 --width_divisor 8 \
      --image_size 64 --eval_size 64 --batch_size 16 --steps 10]

Measures, on whatever devices this process has (one 'data' mesh over all of them):
  pipeline        segdata.train_dataset on the synthetic set (host: scale / crop / flip + batch)
  linear_step     probe train step, frozen backbone (forward only through f) + 1×1 head
  finetune_step   probe train step, whole network (forward + backward through f, SyncBN)
  eval_step       full-resolution eval step: logits, upsampling, argmax, confusion matrix
  confusion       metrics.confusion_matrix alone on random labels (Mpixel/s)
Each device row times `--steps` calls after one warm-up (compile) call. Prints a table and
writes benchmarks/results/eval_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cacl_jax.runtime import parallel  # noqa: E402
from cacl_jax.data import synthetic  # noqa: E402
from cacl_jax.evaluation import metrics, probe, segdata  # noqa: E402


def _time(fn, steps: int) -> float:
  """Seconds per call of fn() after one warm-up call; fn returns something to block on."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "resnet50"))
  parser.add_argument("--width_divisor", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=64, help="train crop side")
  parser.add_argument("--eval_size", type=int, default=64, help="val image side (square)")
  parser.add_argument("--batch_size", type=int, default=16, help="global batch")
  parser.add_argument("--num_classes", type=int, default=19)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "eval_throughput.json"))
  args = parser.parse_args()

  mesh = parallel.make_mesh()
  parallel.check_batch_size(args.batch_size, mesh)
  model_config = ml_collections.ConfigDict({
      "backbone": args.backbone, "width_divisor": args.width_divisor, "dtype": "float32",
      "bn_mode": "sync", "bn_group_size": None})
  params, stats = probe.random_backbone(model_config, 0, args.image_size)
  rng = np.random.default_rng(0)
  b, s, e = args.batch_size, args.image_size, args.eval_size
  train_batch = parallel.host_to_global(mesh, {
      "image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
      "label": rng.integers(0, args.num_classes, (b, s, s)).astype(np.uint8)})
  eval_batch = parallel.host_to_global(mesh, {
      "image": rng.integers(0, 256, (b, e, e, 3), dtype=np.uint8),
      "label": rng.integers(0, args.num_classes, (b, e, e)).astype(np.uint8)})

  rows = []

  # ---- host input pipeline (in-process, as the synthetic eval config runs it).
  data_config = ml_collections.ConfigDict({"image_size": s, "num_workers": 0, "prefetch": 2})
  source = synthetic.SyntheticSegmentation("train", num_images=256, frame_size=e, seed=0)
  it = iter(segdata.train_dataset(source, data_config, b, seed=0))
  next(it)
  start = time.perf_counter()
  for _ in range(args.steps):
    next(it)
  sec = (time.perf_counter() - start) / args.steps
  rows.append({"part": "pipeline", "sec_per_step": sec, "images_per_s": b / sec})

  # ---- probe steps.
  for finetune in (False, True):
    backbone = probe.probe_backbone(model_config, finetune)
    head = probe.make_head(args.num_classes)
    head_params = head.init(jax.random.key(0),
                            jnp.zeros((1, 1, 1, backbone.num_features)))["params"]
    tx, _ = probe.make_optimizer(ml_collections.ConfigDict({"learning_rate": 0.1}), 1000)
    trainable = {"head": head_params, **({"backbone": params} if finetune else {})}
    state = jax.device_put(probe.ProbeState(
        step=jnp.zeros((), jnp.int32), head=head_params, backbone=params, batch_stats=stats,
        opt_state=tx.init(trainable)), parallel.replicated(mesh))
    train_step, eval_step, _ = probe.make_steps(backbone, head, tx, mesh, args.num_classes,
                                                finetune)
    holder = {"state": state}

    def run_train():
      holder["state"], loss = train_step(holder["state"], train_batch)
      return loss

    sec = _time(run_train, args.steps)
    rows.append({"part": "finetune_step" if finetune else "linear_step", "sec_per_step": sec,
                 "images_per_s": b / sec})
    if not finetune:
      sec = _time(lambda: eval_step(holder["state"], eval_batch), args.steps)
      rows.append({"part": "eval_step", "sec_per_step": sec, "images_per_s": b / sec})

  # ---- the confusion matrix alone.
  cm_fn = jax.jit(metrics.confusion_matrix, static_argnums=2,
                  out_shardings=parallel.replicated(mesh))
  sec = _time(lambda: cm_fn(eval_batch["label"], eval_batch["label"], args.num_classes),
              args.steps)
  rows.append({"part": "confusion", "sec_per_step": sec, "images_per_s": b / sec,
               "mpixels_per_s": b * e * e / sec / 1e6})

  setup = {"backbone": args.backbone, "width_divisor": args.width_divisor,
           "image_size": s, "eval_size": e, "batch_size": b, "num_classes": args.num_classes,
           "steps": args.steps, "devices": mesh.devices.size,
           "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
           "cpu_count": os.cpu_count(), "machine": platform.machine()}
  print(f"eval throughput: {args.backbone}/{args.width_divisor}, crop {s}, eval {e}, "
        f"batch {b}, {mesh.devices.size} x {setup['device_kind']}")
  print(f"{'part':<15}{'ms/step':>10}{'images/s':>12}")
  for r in rows:
    print(f"{r['part']:<15}{1e3 * r['sec_per_step']:>10.1f}{r['images_per_s']:>12.1f}"
          + (f"   ({r['mpixels_per_s']:.1f} Mpixel/s)" if "mpixels_per_s" in r else ""))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"setup": setup, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
