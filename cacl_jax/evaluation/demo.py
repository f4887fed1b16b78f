"""The demo's evidence: the linear and cluster protocols for the pretrained and a random-init backbone.

Called by `main` after pretraining when the config carries `eval_after` (configs/demo.py).
Both backbones get the identical probe (same head init, data order and schedule); the random
one has its BN statistics re-estimated on train images (`probe.random_backbone`), the usual
fair baseline. Writes WORKDIR/linear_eval/{pretrained,random_init}/ (figures, per-run
results) and WORKDIR/linear_eval/results.json: the contract's keys for the pretrained
backbone, plus `random_init` and the comparison table; each run's cluster-protocol results
(`evaluation/cluster.py`) sit under its `cluster` key. When the evaluation config has a
`supervised` section, a third row reads the table: the same backbone from the same random
initialisation trained end to end with the probe's own labels (same images, epochs and
augmentation; the fine-tuning protocol's optimiser), under `supervised` in results.json — the
level labels reach at this scale, so that the unsupervised rows can be read against it.
"""
from __future__ import annotations

import contextlib
import json
import os

import jax
import ml_collections
import numpy as np

from cacl_jax import parallel, paths, runlock
from cacl_jax.evaluation import metrics as metrics_lib
from cacl_jax.evaluation import cluster, probe, segdata


def evaluate_after_pretraining(config: ml_collections.ConfigDict, workdir: str) -> dict:
  eval_config = ml_collections.ConfigDict(config.eval_after.to_dict())
  eval_config.pretrained = workdir
  out = os.path.join(workdir, "linear_eval")
  mesh = parallel.make_mesh()
  with runlock.hold(paths.resolve(workdir)) if jax.process_index() == 0 else contextlib.nullcontext():
    return _evaluate(config, eval_config, out, mesh)


def _evaluate(config, eval_config, out: str, mesh) -> dict:
  pretrained = probe.evaluate_checkpoint(eval_config, os.path.join(out, "pretrained"), mesh)

  train_source = segdata.segmentation_source(eval_config.data, "train")
  calib = np.stack([train_source[i]["image"] for i in range(min(64, len(train_source)))])
  params, stats = probe.random_backbone(config.model, seed=config.seed,
                                        image_size=eval_config.data.image_size,
                                        calibration_images=calib)
  random_init = probe.linear_probe(eval_config, params, stats, config.model, mesh,
                                   os.path.join(out, "random_init"))
  # The label-free cluster protocol (evaluation/cluster.py) of both backbones, beside the linear.
  eval_config.protocol = "cluster"
  pretrained["cluster"] = probe.evaluate_checkpoint(eval_config, os.path.join(out, "pretrained",
                                                                              "cluster"), mesh)
  random_init["cluster"] = cluster.cluster_probe(eval_config, params, stats, config.model, mesh,
                                                 os.path.join(out, "random_init", "cluster"))

  rows = {"CACL pretrained": pretrained, "random init": random_init}
  extra = {}
  if eval_config.get("supervised"):
    sup_config = ml_collections.ConfigDict(eval_config.to_dict())
    sup_config.protocol = "linear"
    sup_config.finetune = True
    sup_config.update(eval_config.supervised.to_dict())
    rows["supervised (labels)"] = extra["supervised"] = probe.linear_probe(
        sup_config, params, stats, config.model, mesh, os.path.join(out, "supervised"))
  table = metrics_lib.format_comparison(rows)
  results = {**pretrained, "random_init": random_init, **extra, "comparison": table}
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.resolve(out) / "results.json", json.dumps(results, indent=1))
    print(f"\nLinear and cluster protocols on the synthetic val set "
          f"({pretrained['num_images']} images, "
          f"checkpoint step {pretrained['checkpoint_step']}):\n{table}\n"
          f"written to {os.path.join(out, 'results.json')}", flush=True)
  return results
