"""Evaluation entry: the linear protocol (or limited-sample fine-tuning, or the label-free
cluster protocol) of a pretraining run.

  python -m cacl_jax.linear_eval --config configs/linear_eval_cityscapes.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR [--config.KEY=VALUE ...]
  ... --config.protocol=cluster [--config.cluster.num_clusters=K]   # k-means + Hungarian

Writes DIR/results.json (miou, macc, per_class_iou, per_class_acc, num_images,
checkpoint_step, checkpoint_path, config) when it has finished, DIR/confusion_matrix.png,
DIR/predictions.png and DIR/probe_metrics.jsonl. The probe keeps its own checkpoints in
DIR/checkpoints (every `checkpoint_every_steps` steps): on SIGTERM it saves the step reached and
exits 0, and the same command run again resumes from there (`evaluation/probe_loop.py`).
Multi-host: run the same command in every process; TPU pods, SLURM (srun), Open MPI and
Kubernetes Indexed Jobs are joined by themselves, elsewhere pass --coordinator_address
HOST:PORT --num_processes N --process_id I (`parallel.initialize_distributed`).

Exit codes: 0 when finished or preempted; 1 for a busy workdir; 2 with one `error:` line for
bad input or a changed config on resume.
"""
from __future__ import annotations

import signal
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cacl_jax.runtime import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and figures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host "
                                   "outside a TPU pod / SLURM / Open MPI / Kubernetes job).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported after flag parsing, so that --help and flag mistakes answer at once.
  from cacl_jax.runtime import checkpoint, parallel, paths  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import train
  from cacl_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  # SIGTERM outside the probe's training loop (start-up, restore, the evaluation): stop at once,
  # exit 0, nothing lost; inside the loop the probe takes it over to save the step first.
  signal.signal(signal.SIGTERM, _preempted)
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    with train.workdir_lock(paths.resolve(_WORKDIR.value)):
      results = probe.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except parallel.Preempted as e:
    print(f"{e}; rerun the same command to continue", flush=True)
    return
  except (train.UsageError, checkpoint.RestoreError) as e:   # a busy workdir; no checkpoint restores
    sys.exit(f"linear_eval: error: {e}")
  except (ValueError, FileNotFoundError) as e:
    # Configuration / input mistakes: one clear line, no traceback.
    print(f"linear_eval: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{results['mode']}: mIoU {results['miou']:.1f}  mAcc {results['macc']:.1f}  "
        f"pixel acc {results['pixel_acc']:.1f}  "
        f"({results['num_images']} val images, checkpoint step {results['checkpoint_step']})")


def _preempted(signum, frame):
  del signum, frame
  signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not interrupt the exit
  from cacl_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  raise parallel.Preempted("SIGTERM outside the probe's training loop: stopped, nothing lost")


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.linear_eval`."""
  app.run(main, flags_parser=cli.parse_flags("linear_eval"))


if __name__ == "__main__":
  run()
