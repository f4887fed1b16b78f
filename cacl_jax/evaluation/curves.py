"""Learning curves on the frozen instrument: does a variant learn if it trains longer?

    python -m cacl_jax.curves --config configs/demo.py \
        --variants cacl,mocov2,two_heads,pixel_only --seeds 0,1 --workdir DIR \
        [--long_steps 10000 --eval_steps 500,2000,5000,10000 --short_steps 2000]

For every variant and seed, two pretraining runs of the config (nothing else changed):
  long   `--long_steps` steps, its cosine schedule stretched to them, a checkpoint every
         `--checkpoint_every` steps, all kept; each of `--eval_steps` evaluated;
  short  `--short_steps` steps with their own schedule (an intermediate checkpoint of a long
         schedule is not a short run), evaluated at its end (0 = none).
Each checkpoint gets the config's evaluation (`eval_after`, configs/linear_eval_synthetic.py for
the demo) under the linear, cluster and retrieval protocols; the random-init floor and the
labelled ceiling are evaluated once (the first seed's initialisation), as in the demo.

Each pretraining is `python -m cacl_jax.main --config FILE:VARIANT --pretrain_only` in its own
process; the evaluations run in this one. Resumable: a run whose final checkpoint exists is not
rerun (an interrupted one resumes from its checkpoints), an evaluation whose results.json exists
is read back; the order is seed-major, long runs first. Writes, after every run:
  DIR/curves.json  every run (variant, seed, schedule, mIoU per protocol at each evaluated step,
                   the logged curves of `CURVE_KEYS`), the floor and the ceiling, and the table:
                   per variant, schedule, step and protocol, the seeds' values and their mean and
                   the paired difference to `--reference` (default mocov2) with its 95 %
                   Student-t interval (`sweep_summary.paired_interval`);
  DIR/curves.png   mIoU against pretraining steps (one panel per protocol, mean over seeds, seeds
                   as dots, short runs as open markers, floor and ceiling as lines) and the
                   gradient cosines (`training/grad_cosines.py`) and match-true rate over the
                   long runs of every variant that logs them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np

from cacl_jax.evaluation import sweep_summary

PROTOCOLS = ("linear", "cluster", "retrieval")
CURVE_KEYS = ("loss", "loss_global", "loss_pixel", "loss_cycle", "match_true_acc",
              "grad_cos_g_p", "grad_cos_g_c", "grad_cos_p_c", "grad_norm_g", "grad_norm_p",
              "grad_norm_c")


# ---------------------------------------------------------------- the plan

def plan(variants: list[str], seeds: list[int], long_steps: int, eval_steps: list[int],
         short_steps: int) -> list[dict]:
  """The runs in order: seed-major, every variant's long run before the short ones."""
  runs = []
  for seed in seeds:
    runs += [{"variant": v, "seed": seed, "schedule": "long", "total_steps": long_steps,
              "eval_steps": sorted(eval_steps)} for v in variants]
  for seed in seeds:
    if short_steps:
      runs += [{"variant": v, "seed": seed, "schedule": "short", "total_steps": short_steps,
                "eval_steps": [short_steps]} for v in variants]
  return runs


def run_dir(workdir: str, run: dict) -> str:
  return os.path.join(workdir, run["variant"], f"seed_{run['seed']}", f"steps_{run['total_steps']}")


def pretrain_command(config_file: str, run: dict, directory: str, checkpoint_every: int,
                     overrides: list[str]) -> list[str]:
  total, every = run["total_steps"], min(checkpoint_every, run["total_steps"])
  return [sys.executable, "-m", "cacl_jax.main", "--config", f"{config_file}:{run['variant']}",
          "--workdir", directory, "--pretrain_only", f"--config.seed={run['seed']}",
          f"--config.total_steps={total}", f"--config.checkpoint_every_steps={every}",
          f"--config.keep_checkpoints={-(-total // every) + 1}", *overrides]


def pretrained(directory: str, total_steps: int) -> bool:
  return os.path.isdir(os.path.join(directory, "checkpoints", str(total_steps)))


def pretrain(cmd: list[str], directory: str) -> tuple[int, str]:
  """Runs one pretraining, output appended to DIR/log.txt; (exit code, last line)."""
  os.makedirs(directory, exist_ok=True)
  log = os.path.join(directory, "log.txt")
  with open(log, "a") as out:
    out.write("$ " + " ".join(cmd) + "\n")
    out.flush()
    code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
  with open(log) as f:
    lines = [line.strip() for line in f if line.strip()]
  return code, (lines[-1] if lines else "")


# ---------------------------------------------------------------- evaluations

def with_protocol(eval_config: ml_collections.ConfigDict, protocol: str, **keys):
  c = ml_collections.ConfigDict(eval_config.to_dict())
  c.protocol = protocol
  c.update(keys)
  return c


def read_results(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def evaluate_step(eval_config, directory: str, step: int, mesh) -> dict[str, float]:
  """{protocol: mIoU} of checkpoint `step` of the run in `directory` (each protocol's
  results.json under DIR/curves_eval/step_S/PROTOCOL, read back where it exists)."""
  from cacl_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  mious = {}
  for protocol in PROTOCOLS:
    out = os.path.join(directory, "curves_eval", f"step_{step}", protocol)
    res = read_results(os.path.join(out, "results.json"))
    if res is None:
      res = probe.evaluate_checkpoint(
          with_protocol(eval_config, protocol, pretrained=directory, checkpoint_step=step), out, mesh)
    mious[protocol] = float(res["miou"])
  return mious


def instrument(config, eval_config, workdir: str, mesh) -> dict:
  """The floor (random init: linear, cluster, retrieval) and the ceiling (labels: linear,
  retrieval) of the first seed's initialisation, once (DIR/instrument.json)."""
  from cacl_jax.evaluation import cluster, demo, retrieval  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "instrument.json")
  done = read_results(path)
  if done is not None:
    return done
  out = os.path.join(workdir, "instrument")
  floor, params, stats = demo.floor(config, eval_config, os.path.join(out, "random_init"), mesh)
  result = {"floor": {"linear": floor["miou"]}, "ceiling": {}}
  for protocol, probe_fn in (("cluster", cluster.cluster_probe),
                             ("retrieval", retrieval.retrieval_probe)):
    result["floor"][protocol] = probe_fn(with_protocol(eval_config, protocol), params, stats,
                                         config.model, mesh,
                                         os.path.join(out, "random_init", protocol))["miou"]
  sup = demo.ceiling(config, eval_config, params, stats, os.path.join(out, "supervised"), mesh,
                     with_protocol(eval_config, "retrieval"))
  if sup is not None:
    result["ceiling"] = {"linear": sup["miou"], "retrieval": sup["retrieval"]["miou"]}
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  return result


def logged_curves(directory: str) -> dict[str, list]:
  """{'step': [...], key: [...]} from the run's metrics.jsonl, for `CURVE_KEYS` (NaN where a
  record lacks a key)."""
  records = []
  path = os.path.join(directory, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  present = [k for k in CURVE_KEYS if any(k in r for r in records)]
  return {"step": [r["step"] for r in records],
          **{k: [r.get(k, float("nan")) for r in records] for k in present}}


# ---------------------------------------------------------------- the table

def table(rows: list[dict], reference: str) -> list[dict]:
  """One entry per (variant, schedule, step, protocol): seeds' values, mean, and the paired
  difference to `reference` (same schedule, step and seed) with its 95 % t interval."""
  values: dict[tuple, dict[int, float]] = {}
  for row in rows:
    for step, mious in row.get("evals", {}).items():
      for protocol, miou in mious.items():
        key = (row["variant"], row["schedule"], int(step), protocol)
        values.setdefault(key, {})[row["seed"]] = miou
  out = []
  for (variant, schedule, step, protocol), by_seed in sorted(values.items()):
    entry = {"variant": variant, "schedule": schedule, "step": step, "protocol": protocol,
             "seeds": {str(s): v for s, v in sorted(by_seed.items())},
             "mean": float(np.mean(list(by_seed.values())))}
    ref = values.get((reference, schedule, step, protocol), {})
    common = sorted(set(ref) & set(by_seed))
    if variant != reference and common:
      diffs = [by_seed[s] - ref[s] for s in common]
      entry["minus_reference"] = {"seeds": [int(s) for s in common], "differences": diffs,
                                  **sweep_summary.paired_interval(diffs)}
    out.append(entry)
  return out


def markdown(entries: list[dict], inst: dict, reference: str) -> str:
  """The table as markdown: variant × schedule × step, one column per protocol (mean, the
  seeds in brackets), then the paired difference to the reference per protocol."""
  by_row: dict[tuple, dict[str, dict]] = {}
  for e in entries:
    by_row.setdefault((e["variant"], e["schedule"], e["step"]), {})[e["protocol"]] = e
  head = ("| variant | schedule | step | " + " | ".join(PROTOCOLS) + " | " +
          " | ".join(f"{p} − {reference} [95 % CI]" for p in PROTOCOLS) + " |")
  lines = [head, "|" + "---|" * (3 + 2 * len(PROTOCOLS))]
  fmt_seeds = lambda e: "/".join(f"{v:.1f}" for v in e["seeds"].values())
  for (variant, schedule, step), cells in sorted(by_row.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
    values = [f"{cells[p]['mean']:.1f} ({fmt_seeds(cells[p])})" if p in cells else "–"
              for p in PROTOCOLS]
    diffs = []
    for p in PROTOCOLS:
      d = cells.get(p, {}).get("minus_reference")
      if d is None:
        diffs.append("–")
      elif d["low"] is None:
        diffs.append(f"{d['mean']:+.1f} (one seed)")
      else:
        diffs.append(f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]")
    lines.append(f"| {variant} | {schedule} | {step} | " + " | ".join(values) + " | " +
                 " | ".join(diffs) + " |")
  floor = inst.get("floor", {})
  ceiling = inst.get("ceiling", {})
  lines += ["", "Floor (random init): " + ", ".join(f"{p} {v:.1f}" for p, v in floor.items()) +
            "; ceiling (labels): " + ", ".join(f"{p} {v:.1f}" for p, v in ceiling.items()) + "."]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the figure

def figure(rows: list[dict], inst: dict, path: str, title: str) -> str:
  """curves.png: mIoU vs steps per protocol; gradient cosines and match-true over long runs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  variants = list(dict.fromkeys(r["variant"] for r in rows))
  colours = {v: plt.cm.tab10(i) for i, v in enumerate(variants)}
  fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), layout="constrained")
  for ax, protocol in zip(axes[0], PROTOCOLS):
    for v in variants:
      for schedule, marker, fill in (("long", "o", True), ("short", "s", False)):
        points = {}
        for r in rows:
          if r["variant"] == v and r["schedule"] == schedule:
            for step, mious in r.get("evals", {}).items():
              if protocol in mious:
                points.setdefault(int(step), []).append(mious[protocol])
        if not points:
          continue
        steps = sorted(points)
        ax.plot(steps, [np.mean(points[s]) for s in steps], marker=marker, color=colours[v],
                linestyle="-" if schedule == "long" else "none",
                markerfacecolor=colours[v] if fill else "none",
                label=f"{v} ({schedule})" if schedule == "short" else v)
        for s in steps:
          ax.scatter([s] * len(points[s]), points[s], s=8, color=colours[v], alpha=0.5)
    for level, name, style in ((inst.get("floor", {}), "floor", ":"),
                               (inst.get("ceiling", {}), "ceiling", "--")):
      if protocol in level:
        ax.axhline(level[protocol], color="grey", linestyle=style, label=name)
    ax.set_xscale("log")
    ax.set_title(f"{protocol} protocol: mIoU")
    ax.set_xlabel("pretraining steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  longs = [_with_norm_ratio(r) for r in rows if r["schedule"] == "long"]
  _curve_panel(axes[0][3], longs, "match_true_acc", colours, "match-true rate of m(i) (eq. 4)")
  titles = {"grad_cos_g_p": "cos(∇L_G, ∇L_P), backbone", "grad_cos_g_c": "cos(∇L_G, ∇L_C), backbone",
            "grad_cos_p_c": "cos(∇L_P, ∇L_C), backbone", "norm_ratio_p_g": "‖∇L_P‖ / ‖∇L_G‖, backbone"}
  for ax, (name, panel_title) in zip(axes[1], titles.items()):
    _curve_panel(ax, longs, name, colours, panel_title)
  fig.suptitle(f"{title}\ncurves of the long runs: each logging step faint, the running mean of 9 "
               "records solid; seeds by line style", fontsize=9)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _with_norm_ratio(row: dict) -> dict:
  """The row with curves['norm_ratio_p_g'] = grad_norm_p / grad_norm_g where both are logged."""
  c = row.get("curves", {})
  if "grad_norm_p" not in c or "grad_norm_g" not in c:
    return row
  ratio = [p / g if g else float("nan") for p, g in zip(c["grad_norm_p"], c["grad_norm_g"])]
  return {**row, "curves": {**c, "norm_ratio_p_g": ratio}}


def _curve_panel(ax, rows, key, colours, title, window: int = 9):
  """One logged key over the steps of each run that has it (seeds by line style): every
  record faint, the running mean over `window` records drawn over it."""
  styles = ("-", "--", ":", "-.")
  for r in rows:
    ys = r.get("curves", {}).get(key)
    if ys:
      steps, ys = np.asarray(r["curves"]["step"]), np.asarray(ys, float)
      colour, style = colours[r["variant"]], styles[r["seed"] % len(styles)]
      ax.plot(steps, ys, color=colour, linestyle=style, linewidth=0.6, alpha=0.3)
      if len(ys) >= window:
        mean = np.convolve(ys, np.ones(window) / window, mode="valid")
        ax.plot(steps[window // 2:window // 2 + len(mean)], mean, color=colour, linestyle=style,
                linewidth=1.4, label=f"{r['variant']} seed {r['seed']}")
      else:
        ax.lines[-1].set_label(f"{r['variant']} seed {r['seed']}")
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=6)


# ---------------------------------------------------------------- main

def write(workdir: str, rows: list[dict], inst: dict, args: dict) -> list[dict]:
  entries = table(rows, args["reference"])
  doc = {"args": args, "instrument": inst, "runs": rows, "table": entries}
  path = os.path.join(workdir, "curves.json")
  with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(path + ".tmp", path)
  with open(os.path.join(workdir, "curves.md"), "w") as f:
    f.write(f"Curves `{args['command']}`\n\n" + markdown(entries, inst, args["reference"]))
  figure(rows, inst, os.path.join(workdir, "curves.png"), args["command"][:150])
  return entries


def main(config_file: str, variants: list[str], seeds: list[int], workdir: str, long_steps: int,
         eval_steps: list[int], short_steps: int, checkpoint_every: int, reference: str,
         overrides: list[str], command: str, load_config) -> None:
  from cacl_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  bad = [s for s in eval_steps if s % checkpoint_every or s > long_steps]
  if bad:
    sys.exit(f"curves: error: --eval_steps {bad} must be multiples of --checkpoint_every "
             f"{checkpoint_every} up to --long_steps {long_steps}")
  configs = {v: load_config(v) for v in variants}
  if not configs[variants[0]].get("eval_after"):
    sys.exit(f"curves: error: {config_file} chains no evaluation (`eval_after`)")
  os.makedirs(workdir, exist_ok=True)
  args = {"command": command, "config": config_file, "variants": variants, "seeds": seeds,
          "long_steps": long_steps, "eval_steps": eval_steps, "short_steps": short_steps,
          "checkpoint_every": checkpoint_every, "reference": reference, "overrides": overrides}
  mesh = parallel.make_mesh()
  first = ml_collections.ConfigDict(configs[variants[0]].to_dict())
  first.seed = seeds[0]
  eval_config = ml_collections.ConfigDict(first.eval_after.to_dict())
  runs = plan(variants, seeds, long_steps, eval_steps, short_steps)
  rows = [dict(r, status="pending") for r in runs]
  before = read_results(os.path.join(workdir, "curves.json")) or {}
  # Runs already done in DIR/curves.json (e.g. a copy from another machine) are kept as they are.
  earlier = {_identity(r): r for r in before.get("runs", []) if r.get("status") == "done"}
  start, failed = time.time(), 0
  inst = before.get("instrument") or instrument(first, eval_config, workdir, mesh)
  print(f"curves: floor {inst['floor']}, ceiling {inst['ceiling']}", flush=True)
  for k, run in enumerate(runs, start=1):
    row = rows[k - 1]
    directory = run_dir(workdir, run)
    if _identity(run) in earlier:
      rows[k - 1] = earlier[_identity(run)]
      continue
    label = f"[{k}/{len(runs)}] {run['variant']} seed {run['seed']} {run['total_steps']} steps"
    if not pretrained(directory, run["total_steps"]):
      print(f"{label}: pretraining → {directory} ({_hms(time.time() - start)} so far)", flush=True)
      code, last = pretrain(pretrain_command(config_file, run, directory, checkpoint_every,
                                             overrides), directory)
      if code or not pretrained(directory, run["total_steps"]):
        failed += 1
        row.update(status="failed", exit_code=code, last_line=last)
        print(f"{label}: FAILED (exit {code}): {last}", flush=True)
        write(workdir, rows, inst, args)
        continue
    row["evals"] = {}
    for step in run["eval_steps"]:
      row["evals"][str(step)] = evaluate_step(eval_config, directory, step, mesh)
      print(f"{label}: step {step}: " + ", ".join(
          f"{p} {v:.1f}" for p, v in row["evals"][str(step)].items()), flush=True)
    row.update(status="done", curves=logged_curves(directory))
    write(workdir, rows, inst, args)
  entries = write(workdir, rows, inst, args)
  print("\n" + markdown(entries, inst, reference), flush=True)
  print(f"written: {os.path.join(workdir, 'curves.json')}, curves.md, curves.png "
        f"({_hms(time.time() - start)} this start)", flush=True)
  if failed:
    sys.exit(f"curves: error: {failed} of {len(runs)} runs failed (see their log.txt)")


def _identity(run: dict) -> tuple:
  return (run["variant"], run["seed"], run["schedule"], run["total_steps"], tuple(run["eval_steps"]))


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
