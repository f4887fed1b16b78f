"""`python -m cacl_jax.sweep`: two tiny variants end to end, the summary files, resumption,
and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

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
  md = open(tmp_path / "sweep.md").read()
  assert "| cacl |" in md and "| mocov2 |" in md and "38.2" in md
  assert "| supervised (labels) |" in md and "Instrument (SPEC §10): ceiling" in md
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
