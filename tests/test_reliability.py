"""The pieces the fault-tolerant trainer is built from, each fed the fault it exists for: a
metrics log killed mid-write, a changed config, a live / dead / remote lock holder, URL
workdirs, a warm-up longer than the run, a state holding NaN. The whole-program faults (kills,
damaged checkpoints, dead workers, preemption, URL workdirs end to end) are in test_train.py,
test_multiprocess.py and test_prepare_data.py; the README's "Reliability" section lists them.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from etils import epath

from cacl_jax.runtime import checkpoint, config_diff, metrics_log, paths, runlock
from cacl_jax.training import optim
import tiny


# ---------------------------------------------------------------- metrics.jsonl

def write_log(workdir, steps, tail=""):
  text = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail
  (workdir / metrics_log.FILE).write_text(text)


def test_repair_drops_a_half_written_line_and_the_steps_logged_again(tmp_path):
  workdir = epath.Path(tmp_path)
  write_log(workdir, range(1, 8), tail='{"step": 8, "lo')   # killed mid-write
  assert [r["step"] for r in metrics_log.read(workdir)] == list(range(1, 8))
  assert metrics_log.repair(workdir, 6) == 2   # step 7 (logged again after 6) and the half line
  assert [r["step"] for r in metrics_log.read(workdir)] == list(range(1, 7))
  assert (workdir / metrics_log.FILE).read_text().endswith("}\n")
  assert metrics_log.repair(workdir, 6) == 0   # nothing to do: the file is not rewritten
  metrics_log.append(workdir, {"step": 7, "loss": 0.5})
  assert [r["step"] for r in metrics_log.read(workdir)] == list(range(1, 8))
  # A crash before the first checkpoint: the restart logs every step again.
  assert metrics_log.repair(workdir, 0) == 7
  assert (workdir / metrics_log.FILE).read_text() == ""
  assert sorted(os.listdir(tmp_path)) == [metrics_log.FILE]   # no temporary file left


# ---------------------------------------------------------------- config on resume

def test_changed_config_keys_are_named_with_old_and_new_values():
  saved = tiny.get_config()
  new = tiny.get_config("eval")
  with new.unlocked():
    new.log_every_steps, new.checkpoint_every_steps = 5, 4      # may change
    new.data.num_workers, new.data.root = 2, "/elsewhere"       # may change
  assert config_diff.changed_keys(saved, new) == []
  with new.unlocked():
    new.batch_size, new.queue.size, new.model.backbone = 16, 128, "resnet50"
  assert config_diff.changed_keys(saved, new) == [
      ("batch_size", 8, 16), ("model.backbone", "resnet18", "resnet50"), ("queue.size", 64, 128)]
  with pytest.raises(ValueError, match=r"batch_size 8 -> 16, model.backbone \"resnet18\" -> "
                                       r"\"resnet50\", queue.size 64 -> 128\. .*another --workdir"):
    config_diff.check_resume(saved, new, "W/checkpoints/3")


def test_a_key_the_saved_config_lacks_counts_as_its_default():
  saved = json.loads(tiny.get_config().to_json_best_effort())
  del saved["model"]["padding"]   # a run saved before the key existed
  new = tiny.get_config()
  assert config_diff.changed_keys(saved, new) == []
  with new.unlocked():
    new.model.padding = "circular"
  assert config_diff.changed_keys(saved, new) == [("model.padding", config_diff._ABSENT, "circular")]  # pylint: disable=protected-access


# ---------------------------------------------------------------- the run lock

def lock_of(**fields):
  me = runlock._me()  # pylint: disable=protected-access
  return {**me, **fields}


def test_a_live_holder_blocks_a_dead_one_does_not(tmp_path):
  workdir = epath.Path(tmp_path)
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (workdir / runlock.LOCK_FILE).write_text(json.dumps(lock_of(pid=sleeper.pid, command="other run")))
    with pytest.raises(runlock.WorkdirBusy, match=f"in use by pid {sleeper.pid} on "
                                                  f"{socket.gethostname()}.*other run"):
      with runlock.hold(workdir):
        pass
  finally:
    sleeper.kill()
    sleeper.wait()
  with runlock.hold(workdir):   # its holder is gone (SIGKILLed): taken over
    assert json.loads((workdir / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (workdir / runlock.LOCK_FILE).exists()   # given back


def test_a_holder_on_another_machine_is_alive_while_it_beats(tmp_path):
  workdir = epath.Path(tmp_path)
  (workdir / runlock.LOCK_FILE).write_text(json.dumps(lock_of(host="tpu-worker-7", pid=1)))
  with pytest.raises(runlock.WorkdirBusy, match="pid 1 on tpu-worker-7"):
    with runlock.hold(workdir):
      pass
  stale = time.time() - runlock.STALE_S - 1
  (workdir / runlock.LOCK_FILE).write_text(json.dumps(lock_of(host="tpu-worker-7", pid=1,
                                                              heartbeat=stale)))
  with runlock.hold(workdir):
    pass


# ---------------------------------------------------------------- paths

def test_file_urls_are_local_paths_and_unknown_schemes_one_line(tmp_path):
  assert paths.resolve(f"file://{tmp_path}/run") == epath.Path(f"{tmp_path}/run")
  assert paths.resolve(f"file://localhost{tmp_path}/a%20b") == epath.Path(f"{tmp_path}/a b")
  assert paths.resolve("relative/run") == epath.Path(os.path.abspath("relative/run"))
  assert paths.is_local(f"file://{tmp_path}") and not paths.is_local("gs://bucket/run")
  with pytest.raises(ValueError, match="unsupported URL scheme ftp://"):
    paths.resolve("ftp://host/run")
  with pytest.raises(ValueError, match="names a path on this machine"):
    paths.resolve("file://otherhost/run")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_names_the_extra_to_install():
  with pytest.raises(ValueError, match=r"gs:// paths need the gcsfs package.*requirements-gcs\.txt"):
    paths.resolve("gs://bucket/run")


# ---------------------------------------------------------------- short runs

def test_a_warmup_not_shorter_than_the_run_shrinks_with_it():
  config = tiny.get_config()
  with config.unlocked():
    config.optim.warmup_steps = 50
    config.total_steps = 500
  assert optim.warmup_steps(config) == 50 and optim.warmup_note(config) is None
  for total, warmup in ((50, 5), (6, 0), (49, 4)):
    config.total_steps = total
    assert optim.warmup_steps(config) == warmup
    assert optim.warmup_note(config).endswith(f"the warm-up is {warmup} steps (10% of the run)")
  schedule = optim.learning_rate_schedule(config)   # 49 steps, 4 of warm-up
  peak = config.optim.base_lr * config.batch_size / config.optim.base_batch
  assert float(schedule(0)) == 0.0 and float(schedule(4)) == pytest.approx(peak)


# ---------------------------------------------------------------- non-finite states

def test_a_state_with_nan_is_never_saved(tmp_path):
  mngr = checkpoint.manager(str(tmp_path))
  config = tiny.get_config()
  good = {"w": jnp.ones((3,)), "step": jnp.int32(1)}
  bad = {"w": jnp.array([1.0, jnp.nan, 2.0]), "step": jnp.int32(2)}
  checkpoint.save(mngr, 1, good, config, force=True)
  with pytest.raises(checkpoint.NonFiniteState, match="after step 2 holds NaN or inf"):
    checkpoint.save(mngr, 2, bad, config, force=True)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1]
  mngr.close()
