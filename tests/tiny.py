"""The tiny pretraining run shared by the trainer's tests, and helpers to launch and read it.

This file is also the config file of those runs (`--config tests/tiny.py`): every test
launches the same program shapes, so the JAX persistent compile cache (tests/conftest.py)
serves every run after the first. ⅛-width ResNet-18, 32×32 synthetic pairs, global batch 8
in BN groups of 4, D = 32, K = 64; twelve steps, a checkpoint every three, an affinity
figure every six; grain in-process; no chained evaluation (`eval_after` stays empty), except
in the variant `tests/tiny.py:eval`, which chains a one-epoch linear probe on 32 synthetic
images (the shapes of tests/test_linear_eval.py, so its compiled probe is reused).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from cacl_jax import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.abspath(__file__)
TOTAL_STEPS = 12
CHECKPOINT_EVERY = 3
VIZ_EVERY = 6
TIMEOUT = 300   # seconds for any one subprocess: a cold compile cache on a busy 2-core box
NO_VIZ = "--config.viz_every_steps=0"   # for runs whose figures no test reads


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.seed = 0
  c.batch_size = 8
  c.total_steps = TOTAL_STEPS
  c.checkpoint_every_steps = CHECKPOINT_EVERY
  c.keep_checkpoints = 10          # keep them all: the tests look at intermediate ones
  c.log_every_steps = 1
  c.viz_every_steps = VIZ_EVERY
  c.log_grad_cosines = False       # its own test (test_diagnostics.py); here a compile per run

  c.data.name = "synthetic"
  c.data.image_size = 32
  c.data.frame_stride = 2
  c.data.num_workers = 0
  c.data.prefetch = 2
  c.data.synthetic.num_videos = 64
  c.data.synthetic.num_frames = 6
  c.data.synthetic.frame_size = 40

  c.model.width_divisor = 8
  c.model.embed_dim = 32
  c.model.bn_group_size = 4
  c.model.ema_momentum = 0.9
  c.queue.size = 64
  c.optim.base_lr = 64.0           # lr 1.0 at batch 8: the parameters move visibly
  if variant == "eval":
    c.eval_after = eval_config()
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of tests/tiny.py (expected 'eval')")
  return c


def eval_config():
  """configs/linear_eval_synthetic.py, shrunk: 32 train images (2 steps), 10 val images
  of 64 px padded to 72² in batches of 8."""
  spec = importlib.util.spec_from_file_location(
      "linear_eval_synthetic", os.path.join(ROOT, "configs", "linear_eval_synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.num_epochs = 1
  c.batch_size = 16
  c.eval_batch_size = 8
  c.log_every_steps = 1
  c.num_figure_images = 2
  c.data.eval_pad_size = (72, 72)
  c.data.synthetic.frame_size = 64
  c.data.synthetic.num_train_images = 32
  c.data.synthetic.num_val_images = 10
  c.supervised = type(c)()   # no supervised reference row: the demo's evidence, not the tests'
  return c


# ---------------------------------------------------------------- launching main

def env(num_devices: int, compile_cache: bool = True) -> dict[str, str]:
  """This process' environment (compile cache, CPU) for a child with `num_devices` fake
  CPU devices and the suite's fast-compile XLA flag.

  `compile_cache=False` is for the processes of one multi-process run: process 0 alone reads
  and writes the cache (the others' keys differ and never hit), and JAX's CPU collectives
  (Gloo) give up if the processes reach their first collective more than 30 s apart; so
  they all compile, side by side."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={num_devices} "
                    "--xla_backend_optimization_level=0")
  e["JAX_PLATFORMS"] = "cpu"
  e.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/cacl_jax_test_compile_cache")
  e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  e["JAX_ENABLE_COMPILATION_CACHE"] = "true" if compile_cache else "false"
  return e


def main_command(workdir, *args: str, config: str = CONFIG) -> list[str]:
  return [sys.executable, "-m", "cacl_jax.main", "--config", config, "--workdir", str(workdir),
          *args]


def start_main(workdir, *args: str, log: str, num_devices: int = 8,
               compile_cache: bool = True, config: str = CONFIG,
               extra_env: dict[str, str] | None = None) -> subprocess.Popen:
  """`python -m cacl_jax.main` on the tiny config in the background, stdout and stderr to the
  file `log` (a pipe that nobody reads while waiting could fill up and stall the child);
  `extra_env` is added to its environment (a cluster's variables)."""
  with open(log, "w") as out:   # the child keeps its own descriptor
    # Its own process group: a kill reaches its grain workers too, as a preempted VM's would.
    proc = subprocess.Popen(main_command(workdir, *args, config=config), cwd=ROOT,
                            env={**env(num_devices, compile_cache), **(extra_env or {})},
                            start_new_session=True,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
  proc.log_path = log
  return proc


def children(pid: int) -> list[tuple[int, str]]:
  """(pid, command line) of every descendant of `pid`, from /proc."""
  parent, cmdline = {}, {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
      continue
  found, frontier = [], [pid]
  while frontier:
    kids = [p for p, pp in parent.items() if pp in frontier]
    found += kids
    frontier = kids
  return [(p, cmdline.get(p, "")) for p in found]


def running(pid: int) -> bool:
  """Whether `pid` is a live process (not gone, and not a zombie waiting to be reaped)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
  """Sends `sig` to the child and every process it started (grain workers)."""
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
  """Waits for a `start_main` child (killed if it overruns); returns (exit code, output)."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    kill_group(proc)
    proc.wait()
  with open(proc.log_path) as f:
    return proc.returncode, f.read()


def kill_running(procs) -> None:
  """SIGKILL the children still running (a fixture that failed half-way leaves none behind)."""
  for p in procs:   # exited or not: its grain workers may outlive it
    kill_group(p)
    p.wait()


def wait_until(condition, procs, what: str, timeout: float = TIMEOUT) -> None:
  """Polls `condition()` every 20 ms; fails if a child exits first or time runs out."""
  deadline = time.monotonic() + timeout
  while not condition():
    exited = [p.returncode for p in procs if p.poll() is not None]
    if exited:
      raise AssertionError(f"a run exited (codes {exited}) before {what}")
    if time.monotonic() > deadline:
      raise AssertionError(f"no {what} after {timeout} s")
    time.sleep(0.02)


# ---------------------------------------------------------------- reading a workdir

def metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl (complete lines only: a run may be writing)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f.read().split("\n")[:-1] if line.strip()]


def last_logged_step(workdir) -> int:
  return max((r["step"] for r in metrics(workdir)), default=0)


def committed_steps(workdir) -> list[int]:
  """Steps of finished checkpoints: Orbax renames `S.orbax-checkpoint-tmp` to `S` at commit."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


# What a record says about time and memory, which differ between two runs of the same steps.
TIMING_KEYS = frozenset({"steps_per_sec", "compile_s", "data_wait_s", "step_s", "checkpoint_s",
                         "log_s", "goodput", "host_rss_gib", "host_peak_rss_gib",
                         "device_memory_gib", "device_peak_memory_gib"})


def without_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def restore_state(workdir, step: int, mesh):
  """The whole TrainState of checkpoint `step`, restored onto `mesh` with the trainer's
  shardings (queues split along K), through the product's `checkpoint.restore`."""
  # Imported here, not at the top: this file is also the config that `main` loads first.
  import jax  # pylint: disable=g-import-not-at-top
  from cacl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top

  config = checkpoint.read_config(workdir, step)
  model = model_from_config(config.model)
  tx, _ = optim.make_optimizer(config)
  shapes = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, 0))
  target = checkpoint.abstract_like(shapes, step_lib.state_shardings(shapes, mesh))
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    return checkpoint.restore(mngr, step, target)
  finally:
    mngr.close()
