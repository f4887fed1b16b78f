"""Runs the PyTorch peer (`../shared/bench/torch_peer.py`, not part of this project) on a GPU.

  python benchmarks/torch_peer_gpu.py --peer PATH/torch_peer.py [--bf16] -- --arch r50 --batch 64 --size 224

The peer is written for a CPU. Unchanged, it runs on CUDA when torch's default device is the GPU
(every tensor it makes lands there); its per-step timer is made honest by synchronising the GPU
at every clock read (otherwise it would time kernel launches, not kernels). `--bf16` runs its
forward passes under `torch.autocast(bfloat16)`, as this project's step computes in bfloat16 on
accelerators (losses in float32 either way: autocast keeps the softmaxes in float32). TF32 stays
at torch's defaults (cuDNN convolutions on, float32 matmuls off). Prints the peer's JSON line with
`device` and `bf16` added. Without a GPU it runs on the CPU (the dry run of device_check.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--peer", required=True)
  ap.add_argument("--bf16", action="store_true")
  ap.add_argument("peer_args", nargs=argparse.REMAINDER)
  args = ap.parse_args()
  import torch  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_default_device(device)
  if device == "cuda":
    clock = time.perf_counter
    time.perf_counter = lambda: (torch.cuda.synchronize(), clock())[1]
  spec = importlib.util.spec_from_file_location("torch_peer", args.peer)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  if args.bf16:
    forward = peer.Net.forward

    def autocast_forward(self, x):
      with torch.autocast(device, dtype=torch.bfloat16):
        return tuple(t.float() for t in forward(self, x))

    peer.Net.forward = autocast_forward
  sys.argv = [args.peer] + [a for a in args.peer_args if a != "--"]
  lines = []
  with contextlib.redirect_stdout(_Lines(lines)):
    peer.main()
  result = json.loads(lines[-1])
  result.update(device=device, bf16=args.bf16)
  if device == "cuda":
    result["gpu"] = torch.cuda.get_device_name()
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  print(json.dumps(result))


class _Lines:
  """A stdout that keeps the peer's printed lines."""

  def __init__(self, lines):
    self.lines, self.buffer = lines, ""

  def write(self, text):
    self.buffer += text
    *done, self.buffer = self.buffer.split("\n")
    self.lines.extend(l for l in done if l.strip())

  def flush(self):
    pass


if __name__ == "__main__":
  main()
