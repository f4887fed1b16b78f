"""`python -m cacl_jax.evaluation.instrument`: the demo's floor and ceiling without pretraining,
docs/demo.md's criteria on them, resumption."""
import json
import os
import subprocess
import sys

import numpy as np

from cacl_jax.evaluation import instrument
import tiny

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_sweep.py")


def test_criteria_follow_spec_section_10():
  ok = instrument.criteria([11.0, 12.0, 13.0], [55.0, 56.0, 57.0])
  assert ok["floor_mean"] == 12.0 and ok["ceiling_mean"] == 56.0
  np.testing.assert_allclose(ok["floor_std"], np.std([11.0, 12.0, 13.0], ddof=1))
  np.testing.assert_allclose(ok["std_allowed"], (56.0 - 12.0) / 8)
  assert ok["ceiling_ok"] and ok["floor_ok"] and ok["floor_std_ok"]
  low = instrument.criteria([20.0, 21.0], [39.0, 39.5])   # ceiling < 40, floor > ½ ceiling
  assert not low["ceiling_ok"] and not low["floor_ok"] and low["floor_std_ok"]
  noisy = instrument.criteria([4.0, 16.0], [50.0, 50.0])   # std 8.5 > ⅛ × (50 − 10)
  assert not noisy["floor_std_ok"]
  assert instrument.criteria([12.0], [50.0])["floor_std_ok"] is None   # one seed: no std


def test_floor_and_ceiling_per_seed_then_resume(tmp_path):
  cmd = [sys.executable, "-m", "cacl_jax.evaluation.instrument", "--config", CONFIG,
         "--workdir", str(tmp_path), "--seeds", "0,1"]
  out = subprocess.run(cmd, cwd=tiny.ROOT, env=tiny.env(8), capture_output=True, text=True,
                       timeout=2 * tiny.TIMEOUT)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.load(open(tmp_path / "instrument.json"))
  seeds = {s["seed"]: s for s in result["seeds"]}
  assert set(seeds) == {0, 1}
  for seed, row in seeds.items():
    for run, key in (("random_init", "floor"), ("supervised", "ceiling")):
      assert (tmp_path / f"seed_{seed}" / run / "confusion_matrix.png").exists()
      per_class = row[f"{key}_per_class_iou"]
      np.testing.assert_allclose(np.mean(list(per_class.values())), row[f"{key}_miou"], atol=0.06)
  expect = instrument.criteria([seeds[s]["floor_miou"] for s in (0, 1)],
                               [seeds[s]["ceiling_miou"] for s in (0, 1)])
  assert result["criteria"] == expect
  world = result["world"]
  assert 0.5 < world["background_share"] < 0.95 and world["classes_per_frame"] >= 1
  md = open(tmp_path / "instrument.md").read()
  assert "| 0 |" in md and "| 1 |" in md and "ceiling" in md
  again = subprocess.run(cmd, cwd=tiny.ROOT, env=tiny.env(8), capture_output=True, text=True,
                         timeout=tiny.TIMEOUT)
  assert again.returncode == 0 and again.stdout.count("done already") == 2, again.stdout


def test_a_config_without_a_ceiling_is_one_line(tmp_path):
  cmd = [sys.executable, "-m", "cacl_jax.evaluation.instrument", "--config", tiny.CONFIG,
         "--workdir", str(tmp_path)]
  out = subprocess.run(cmd, cwd=tiny.ROOT, env=tiny.env(1), capture_output=True, text=True,
                       timeout=tiny.TIMEOUT)
  assert out.returncode != 0
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert "no eval_after" in lines[-1], out.stderr


def test_neighbour_agreement_against_brute_force():
  from cacl_jax.evaluation import neighbours
  rng = np.random.default_rng(0)
  b, n, d = 5, 12, 6
  labels = rng.integers(0, 4, size=(b, n))
  x = rng.normal(size=(b, n, d)) + 2.0 * np.eye(d)[labels]   # classes pull features together
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  flat, lab = unit.reshape(b * n, d), labels.reshape(-1)
  image = np.repeat(np.arange(b), n)
  def brute(allowed):
    sims = np.where((image[None] == image[:, None]) | ~allowed[None], -np.inf, flat @ flat.T)
    return sims.argmax(-1)
  every, among = brute(np.ones(b * n, bool)), brute(lab > 0)
  got = neighbours.agreement(x.astype(np.float32), labels)
  np.testing.assert_allclose(got["agree_all"], np.mean(lab[every] == lab))
  np.testing.assert_allclose(got["agree_objects"], np.mean((lab[among] == lab)[lab > 0]))
  shares = np.bincount(lab, minlength=7) / lab.size
  np.testing.assert_allclose(got["chance_all"], np.sum(shares ** 2))
  np.testing.assert_allclose(got["chance_objects"], np.sum((shares[1:] / shares[1:].sum()) ** 2))
  assert got["agree_objects"] > got["chance_objects"]   # the planted structure is found
