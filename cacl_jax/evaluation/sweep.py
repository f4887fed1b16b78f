"""Variants × seeds of pretraining + evaluation, summarised in one table (any ablation).

    python -m cacl_jax.sweep --config configs/demo.py --variants cacl,two_heads,mocov2 \
        --seeds 0,1,2 --workdir DIR [--config.KEY=VALUE ...]

Each run is `python -m cacl_jax.main --config FILE:VARIANT --workdir DIR/VARIANT/seed_S
--config.seed=S [--config.KEY=VALUE ...]` in its own process, one after another; the
`--config.*` overrides apply to every run. A config that chains its evaluation (`eval_after`,
as configs/demo.py) is evaluated by `main`; for any other, `--eval_config FILE` runs
`python -m cacl_jax.linear_eval` on the run (`--eval_override KEY=VALUE` sets its keys, e.g.
`data.root=/data/prepared/cityscapes`).

Resumable: a run whose results.json exists is not rerun, and an interrupted one resumes from
its own checkpoints; a failed run is recorded (exit code, last line of its log) and the sweep
goes on. Writes, after every run (`cacl_jax/evaluation/sweep_summary.py`):
  DIR/sweep.json   every run (variant, seed, mIoU per evaluation protocol — linear, and cluster
                   and retrieval where the run has them —, the floor's and ceiling's, last logged
                   metrics), the summary per variant and the paired differences;
  DIR/sweep.md     mean ± std over seeds per variant and protocol, the paper's number beside it
                   where the config file names one (`PAPER_MIOU = {variant: mIoU}`); the demo's
                   floor (random init) and ceiling (supervised) rows, one value per seed, and
                   docs/demo.md's instrument criteria on them (the ceiling is computed by the first
                   variant's run of each seed only); per protocol, every variant's per-seed
                   difference to `--reference` (default mocov2) with its mean, 95 % Student-t
                   interval and verdict;
  DIR/sweep.png    the means with the seeds as dots, and the paired differences with their
                   intervals, one panel per protocol.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from cacl_jax.evaluation import sweep_summary as summary_lib
from cacl_jax.runtime import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining config file (its variants are swept).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per variant and seed.")
flags.DEFINE_list("variants", None, "Variant names of the config file, e.g. cacl,two_heads,mocov2.")
flags.DEFINE_list("seeds", ["0"], "Seeds, e.g. 0,1,2.")
flags.DEFINE_string("eval_config", None, "Evaluation config for configs without `eval_after`.")
flags.DEFINE_multi_string("eval_override", [], "KEY=VALUE for the evaluation config (repeatable).")
flags.DEFINE_string("reference", "mocov2", "Variant that the paired differences are taken to.")
flags.mark_flags_as_required(["config", "workdir", "variants"])


# ---------------------------------------------------------------- one run

def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed_{seed}")


def results_path(run: str, chained: bool) -> str:
  return os.path.join(run, "linear_eval" if chained else "eval", "results.json")


def commands(config_file: str, variant: str, seed: int, run: str, overrides: list[str],
             eval_config: str | None, eval_overrides: list[str]) -> list[list[str]]:
  """The processes of one run: pretraining (+ chained evaluation), or pretraining then
  `linear_eval` when an evaluation config is given."""
  py = sys.executable
  cmds = [[py, "-m", "cacl_jax.main", "--config", f"{config_file}:{variant}", "--workdir", run,
           f"--config.seed={seed}", *overrides]]
  if eval_config:
    cmds.append([py, "-m", "cacl_jax.linear_eval", "--config", eval_config,
                 "--workdir", os.path.join(run, "eval"), f"--config.pretrained={run}",
                 *[f"--config.{kv}" for kv in eval_overrides]])
  return cmds


def last_metrics(run: str) -> dict:
  """The last well-formed record of the run's metrics.jsonl ({} if none)."""
  path = os.path.join(run, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          last = json.loads(line)
        except json.JSONDecodeError:
          continue
  return last


def record(variant: str, seed: int, run: str, chained: bool) -> dict:
  """One run's row from its files (status 'done' when results.json exists)."""
  row = {"variant": variant, "seed": seed, "workdir": run, "status": "missing"}
  path = results_path(run, chained)
  if os.path.exists(path):
    with open(path) as f:
      res = json.load(f)
    row.update(status="done", miou=res["miou"], macc=res["macc"], protocols=protocol_mious(res))
    for part in ("random_init", "supervised"):
      if part in res:
        row[part] = protocol_mious(res[part])
        row[f"{part}_miou"] = res[part]["miou"]
    row["final_metrics"] = last_metrics(run)
  return row


def protocol_mious(res: dict) -> dict[str, float]:
  """{'linear': mIoU, and 'cluster' / 'retrieval' where results.json carries them}."""
  return {"linear": res["miou"],
          **{p: res[p]["miou"] for p in ("cluster", "retrieval") if p in res}}


def execute(cmds: list[list[str]], run: str) -> tuple[int, str]:
  """Runs the commands in order, output appended to RUN/log.txt; returns (code, last line)."""
  os.makedirs(run, exist_ok=True)
  log = os.path.join(run, "log.txt")
  code = 0
  for cmd in cmds:
    with open(log, "a") as out:
      out.write("$ " + " ".join(cmd) + "\n")
      out.flush()
      code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code:
      break
  with open(log) as f:
    lines = [line.strip() for line in f if line.strip()]
  return code, (lines[-1] if lines else "")


# ---------------------------------------------------------------- the summary

def write_outputs(workdir: str, rows: list[dict], variants: list[str], paper: dict, args: dict):
  """sweep.json, sweep.md and sweep.png from the rows so far; returns (summary, paired)."""
  reference = args["reference"]
  summary = summary_lib.summarise(rows, variants, paper)
  pairs = summary_lib.paired(rows, variants, reference)
  header = (f"Sweep `{args['command']}`\n\n{sum(r['status'] == 'done' for r in rows)} of "
            f"{len(rows)} runs done.")
  tmp = os.path.join(workdir, "sweep.json.tmp")
  with open(tmp, "w") as f:
    json.dump({"args": args, "runs": rows, "summary": summary, "paired": pairs}, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "sweep.json"))
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(summary_lib.markdown(summary, pairs, header, reference))
  if summary:
    summary_lib.figure(summary, pairs, os.path.join(workdir, "sweep.png"), args["command"][:120],
                       reference)
  return summary, pairs


# ---------------------------------------------------------------- main

def main(argv):
  del argv
  config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
  chained = bool(FLAGS.config.get("eval_after"))
  if not chained and not FLAGS.eval_config:
    sys.exit("sweep: error: the config chains no evaluation (`eval_after`): pass --eval_config FILE")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    sys.exit(f"sweep: error: --seeds must be integers, got {','.join(FLAGS.seeds)}")
  # Every variant must exist before hours of work start (the config file raises on unknown names).
  module = cli.load_config_module(config_file)
  for v in FLAGS.variants:
    try:
      module.get_config(v)
    except (ValueError, KeyError, TypeError) as e:
      sys.exit(f"sweep: error: {config_file}:{v}: {e}")
  if FLAGS.reference not in FLAGS.variants:
    print(f"sweep: note: the reference {FLAGS.reference!r} is not among the variants: no paired "
          "differences", flush=True)
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  paper = dict(getattr(module, "PAPER_MIOU", {}))
  args = {"command": " ".join(["python -m cacl_jax.sweep", *sys.argv[1:]]),
          "config": config_file, "variants": FLAGS.variants, "seeds": seeds, "overrides": overrides,
          "eval_config": FLAGS.eval_config, "eval_overrides": FLAGS.eval_override,
          "reference": FLAGS.reference}
  plan = [(v, s) for s in seeds for v in FLAGS.variants]   # seed-major: early rows are comparable
  eval_config = None if chained else FLAGS.eval_config
  # The demo's supervised row (the ceiling) depends on the seed, not on the variant: the first
  # variant of each seed computes it, the others skip it (minutes each).
  ceiling_once = chained and bool(FLAGS.config.eval_after.get("supervised"))
  rows, failed, durations = [], 0, []
  for k, (variant, seed) in enumerate(plan, start=1):
    run = run_dir(workdir, variant, seed)
    row = record(variant, seed, run, chained)
    if row["status"] != "done":
      eta = (f", ETA {_hms(sum(durations) / len(durations) * (len(plan) - k + 1))}"
             if durations else "")
      print(f"[{k}/{len(plan)}] {variant} seed {seed} → {run}{eta}", flush=True)
      start = time.time()
      skip = (["--config.eval_after.supervised.num_epochs=0"]
              if ceiling_once and variant != FLAGS.variants[0] else [])
      code, last = execute(commands(config_file, variant, seed, run, overrides + skip, eval_config,
                                    FLAGS.eval_override), run)
      durations.append(time.time() - start)
      row = record(variant, seed, run, chained)
      if row["status"] != "done":
        failed += 1
        row.update(status="failed", exit_code=code, last_line=last)
        print(f"[{k}/{len(plan)}] {variant} seed {seed} FAILED (exit {code}): {last}", flush=True)
      else:
        print(f"[{k}/{len(plan)}] {variant} seed {seed}: mIoU {_mious(row)} "
              f"({_hms(durations[-1])})", flush=True)
    else:
      print(f"[{k}/{len(plan)}] {variant} seed {seed}: done already, mIoU {_mious(row)}",
            flush=True)
    rows.append(row)
    summary, pairs = write_outputs(workdir, rows, FLAGS.variants, paper, args)
  print("\n" + summary_lib.markdown(summary, pairs, f"sweep of {len(plan)} runs in {workdir}",
                                    FLAGS.reference), flush=True)
  print(f"written: {os.path.join(workdir, 'sweep.json')}, sweep.md, sweep.png", flush=True)
  if failed:
    sys.exit(f"sweep: error: {failed} of {len(plan)} runs failed (see their log.txt)")


def _mious(row: dict) -> str:
  return ", ".join(f"{p} {v:.1f}" for p, v in row["protocols"].items())


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
