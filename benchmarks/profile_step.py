"""Where the train step's time goes: XLA's profiler, every executed HLO op, grouped by phase.

  python benchmarks/profile_step.py                      # R18, 112 px and 224 px, batch 16, K 16384
  python benchmarks/profile_step.py --size 224 --steps 2 --top 15

Runs the compiled step under `jax.profiler.trace`, reads each executed op's time from the trace
(thunk events on the CPU; kernels on a GPU), and maps each op back to the compiled HLO: its
opcode (convolution, dot, fusion, copy, ...) and the `jax.named_scope` phase the train step gives
it (augment, target forward, online forward / backward, losses forward / backward, optimizer,
ema, queues). Prints, per setting, the share of op time by phase × kind and the costliest single
ops, and writes benchmarks/results/profile_step.json. Times are summed over threads, so the
shares are shares of busy CPU time, not of wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

import common

# First match wins: the backward passes are transposes of the forward jvps.
_PHASES = (("transpose(jvp(online))", "online backward"), ("transpose(jvp(losses))", "losses backward"),
           ("jvp(online)", "online forward"), ("jvp(losses)", "losses forward"), ("/losses/", "losses forward"),
           ("/target/", "target forward"), ("/augment/", "augment"), ("/optimizer/", "optimizer"),
           ("/ema/", "ema"), ("/queues/", "queues"))
_KINDS = {"convolution": "conv", "dot": "dot", "copy": "copy", "transpose": "copy", "fusion": "fusion",
          "reduce-window": "reduce-window", "select-and-scatter": "reduce-window", "sort": "sort", "custom-call": "custom-call", "scatter": "gather/scatter", "gather": "gather/scatter",
          "dynamic-update-slice": "copy", "concatenate": "copy", "pad": "copy", "slice": "copy"}


def _instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """HLO instruction name → (opcode, op_name metadata, fusion calls) for every computation."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not m:
      continue
    rest = line[m.end():]
    if rest.startswith("("):   # a tuple shape: skip its balanced parentheses
      depth = 0
      for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          rest = rest[i + 1:].lstrip()
          break
    else:
      rest = rest.split(" ", 1)[1] if " " in rest else ""
    op = re.match(r"([\w\-]+)\(", rest)
    name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    out[m.group(1)] = (op.group(1) if op else "?", name.group(1) if name else "",
                       calls.group(1) if calls else "")
  return out


def _fusion_body(hlo_text: str, computation: str) -> str:
  m = re.search(r"%?" + re.escape(computation) + r" [^\n]*\{\n.*?\n\}", hlo_text, re.S)
  return m.group(0) if m else ""


def _fusion_kind(body: str) -> str:
  """A fusion that wraps a conv or a dot counts as that (XLA:CPU fuses them with their epilogue)."""
  for op, kind in (("convolution(", "conv"), (" dot(", "dot")):
    if op in body:
      return kind
  return "fusion"


def phase_of(op_name: str) -> str:
  for key, phase in _PHASES:
    if key in op_name:
      return phase
  return "other"


def profile(compiled, state, batch, steps: int) -> tuple[list[dict], float, float]:
  """Per-op time (µs per step) of `steps` steps under the profiler, the wall seconds per step,
  and the seconds per step during which at least one traced op ran.

  XLA:CPU traces its kernel and library-fusion thunks but not Eigen's convolutions (which
  full-width backbones use on a CPU, `xla_cpu.compiler_options`): the wall time no traced op
  covers is reported as theirs."""
  import jax  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  hlo = compiled.as_text()
  instr = _instructions(hlo)
  state, m = compiled(state, batch)   # warm-up outside the trace
  jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  busy, intervals = collections.Counter(), []
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        # A loop's or call's body ops are traced on their own: count those, not the loop.
        if ev.name in instr and instr[ev.name][0] not in ("while", "call", "conditional"):
          busy[ev.name] += ev.duration_ns / 1e3 / steps
          intervals.append((ev.start_ns, ev.end_ns))
  covered = _union_ns(intervals) / 1e9 / steps   # seconds per step
  rows = []
  for name, us in busy.items():
    op, op_name, calls = instr[name]
    kind = _KINDS.get(op, "other")
    if op == "fusion":
      body = _fusion_body(hlo, calls)
      kind = _fusion_kind(body)
      if not op_name:   # a fusion without metadata: take its first fused op's
        inner = re.search(r'op_name="([^"]*)"', body)
        op_name = inner.group(1) if inner else ""
    phase = phase_of(op_name)
    if phase == "other" and kind == "conv":
      # The only convolutions XLA builds without source metadata are the transposed ones of
      # the backward pass (weight gradients, in a [C_in, H, W, B] layout).
      phase = "online backward"
    rows.append({"op": name, "opcode": op, "kind": kind, "phase": phase, "op_name": op_name, "us": us})
  return sorted(rows, key=lambda r: -r["us"]), wall, covered


def _union_ns(intervals) -> int:
  """Length of the union of [start, end) intervals."""
  total, end = 0, None
  for a, b in sorted(intervals):
    if end is None or a > end:
      total, end = total + (b - a), b
    elif b > end:
      total, end = total + (b - end), b
  return total


def summarize(rows: list[dict], top: int) -> dict:
  total = sum(r["us"] for r in rows)
  by = collections.Counter()
  for r in rows:
    by[(r["phase"], r["kind"])] += r["us"]
  by_phase = collections.Counter()
  for r in rows:
    by_phase[r["phase"]] += r["us"]
  return {"busy_ms": total / 1e3,
          "by_phase": [{"phase": p, "ms": us / 1e3, "share": us / total} for p, us in by_phase.most_common()],
          "by_phase_kind": [{"phase": p, "kind": k, "ms": us / 1e3, "share": us / total}
                            for (p, k), us in by.most_common()],
          "top_ops": [{**r, "ms": r["us"] / 1e3, "share": r["us"] / total} for r in rows[:top]],
          "all_ops": [{**r, "ms": r["us"] / 1e3} for r in rows if r["us"] >= 100]}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", type=int, nargs="+", default=[112, 224])
  ap.add_argument("--backbone", default="resnet18")
  ap.add_argument("--width", type=int, default=1)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--queue", type=int, default=16384)
  ap.add_argument("--soft_cycle", action="store_true", help="soft cycle (default: hard, as the peer)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=10)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "profile_step.json"))
  args = ap.parse_args()
  from cacl_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import xla_cpu

  results = []
  for size in args.size:
    config = common.step_config(args.backbone, args.width, size, args.batch, args.queue,
                                soft_cycle=args.soft_cycle, dtype=args.dtype)
    compiled, state, batch, compile_s = common.build_step(config)
    options = xla_cpu.compiler_options(config, parallel.make_mesh())
    rows, wall, covered = profile(compiled, state, batch, args.steps)
    summary = summarize(rows, args.top)
    setting = f"{args.backbone} ÷{args.width}, {size} px, batch {args.batch}, K {args.queue}"
    untraced = max(wall - covered, 0.0)
    results.append({"setting": setting, "image_size": size, "wall_ms": wall * 1e3,
                    "untraced_wall_ms": untraced * 1e3, "compiler_options": options,
                    "compile_s": compile_s, **summary})
    print(f"\n== {setting}: {wall * 1e3:.0f} ms/step wall, {summary['busy_ms']:.0f} ms busy "
          f"(op time summed over threads); compiler options {options}")
    print(f"wall time with no traced op running (Eigen convolutions when used, dispatch): "
          f"{untraced * 1e3:.0f} ms ({100 * untraced / wall:.0f} % of the step)")
    print(f"{'phase':<17} {'kind':<14} {'ms':>9} {'share':>6}")
    for r in summary["by_phase_kind"][:args.top]:
      print(f"{r['phase']:<17} {r['kind']:<14} {r['ms']:>9.1f} {100 * r['share']:>5.1f}%")
    print(f"\ncostliest ops:\n{'op':<28} {'kind':<8} {'ms':>8} {'share':>6}  source")
    for r in summary["top_ops"]:
      print(f"{r['op'][:28]:<28} {r['kind']:<8} {r['ms']:>8.1f} {100 * r['share']:>5.1f}%  "
            f"{r['op_name'][-70:]}")
  common.write_results(args.out, args, results=results)


if __name__ == "__main__":
  main()
