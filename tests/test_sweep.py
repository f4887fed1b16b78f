"""`python -m cacl_jax.sweep`: two tiny variants end to end, the summary files, resumption,
one-line errors, and the paired differences with their t intervals."""
import json
import os
import subprocess
import sys

import pytest

from cacl_jax.evaluation import sweep_summary
import tiny

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_sweep.py")


def sweep(workdir, *args):
  cmd = [sys.executable, "-m", "cacl_jax.sweep", "--config", CONFIG, "--workdir", str(workdir), *args]
  return subprocess.run(cmd, cwd=tiny.ROOT, env=tiny.env(8), capture_output=True, text=True,
                        timeout=2 * tiny.TIMEOUT)


def test_two_variants_end_to_end_then_resume(tmp_path):
  out = sweep(tmp_path, "--variants", "cacl,mocov2", "--seeds", "3", "--config.checkpoint_every_steps=2")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.load(open(tmp_path / "sweep.json"))
  runs = {r["variant"]: r for r in result["runs"]}
  assert set(runs) == {"cacl", "mocov2"} and all(r["status"] == "done" for r in runs.values())
  for name, r in runs.items():
    assert r["workdir"] == str(tmp_path / name / "seed_3")
    saved = json.load(open(tmp_path / name / "seed_3" / "linear_eval" / "results.json"))
    assert r["miou"] == saved["miou"] and r["random_init_miou"] == saved["random_init"]["miou"]
    # The three protocols of the demo's evaluation, for the run and for its floor.
    for protocol in ("cluster", "retrieval"):
      assert r["protocols"][protocol] == saved[protocol]["miou"]
      assert r["random_init"][protocol] == saved["random_init"][protocol]["miou"]
    assert r["final_metrics"]["step"] == 4
  # The override and the seed reached the runs; the variant set its own loss weights.
  log = open(tmp_path / "mocov2" / "seed_3" / "log.txt").read()
  assert "--config.seed=3" in log and "--config.checkpoint_every_steps=2" in log
  assert runs["mocov2"]["final_metrics"]["loss_pixel"] == 0.0
  assert runs["cacl"]["final_metrics"]["loss_pixel"] > 0.0
  summary = result["summary"]
  assert summary["cacl"]["paper"] == 38.2 and summary["cacl"]["n"] == 1
  # The floor and the ceiling: one value per seed; the ceiling computed by the first variant only.
  assert summary["random init"]["n"] == 1 and summary["supervised (labels)"]["n"] == 1
  assert "supervised_miou" in runs["cacl"] and "supervised_miou" not in runs["mocov2"]
  assert "supervised" not in json.load(open(tmp_path / "mocov2" / "seed_3" / "linear_eval" /
                                            "results.json"))
  retrieved = runs["cacl"]["protocols"]["retrieval"]
  assert summary["cacl"]["protocols"]["retrieval"]["values"] == [retrieved]
  # The ceiling's backbone is evaluated by retrieval too.
  assert set(runs["cacl"]["supervised"]) == {"linear", "retrieval"}
  # Paired to the default reference, mocov2: one seed gives a difference but no interval.
  pair = result["paired"]["retrieval"]["cacl"]
  assert pair["seeds"] == [3] and pair["verdict"] == "one seed" and pair["low"] is None
  assert pair["differences"] == [pytest.approx(runs["cacl"]["protocols"]["retrieval"]
                                               - runs["mocov2"]["protocols"]["retrieval"])]
  assert set(result["paired"]) == {"linear", "cluster", "retrieval"}
  md = open(tmp_path / "sweep.md").read()
  assert "| cacl |" in md and "| mocov2 |" in md and "38.2" in md
  assert "| retrieval | cacl |" in md and "| linear | random init |" in md
  assert "| supervised (labels) |" in md and "Instrument (docs/demo.md): ceiling" in md
  assert os.path.getsize(tmp_path / "sweep.png") > 5000
  # Rerun: nothing is trained again.
  again = sweep(tmp_path, "--variants", "cacl,mocov2", "--seeds", "3", "--config.checkpoint_every_steps=2")
  assert again.returncode == 0 and again.stdout.count("done already") == 2, again.stdout


@pytest.mark.parametrize("args, message", [
    (["--variants", "cacl,nope"], "unknown variant 'nope'"),
    (["--variants", "cacl", "--seeds", "a"], "--seeds must be integers"),
    (["--variants", "cacl", "--config.loss.nope=1"], "unknown config key"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
  out = sweep(tmp_path, *args)
  assert out.returncode != 0
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], out.stderr


def test_paired_intervals_are_student_t_over_the_seeds():
  """d = (1, 2, 3): mean 2, sd 1, t(0.975, 2) = 4.3027 → 2 ± 2.484 contains 0; d + 2 does not."""
  d = sweep_summary.paired_interval([1.0, 2.0, 3.0])
  assert d["mean"] == 2.0 and d["n"] == 3 and d["verdict"] == "not resolved"
  assert (d["low"], d["high"]) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-4)
  assert sweep_summary.paired_interval([3.0, 4.0, 5.0])["verdict"] == "above"
  assert sweep_summary.paired_interval([-3.0, -4.0, -5.0])["verdict"] == "below"
  # Pairs are taken seed by seed: a seed that the reference lacks is left out.
  rows = [{"variant": v, "seed": s, "status": "done", "miou": m, "macc": 0.0,
           "protocols": {"linear": m, "retrieval": m + 1}, "random_init": {"linear": 10.0 + s}}
          for v, s, m in [("mocov2", 0, 20.0), ("mocov2", 1, 22.0), ("cacl", 0, 15.0),
                          ("cacl", 1, 19.0), ("cacl", 2, 30.0)]]
  pairs = sweep_summary.paired(rows, ["cacl", "mocov2"], "mocov2")
  assert pairs["linear"]["cacl"]["differences"] == [-5.0, -3.0]
  assert pairs["linear"]["cacl"]["seeds"] == [0, 1] and pairs["retrieval"]["cacl"]["mean"] == -4.0
  assert pairs["linear"]["random init"]["differences"] == [-10.0, -11.0]
  assert "random init" not in pairs["retrieval"]
  summary = sweep_summary.summarise(rows, ["cacl", "mocov2"], {})
  assert summary["cacl"]["protocols"]["retrieval"]["values"] == [16.0, 20.0, 31.0]
  assert summary["random init"]["mious"] == [10.0, 11.0, 12.0]


# ---------------------------------------------------------------- learning curves

def curves(workdir, *args):
  cmd = [sys.executable, "-m", "cacl_jax.curves", "--config", CONFIG, "--workdir", str(workdir),
         "--variants", "cacl,mocov2", "--seeds", "0,1", "--long_steps", "4", "--eval_steps", "2,4",
         "--checkpoint_every", "2", "--short_steps", "2", *args]
  return subprocess.run(cmd, cwd=tiny.ROOT, env=tiny.env(1), capture_output=True, text=True,
                        timeout=tiny.TIMEOUT)


def test_curves_table_pairs_each_schedule_and_step_with_the_reference():
  from cacl_jax.evaluation import curves as curves_lib
  runs = curves_lib.plan(["cacl", "mocov2"], [0, 1], 4, [4, 2], 2)
  assert [(r["variant"], r["seed"], r["schedule"]) for r in runs][:3] == [
      ("cacl", 0, "long"), ("mocov2", 0, "long"), ("cacl", 1, "long")]
  assert runs[0]["eval_steps"] == [2, 4] and runs[-1]["eval_steps"] == [2]
  rows = [dict(r, evals={str(s): {"linear": 10.0 * (r["variant"] == "cacl") + r["seed"] + s,
                                  "cluster": 5.0} for s in r["eval_steps"]}) for r in runs]
  table = {(e["variant"], e["schedule"], e["step"], e["protocol"]): e
           for e in curves_lib.table(rows, "mocov2")}
  e = table[("cacl", "long", 4, "linear")]
  assert e["seeds"] == {"0": 14.0, "1": 15.0} and e["mean"] == 14.5
  assert e["minus_reference"]["differences"] == [10.0, 10.0]
  assert e["minus_reference"]["verdict"] == "above"   # two equal differences: sd 0, interval [10, 10]
  assert table[("cacl", "short", 2, "cluster")]["minus_reference"]["differences"] == [0.0, 0.0]
  assert "minus_reference" not in table[("mocov2", "long", 2, "linear")]
  md = curves_lib.markdown(list(table.values()), {"floor": {"linear": 1.0}, "ceiling": {}}, "mocov2")
  assert "| cacl | long | 4 | 14.5 (14.0/15.0) |" in md


def test_curves_resume_from_a_copied_json_and_reject_bad_steps(tmp_path):
  """A curves.json from another machine: its done runs are neither pretrained nor evaluated
  again; the table, markdown and figure are rewritten from it. Bad --eval_steps: one line."""
  from cacl_jax.evaluation import curves as curves_lib
  runs = curves_lib.plan(["cacl", "mocov2"], [0, 1], 4, [2, 4], 2)
  rows = [dict(r, status="done", evals={str(s): {"linear": 12.0 + r["seed"]} for s in r["eval_steps"]},
               curves={"step": [2, 4], "grad_cos_g_p": [0.1, -0.2]}) for r in runs]
  json.dump({"instrument": {"floor": {"linear": 10.0}, "ceiling": {"linear": 60.0}}, "runs": rows},
            open(tmp_path / "curves.json", "w"))
  out = curves(tmp_path)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "pretraining" not in out.stdout and not (tmp_path / "cacl").exists()
  result = json.load(open(tmp_path / "curves.json"))
  assert [r["status"] for r in result["runs"]] == ["done"] * 8
  assert result["instrument"]["ceiling"] == {"linear": 60.0}
  assert os.path.getsize(tmp_path / "curves.png") > 5000
  assert "| cacl | long | 4 | 12.5 (12.0/13.0) |" in open(tmp_path / "curves.md").read()
  bad = curves(tmp_path, "--eval_steps", "3")
  lines = [l for l in bad.stderr.strip().splitlines() if l.strip()]
  assert bad.returncode != 0 and len(lines) == 1 and "multiples of --checkpoint_every" in lines[0]
