"""The pretraining program, `python -m cacl_jax.main`, end to end on the tiny config
(tests/tiny.py): the files a run writes, exact resume after SIGKILL, SIGTERM, a checkpoint
of 8 devices restored on 1, and one-line errors for bad input.

Each launch costs seconds of start-up and tracing on a 2-core box, so the module launches
four runs and reads them from several tests: A, uninterrupted, 8 devices; B, the same run
killed with SIGKILL after a checkpoint and restarted; S, stopped with SIGTERM. A runs next
to B's first part (on a cold compile cache both compile at once), B's restart next to S.
"""
import math
import os
import signal
import struct
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from cacl_jax import checkpoint, parallel
import tiny

T = tiny.TOTAL_STEPS
HEAD_KEYS = ("loss", "loss_global", "loss_pixel", "loss_cycle")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs and outputs of A, B and S (see the module docstring)."""
  root = tmp_path_factory.mktemp("train")
  a, b, s = (str(root / name) for name in ("uninterrupted", "killed", "sigterm"))
  started = []
  try:
    started += [tiny.start_main(a, log=a + ".log"),
                tiny.start_main(b, tiny.NO_VIZ, log=b + ".1.log")]
    run_a, b1 = started

    def checkpoint_then_a_step():   # so that the restart must drop and re-log metrics lines
      done = tiny.committed_steps(b)
      return bool(done) and tiny.last_logged_step(b) > done[-1]
    tiny.wait_until(checkpoint_then_a_step, [b1], "a checkpoint followed by a logged step")
    b1.send_signal(signal.SIGKILL)
    killed = {"code": tiny.finish(b1)[0], "committed": tiny.committed_steps(b),
              "logged": tiny.last_logged_step(b)}

    started += [tiny.start_main(b, tiny.NO_VIZ, log=b + ".2.log"),
                tiny.start_main(s, tiny.NO_VIZ, log=s + ".log")]
    b2, s1 = started[2:]
    tiny.wait_until(lambda: tiny.last_logged_step(s) >= 1, [s1], "a logged step")
    s1.send_signal(signal.SIGTERM)
    return {"a": a, "b": b, "s": s, "killed": killed,
            "a_out": tiny.finish(run_a), "b_out": tiny.finish(b2), "s_out": tiny.finish(s1)}
  finally:
    tiny.kill_running(started)


@pytest.fixture(scope="module")
def final_a(runs):
  """A's last checkpoint restored onto one device."""
  return tiny.restore_state(runs["a"], T, parallel.make_mesh(1))


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
  for part in ("state", "data", "config"):
    assert os.path.isdir(os.path.join(a, "checkpoints", "12", part))
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

def test_resume_after_sigkill_is_exact(runs, final_a):
  """B, killed after a checkpoint and restarted, logs A's numbers bit for bit and ends
  with A's parameters, BN statistics, optimiser state, queues, RNG and data iterator."""
  killed = runs["killed"]
  assert killed["code"] == -signal.SIGKILL
  resumed_from = killed["committed"][-1]
  assert 0 < resumed_from < killed["logged"] < T   # killed mid-run, past its last checkpoint
  code, out = runs["b_out"]
  assert code == 0, out[-3000:]
  assert f"resumed from {checkpoint.checkpoint_dir(runs['b'])}/{resumed_from}" in out

  logged_a, logged_b = (tiny.without_timing(tiny.metrics(runs[r])) for r in "ab")
  assert logged_b == logged_a
  final_b = tiny.restore_state(runs["b"], T, parallel.make_mesh(1))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  iterator = os.path.join("checkpoints", str(T), "data", "process_0-of-1.json")
  with open(os.path.join(runs["a"], iterator)) as fa, open(os.path.join(runs["b"], iterator)) as fb:
    assert fa.read() == fb.read()


def test_sigterm_saves_the_step_reached_and_exits_0(runs):
  code, out = runs["s_out"]
  assert code == 0, out[-3000:]
  reached = tiny.last_logged_step(runs["s"])
  assert 0 < reached < T
  assert f"SIGTERM: saved step {reached}, exiting" in out
  assert tiny.committed_steps(runs["s"])[-1] == reached
  assert int(tiny.restore_state(runs["s"], reached, parallel.make_mesh(1)).step) == reached


# ---------------------------------------------------------------- device counts

def test_checkpoint_of_8_devices_restores_on_1(runs, final_a):
  eight = tiny.restore_state(runs["a"], T, parallel.make_mesh(8))
  assert len(eight.queues["pixel"].sharding.device_set) == 8
  assert not eight.queues["pixel"].sharding.is_fully_replicated   # split along K, as saved
  assert len(final_a.queues["pixel"].sharding.device_set) == 1
  assert int(final_a.step) == T
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               final_a, eight)

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
