"""What the CPU program's bit-identity across device counts costs (docs/reliability.md).

  python benchmarks/cpu_program_cost.py                        # R18 ¼ width 64 px and R18 112 px
  python benchmarks/cpu_program_cost.py --sizes r18q64 --rounds 9

On one CPU device, at the PyTorch peer's shapes (benchmarks/step_vs_pytorch.py: hard cycle,
K = 16384, batch 16), compiles the train step twice: the CPU program (`jit_train_step(...)`:
the target's padding sample per device, the online network in gradient blocks added in a fixed
order) and the program GPUs and TPUs compile (`blocks=0`: one value_and_grad). The two
alternate in one process, `--steps` steps a round each; the table gives each round's fastest
step, the median over rounds, and the ratio. Writes benchmarks/results/cpu_program_cost.json.
"""
from __future__ import annotations

import argparse
import os
import statistics

import common

SIZES = {"r18q64": ("resnet18", 4, 64), "r18_112": ("resnet18", 1, 112)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "cpu_program_cost.json"))
  args = ap.parse_args()
  rows = []
  for size in args.sizes:
    backbone, width, pixels = SIZES[size]
    config = common.step_config(backbone, width, pixels)
    programs = {"cpu": common.build_step(config), "accelerators": common.build_step(config, blocks=0)}
    states = {name: p[1] for name, p in programs.items()}
    fastest = {name: [] for name in programs}
    for _ in range(args.rounds):
      for name, (compiled, _, batch, _) in programs.items():
        times, states[name] = common.time_steps(compiled, states[name], batch, args.steps)
        fastest[name].append(1e3 * min(times))
    med = {name: statistics.median(ms) for name, ms in fastest.items()}
    rows.append({"size": size, "backbone": backbone, "width_divisor": width, "image_size": pixels,
                 "cpu_ms": med["cpu"], "accelerators_ms": med["accelerators"],
                 "ratio": med["cpu"] / med["accelerators"], "rounds_ms": fastest,
                 "compile_s": {name: round(p[3], 1) for name, p in programs.items()}})
    print(f"  {size}: CPU program {med['cpu']:.0f} ms, accelerators' program "
          f"{med['accelerators']:.0f} ms", flush=True)
  print("\n| size | CPU program, ms/step | accelerators' program (blocks=0) | CPU / accelerators' |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']} | {r['cpu_ms']:,.0f} | {r['accelerators_ms']:,.0f} | {r['ratio']:.3f} |")
  common.write_results(args.out, args, rows=rows)


if __name__ == "__main__":
  main()
