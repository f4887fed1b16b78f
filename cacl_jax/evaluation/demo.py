"""The demo's evidence: the linear, cluster and retrieval protocols for the pretrained and a
random-init backbone.

Called by `main` after pretraining when the config carries `eval_after` (configs/demo.py).
Both backbones get the identical probe (same head init, data order and schedule); the random
one has its BN statistics re-estimated on train images (`probe.random_backbone`), the usual
fair baseline. Writes WORKDIR/linear_eval/{pretrained,random_init}/ (figures, per-run
results) and WORKDIR/linear_eval/results.json: the contract's keys for the pretrained
backbone, plus `random_init` and the comparison table; each run's cluster-protocol results
(`evaluation/cluster.py`) sit under its `cluster` key and its retrieval-protocol results
(`evaluation/retrieval.py`, Hummingbird) under `retrieval`. When the evaluation config has a
`supervised` section, a third row reads the table: the same backbone from the same random
initialisation trained end to end with the probe's own labels (same images, epochs and
augmentation; the fine-tuning protocol's optimiser), under `supervised` in results.json — the
level labels reach at this scale, so that the unsupervised rows can be read against it; its
backbone is also evaluated by retrieval (seconds, against the minutes of its training).
"""
from __future__ import annotations

import contextlib
import json
import os

import jax
import ml_collections
import numpy as np

from cacl_jax.runtime import parallel, paths, runlock
from cacl_jax.evaluation import metrics as metrics_lib
from cacl_jax.evaluation import cluster, probe, retrieval, segdata


def evaluate_after_pretraining(config: ml_collections.ConfigDict, workdir: str) -> dict:
  eval_config = ml_collections.ConfigDict(config.eval_after.to_dict())
  eval_config.pretrained = workdir
  out = os.path.join(workdir, "linear_eval")
  mesh = parallel.make_mesh()
  with runlock.hold(paths.resolve(workdir)) if jax.process_index() == 0 else contextlib.nullcontext():
    return _evaluate(config, eval_config, out, mesh)


def supervised_config(eval_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ceiling's run: the evaluation config fine-tuning the whole network (`finetune`) with
  the `supervised` section's images, epochs and optimiser on the same probe data."""
  sup = ml_collections.ConfigDict(eval_config.to_dict())
  sup.protocol, sup.finetune = "linear", True
  section = eval_config.supervised.to_dict()
  sup.data.synthetic.num_train_images = section.pop("num_train_images")
  sup.update(section)
  return sup


def floor(config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict, out: str,
          mesh) -> tuple[dict, object, object]:
  """The random-init row (docs/demo.md's floor): the backbone of `config.model` initialised with
  `config.seed`, BN statistics re-estimated on 64 train images, under the linear protocol.
  Returns (results, params, batch_stats); the ceiling starts from the same params."""
  train_source = segdata.segmentation_source(eval_config.data, "train")
  calib = np.stack([train_source[i]["image"] for i in range(min(64, len(train_source)))])
  params, stats = probe.random_backbone(config.model, seed=config.seed,
                                        image_size=eval_config.data.image_size,
                                        calibration_images=calib)
  return probe.linear_probe(eval_config, params, stats, config.model, mesh, out), params, stats


def ceiling(config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict, params,
            stats, out: str, mesh, retrieval_config: ml_collections.ConfigDict | None = None
            ) -> dict | None:
  """The supervised row (docs/demo.md's ceiling), or None where the evaluation config has no
  `supervised` section or its num_epochs is 0. With `retrieval_config`, the trained backbone is
  also evaluated by retrieval (under the result's `retrieval` key)."""
  if not (eval_config.get("supervised") and eval_config.supervised.num_epochs):
    return None
  results, state = probe.run_probe(supervised_config(eval_config), params, stats, config.model,
                                   mesh, out)
  if retrieval_config is not None:
    results["retrieval"] = retrieval.retrieval_probe(
        retrieval_config, state.backbone, state.batch_stats, config.model, mesh,
        os.path.join(out, "retrieval"))
  return results


def with_protocol(eval_config: ml_collections.ConfigDict,
                  protocol: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(eval_config.to_dict())
  c.protocol = protocol
  return c


def pretrained_name(config: ml_collections.ConfigDict) -> str:
  """The pretrained row's name: the variant that was pretrained (`configs/demo.py:VARIANT`)."""
  return f"{config.get('variant') or 'cacl'} pretrained"


def _heading(text: str) -> None:
  if jax.process_index() == 0:
    print(f"\n== {text}", flush=True)


def _evaluate(config, eval_config, out: str, mesh) -> dict:
  """Each backbone in turn under the linear, cluster and retrieval protocols (each protocol
  logs one line; its per-class table goes to per_class.txt beside its results.json)."""
  name = pretrained_name(config)
  retrieval.check_run_memory(with_protocol(eval_config, "retrieval"), config.model, mesh)
  _heading(f"{name}: linear, cluster and retrieval protocols")
  pretrained = probe.evaluate_checkpoint(eval_config, os.path.join(out, "pretrained"), mesh)
  for protocol in ("cluster", "retrieval"):
    pretrained[protocol] = probe.evaluate_checkpoint(
        with_protocol(eval_config, protocol), os.path.join(out, "pretrained", protocol), mesh)

  _heading("random init (the floor): linear, cluster and retrieval protocols")
  random_init, params, stats = floor(config, eval_config, os.path.join(out, "random_init"), mesh)
  for protocol, run in (("cluster", cluster.cluster_probe),
                        ("retrieval", retrieval.retrieval_probe)):
    random_init[protocol] = run(with_protocol(eval_config, protocol), params, stats, config.model,
                                mesh, os.path.join(out, "random_init", protocol))

  rows = {name: pretrained, "random init": random_init}
  extra = {}
  if eval_config.get("supervised") and eval_config.supervised.num_epochs:
    _heading("supervised (labels, the ceiling): fine-tuning from the random init, and retrieval")
  supervised = ceiling(config, eval_config, params, stats, os.path.join(out, "supervised"), mesh,
                       with_protocol(eval_config, "retrieval"))
  if supervised is not None:
    rows["supervised (labels)"] = extra["supervised"] = supervised
  table = metrics_lib.format_comparison(rows)
  results = {**pretrained, "random_init": random_init, **extra, "comparison": table}
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.resolve(out) / "results.json", json.dumps(results, indent=1))
    print(f"\n== Linear, cluster and retrieval protocols on the synthetic val set "
          f"({pretrained['num_images']} images, checkpoint step {pretrained['checkpoint_step']}, "
          f"backbone {_backbone(config)}):\n{table}\n"
          f"written to {os.path.join(out, 'results.json')}", flush=True)
  return results


def _backbone(config: ml_collections.ConfigDict) -> str:
  """e.g. 'resnet18 ÷8 width'."""
  divisor = config.model.get("width_divisor", 1)
  return config.model.backbone + (f" ÷{divisor} width" if divisor != 1 else "")
