"""Pretraining entry point.

    python -m cacl_jax.main --config configs/demo.py --workdir /tmp/cacl_demo
    python -m cacl_jax.main --config configs/cacl_r18_kinetics.py --workdir DIR --config.data.root=DATA
    python -m cacl_jax.main --config configs/cacl_r18_kinetics.py:mocov2 --workdir DIR ...   # a variant

Resumes by itself from DIR/checkpoints. Multi-host: run the same command in every process. A
process whose environment describes a job of several processes (a Cloud TPU pod, `srun` under
SLURM, `mpirun`, a Kubernetes Indexed Job) joins the others through jax.distributed.initialize();
elsewhere pass --coordinator_address HOST:PORT --num_processes N --process_id I (explicit flags
always win); alone, a process runs single-host (`parallel.initialize_distributed`).
A config that chains an evaluation (`eval_after`, as configs/demo.py does) runs it afterwards
(`--pretrain_only` skips it).

Exit codes: 0 when the run finished or was preempted (SIGTERM: the step reached is saved, and a
chained evaluation, whose probes keep their own checkpoints, is resumed by the rerun that
finishes the run); 1 with one `error:` line for
bad input, a busy or changed workdir, divergence (10 non-finite steps in a row), a dead data
worker, a file-system error, checkpoints of which none restores (no silent start over) or
storage that does not answer; 3 from the watchdog (no step for `watchdog_seconds`: every
thread's stack on stderr).
"""
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from cacl_jax.runtime import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining config file (file.py or file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, events, figures.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host outside a "
                    "TPU pod / SLURM / Open MPI / Kubernetes job, which are detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process' id (with --coordinator_address).")
flags.DEFINE_bool("pretrain_only", False, "Skip the config's chained evaluation (eval_after); "
                  "a later run of the same command without it evaluates the finished run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Imported after flag parsing so that `--help` and flag errors are instant.
  from cacl_jax.runtime import checkpoint, parallel, runlock  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import train
  from cacl_jax.evaluation import demo  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  # SIGTERM outside the training loop (start-up, the chained evaluation): stop at once, exit 0;
  # inside the loop train.run takes it over to save the step first.
  signal.signal(signal.SIGTERM, _preempted)
  try:
    try:
      parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:   # flags given in part, a cluster JAX cannot join
      raise train.UsageError(str(e)) from None
    train.run(config, FLAGS.workdir)
    if config.eval_after and not FLAGS.pretrain_only:
      demo.evaluate_after_pretraining(config, FLAGS.workdir)
  except (train.Preempted, parallel.Preempted) as e:   # pretraining, or the chained probes
    print(f"{e}; rerun the same command to continue", flush=True)
  except (train.UsageError, train.TrainingDiverged, train.DataWorkerDied, runlock.WorkdirBusy,
          checkpoint.RestoreError, OSError) as e:
    sys.exit(f"cacl_jax.main: error: {_one_line(e)}")


def _preempted(signum, frame):
  del signum, frame
  signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not interrupt the exit
  from cacl_jax.training import train  # pylint: disable=g-import-not-at-top
  raise train.Preempted("SIGTERM outside the training loop: stopped, nothing lost")


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split("\n")).strip() or type(error).__name__


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.main`."""
  app.run(main, flags_parser=cli.parse_flags("cacl_jax.main"))


if __name__ == "__main__":
  run()
