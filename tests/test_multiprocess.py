"""Two `jax.distributed` processes on 127.0.0.1, 2 fake CPU devices each, running
`python -m cacl_jax.main` on the tiny config (tests/tiny.py).

The first launch is preempted: SIGTERM reaches process 1 only, as when one host of a pod
is told first; both processes must stop at the same step (the step and the save are
collectives), save it together and exit 0. The second launch resumes both from that
checkpoint (the state, and each process' own grain iterator) and runs to the end. Its
logged losses must be those of one process with 4 devices fed the same global batches:
process i's pipeline shard, `make_pretrain_dataset(process_index=i, process_count=2)`,
fills rows [4i, 4i + 4) of each batch of 8. That reference runs in this test process
while the first launch runs.
"""
import os
import signal
import socket
import threading

import jax
import numpy as np
import pytest

from cacl_jax import checkpoint, optim, parallel, step as step_lib
from cacl_jax.data import pipeline
from cacl_jax.data.video import ArrayVideo
from cacl_jax.models.cacl import model_from_config
import tiny

T = tiny.TOTAL_STEPS
HEAD_KEYS = ("loss", "loss_global", "loss_pixel", "loss_cycle")


# ---------------------------------------------------------------- the data shards

class NumberedVideos:
  """Videos whose every pixel is their index: a crop tells which video it came from."""

  def __init__(self, num_videos: int):
    self.num_videos = num_videos

  def __len__(self) -> int:
    return self.num_videos

  def __getitem__(self, index: int) -> ArrayVideo:
    return ArrayVideo(np.full((4, 24, 24, 3), index, np.uint8), name=f"video_{index}")


def test_process_shards_are_disjoint_and_cover_the_videos():
  config = tiny.get_config()
  seen = []
  for index in range(2):
    data = pipeline.make_pretrain_dataset(config.data, global_batch_size=8, process_index=index,
                                          process_count=2, seed=0, source=NumberedVideos(40))
    batches = [batch for batch, _ in zip(data, range(5))]   # 5 × 4 pairs: one pass of 20
    assert batches[0]["v"].shape == (4, 32, 32, 3)
    ids = np.concatenate([b["v"][:, 0, 0, 0] for b in batches])
    for b in batches:   # v and v+ come from the same video, and each crop from one video
      np.testing.assert_array_equal(b["v"], b["v_pos"])
      assert (b["v"] == b["v"][:, :1, :1, :1]).all()
    assert sorted(ids) == list(range(index, 40, 2))   # this process' shard, each video once
    seen.append(set(ids))
  assert not seen[0] & seen[1]


# ---------------------------------------------------------------- two processes

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(workdir: str, launch: int):
  port = free_port()
  return [tiny.start_main(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}", tiny.NO_VIZ, log=f"{workdir}.{launch}.p{i}.log",
                          num_devices=2, compile_cache=False)
          for i in range(2)]


def one_process_reference():
  """The tiny run on one process with 4 devices, each global batch assembled from the two
  processes' shards. Returns (per-step metrics, final state)."""
  config = tiny.get_config()
  mesh = parallel.make_mesh(4)
  model = model_from_config(config.model)
  tx, schedule = optim.make_optimizer(config)
  state, shardings = step_lib.create_state(model, tx, config, mesh, config.seed)
  train_step = step_lib.jit_train_step(model, tx, schedule, config, mesh, shardings)
  shards = [iter(pipeline.make_pretrain_dataset(
      config.data, global_batch_size=config.batch_size, process_index=i, process_count=2,
      seed=config.seed)) for i in range(2)]
  records = []
  for step in range(1, T + 1):
    parts = [next(shard) for shard in shards]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in ("v", "v_pos")}
    state, metrics = train_step(state, parallel.host_to_global(mesh, batch))
    records.append({"step": step, **parallel.to_host(metrics)})
  return records, state


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("multiprocess") / "run")
  first = start_pair(workdir, 1)
  failures = []

  def preempt_process_1():
    try:
      tiny.wait_until(lambda: tiny.last_logged_step(workdir) >= 1, first, "a logged step")
      first[1].send_signal(signal.SIGTERM)
    except AssertionError as e:
      failures.append(str(e))
  signaller = threading.Thread(target=preempt_process_1)
  signaller.start()
  reference = one_process_reference()
  signaller.join()
  first_out = [tiny.finish(p) for p in first]
  assert not failures, failures
  preempted = {"out": first_out, "committed": tiny.committed_steps(workdir),
               "logged": tiny.last_logged_step(workdir)}
  second_out = [tiny.finish(p) for p in start_pair(workdir, 2)]
  return {"workdir": workdir, "preempted": preempted, "resumed": second_out,
          "reference": reference}


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_processes):
  preempted = two_processes["preempted"]
  reached = preempted["logged"]
  assert 0 < reached < T
  for code, out in preempted["out"]:
    assert code == 0, out[-3000:]
    assert f"SIGTERM: saved step {reached}, exiting" in out
  assert "mesh: 4 devices over 2 processes" in preempted["out"][0][1]
  assert preempted["committed"][-1] == reached
  # Each process saved its own iterator; they differ (disjoint shards).
  data = os.path.join(two_processes["workdir"], "checkpoints", str(reached), "data")
  states = []
  for i in range(2):
    with open(os.path.join(data, f"process_{i}-of-2.json")) as f:
      states.append(f.read())
  assert states[0] != states[1]


def test_both_processes_resume_and_match_one_process_with_four_devices(two_processes):
  workdir = two_processes["workdir"]
  reached = two_processes["preempted"]["logged"]
  for code, out in two_processes["resumed"]:
    assert code == 0, out[-3000:]
    assert f"resumed from {checkpoint.checkpoint_dir(workdir)}/{reached}" in out
  logged = tiny.metrics(workdir)
  assert [r["step"] for r in logged] == list(range(1, T + 1))
  reference, _ = two_processes["reference"]
  for key in HEAD_KEYS:
    np.testing.assert_allclose([r[key] for r in logged], [r[key] for r in reference],
                               rtol=1e-5, err_msg=key)


def test_two_process_checkpoint_restores_in_one_process(two_processes):
  """The state the two processes saved together holds the reference's final numbers."""
  _, expected = two_processes["reference"]
  restored = tiny.restore_state(two_processes["workdir"], T, parallel.make_mesh(1))
  assert int(restored.step) == T
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
