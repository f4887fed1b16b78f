"""The pretraining program, `python -m cacl_jax.main`, end to end on the tiny config
(tests/tiny.py): the files a run writes, and every fault a long run meets, each injected into
a real run: SIGKILL before the first checkpoint (and a half-written metrics line), a grain
worker killed mid-run, a second run on a busy workdir, SIGTERM (twice) with an evaluation
chained, damaged checkpoints, a changed config, NaN parameters, a short run on a URL workdir.

Each launch costs seconds of start-up on a 2-core box, so the module launches each run once
and reads it from several tests. `runs` (all on the tiny config, so the compile cache serves
every launch after the first):
  A   uninterrupted, 8 devices: the reference every restarted run must reproduce;
  W   SIGKILLed before its first checkpoint (checkpoint cadence 100), a half line appended to
      its metrics.jsonl, restarted with the default cadence;
  B   two grain workers; one worker SIGKILLed after the first checkpoint; restarted with two
      workers;
  C   started on B's workdir while B's restart holds it (frozen with SIGSTOP meanwhile);
  S   the `:eval` variant (an evaluation chained), SIGTERM twice after a logged step;
  D   a copy of A with its checkpoints 12 (a truncated data file) and 9 (a missing file) damaged.
`compiled_runs` need their own compile (another learning-rate schedule): a NaN run
(lr = inf) and a short run (total_steps 4 < warm-up 50) with its evaluation on a file:// URL.
"""
import glob
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from cacl_jax.runtime import checkpoint, fingerprint, parallel
from cacl_jax.data import pipeline
import tiny

T = tiny.TOTAL_STEPS
HEAD_KEYS = ("loss", "loss_global", "loss_pixel", "loss_cycle")
TWO_WORKERS = ("--config.data.num_workers=2", "--config.data.prefetch=1")   # small buffers: a
# dead worker's batch is needed within a few steps


def lock_holder(workdir) -> int | None:
  try:
    with open(os.path.join(workdir, "run.lock")) as f:
      return json.load(f)["pid"]
  except (OSError, ValueError, KeyError):
    return None


def grain_workers(proc) -> list[int]:
  """The pids of a `start_main` child's grain workers (multiprocessing spawn children; its
  resource tracker is not one)."""
  return [pid for pid, cmd in tiny.children(proc.pid) if "spawn_main" in cmd]


def damage(workdir: str) -> None:
  """Checkpoint 12: its largest array file truncated; checkpoint 9: its state metadata gone."""
  data = max(glob.glob(os.path.join(workdir, "checkpoints", "12", "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)
  os.truncate(data, 1000)
  os.remove(os.path.join(workdir, "checkpoints", "9", "state", "_METADATA"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs and outputs of A, W, B, C, S and D (see the module docstring)."""
  root = tmp_path_factory.mktemp("train")
  a, w, b, s, d = (str(root / name) for name in ("uninterrupted", "sigkill", "worker", "sigterm",
                                                  "damaged"))
  started = []
  out = {"a": a, "w": w, "b": b, "s": s, "d": d}
  try:
    # ---- A next to W's first part: on a cold compile cache both compile at once.
    started += [tiny.start_main(a, log=a + ".log"),
                tiny.start_main(w, tiny.NO_VIZ, "--config.checkpoint_every_steps=100",
                                log=w + ".1.log")]
    run_a, w1 = started
    tiny.wait_until(lambda: tiny.last_logged_step(w) >= 2, [w1], "two logged steps")
    tiny.kill_group(w1)
    out["w_killed"] = {"code": tiny.finish(w1)[0], "committed": tiny.committed_steps(w),
                       "logged": tiny.last_logged_step(w), "pid": w1.pid}
    with open(os.path.join(w, "metrics.jsonl"), "a") as f:
      f.write('{"step": 99, "loss": 1.')   # as if killed in the middle of writing a line

    # ---- W's restart next to B: a worker of B dies after a checkpoint.
    started += [tiny.start_main(w, tiny.NO_VIZ, log=w + ".2.log"),
                tiny.start_main(b, tiny.NO_VIZ, *TWO_WORKERS, "--config.checkpoint_every_steps=1",
                                log=b + ".1.log")]
    w2, b1 = started[2:]

    # A checkpoint every step (a key that may change on resume): the worker is killed right
    # after the first, so the steps it had buffered run out before the run does (each worker
    # runs ~4 batches ahead), and the run stops at a step a checkpoint just saved.
    tiny.wait_until(lambda: bool(tiny.committed_steps(b)), [b1], "a checkpoint")
    os.kill(b1.pid, signal.SIGSTOP)   # hold still while a worker is picked and killed
    workers = grain_workers(b1)
    os.kill(workers[0], signal.SIGKILL)
    os.kill(b1.pid, signal.SIGCONT)
    out["b_killed"] = {"workers": len(workers), "out": tiny.finish(b1),
                       "committed": tiny.committed_steps(b)}

    # ---- B's restart (C tries B's workdir meanwhile) next to S.
    started += [tiny.start_main(b, tiny.NO_VIZ, *TWO_WORKERS, log=b + ".2.log"),
                tiny.start_main(s, tiny.NO_VIZ, config=tiny.CONFIG + ":eval", log=s + ".log")]
    b2, s1 = started[4:]
    tiny.wait_until(lambda: lock_holder(b) == b2.pid, [b2], "B's restart holding its workdir")
    os.kill(b2.pid, signal.SIGSTOP)   # B2 must outlive C's start-up: freeze it meanwhile
    os.kill(s1.pid, signal.SIGSTOP)   # and S, which could finish its 12 steps on a busy machine
    try:
      c = subprocess.run(tiny.main_command(b, tiny.NO_VIZ), cwd=tiny.ROOT, env=tiny.env(8),
                         capture_output=True, text=True, timeout=tiny.TIMEOUT)
    finally:
      os.kill(b2.pid, signal.SIGCONT)
      os.kill(s1.pid, signal.SIGCONT)
    out["c"] = {"code": c.returncode, "stdout": c.stdout, "stderr": c.stderr, "holder": b2.pid}
    tiny.wait_until(lambda: tiny.last_logged_step(s) >= 1, [s1], "a logged step")
    s1.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    s1.send_signal(signal.SIGTERM)   # impatient: the second must not turn into a failure
    out["s_out"] = tiny.finish(s1)
    out.update(a_out=tiny.finish(run_a), w_out=tiny.finish(w2), b_out=tiny.finish(b2))

    # ---- D: A's workdir with its newest checkpoints damaged; a changed config on A.
    shutil.copytree(a, d)
    damage(d)
    started.append(tiny.start_main(d, tiny.NO_VIZ, log=d + ".log"))
    changed = subprocess.run(
        tiny.main_command(a, "--config.batch_size=16", "--config.queue.size=128",
                          "--config.log_every_steps=3"),
        cwd=tiny.ROOT, env=tiny.env(8), capture_output=True, text=True, timeout=tiny.TIMEOUT)
    out["changed"] = (changed.returncode, changed.stdout, changed.stderr)
    out["d_out"] = tiny.finish(started[-1])
    return out
  finally:
    tiny.kill_running(started)


@pytest.fixture(scope="module")
def final_a(runs):
  """A's last checkpoint restored onto one device."""
  return tiny.restore_state(runs["a"], T, parallel.make_mesh(1))


def error_lines(output: str) -> list[str]:
  return [line for line in output.splitlines() if "error:" in line]


def read_scalars(path: str) -> dict[str, dict[int, float]]:
  """TensorBoard scalars of one events file (TFRecord framing: u64 length, u32 crc, data,
  u32 crc), read with tensorboardX's own Event proto: tag → step → value."""
  scalars: dict[str, dict[int, float]] = {}
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


# ---------------------------------------------------------------- one run's files

def test_main_writes_checkpoints_metrics_events_and_figures(runs):
  a = runs["a"]
  code, out = runs["a_out"]
  assert code == 0, out[-3000:]
  assert "mesh: 8 devices over 1 processes" in out
  assert f"[{T:>7d}/{T}] loss" in out

  assert tiny.committed_steps(a) == [3, 6, 9, 12]
  for part in ("state", "config"):
    assert os.path.isdir(os.path.join(a, "checkpoints", "12", part))
  assert not os.path.exists(os.path.join(a, "checkpoints", "12", "data"))   # the step is the position
  assert not os.path.exists(os.path.join(a, "run.lock"))   # given back at the end
  saved = checkpoint.read_config(a, 12)
  assert (saved.batch_size, saved.model.width_divisor, saved.data.crop_scale) == (8, 8, (0.2, 1.0))

  records = tiny.metrics(a)
  assert [r["step"] for r in records] == list(range(1, T + 1))
  for r in records:
    assert all(math.isfinite(r[k]) for k in HEAD_KEYS)
    heads = r["loss_global"] + r["loss_pixel"] + r["loss_cycle"]   # weights 1
    assert r["loss"] == pytest.approx(heads, rel=1e-5)
    assert r["loss_global"] > 0 and r["loss_pixel"] > 0 and r["loss_cycle"] > 0
    # Logged with the step's own learning rate: cosine from 1.0 (= 64 · 8 / 512) over T steps.
    assert r["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / T)), abs=1e-6)
  assert len({r["loss"] for r in records}) == T   # the numbers move from step to step
  # batch_hash: which pairs (video, t, t + s) each step saw, as the pipeline draws them.
  config = tiny.get_config()
  stream = iter(pipeline.make_pretrain_dataset(config.data, global_batch_size=config.batch_size,
                                               process_index=0, process_count=1, seed=config.seed))
  expected = [pipeline.batch_hash(b["video"], b["frames"]) for b, _ in zip(stream, range(T))]
  assert [r["batch_hash"] for r in records] == expected and len(set(expected)) == T

  events = [f for f in os.listdir(a) if f.startswith("events.out.tfevents")]
  assert len(events) == 1
  scalars = read_scalars(os.path.join(a, events[0]))
  for key in HEAD_KEYS:
    np.testing.assert_allclose([scalars[f"train/{key}"][r["step"]] for r in records],
                               [r[key] for r in records], rtol=1e-6)

  assert sorted(os.listdir(os.path.join(a, "figures"))) == ["affinity_0000006.png",
                                                            "affinity_0000012.png",
                                                            "diagnostics.png"]
  # The learning diagnostics join every logged step (synthetic data: with ground truth).
  for r in records:
    for key in ("match_true_acc", "match_label_acc", "cos_within_h", "cos_cross_c", "cycle_return",
                "soft_target_entropy"):
      assert 0.0 <= r[key] <= 1.0 + 1e-5 or key.startswith("cos_"), (key, r[key])
      assert -1.0 <= r[key] <= 1.0 + 1e-5
  assert scalars["train/match_true_acc"][T] == pytest.approx(records[-1]["match_true_acc"])
  with Image.open(os.path.join(a, "figures", "affinity_0000012.png")) as image:
    assert image.width >= 200 and image.height >= 100
    pixels = np.asarray(image.convert("L"))
  assert pixels.std() > 10   # drawn, not blank


# ---------------------------------------------------------------- resume, SIGTERM

def assert_same_log(workdir, reference) -> None:
  """Each step logged once, with the reference's numbers, batch and state hashes, bit for bit."""
  ours, theirs = (tiny.without_timing(tiny.metrics(w)) for w in (workdir, reference))
  assert [r["step"] for r in ours] == list(range(1, T + 1))
  assert ours == theirs


def test_the_same_command_twice_logs_the_same_losses_and_state_hashes(runs):
  """W's restart started from step 0 (its first part died before any checkpoint): a second run
  of A's command. Every step's losses, data (batch_hash) and train state (state_hash, all of
  it: parameters, BN statistics, optimiser, queues) are A's, bit for bit."""
  keys = HEAD_KEYS + ("batch_hash", "state_hash")
  ours, theirs = ([{k: r[k] for k in keys} for r in tiny.metrics(w)] for w in (runs["w"], runs["a"]))
  assert ours == theirs and len(ours) == T
  assert len({r["state_hash"] for r in ours}) == T   # the state changes every step


def test_sigkill_before_the_first_checkpoint_restarts_cleanly(runs):
  """W: killed with no checkpoint yet, a half-written metrics line left: the restart takes over
  the dead run's lock, drops every line (it logs those steps again) and matches A."""
  killed = runs["w_killed"]
  assert killed["code"] == -signal.SIGKILL
  assert killed["committed"] == [] and killed["logged"] >= 2
  code, out = runs["w_out"]
  assert code == 0, out[-3000:]
  assert f"taking over the lock of pid {killed['pid']}" in out
  assert "resumed from" not in out
  assert_same_log(runs["w"], runs["a"])


def test_a_dead_grain_worker_is_one_line_and_the_resume_is_exact(runs, final_a):
  """B: a grain worker SIGKILLed after a checkpoint: the run stops with one error line (exit 1),
  and the restart (two workers again) continues from the last checkpoint to A's numbers,
  batches and final state, bit for bit."""
  killed = runs["b_killed"]
  assert killed["workers"] == 2
  code, out = killed["out"]
  assert code == 1, out[-3000:]
  assert "Traceback" not in out
  errors = error_lines(out)
  assert len(errors) == 1 and errors[0].startswith("cacl_jax.main: error: a grain data worker "
                                                   "process died while preparing step"), errors
  resumed_from = killed["committed"][-1]
  assert f"the last good checkpoint is step {resumed_from}" in errors[0]
  code, out = runs["b_out"]
  assert code == 0, out[-3000:]
  assert f"resumed from {checkpoint.checkpoint_dir(runs['b'])}/{resumed_from}" in out
  assert_same_log(runs["b"], runs["a"])
  final_b = tiny.restore_state(runs["b"], T, parallel.make_mesh(1))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_a_second_run_on_a_busy_workdir_exits_at_once_naming_the_first(runs):
  c = runs["c"]
  assert c["code"] == 1 and c["stdout"] == ""
  lines = c["stderr"].strip().splitlines()
  assert len(lines) == 1, c["stderr"][-3000:]
  assert lines[0].startswith(f"cacl_jax.main: error: {runs['b']} is in use by pid {c['holder']} on ")
  assert "kill -TERM" in lines[0]


def test_sigterm_saves_the_step_reached_exits_0_and_skips_the_evaluation(runs):
  code, out = runs["s_out"]
  assert code == 0, out[-3000:]
  reached = tiny.last_logged_step(runs["s"])
  assert 0 < reached < T
  assert f"SIGTERM: saved step {reached}, exiting" in out
  assert "rerun the same command to continue" in out
  assert tiny.committed_steps(runs["s"])[-1] == reached
  assert int(tiny.restore_state(runs["s"], reached, parallel.make_mesh(1)).step) == reached
  assert not os.path.exists(os.path.join(runs["s"], "linear_eval"))   # never started
  assert "Traceback" not in out


def test_damaged_checkpoints_are_moved_aside_and_the_newest_good_one_resumes(runs):
  d = runs["d"]
  code, out = runs["d_out"]
  assert code == 0, out[-3000:]
  for step in (12, 9):
    assert (f"checkpoint {checkpoint.checkpoint_dir(d)}/{step} does not restore (" in out and
            f"moved to {d}/checkpoints_damaged/{step}; falling back" in out)
    assert os.path.isdir(os.path.join(d, "checkpoints_damaged", str(step), "state"))   # kept
  assert f"resumed from {checkpoint.checkpoint_dir(d)}/6" in out
  assert tiny.committed_steps(d) == [3, 6, 9, 12]
  assert_same_log(d, runs["a"])


def test_a_changed_config_is_refused_naming_each_key(runs):
  code, out, err = runs["changed"]
  assert code == 1 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith("cacl_jax.main: error: the config differs from the one "
                             f"{checkpoint.checkpoint_dir(runs['a'])}/12 was saved with: "
                             "batch_size 8 -> 16, queue.size 64 -> 128. ")
  assert "log_every_steps" not in lines[0].split(". These keys")[0]   # a key that may change


# ---------------------------------------------------------------- device counts

def test_checkpoint_of_8_devices_restores_on_1(runs, final_a):
  eight = tiny.restore_state(runs["a"], T, parallel.make_mesh(8))
  assert len(eight.queues["pixel"].sharding.device_set) == 8
  assert not eight.queues["pixel"].sharding.is_fully_replicated   # split along K, as saved
  assert len(final_a.queues["pixel"].sharding.device_set) == 1
  assert int(final_a.step) == T
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               final_a, eight)
  # The logged state_hash is the saved state's, whatever the layout it is read on.
  logged = tiny.metrics(runs["a"])[-1]["state_hash"]
  assert fingerprint.fingerprint(final_a) == fingerprint.fingerprint(eight) == logged

  pretrained = checkpoint.restore_pretrained(runs["a"])
  assert pretrained.step == T
  jax.tree.map(np.testing.assert_array_equal, pretrained.params,
               jax.device_get(final_a.params["backbone"]))
  jax.tree.map(np.testing.assert_array_equal, pretrained.batch_stats,
               jax.device_get(final_a.batch_stats["backbone"]))
  # Trained, not the initialisation: the EMA target trails the online network.
  online, target = (jax.tree.leaves(t["backbone"]) for t in (final_a.params, final_a.target_params))
  assert any(not np.array_equal(o, t) for o, t in zip(online, target))


# ---------------------------------------------------------------- bad input

BAD_INPUT = {
    "unknown_key": (["--config.model.no_such_key=1"], "unknown config key 'no_such_key'"),
    "batch_vs_devices": (["--config.batch_size=12"],
                         "batch_size 12 is not divisible by the 8 devices"),
    "missing_data": (["--config.data.name=kinetics", "--config.data.root={root}/missing"],
                     "data.root='{root}/missing' is not a directory"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """The three bad launches, run side by side: {case: (workdir, code, stdout, stderr)}."""
  root = str(tmp_path_factory.mktemp("bad"))
  procs = {}
  for case, (args, _) in BAD_INPUT.items():
    workdir = os.path.join(root, case)
    procs[case] = workdir, subprocess.Popen(
        tiny.main_command(workdir, *(a.format(root=root) for a in args)), cwd=tiny.ROOT,
        env=tiny.env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  results = {}
  for case, (workdir, proc) in procs.items():
    out, err = proc.communicate(timeout=tiny.TIMEOUT)
    results[case] = workdir, proc.returncode, out, err
  return root, results


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_error_line_before_any_work(bad_runs, case):
  root, results = bad_runs
  workdir, code, out, err = results[case]
  assert code != 0
  assert out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith("cacl_jax.main: error: ")
  assert BAD_INPUT[case][1].format(root=root) in lines[0]
  assert not os.path.exists(workdir)   # nothing created: no checkpoints, no logs


# ---------------------------------------------------------------- runs with their own compile

@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
  """N: lr = inf, a checkpoint every step, logging only at the end: step 1's loss is finite,
  the state after it is not. U: a 4-step run of a config with a 50-step warm-up, on a file://
  workdir, with its chained evaluation; started from another directory so that any output
  that bypassed the path layer would land there, under ./file:."""
  root = tmp_path_factory.mktemp("compiled")
  n, u, cwd = str(root / "nan"), str(root / "url" / "run"), root / "cwd"
  cwd.mkdir()
  started = []
  try:
    started.append(tiny.start_main(n, tiny.NO_VIZ, "--config.optim.base_lr=inf",
                                   "--config.checkpoint_every_steps=1",
                                   "--config.log_every_steps=100", log=n + ".log"))
    with open(str(root / "url.log"), "w") as log:
      started.append(subprocess.Popen(
          tiny.main_command(f"file://{u}", "--config.total_steps=4",
                            "--config.optim.warmup_steps=50", config=tiny.CONFIG + ":eval"),
          cwd=cwd, env={**tiny.env(8), "PYTHONPATH": tiny.ROOT}, stdout=log,
          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    started[-1].log_path = str(root / "url.log")
    return {"n": n, "u": u, "cwd": str(cwd), "n_out": tiny.finish(started[0]),
            "u_out": tiny.finish(started[1])}
  finally:
    tiny.kill_running(started)


def test_a_state_with_nan_is_never_saved(compiled_runs):
  code, out = compiled_runs["n_out"]
  assert code == 1, out[-3000:]
  errors = error_lines(out)
  assert errors == ["cacl_jax.main: error: the state after step 1 holds NaN or inf values: not "
                    "saved, the run stops; no checkpoint was saved in this workdir yet"], errors
  assert tiny.committed_steps(compiled_runs["n"]) == []


def test_a_short_run_with_its_evaluation_writes_everything_through_a_file_url(compiled_runs):
  code, out = compiled_runs["u_out"]
  assert code == 0, out[-3000:]
  assert ("optim.warmup_steps=50 is not shorter than total_steps=4: the warm-up is 0 steps "
          "(10% of the run)") in out
  u = compiled_runs["u"]
  assert [r["step"] for r in tiny.metrics(u)] == [1, 2, 3, 4]
  assert tiny.committed_steps(u) == [3, 4]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(u))
  assert os.path.exists(os.path.join(u, "figures", "diagnostics.png"))
  for part in ("pretrained", "random_init"):
    for name in ("results.json", "confusion_matrix.png", "predictions.png", "probe_metrics.jsonl"):
      if part == "random_init" and name == "results.json":
        continue
      assert os.path.exists(os.path.join(u, "linear_eval", part, name)), (part, name)
  with open(os.path.join(u, "linear_eval", "results.json")) as f:
    results = json.load(f)
  assert results["checkpoint_step"] == 4 and 0 <= results["miou"] <= 100
  assert os.listdir(compiled_runs["cwd"]) == []   # nothing bypassed the path layer


def test_pretrain_only_skips_the_chained_evaluation_and_a_rerun_evaluates(tmp_path):
  w = str(tmp_path / "run")
  run = lambda *args: subprocess.run(
      tiny.main_command(w, tiny.NO_VIZ, "--config.total_steps=2", *args, config=tiny.CONFIG + ":eval"),
      cwd=tiny.ROOT, env=tiny.env(8), capture_output=True, text=True, timeout=tiny.TIMEOUT)
  out = run("--pretrain_only")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert [r["step"] for r in tiny.metrics(w)] == [1, 2]
  assert not os.path.exists(os.path.join(w, "linear_eval"))
  out = run()   # the finished run: no step is trained again, the evaluation runs
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert [r["step"] for r in tiny.metrics(w)] == [1, 2]
  assert os.path.exists(os.path.join(w, "linear_eval", "results.json"))
