"""The whole CACL step against a PyTorch implementation of the same step, same machine, one run.

  python benchmarks/step_vs_pytorch.py                         # the four sizes below, 3 rounds
  python benchmarks/step_vs_pytorch.py --sizes r18q64 r18_112 --rounds 5
  python benchmarks/step_vs_pytorch.py --peer PATH/torch_peer.py

The PyTorch side is an external script (default `../shared/bench/torch_peer.py` next to the
repository; it is not part of this project): a PixPro / DenseCL-style step with the same dilated
ResNet, three heads, global + pixel + hard-cycle losses against K-long queues, EMA and enqueue,
run with the CPU build of torch and its default threads. This side is the project's own train
step at the same shapes (hard cycle, K = 16384, batch 16, BN over the batch), compiled once per
size, with everything it always does (device-side augmentation, pixel shuffle, shuffle-BN
permutation, LARS). The two alternate: each round times `--steps` steps of ours, then runs the
peer for `--steps` steps (after its own 2 warm-up steps), so both see the same machine load;
the table reports medians over rounds and the ratio peer / ours (> 1: this project is faster).
Writes benchmarks/results/step_vs_pytorch.json with every round and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import common

# name: (peer arch, width divisor, image side)
SIZES = {"r18e64": ("resnet18", 8, 64), "r18q64": ("resnet18", 4, 64),
         "r18_112": ("resnet18", 1, 112), "r18_224": ("resnet18", 1, 224),
         "r50_112": ("resnet50", 1, 112)}
DEFAULT_PEER = os.path.join(os.path.dirname(common.ROOT), "shared", "bench", "torch_peer.py")


def run_peer(peer: str, backbone: str, width: int, size: int, batch: int, queue: int, steps: int) -> dict:
  arch = {"resnet18": "r18", "resnet50": "r50"}[backbone]
  cmd = [sys.executable, peer, "--arch", arch, "--width", str(width), "--batch", str(batch),
         "--size", str(size), "--queue", str(queue), "--steps", str(steps)]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", nargs="+", default=["r18e64", "r18q64", "r18_112", "r18_224"], choices=list(SIZES))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--queue", type=int, default=16384)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
  ap.add_argument("--peer", default=DEFAULT_PEER)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "step_vs_pytorch.json"))
  args = ap.parse_args()
  if not os.path.isfile(args.peer):
    sys.exit(f"step_vs_pytorch: no PyTorch peer at {args.peer} (pass --peer PATH/torch_peer.py)")

  rows = []
  for name in args.sizes:
    backbone, width, size = SIZES[name]
    config = common.step_config(backbone, width, size, args.batch, args.queue)
    compiled, state, batch, compile_s = common.build_step(config)
    ours, peer, loads = [], [], []
    for _ in range(args.rounds):
      loads.append(os.getloadavg()[0])
      times, state = common.time_steps(compiled, state, batch, args.steps)
      ours.append(1e3 * statistics.median(times))
      peer.append(run_peer(args.peer, backbone, width, size, args.batch, args.queue, args.steps)["ms_per_step"])
      print(f"  {name}: ours {ours[-1]:8.0f} ms   pytorch {peer[-1]:8.0f} ms   (load {loads[-1]:.2f})",
            flush=True)
    row = {"size": name, "backbone": backbone, "width_divisor": width, "image_size": size,
           "batch": args.batch, "queue": args.queue, "compile_s": round(compile_s, 1),
           "ours_ms": statistics.median(ours), "pytorch_ms": statistics.median(peer),
           "rounds_ours_ms": ours, "rounds_pytorch_ms": peer, "load_avg_1min": loads}
    row["speedup"] = row["pytorch_ms"] / row["ours_ms"]
    rows.append(row)
    del compiled, state, batch

  print(f"\n| size | ours ms/step | PyTorch ms/step | PyTorch / ours |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']} ({r['backbone']} ÷{r['width_divisor']}, {r['image_size']} px) | "
          f"{r['ours_ms']:,.0f} | {r['pytorch_ms']:,.0f} | {r['speedup']:.2f}× |")
  common.write_results(args.out, args, rows=rows)


if __name__ == "__main__":
  main()
