"""Weak scaling of the train step, compile-only, on fake CPU devices (docs/method.md §2 "Weak scaling").

  python benchmarks/scaling.py                                 # demo, R18, R50 at 1 2 4 8 16 devices
  python benchmarks/scaling.py --models demo r18_224 --devices 1 4 16

At a fixed per-device batch (`--per_device_batch`, 8), compiles the accelerators' program of the
train step (`jit_train_step`, the one program of every platform) over N devices of one process
(`--xla_force_host_platform_device_count=N`, one subprocess per N) and reads, per device:
  * FLOPs — `compiled.cost_analysis()` of the partitioned program (a loop body counts once, the
    same at every N: a weak-scaling comparison, not an absolute count; benchmarks/mfu.py unrolls);
  * collective bytes by kind — the result buffers of every all-reduce, all-gather,
    reduce-scatter, all-to-all and collective-permute in `compiled.as_text()`, times the trip
    count of the loops they sit in, and the largest single one;
  * peak memory — `memory_analysis()`: arguments + outputs − donated aliases + temporaries.
Per-device work and traffic should not grow with N: what grows is only what docs/method.md §2 allows (BN
groups' sums, [global batch / group, channels]; the queues' new keys, [global batch, D]).
Writes benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

import common

GIB, MIB = 2 ** 30, 2 ** 20
# name: (backbone, width divisor, image side); 'demo' is configs/demo.py at this batch.
MODELS = {"demo": ("resnet18", 8, 64), "r18q64": ("resnet18", 4, 64), "r18_224": ("resnet18", 1, 224),
          "r50_224": ("resnet50", 1, 224)}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(pred|[fsu](?:8|16|32|64)|bf16)\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|true_computation|"
                    r"false_computation)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")


def _arrays(shape_text: str, kind: str, is_start: bool) -> tuple[list[int], str]:
  """Bytes of each array of a collective's result (several for a combined collective) and a
  short description. An async all-gather/collective-permute start carries (operand, result):
  its last shape counts."""
  shapes = _SHAPE.findall(shape_text)
  if is_start and kind in ("all-gather", "collective-permute", "all-to-all"):
    shapes = shapes[-1:]
  sizes = []
  for dtype, dims in shapes:
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n * _ITEMSIZE[dtype])
  if len(shapes) > 2:
    return sizes, f"{len(shapes)} arrays"
  return sizes, " ".join(f"{t}[{d}]" for t, d in shapes)


def collectives(hlo: str) -> list[dict]:
  """Every collective of an HLO module (`compiled.as_text()`): {'kind', 'bytes', 'arrays' (the
  bytes of each array it carries), 'shape', 'times'}, where `times` is how often it runs per call
  (the product of the known trip counts of the while loops around it; 1 outside loops)."""
  comps, order, entry, current = {}, [], None, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("{")[0].split("(")[0]:
      current = m.group(2)
      comps[current], entry = [], current if m.group(1) else entry
      order.append(current)
    elif current is not None:
      comps[current].append(line)
  # How many times each computation runs per call of the entry: loop bodies × their trip count.
  times = collections.defaultdict(int)
  if entry is None:
    return []
  times[entry] = 1
  for name in reversed(order):          # callers follow their callees in HLO text
    for line in comps[name]:
      w = _WHILE.search(line)
      trips = int(_TRIPS.search(line).group(1)) if (w and _TRIPS.search(line)) else 1
      for group in _CALLS.findall(line):
        for callee in re.split(r",\s*%?", group):
          if callee in comps and callee != name:
            times[callee] += times[name] * (trips if w and callee == w.group(1) else 1)
  found = []
  for name, lines in comps.items():
    for line in lines:
      m = _COLLECTIVE.search(line)
      if m:
        sizes, shape = _arrays(m.group(1), m.group(2), bool(m.group(3)))
        found.append({"kind": m.group(2), "bytes": sum(sizes), "arrays": sizes, "shape": shape,
                      "times": max(times[name], 1)})
  return found


def model_config(name: str, per_device_batch: int, devices: int):
  """The pretraining config of one benchmark model at a global batch of per_device × devices.
  BN groups: the config's size (32 for the paper's models, 8 for the demo's) or the whole batch
  if smaller, so that groups span devices as they do on a pod at 8 images a chip."""
  batch = per_device_batch * devices
  if name == "demo":
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location("demo", os.path.join(common.ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.batch_size = batch
  else:
    backbone, width, size = MODELS[name]
    c = common.step_config(backbone, width, size, batch, 16384, readings="defaults")
    c.loss.soft_cycle = True       # the defaults' losses, as the paper-scale configs train
    c.model.bn_group_size = 32
  c.model.bn_group_size = min(c.model.bn_group_size, batch)
  return c


def analyse(config, mesh) -> dict:
  """Compile-only figures of the train step on `mesh` (per device): FLOPs, collective bytes by
  kind, the largest collective, peak memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  abstract = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, 0))
  fn = step_lib.jit_train_step(model, tx, schedule, config, mesh,
                               step_lib.state_shardings(abstract, mesh))
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8)
  t0 = time.perf_counter()
  compiled = fn.lower(abstract, {"v": images, "v_pos": images}).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  found = collectives(compiled.as_text())
  by_kind = {k: sum(c["bytes"] * c["times"] for c in found if c["kind"] == k) for k in KINDS}
  largest = max(found, key=lambda c: c["bytes"], default=None)
  return {"devices": mesh.devices.size, "global_batch": config.batch_size,
          "flops": float(cost.get("flops", 0.0)),
          "collective_bytes": sum(by_kind.values()), "by_kind": by_kind,
          "count": sum(c["times"] for c in found),
          "largest": largest, "collectives": found,
          "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                            - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes), "compile_s": round(compile_s, 1)}


def _child(name: str, devices: int, per_device_batch: int) -> None:
  from cacl_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  row = analyse(model_config(name, per_device_batch, devices), parallel.make_mesh(devices))
  print("RESULT " + json.dumps(row), flush=True)


def run(name: str, devices: int, per_device_batch: int) -> dict:
  """One subprocess with `devices` fake CPU devices (the count is fixed when XLA starts)."""
  # XLA's default scheduler at every N, the one `cli.use_fake_cpu_devices` selects for N > 1:
  # XLA:CPU's concurrency-optimised scheduler, its choice for one device, assigns buffers for
  # overlap (R18 224 px: peak 1.07 GiB against 0.57), so the peak column would compare two
  # schedulers instead of two device counts. LLVM's optimisation level is moot: compile-only.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_cpu_enable_concurrency_optimized_scheduler=false "
                       "--xla_backend_optimization_level=0")
  out = subprocess.run([sys.executable, __file__, "--child", name, str(devices),
                        "--per_device_batch", str(per_device_batch)],
                       env=env, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.exit(f"scaling: {name} on {devices} devices failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", nargs="+", default=["demo", "r18_224", "r50_224"], choices=list(MODELS))
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  ap.add_argument("--per_device_batch", type=int, default=8)
  ap.add_argument("--child", nargs=2, metavar=("MODEL", "DEVICES"), help=argparse.SUPPRESS)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "scaling.json"))
  args = ap.parse_args(argv)
  if args.child:
    return _child(args.child[0], int(args.child[1]), args.per_device_batch)

  rows = []
  for name in args.models:
    for n in args.devices:
      row = {"model": name, **run(name, n, args.per_device_batch)}
      rows.append(row)
      kinds = ", ".join(f"{k} {v / MIB:.2f}" for k, v in row["by_kind"].items() if v)
      print(f"  {name} on {n:>2} devices: {row['flops'] / 1e9:8.2f} GFLOP, collectives "
            f"{row['collective_bytes'] / MIB:7.2f} MiB ({kinds or 'none'}), peak "
            f"{row['peak_bytes'] / GIB:.2f} GiB, compiled in {row['compile_s']} s", flush=True)
  print(f"\nPer device, {args.per_device_batch} images per device, the one program, float32:\n")
  print("| model | devices | global batch | GFLOP | vs 1st | collectives MiB | largest collective | "
        "peak GiB |\n|---|---|---|---|---|---|---|---|")
  for name in args.models:
    mine = [r for r in rows if r["model"] == name]
    for r in mine:
      big = r["largest"]
      print(f"| {name} | {r['devices']} | {r['global_batch']} | {r['flops'] / 1e9:,.2f} | "
            f"{r['flops'] / mine[0]['flops']:.3f}× | {r['collective_bytes'] / MIB:,.2f} | "
            f"{big['kind'] + ' ' + big['shape'] if big else '–'} | {r['peak_bytes'] / GIB:.2f} |")
  for r in rows:
    r.pop("collectives")   # per-op lists stay out of the JSON: the kinds and the largest stay
  common.write_results(args.out, args, rows=rows)
  return rows


if __name__ == "__main__":
  main()
