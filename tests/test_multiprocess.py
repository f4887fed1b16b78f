"""`jax.distributed` processes on 127.0.0.1 (fake CPU devices) running `python -m cacl_jax.main`
on the tiny config (tests/tiny.py): preemption, a cluster start without flags, and the elastic
resume the global data stream allows.

The first launch, 2 processes × 2 devices with two grain workers each, is preempted as a cluster
preempts a job, SIGTERM to every process of it, data workers included (`os.killpg`), and here
host by host: process 1's group first, as when one host of a pod is told first, then process
0's. Both processes must stop at the same step (the step and the save are collectives), save it
together, exit 0 and leave no shared memory behind. Its checkpoint is then resumed two ways: by
1 process (8 devices, on a copy) and, in place, by 4 processes (1 device each) started as `srun
--ntasks=4` starts them on one node, with SLURM's environment and no coordinator flags. The
global batch of step t is a function of (seed, t) alone (`data/pipeline.py`), so every run logs the
`batch_hash` sequence one process computes from the pipeline, preempted or not, and the
multi-process steps are those of one process with 4 devices given the same state: that
reference is built and compiled in this test process while the first launch runs, and replays
one step from each state the processes saved.
"""
import os
import random
import shutil
import signal
import socket
import threading
import time

import jax
import numpy as np
import pytest

from cacl_jax.runtime import checkpoint, parallel
from cacl_jax.training import optim, step as step_lib
from cacl_jax.data import pipeline
from cacl_jax.models.cacl import model_from_config
import tiny

T = tiny.TOTAL_STEPS
HEAD_KEYS = ("loss", "loss_global", "loss_pixel", "loss_cycle")
TWO_WORKERS = ("--config.data.num_workers=2", "--config.data.prefetch=1")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir: str, launch: str, count: int, devices: int, *args: str):
  port = free_port()
  return [tiny.start_main(workdir, f"--coordinator_address=127.0.0.1:{port}",
                          f"--num_processes={count}", f"--process_id={i}", tiny.NO_VIZ, *args,
                          log=f"{workdir}.{launch}.p{i}.log", num_devices=devices,
                          compile_cache=False)
          for i in range(count)]


def slurm_job_id() -> int:
  """A SLURM_JOB_ID whose coordinator port is free here: JAX's SLURM detection puts the
  coordinator on the step's first node at port 61440 + SLURM_JOB_ID mod 4096."""
  while True:
    offset = random.randrange(4096)
    with socket.socket() as s:
      try:
        s.bind(("", 61440 + offset))
      except OSError:
        continue
    return 4096 * 1000 + offset


def start_slurm_tasks(workdir: str, launch: str, count: int):
  """`count` processes with the environment `srun --ntasks=COUNT` gives the tasks of one node
  (the variables JAX's SLURM detection reads) and no coordinator flags, 1 device each."""
  job = str(slurm_job_id())
  return [tiny.start_main(workdir, tiny.NO_VIZ, log=f"{workdir}.{launch}.p{i}.log", num_devices=1,
                          compile_cache=False,
                          extra_env={"SLURM_JOB_ID": job, "SLURM_STEP_NODELIST": "localhost",
                                     "SLURM_NTASKS": str(count), "SLURM_PROCID": str(i),
                                     "SLURM_LOCALID": str(i)})
          for i in range(count)]


class OneProcessFourDevices:
  """The tiny run's train step on one process with 4 devices, fed the global stream of one
  process; also the `batch_hash` of each step's global batch."""

  def __init__(self):
    config = tiny.get_config()
    self.mesh = parallel.make_mesh(4)
    model = model_from_config(config.model)
    tx, schedule = optim.make_optimizer(config)
    self.init_state, shardings = step_lib.create_state(model, tx, config, self.mesh, config.seed)
    self.train_step = step_lib.jit_train_step(model, tx, schedule, config, self.mesh, shardings)
    stream = iter(pipeline.make_pretrain_dataset(
        config.data, global_batch_size=config.batch_size, process_index=0, process_count=1,
        seed=config.seed))
    self.batches, self.hashes = [], []
    for _ in range(T):
      batch = next(stream)
      self.hashes.append(pipeline.batch_hash(batch.pop("video"), batch.pop("frames")))
      self.batches.append(batch)

  def metrics_after(self, state, step: int) -> dict[str, float]:
    """Metrics of step `step` + 1 taken from `state` (the state after `step` steps)."""
    _, metrics = self.train_step(state, parallel.host_to_global(self.mesh, self.batches[step]))
    return {k: float(v) for k, v in parallel.to_host(metrics).items()}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  workdir, one = str(root / "run"), str(root / "on_1_process")
  first = start_processes(workdir, "1", 2, 2, *TWO_WORKERS)
  later = []
  failures = []
  workers = []

  def preempt_host_by_host():
    try:
      tiny.wait_until(lambda: tiny.last_logged_step(workdir) >= 1, first, "a logged step")
      workers.extend(w for p in first for w, cmd in tiny.children(p.pid) if "spawn_main" in cmd)
      tiny.kill_group(first[1], signal.SIGTERM)
      time.sleep(0.5)
      tiny.kill_group(first[0], signal.SIGTERM)
    except AssertionError as e:
      failures.append(str(e))
  try:
    signaller = threading.Thread(target=preempt_host_by_host)
    signaller.start()
    reference = OneProcessFourDevices()   # builds and compiles while the processes run
    first_step = reference.metrics_after(reference.init_state, 0)
    signaller.join()
    first_out = [tiny.finish(p) for p in first]
    assert not failures, failures
    preempted = {"out": first_out, "committed": tiny.committed_steps(workdir),
                 "logged": tiny.last_logged_step(workdir), "workers": workers,
                 "workers_left": [w for w in workers if tiny.running(w)]}
    shutil.copytree(workdir, one)   # the preempted workdir, to resume on 1 process too
    later.append(tiny.start_main(one, tiny.NO_VIZ, log=one + ".log"))   # 1 process, 8 devices
    on_one = tiny.finish(later[0])
    later += start_slurm_tasks(workdir, "2", 4)   # in place: 4 processes, 1 device each
    on_four = [tiny.finish(p) for p in later[1:]]
    return {"workdir": workdir, "one": one, "preempted": preempted, "on_one": [on_one],
            "on_four": on_four, "reference": reference, "first_step": first_step}
  finally:
    tiny.kill_running(first + later)


def test_sigterm_to_the_process_groups_stops_both_at_the_same_step(two_processes):
  preempted = two_processes["preempted"]
  reached = preempted["logged"]
  assert 0 < reached < T
  assert len(preempted["workers"]) == 4   # two grain workers per process, signalled too
  assert preempted["workers_left"] == []   # stopped by their parents, none orphaned
  for code, out in preempted["out"]:
    assert code == 0, out[-3000:]
    assert f"SIGTERM: saved step {reached}, exiting" in out
    assert "leaked shared_memory" not in out, out[-3000:]   # the resource tracker's warning
  assert "mesh: 4 devices over 2 processes" in preempted["out"][0][1]
  assert preempted["committed"][-1] == reached
  # No iterator state: the step is the data position, whatever the process count (`timing`
  # holds the goodput's count).
  assert sorted(os.listdir(os.path.join(two_processes["workdir"], "checkpoints", str(reached)))) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "config", "state", "timing"]


def test_every_segment_matches_one_process_with_four_devices(two_processes):
  """From the initial state and from each checkpoint the multi-process run saved (2 × 2
  devices up to the preemption, 4 × 1 after it; restored here onto one process' 4 devices),
  one step of the one-process program reproduces the step the processes logged next. Compared per step: over several steps the float32 rounding of
  a different reduction order (~1e-7) is amplified past any tolerance by the pixel head's
  argmax matches and lr 1.0, so whole trajectories agree only for a few steps."""
  workdir, reference = two_processes["workdir"], two_processes["reference"]
  logged = {r["step"]: r for r in tiny.metrics(workdir)}
  starts = [0] + [c for c in tiny.committed_steps(workdir) if c < T]
  assert len(starts) >= 4   # the initial state, the preemption step and periodic checkpoints
  for start in starts:
    if start == 0:
      ours = two_processes["first_step"]
    else:
      restored = tiny.restore_state(workdir, start, reference.mesh)
      assert int(restored.step) == start
      ours = reference.metrics_after(restored, start)
    theirs = logged[start + 1]
    for key in HEAD_KEYS:
      assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (start + 1, key)
    assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-6)


@pytest.mark.parametrize("where", ["on_one", "on_four"])
def test_a_two_process_checkpoint_resumes_on_1_and_on_4_processes(two_processes, where):
  """Elastic resume: the checkpoint the 2 processes saved at preemption resumes on 1 process
  (8 devices) and on 4 processes (1 device each). Every step of both runs, before the
  preemption (2 processes) and after it, logs the batch_hash of the global batch one process
  draws from the pipeline: exactly the batches of an uninterrupted run."""
  workdir = two_processes["one" if where == "on_one" else "workdir"]
  reached = two_processes["preempted"]["logged"]
  processes = 1 if where == "on_one" else 4
  for code, out in two_processes[where]:
    assert code == 0, out[-3000:]
    assert f"resumed from {checkpoint.checkpoint_dir(workdir)}/{reached}" in out
  assert (f"mesh: {8 if processes == 1 else 4} devices over {processes} processes"
          in two_processes[where][0][1])
  if where == "on_four":   # SLURM's environment, no flags: one job of 4 processes
    for i, (_, out) in enumerate(two_processes[where]):
      assert f"joined a SLURM job through jax.distributed: process {i} of 4" in out
  records = tiny.metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, T + 1))
  assert [r["batch_hash"] for r in records] == two_processes["reference"].hashes
  assert tiny.committed_steps(workdir)[-1] == T


def test_the_first_step_after_an_elastic_resume_is_the_same_on_1_and_on_4_processes(two_processes):
  """Same state, same batch, 8 devices of 1 process or 4 × 1 device: the same step, within
  float tolerance (later steps drift apart at float32 rounding, see above)."""
  reached = two_processes["preempted"]["logged"]
  one, four = (tiny.metrics(two_processes[w])[reached] for w in ("one", "workdir"))
  assert one["step"] == four["step"] == reached + 1
  for key in HEAD_KEYS:
    assert one[key] == pytest.approx(four[key], rel=1e-5), key


def test_a_multi_process_checkpoint_restores_on_one_and_on_four_devices(two_processes):
  workdir = two_processes["workdir"]
  one = tiny.restore_state(workdir, T, parallel.make_mesh(1))
  four = tiny.restore_state(workdir, T, parallel.make_mesh(4))
  assert int(one.step) == int(four.step) == T
  assert len(four.queues["cycle"].sharding.device_set) == 4
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(four)):
    assert np.isfinite(np.asarray(x, np.float64)).all(), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
