"""The train step of two or more checkouts side by side: cold compile seconds and ms per step,
each measurement its own process, the checkouts alternating round by round, with the PyTorch
peer in every round (the step's absolute speed moves ~2× with the machine's day; a comparison
holds only inside one run).

  git worktree add /tmp/old c949f96        # e.g. the commit before the one-program change
  python benchmarks/step_across_commits.py --side new=. --side old=/tmp/old \\
      --side old_blocks0=/tmp/old:blocks=0 --sizes demo r18q64 r18_112 --rounds 3

A side is NAME=PATH[:blocks=N]: PATH a checkout whose `benchmarks/common.py` builds the step;
`blocks=N` is passed to `build_step` (before `5ab0d0f` it chose the CPU-only program (None) or
the accelerators' (0); since then there is one program and no such argument). Sizes: `demo`
(configs/demo.py of that checkout, one device), and step_vs_pytorch.py's `r18q64`, `r18_112`
(the peer's shapes, batch 16, K = 16384). No persistent compilation cache is configured: every
compile is cold. Prints a table (best and median of rounds) and writes
benchmarks/results/step_across_commits.json with every round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import common
from step_vs_pytorch import DEFAULT_PEER, SIZES, run_peer

# Run inside each measurement's process, with the side's checkout first on sys.path.
_CHILD = r"""
import importlib.util, json, os, statistics, sys
path, size, steps, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path[:0] = [os.path.join(path, "benchmarks"), path]
import common
if size == "demo":
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(path, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
  config = module.get_config()
else:
  backbone, width, side = json.loads(sys.argv[5])
  config = common.step_config(backbone, width, side, 16, 16384)
kwargs = {} if blocks == "-" else {"blocks": None if blocks == "None" else int(blocks)}
compiled, state, batch, compile_s = common.build_step(config, **kwargs)
times, _ = common.time_steps(compiled, state, batch, steps)
print(json.dumps({"compile_s": compile_s, "ms": [1e3 * t for t in times]}))
"""


def parse_side(text: str) -> tuple[str, str, str]:
  """'NAME=PATH[:blocks=N]' → (name, absolute path, blocks or '-')."""
  name, _, rest = text.partition("=")
  path, _, option = rest.partition(":")
  if not name or not path or (option and not option.startswith("blocks=")):
    raise argparse.ArgumentTypeError(f"a side is NAME=PATH[:blocks=N], got {text!r}")
  path = os.path.abspath(path)
  if not os.path.isfile(os.path.join(path, "benchmarks", "common.py")):
    raise argparse.ArgumentTypeError(f"{path} is not a checkout of this project (no benchmarks/common.py)")
  return name, path, option.partition("=")[2] or "-"


def measure(path: str, size: str, steps: int, blocks: str) -> dict:
  shape = json.dumps(list(SIZES[size])) if size != "demo" else "[]"
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run([sys.executable, "-c", _CHILD, path, size, str(steps), blocks, shape],
                       check=True, capture_output=True, text=True, env=env)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["median_ms"] = statistics.median(result["ms"])
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--side", type=parse_side, action="append", required=True, help="NAME=PATH[:blocks=N]")
  ap.add_argument("--sizes", nargs="+", default=["demo", "r18q64", "r18_112"], choices=["demo", *SIZES])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement (r18_112 and larger: half)")
  ap.add_argument("--peer", default=DEFAULT_PEER, help="the PyTorch peer ('' = none)")
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "step_across_commits.json"))
  args = ap.parse_args()
  peer = args.peer if args.peer and os.path.isfile(args.peer) else None

  rounds = []
  for r in range(args.rounds):
    for size in args.sizes:
      steps = args.steps if size in ("demo", "r18e64", "r18q64") else max(args.steps // 2, 1)
      for name, path, blocks in args.side:
        m = measure(path, size, steps, blocks)
        rounds.append({"round": r, "size": size, "side": name, "path": path, "blocks": blocks, **m,
                       "load_avg_1min": os.getloadavg()[0]})
        print(f"  round {r + 1} {size:8s} {name:12s} compile {m['compile_s']:6.1f} s  "
              f"step {m['median_ms']:8.1f} ms", flush=True)
      if peer and size != "demo":
        backbone, width, side = SIZES[size]
        ms = run_peer(peer, backbone, width, side, 16, 16384, steps)["ms_per_step"]
        rounds.append({"round": r, "size": size, "side": "pytorch", "median_ms": ms,
                       "load_avg_1min": os.getloadavg()[0]})
        print(f"  round {r + 1} {size:8s} {'pytorch':12s}                  step {ms:8.1f} ms", flush=True)

  table = []
  print("\n| size | side | compile s (rounds) | ms/step best | ms/step median | PyTorch / this (best) |\n"
        "|---|---|---|---|---|---|")
  for size in args.sizes:
    peer_ms = [x["median_ms"] for x in rounds if x["size"] == size and x["side"] == "pytorch"]
    for name, _, _ in args.side:
      rs = [x for x in rounds if x["size"] == size and x["side"] == name]
      ms = [x["median_ms"] for x in rs]
      row = {"size": size, "side": name, "compile_s": [round(x["compile_s"], 1) for x in rs],
             "best_ms": min(ms), "median_ms": statistics.median(ms),
             "peer_over_this_best": min(peer_ms) / min(ms) if peer_ms else None}
      table.append(row)
      ratio = f"{row['peer_over_this_best']:.2f}×" if peer_ms else "–"
      print(f"| {size} | {name} | {' / '.join(f'{c:.1f}' for c in row['compile_s'])} | "
            f"{row['best_ms']:,.1f} | {row['median_ms']:,.1f} | {ratio} |")
  common.write_results(args.out, args, table=table, rounds=rounds)


if __name__ == "__main__":
  main()
