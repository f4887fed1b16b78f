"""Evaluation entry: the linear protocol (or limited-sample fine-tuning, or the label-free
cluster protocol) of a pretraining run.

  python -m cacl_jax.linear_eval --config configs/linear_eval_cityscapes.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR [--config.KEY=VALUE ...]
  ... --config.protocol=cluster [--config.cluster.num_clusters=K]   # k-means + Hungarian

Writes DIR/results.json (miou, macc, per_class_iou, per_class_acc, num_images,
checkpoint_step, checkpoint_path, config), DIR/confusion_matrix.png, DIR/predictions.png and
DIR/probe_metrics.jsonl. Multi-host outside TPU pods: --coordinator_address HOST:PORT
--num_processes N --process_id I (on TPU pods peers are found automatically).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cacl_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and figures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported after flag parsing, so that --help and flag mistakes answer at once.
  from cacl_jax import parallel  # pylint: disable=g-import-not-at-top
  from cacl_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    results = probe.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    # Configuration / input mistakes: one clear line, no traceback.
    print(f"linear_eval: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{results['mode']}: mIoU {results['miou']:.1f}  mAcc {results['macc']:.1f}  "
        f"pixel acc {results['pixel_acc']:.1f}  "
        f"({results['num_images']} val images, checkpoint step {results['checkpoint_step']})")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags("linear_eval"))
