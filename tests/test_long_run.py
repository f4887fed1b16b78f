"""A multi-day run left alone (docs/reliability.md "Long runs"): non-finite steps skipped in the
graph, a restore that never silently starts over, a hang turned into an exit code, the time
split, goodput, compile_s and a profile on demand, metrics appended where files cannot be.

Two real runs of the tiny config (tests/tiny.py), started side by side:
  N   NaN injected at steps 5, 7, 8 and 9 (`debug.nonfinite_steps`), `max_consecutive_skips`
      3, a checkpoint every step, a profile of steps 2-3: it skips 5, applies 6, and stops at
      9 (three in a row);
  H   `debug.hang_at_step=3` with `watchdog_seconds=10`: the watchdog ends it.
Then N's workdir, every checkpoint file truncated, is started again: it must refuse.
"""
import glob
import os
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from cacl_jax.runtime import checkpoint, metrics_log, parallel, watchdog
from cacl_jax.training import nonfinite, state as state_lib
import tiny

NAN_STEPS = (5, 7, 8, 9)
N_ARGS = (tiny.NO_VIZ, f"--config.debug.nonfinite_steps={NAN_STEPS}", "--config.max_consecutive_skips=3",
          "--config.checkpoint_every_steps=1", "--config.profile.start_step=2",
          "--config.profile.num_steps=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("long_run")
  n, h = str(root / "nan"), str(root / "hang")
  started = [tiny.start_main(n, *N_ARGS, log=n + ".log"),
             tiny.start_main(h, tiny.NO_VIZ, "--config.debug.hang_at_step=3",
                             "--config.watchdog_seconds=10", log=h + ".log")]
  try:
    t = time.monotonic()
    h_out = tiny.finish(started[1])
    out = {"n": n, "h": h, "h_out": h_out, "h_seconds": time.monotonic() - t,
           "n_out": tiny.finish(started[0])}
    # Every file of every checkpoint of N truncated to half; the same command again.
    d = str(root / "damaged")
    shutil.copytree(n, d)
    for path in glob.glob(os.path.join(d, "checkpoints", "**", "*"), recursive=True):
      if os.path.isfile(path):
        os.truncate(path, os.path.getsize(path) // 2)
    before = open(os.path.join(d, "metrics.jsonl")).read()
    again = subprocess.run(tiny.main_command(d, *N_ARGS), cwd=tiny.ROOT, env=tiny.env(8),
                           capture_output=True, text=True, timeout=tiny.TIMEOUT)
    out.update(d=d, d_metrics_before=before, d_out=again)
    return out
  finally:
    tiny.kill_running(started)


def restored(workdir, step):
  return tiny.restore_state(workdir, step, parallel.make_mesh(1))


def same_but_counters(a, b) -> list[str]:
  """The paths of the leaves that differ between two TrainStates, besides step, rng and
  skipped_steps."""
  differ = []
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if not any(k in name for k in ("step", "rng", "skipped_steps")) and \
        not np.array_equal(np.asarray(x), np.asarray(y)):
      differ.append(name)
  return differ


# ---------------------------------------------------------------- non-finite steps

def test_inject_makes_loss_and_gradient_nan_only_at_its_steps():
  grad = jax.grad(lambda w, step: nonfinite.inject(jnp.sum(w ** 2), step, (2, 4)))
  w = jnp.arange(3.0)
  assert np.isnan(np.asarray(grad(w, jnp.int32(1)))).all()          # logged step 2
  np.testing.assert_array_equal(grad(w, jnp.int32(2)), 2 * w)        # step 3: untouched
  assert nonfinite.inject(jnp.float32(1.5), jnp.int32(0), ()) == 1.5
  old = state_lib.TrainState(
      step=jnp.int32(4), params={"w": w}, batch_stats={"m": w}, target_params={"w": w},
      target_batch_stats={"m": w}, opt_state=({"mu": w},), queues={"g": jnp.ones((2, 2))},
      queue_ptrs={"g": jnp.int32(1)}, rng=jnp.array([1, 2], jnp.uint32),
      skipped_steps=jnp.int32(0))
  new = jax.tree.map(lambda x: x + 1, old)
  kept = nonfinite.keep_if_finite(old, new, jnp.float32(jnp.nan), {"w": w})
  assert same_but_counters(kept, old) == []
  assert (int(kept.step), int(kept.skipped_steps)) == (5, 1)
  np.testing.assert_array_equal(kept.rng, new.rng)
  grads_inf = {"w": w.at[0].set(jnp.inf)}
  assert int(nonfinite.keep_if_finite(old, new, jnp.float32(1.0), grads_inf).skipped_steps) == 1
  applied = nonfinite.keep_if_finite(old, new, jnp.float32(1.0), {"w": w})
  assert same_but_counters(applied, new) == [] and int(applied.skipped_steps) == 0


def test_a_nan_step_changes_no_state_and_three_in_a_row_stop_the_run(runs):
  n = runs["n"]
  code, out = runs["n_out"]
  assert code == 1, out[-3000:]
  errors = [line for line in out.splitlines() if "error:" in line]
  assert errors == [
      "cacl_jax.main: error: 3 steps in a row (7-9) had a non-finite loss or gradient and were "
      "skipped (max_consecutive_skips=3); the run stops with its state unchanged since step 6: "
      f"the last good checkpoint is step 8 ({checkpoint.checkpoint_dir(n)}/8)"], errors
  assert tiny.committed_steps(n) == list(range(1, 9))
  # The whole state after a skipped step is the one before it; step and key move on.
  four, five, six, eight = (restored(n, s) for s in (4, 5, 6, 8))
  assert same_but_counters(five, four) == []
  assert [int(s.skipped_steps) for s in (four, five, six, eight)] == [0, 1, 1, 3]
  assert int(five.step) == 5 and not np.array_equal(five.rng, four.rng)
  assert same_but_counters(six, five) != []      # step 6 was applied
  assert same_but_counters(eight, six) == []
  records = tiny.metrics(n)
  assert [r["step"] for r in records] == list(range(1, 10))
  assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 1, 2, 3, 4]
  assert [r["skipped"] for r in records] == [0, 0, 0, 0, 1, 0, 1, 1, 1]
  assert all(np.isfinite(r[k]) for r in records for k in tiny_heads())
  # A skipped step's record carries the losses of the newest applied step (the state's).
  assert records[4]["loss_step"] == 4 and records[4]["loss"] == records[3]["loss"]
  assert records[8]["loss_step"] == 6 and records[8]["loss"] == records[5]["loss"]


def tiny_heads():
  return ("loss", "loss_global", "loss_pixel", "loss_cycle")


def test_every_record_says_where_the_time_went_and_a_profile_was_taken(runs):
  records = tiny.metrics(runs["n"])
  assert records[0]["compile_s"] > 0 and all("compile_s" not in r for r in records[1:])
  for r in records:
    assert all(r[f"{k}_s"] >= 0 for k in ("data_wait", "step", "checkpoint", "log"))
    assert 0 <= r["goodput"] < 1 and r["host_rss_gib"] > 0
  assert records[-1]["goodput"] > 0
  assert records[1]["checkpoint_s"] > 0   # the checkpoint of step 1 is in step 2's window
  assert "goodput " in runs["n_out"][1]
  traces = glob.glob(os.path.join(runs["n"], "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  # The goodput's count is kept in the checkpoint (and only grows).
  kept = [checkpoint.read_timing(runs["n"], s)["productive_s"] for s in (1, 8)]
  assert 0 < kept[0] < kept[1]


# ---------------------------------------------------------------- restores

def test_every_checkpoint_truncated_refuses_to_start_over(runs):
  d, result = runs["d"], runs["d_out"]
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"cacl_jax.main: error: {checkpoint.checkpoint_dir(d)} holds no "
                             "checkpoint that restores (now moved aside: 8, 7, 6, 5, 4, 3, 2, 1; ")
  assert "--config.allow_fresh_start=True" in lines[0]
  assert sorted(os.listdir(os.path.join(d, "checkpoints_damaged")), key=int) == \
      [str(s) for s in range(1, 9)]
  assert tiny.committed_steps(d) == []
  with open(os.path.join(d, "metrics.jsonl")) as f:
    assert f.read() == runs["d_metrics_before"]   # not one record dropped or added
  assert len(glob.glob(os.path.join(d, "events.out.tfevents.*"))) == 1   # N's only
  # A second start finds only what was moved aside: it refuses too.
  mngr = checkpoint.manager(d)
  with pytest.raises(checkpoint.NothingRestores, match=r"in .*checkpoints_damaged: 1, 2, .*8\)"):
    checkpoint.restore_newest(mngr, d, None, lambda *_: None)
  assert checkpoint.restore_newest(mngr, d, None, lambda *_: None, allow_fresh_start=True) == (None, None)
  mngr.close()


def saved_workdir(tmp_path, steps=(1, 2)):
  state = {"w": jnp.arange(3000.0), "step": jnp.int32(0)}
  mngr = checkpoint.manager(str(tmp_path))
  for s in steps:
    checkpoint.save(mngr, s, {**state, "step": jnp.int32(s)}, tiny.get_config(), force=True)
  mngr.wait_until_finished()
  mngr.close()
  return str(tmp_path), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_transient_restore_error_is_retried_and_moves_nothing_damage_is_moved(tmp_path, monkeypatch, capsys):
  workdir, target = saved_workdir(tmp_path)
  real, failures = checkpoint.restore, {"left": 2}

  def flaky(mngr, step, abstract):   # the storage times out twice, then answers
    if failures["left"]:
      failures["left"] -= 1
      raise TimeoutError("GCS read timed out")
    return real(mngr, step, abstract)
  monkeypatch.setattr(checkpoint, "restore", flaky)
  mngr = checkpoint.manager(workdir)
  step, state = checkpoint.restore_newest(mngr, workdir, target, lambda *_: None,
                                          retry_delays_s=(0.01, 0.01, 0.01))
  assert step == 2 and int(state["step"]) == 2
  assert capsys.readouterr().out.count("retrying in 0.01 s") == 2
  failures["left"] = 10   # it never answers: the run stops, the checkpoints stay
  with pytest.raises(checkpoint.StorageUnavailable,
                     match=r"/2 could not be read after 4 attempts .*TimeoutError: GCS read timed "
                           r"out.*nothing was moved"):
    checkpoint.restore_newest(mngr, workdir, target, lambda *_: None, retry_delays_s=(0.01,) * 3)
  assert tiny.committed_steps(workdir) == [1, 2]
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  # Damage is another matter: a truncated array file is moved aside, the one before restores.
  monkeypatch.setattr(checkpoint, "restore", real)
  data = max(glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)
  os.truncate(data, 100)
  try:
    checkpoint.restore(mngr, 2, target)
  except Exception as e:  # pylint: disable=broad-exception-caught
    assert checkpoint.is_damage(e)   # tensorstore's OUT_OF_RANGE, under Orbax's wrapper
  else:
    raise AssertionError("a truncated checkpoint restored")
  assert not checkpoint.is_damage(TimeoutError("slow")) and not checkpoint.is_damage(MemoryError())
  step, state = checkpoint.restore_newest(mngr, workdir, target, lambda *_: None)
  mngr.close()
  assert step == 1 and int(state["step"]) == 1
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["2"]


# ---------------------------------------------------------------- hangs

def test_a_hang_ends_in_stacks_on_stderr_and_a_nonzero_exit(runs):
  code, out = runs["h_out"]
  assert code == watchdog.EXIT_CODE, out[-3000:]
  assert "watchdog: no training step completed for " in out
  assert "(watchdog_seconds=10)" in out and "after step 2 and its periodic actions" in out
  assert 'File "' in out and "in hang" in out   # faulthandler's stacks, the loop's among them
  assert tiny.last_logged_step(runs["h"]) == 2


# ---------------------------------------------------------------- metrics on object stores

def test_metrics_on_an_object_store_are_new_parts_that_read_and_repair(tmp_path):
  workdir = epath.Path(tmp_path)
  writer = metrics_log.Writer(workdir, appendable=False, part_seconds=0)   # as on gs://
  for step in range(1, 4):
    writer.append({"step": step, "loss": 1.0 / step})
  writer.flush()
  writer.append({"step": 4, "loss": 0.25})
  writer.append({"step": 5, "loss": 0.2})
  writer.close()
  parts = sorted(os.listdir(tmp_path / "metrics.jsonl.parts"))
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  assert len(parts) >= 2 and parts[0].startswith("000000000001-")
  assert [r["step"] for r in metrics_log.read(workdir)] == [1, 2, 3, 4, 5]
  assert metrics_log.repair(workdir, 3) == 2
  assert [r["step"] for r in metrics_log.read(workdir)] == [1, 2, 3]
  local = metrics_log.Writer(workdir / "local")   # a local workdir: lines appended
  (tmp_path / "local").mkdir()
  local.append({"step": 1, "loss": 1.0})
  local.close()
  assert metrics_log.read(workdir / "local") == [{"step": 1, "loss": 1.0}]


def test_a_checkpoint_from_before_skipped_steps_restores_with_the_count_at_0(tmp_path):
  state = state_lib.TrainState(
      step=jnp.int32(7), params={"w": jnp.arange(3.0)}, batch_stats={}, target_params={},
      target_batch_stats={}, opt_state=(), queues={}, queue_ptrs={},
      rng=jnp.array([1, 2], jnp.uint32), skipped_steps=None)   # as saved before the field
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 7, state, tiny.get_config(), force=True)
  mngr.wait_until_finished()
  now = state.replace(skipped_steps=jnp.int32(0))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), now)
  restored = checkpoint.restore(mngr, 7, target)
  mngr.close()
  assert int(restored.skipped_steps) == 0 and int(restored.step) == 7
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])
