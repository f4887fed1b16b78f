"""The linear protocol and limited-sample fine-tuning, as functions (docs/evaluation.md).

Linear protocol: the backbone f (restored online backbone, or a random one for a baseline)
is frozen with BatchNorm in inference mode; a 1×1 conv (C → classes, bias) maps its OS8
features to logits, which are bilinearly upsampled to the label resolution and trained with
cross-entropy ignoring 255: SGD (momentum 0.9, lr 0.6, weight decay 0, cosine to 0). The final
head is evaluated once on the val split with one confusion matrix at full label resolution.

Fine-tuning (`config.finetune`, paper Table 4): the same head, but the whole network trains
on a nested, seeded subset of the train split. BatchNorm then runs in training mode with
statistics over the whole global batch (SyncBN; the pretraining BN groups of 32 do not fit
fine-tuning batches) and updates its running statistics, which the evaluation uses.

Everything runs under one `jax.jit` per step on the 1-D 'data' mesh: the batch is sharded,
parameters and optimiser state are replicated, so the confusion matrix returned by the eval
step already sums every device of every process. The training loop, its checkpoints and its
resume after preemption are in `probe_loop.py`.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cacl_jax.runtime import parallel
from cacl_jax.runtime import paths
from cacl_jax.runtime import viz
from cacl_jax.data import augment
from cacl_jax.evaluation import metrics as metrics_lib
from cacl_jax.evaluation import probe_loop
from cacl_jax.evaluation import segdata
from cacl_jax.models import resnet

IGNORE_LABEL = 255


class ProbeState(struct.PyTreeNode):
  """step; head: 1×1-conv params; backbone / batch_stats: the backbone's variables (trained
  and updated only when fine-tuning); opt_state: over `trainable(state, finetune)`."""
  step: jax.Array
  head: Any
  backbone: Any
  batch_stats: Any
  opt_state: Any


def trainable(state: ProbeState, finetune: bool) -> dict:
  return {"head": state.head, "backbone": state.backbone} if finetune else {"head": state.head}


def make_head(num_classes: int) -> nn.Module:
  """The linear classifier: one 1×1 conv with bias (paper: 'one convolutional layer')."""
  return nn.Conv(num_classes, (1, 1), use_bias=True, name="classifier")


def probe_backbone(model_config: ml_collections.ConfigDict, finetune: bool) -> resnet.ResNet:
  """The pretraining backbone; SyncBN over the global batch when it is fine-tuned."""
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  if finetune:
    model_config.bn_mode = "sync"
  return resnet.backbone_from_config(model_config)


def random_backbone(model_config: ml_collections.ConfigDict, seed: int = 0,
                    image_size: int = 64, calibration_images: np.ndarray | None = None,
                    calibration_passes: int = 50) -> tuple[Any, Any]:
  """(params, batch_stats) of a randomly initialised backbone: the 'no pretraining' baseline.

  Without `calibration_images` the BN statistics keep their initial values (mean 0, var 1),
  as a step-0 checkpoint would; random features then grow with depth, and the probe
  partly measures that scale. With uint8 [n, H, W, 3] `calibration_images` the running
  statistics are re-estimated on them (`calibration_passes` train-mode passes, momentum 0.9
  → within 0.9^passes of the data statistics), the usual fair random-init baseline.
  """
  backbone = resnet.backbone_from_config(model_config)
  variables = jax.jit(backbone.init, static_argnums=2)(
      jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3), jnp.float32), False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  if calibration_images is not None:
    sync = probe_backbone(model_config, finetune=True)   # statistics over the whole set
    x = augment.normalize(jnp.asarray(calibration_images))

    # Arguments, not closures: XLA would otherwise constant-fold the whole forward pass.
    @jax.jit
    def calibrate(params, batch_stats, x):
      def one_pass(_, stats):
        _, updates = sync.apply({"params": params, "batch_stats": stats}, x, True,
                                mutable=["batch_stats"])
        return updates["batch_stats"]
      return jax.lax.fori_loop(0, calibration_passes, one_pass, batch_stats)

    batch_stats = calibrate(params, batch_stats, x)
  return jax.device_get(params), jax.device_get(batch_stats)


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(SGD with momentum, its schedule): cosine decay of `learning_rate` to 0 over
  `total_steps`; weight decay (if any) on conv kernels only, not on biases or BN parameters."""
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(
      optax.add_decayed_weights(config.get("weight_decay", 0.0), mask=decay_mask),
      optax.sgd(schedule, momentum=config.get("momentum", 0.9)))
  return tx, schedule


def upsampled_logits(backbone: nn.Module, head: nn.Module, params: dict, batch_stats: Any,
                     images: jax.Array, train_bn: bool) -> tuple[jax.Array, Any]:
  """uint8 [B, H, W, 3] → float32 logits [B, H, W, classes] (+ new BN stats when train_bn).

  The OS8 logits are upsampled bilinearly (half-pixel centres) to the input, which is the
  label resolution: labels are never downsampled.
  """
  x = augment.normalize(images)
  variables = {"params": params["backbone"], "batch_stats": batch_stats}
  if train_bn:
    features, updates = backbone.apply(variables, x, True, mutable=["batch_stats"])
    batch_stats = updates["batch_stats"]
  else:
    features = backbone.apply(variables, x, False)
  logits = head.apply({"params": params["head"]}, features.astype(jnp.float32))
  b, h, w = images.shape[:3]
  logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), method="bilinear")
  return logits, batch_stats


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over pixels whose label is not 255. logits [..., C], labels [...]."""
  valid = labels != IGNORE_LABEL
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def make_steps(backbone: nn.Module, head: nn.Module, tx: optax.GradientTransformation,
               mesh, num_classes: int, finetune: bool):
  """Jitted (train_step, eval_step, predict) over `mesh`.

  train_step(state, {'image': uint8 [B,S,S,3], 'label': uint8 [B,S,S]}) -> (state, loss)
  eval_step(state, {'image': uint8 [B,H,W,3], 'label': uint8 [B,H,W]}) -> int32 [C, C]
  predict(state, uint8 [B,H,W,3]) -> uint8 [B,H,W]
  """
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

  def loss_fn(train_params, state, batch):
    params = {"backbone": state.backbone, **train_params}
    logits, batch_stats = upsampled_logits(backbone, head, params, state.batch_stats,
                                           batch["image"], train_bn=finetune)
    return cross_entropy(logits, batch["label"]), batch_stats

  def train_step(state, batch):
    # Only `trainable` is differentiated: in the linear protocol the backbone is a
    # constant, so no gradient (and no backward pass) reaches it.
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable(state, finetune), state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, trainable(state, finetune))
    new = optax.apply_updates(trainable(state, finetune), updates)
    state = state.replace(step=state.step + 1, head=new["head"],
                          backbone=new.get("backbone", state.backbone),
                          batch_stats=batch_stats, opt_state=opt_state)
    return state, loss

  def predictions(state, images):
    params = {"backbone": state.backbone, "head": state.head}
    logits, _ = upsampled_logits(backbone, head, params, state.batch_stats, images,
                                 train_bn=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  def eval_step(state, batch):
    return metrics_lib.confusion_matrix(batch["label"], predictions(state, batch["image"]),
                                        num_classes)

  train_step = jax.jit(train_step, in_shardings=(repl, data), out_shardings=(repl, repl),
                       donate_argnums=0)
  eval_step = jax.jit(eval_step, in_shardings=(repl, data), out_shardings=repl)
  predict = jax.jit(predictions, in_shardings=(repl, data), out_shardings=data)
  return train_step, eval_step, predict


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process' rows of a batch-sharded global array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def evaluate(state: ProbeState, eval_step, predict, mesh, val_source, config,
             num_figure_images: int = 0) -> tuple[np.ndarray, dict]:
  """The whole val split once. Returns (int64 [C, C] confusion matrix, figure samples).

  The samples are up to `num_figure_images` of this process' first val images cropped back
  to their own size: {'images', 'labels', 'predictions', 'ids'}.
  """
  per_process = config.eval_batch_size // jax.process_count()
  counts = []
  samples = {"images": [], "labels": [], "predictions": [], "ids": []}
  for i, batch in enumerate(segdata.val_batches(val_source, config.data, per_process,
                                                jax.process_index(), jax.process_count())):
    arrays = parallel.host_to_global(mesh, {"image": batch["image"], "label": batch["label"]})
    # Kept on device until the end, so dispatch runs ahead of the host's input pipeline.
    counts.append(eval_step(state, arrays))
    if i == 0 and num_figure_images:
      preds = _local_rows(predict(state, arrays["image"]))
      for j in range(min(num_figure_images, len(preds))):
        h, w = batch["size"][j]
        if h == 0:
          continue
        samples["images"].append(batch["image"][j, :h, :w])
        samples["labels"].append(batch["label"][j, :h, :w])
        samples["predictions"].append(preds[j, :h, :w])
        samples["ids"].append(batch["id"][j])
  # int32 per batch, int64 over the set: no overflow at Cityscapes' 10^9 pixels.
  cm = np.zeros((len(val_source.class_names),) * 2, np.int64)
  for c in counts:
    cm += np.asarray(jax.device_get(c), np.int64)
  return cm, samples


def _subset_ids(source, indices: np.ndarray) -> list[str]:
  ids = getattr(source, "ids", None)
  if ids is not None:
    return [str(ids[i]) for i in indices]
  return [str(source[int(i)]["id"]) for i in indices]


def linear_probe(config: ml_collections.ConfigDict, backbone_params: Any,
                 backbone_batch_stats: Any, model_config: ml_collections.ConfigDict, mesh,
                 workdir: str) -> dict:
  """Trains the head (or, with `config.finetune`, the whole network) and evaluates it once.

  See `run_probe` for the arguments; returns its results dict.
  """
  return run_probe(config, backbone_params, backbone_batch_stats, model_config, mesh,
                   workdir)[0]


def run_probe(config: ml_collections.ConfigDict, backbone_params: Any,
              backbone_batch_stats: Any, model_config: ml_collections.ConfigDict, mesh,
              workdir: str) -> tuple[dict, ProbeState]:
  """`linear_probe`, also returning the final `ProbeState` (head, backbone, BN statistics).

  Args:
    config: an evaluation config (configs/linear_eval_*.py, finetune_cityscapes.py).
    backbone_params, backbone_batch_stats: the backbone's variables (host or device trees;
      restored from a checkpoint, or `random_backbone(...)` for the baseline).
    model_config: the pretraining `config.model` (backbone kind, width, dtype).
    mesh: the 1-D 'data' mesh to run on (any number of devices).
    workdir: where the probe's checkpoints, figures, probe_metrics.jsonl and, when
      fine-tuning, finetune_ids.txt go; a probe that was stopped there (SIGTERM:
      `parallel.Preempted`) resumes from its newest checkpoint (`probe_loop`).

  Returns:
    ({'miou', 'macc', 'pixel_acc', 'per_class_iou', 'per_class_acc' (percent),
      'num_pixels', 'num_images' (val), 'num_train_images', 'train_steps', 'final_loss',
      'mode', 'class_names', 'confusion_matrix' (list of lists), 'figures' (paths)},
     the final ProbeState).
  """
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh)
  if config.get("pretrained") and paths.resolve(config.pretrained) == paths.resolve(workdir):
    raise ValueError(f"--workdir {workdir} is the pretraining run itself: the evaluation keeps "
                     "its own checkpoints in WORKDIR/checkpoints, pass another --workdir")
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  finetune = bool(config.get("finetune", False))
  train_source = segdata.segmentation_source(config.data, "train")
  val_source = segdata.segmentation_source(config.data, "val")
  class_names = list(val_source.class_names)

  indices = None
  num_train = len(train_source)
  if finetune:
    indices = segdata.subset_indices(len(train_source), config.finetune_fraction, config.seed)
    num_train = len(indices)
    if jax.process_index() == 0:
      (paths.resolve(workdir) / "finetune_ids.txt").write_text(
          "\n".join(_subset_ids(train_source, indices)) + "\n")
  if num_train < config.batch_size:
    raise ValueError(f"{num_train} train images are fewer than batch_size {config.batch_size}")
  steps_per_epoch = num_train // config.batch_size
  total_steps = int(config.num_epochs) * steps_per_epoch
  if total_steps <= 0:
    raise ValueError(f"num_epochs must be positive, got {config.num_epochs}")

  backbone = probe_backbone(model_config, finetune)
  head = make_head(len(class_names))
  head_params = head.init(jax.random.key(config.seed),
                          jnp.zeros((1, 1, 1, backbone.num_features), jnp.float32))["params"]
  tx, schedule = make_optimizer(config, total_steps)
  train_params = {"head": head_params}
  if finetune:
    train_params["backbone"] = backbone_params
  state = ProbeState(step=jnp.zeros((), jnp.int32), head=head_params, backbone=backbone_params,
                     batch_stats=backbone_batch_stats, opt_state=tx.init(train_params))
  state = jax.device_put(state, parallel.replicated(mesh))
  train_step, eval_step, predict = make_steps(backbone, head, tx, mesh, len(class_names),
                                              finetune)

  if jax.process_index() == 0:
    logging.info("%s: %d train images, %d val images, %d classes, %d steps (%d epochs × %d)",
                 "fine-tuning" if finetune else "linear protocol", num_train, len(val_source),
                 len(class_names), total_steps, config.num_epochs, steps_per_epoch)
  # Resumes from WORKDIR/checkpoints when a previous run of this probe saved there
  # (evaluation/probe_loop.py); the batches continue at the step reached.
  saved_config = probe_loop.run_config(
      config, probe_loop.backbone_fingerprint(backbone_params, backbone_batch_stats))
  mngr = probe_loop.manager(workdir)
  try:
    start, state = probe_loop.resume(mngr, workdir, state, saved_config)
    batches = iter(segdata.train_dataset(
        train_source, config.data, config.batch_size // jax.process_count(), config.seed,
        indices=indices, process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start))
    try:
      state, final_loss = probe_loop.train(state, start, train_step, batches, mesh, total_steps,
                                           saved_config, workdir, schedule, mngr)
    finally:
      batches.close()   # stops grain's worker processes of the infinite train iterator
  finally:
    mngr.close()

  num_figs = int(config.get("num_figure_images", 4))
  cm, samples = evaluate(state, eval_step, predict, mesh, val_source, config, num_figs)
  results = metrics_lib.metrics_from_confusion(cm, class_names)
  results.update({
      "num_images": len(val_source), "num_train_images": num_train,
      "train_steps": total_steps, "final_loss": final_loss,
      "mode": "finetune" if finetune else "linear", "class_names": class_names,
      "confusion_matrix": cm.tolist(), "figures": {}})
  if jax.process_index() == 0:
    results["figures"]["confusion"] = viz.confusion_figure(
        cm, class_names, os.path.join(workdir, "confusion_matrix.png"))
    if samples["images"]:
      results["figures"]["predictions"] = viz.segmentation_grid(
          samples["images"], samples["labels"], samples["predictions"], class_names,
          os.path.join(workdir, "predictions.png"))
    metrics_lib.log_results(results, workdir, "fine-tuning" if finetune else "linear probe")
  return results, state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """The `linear_eval` program: restore → probe (or fine-tune, cluster, retrieval) → results.json.

  Restores the online backbone and its BN statistics from the newest checkpoint of
  `config.pretrained` (or `config.checkpoint_step`) onto this run's devices, runs
  `linear_probe` (or, with `protocol='cluster'`, `cluster.cluster_probe`; with
  `protocol='retrieval'`, `retrieval.retrieval_probe`) on `mesh` (default:
  every device) and writes results.json with the metrics,
  `checkpoint_step`, `checkpoint_path` and the evaluation config (process 0).
  """
  from cacl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  from cacl_jax.evaluation import cluster, retrieval  # pylint: disable=g-import-not-at-top
  protocol = config.get("protocol", "linear")
  probes = {"linear": linear_probe, "cluster": cluster.cluster_probe,
            "retrieval": retrieval.retrieval_probe}
  if protocol not in probes:
    raise ValueError(f"protocol must be 'linear', 'cluster' or 'retrieval', got {protocol!r}")
  if not config.get("pretrained"):
    raise ValueError("config.pretrained must name a pretraining workdir "
                     "(--config.pretrained=PRETRAIN_DIR)")
  paths.resolve(workdir), paths.resolve(config.pretrained)   # a bad URL: one line, before work
  if config.data.name not in ("synthetic", "voc", "cityscapes"):
    raise ValueError(f"data.name must be 'synthetic', 'voc' or 'cityscapes', got {config.data.name!r}")
  segdata.eval_pad_size(config.data)
  if config.data.name != "synthetic" and not os.path.isdir(config.data.get("root") or ""):
    raise FileNotFoundError(
        f"data.root={config.data.get('root')!r} is not a directory: prepare the data with "
        f"`python -m cacl_jax.prepare_data {config.data.name} --src RAW --out DATA` and pass "
        "--config.data.root=DATA")
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh)
  pretrained = checkpoint.restore_pretrained(config.pretrained, config.get("checkpoint_step"))
  if jax.process_index() == 0:
    logging.info("restored the backbone of %s (step %d)", pretrained.path, pretrained.step)
  results = probes[protocol](config, pretrained.params, pretrained.batch_stats,
                             pretrained.config.model, mesh, workdir)
  results.update({"checkpoint_step": pretrained.step, "checkpoint_path": pretrained.path,
                  "config": json.loads(config.to_json_best_effort())})
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.resolve(workdir) / "results.json", json.dumps(results, indent=1))
  return results
