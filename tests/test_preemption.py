"""Preemption as clusters deliver it: SIGTERM to every process of the job, the grain data
workers included (SLURM, GCE and Kubernetes signal the whole job; `os.killpg` here).

One process of the tiny run (tests/tiny.py) with two grain workers, its process group signalled
after two logged steps, then the same command again: the first must save the step it reached,
exit 0 and leave no shared memory behind (Python's resource tracker warns of any block nobody
unlinked); the second must finish the run with exactly the batches of an uninterrupted one (the
`batch_hash` of every step, drawn here from the pipeline itself). The same on several processes
(every one saves and exits 0) is in test_multiprocess.py. And the workers' side of it: a worker
outlives a SIGTERM to its group (its parent stops it), not its parent's death.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from cacl_jax.runtime import checkpoint
from cacl_jax.data import pipeline
import tiny

T = tiny.TOTAL_STEPS
TWO_WORKERS = ("--config.data.num_workers=2", "--config.data.prefetch=1", tiny.NO_VIZ)
LEAK = "leaked shared_memory"   # Python's resource tracker: "... N leaked shared_memory objects"


def grain_workers(pid: int) -> list[int]:
  return [p for p, cmd in tiny.children(pid) if "spawn_main" in cmd]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("preemption") / "run")
  started = [tiny.start_main(workdir, *TWO_WORKERS, log=workdir + ".1.log")]
  try:
    tiny.wait_until(lambda: tiny.last_logged_step(workdir) >= 2, started, "two logged steps")
    workers = grain_workers(started[0].pid)
    os.killpg(started[0].pid, signal.SIGTERM)   # the main process, its workers, its tracker
    out = {"stopped": tiny.finish(started[0]), "logged": tiny.last_logged_step(workdir),
           "committed": tiny.committed_steps(workdir), "workers": workers,
           "workers_left": [w for w in workers if tiny.running(w)], "workdir": workdir}
    started.append(tiny.start_main(workdir, *TWO_WORKERS, log=workdir + ".2.log"))
    out["resumed"] = tiny.finish(started[1])
    return out
  finally:
    tiny.kill_running(started)


def test_sigterm_to_the_process_group_saves_exits_0_and_leaks_nothing(preempted):
  reached = preempted["logged"]
  assert 0 < reached < T, "the run ended before the signal reached it"
  assert len(preempted["workers"]) == 2
  code, out = preempted["stopped"]
  assert code == 0, out[-3000:]
  assert f"SIGTERM: saved step {reached}, exiting" in out
  assert LEAK not in out and "Traceback" not in out, out[-3000:]
  assert preempted["committed"][-1] == reached
  assert preempted["workers_left"] == []   # stopped by their parent, none orphaned


def test_the_same_command_resumes_with_the_uninterrupted_batches(preempted):
  workdir = preempted["workdir"]
  code, out = preempted["resumed"]
  assert code == 0, out[-3000:]
  assert f"resumed from {checkpoint.checkpoint_dir(workdir)}/{preempted['logged']}" in out
  assert LEAK not in out, out[-3000:]
  config = tiny.get_config()
  stream = iter(pipeline.make_pretrain_dataset(
      config.data, global_batch_size=config.batch_size, process_index=0, process_count=1,
      seed=config.seed))
  hashes = [pipeline.batch_hash(b["video"], b["frames"]) for b in (next(stream) for _ in range(T))]
  records = tiny.metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, T + 1))   # each step once
  assert [r["batch_hash"] for r in records] == hashes
  assert tiny.committed_steps(workdir)[-1] == T


PARENT = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: None)   # a handler (not SIG_IGN, which children inherit)
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, {tests!r})
import tiny
from cacl_jax.data import pipeline
config = tiny.get_config()
config.data.num_workers = 2
it = iter(pipeline.make_pretrain_dataset(config.data, global_batch_size=8, process_index=0,
                                         process_count=1, seed=0))
next(it), next(it)   # one batch from each worker: both have run their worker_init
print("ready", flush=True)
time.sleep(600)
"""


def test_grain_workers_leave_signals_to_their_parent_and_end_with_it():
  """A parent holding a pipeline with two workers: SIGTERM to the group leaves the workers
  running (a parent stops them when it closes the iterator; this one carries on); SIGKILL to
  the parent alone, which can close nothing, and the workers exit by themselves."""
  parent = subprocess.Popen([sys.executable, "-c", PARENT.format(tests=os.path.dirname(__file__))],
                            cwd=tiny.ROOT, env={**tiny.env(1), "PYTHONPATH": tiny.ROOT},
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
  try:
    assert parent.stdout.readline().strip() == "ready"
    workers = grain_workers(parent.pid)
    assert len(workers) == 2
    os.killpg(parent.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(tiny.running(w) for w in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(tiny.running(w) for w in workers) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not any(tiny.running(w) for w in workers)
  finally:
    tiny.kill_group(parent)
    parent.wait()
