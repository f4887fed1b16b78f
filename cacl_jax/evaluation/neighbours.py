"""Nearest-neighbour class agreement per head: does a pixel's closest pixel in another image share its class?

  python -m cacl_jax.evaluation.neighbours --workdir RUN [--workdir RUN2 ...] [--random_seed 0]

For each pretraining run (its newest checkpoint; synthetic data only), embeds the probe's val
frames (`eval_after`'s synthetic val set: the demo's 128 px frames) with the online network and
reads, for each of h (backbone), u (global head per pixel), p (pixel head) and c (cycle head),
every feature cell's nearest neighbour by cosine among the cells of the *other* images:

  agree_all      fraction of cells whose neighbour has the same class (background included);
                 chance Σ_c share_c² (a representation that ignores content scores it);
  agree_objects  the same among object cells only (query and neighbours), chance Σ_c (share_c /
                 object share)² — what separating the six classes needs.

`--random_seed S` adds the random-init network (BN statistics re-estimated on train images, as
the probe's floor) as a row. Prints a table and writes WORKDIR/neighbours.json per run.
"""
from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from cacl_jax.runtime import checkpoint, paths
from cacl_jax.method import pixel_shuffle
from cacl_jax.data import augment, synthetic
from cacl_jax.training.diagnostics import cell_labels
from cacl_jax.evaluation import probe, segdata
from cacl_jax.models.cacl import model_from_config

FLAGS = flags.FLAGS

HEADS = ("h", "u", "p", "c")


@jax.jit
def nearest_in_other_images(x: jax.Array, allowed: jax.Array) -> jax.Array:
  """x [B, N, D], allowed bool [B, N] -> int [B, N]: for every cell, the flat index (b·N + n)
  of its nearest `allowed` cell by cosine among the cells of the other images."""
  b, n, _ = x.shape
  flat = x.reshape(b * n, -1).astype(jnp.float32)
  flat = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
  image_of = jnp.repeat(jnp.arange(b), n)
  allowed = allowed.reshape(-1)

  def one(k):
    sims = jax.lax.dynamic_slice_in_dim(flat, k * n, n) @ flat.T   # [N, B·N]
    sims = jnp.where((image_of[None, :] == k) | ~allowed[None, :], -jnp.inf, sims)
    return jnp.argmax(sims, axis=-1)
  return jax.lax.map(one, jnp.arange(b))


def agreement(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """x float [B, N, D], labels int [B, N] (0 = background) -> the module docstring's figures."""
  flat = labels.reshape(-1)
  objects = labels > 0
  every = np.asarray(nearest_in_other_images(jnp.asarray(x), jnp.ones(labels.shape, bool)))
  among = np.asarray(nearest_in_other_images(jnp.asarray(x), jnp.asarray(objects)))
  shares = np.bincount(flat, minlength=synthetic.NUM_CLASSES) / flat.size
  obj_shares = shares[1:] / max(shares[1:].sum(), 1e-12)
  return {"agree_all": float(np.mean(flat[every.reshape(-1)] == flat)),
          "chance_all": float(np.sum(shares ** 2)),
          "agree_objects": float(np.mean((flat[among.reshape(-1)] == flat)[objects.reshape(-1)])),
          "chance_objects": float(np.sum(obj_shares ** 2))}


def val_frames(eval_config, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [B, S, S, 3] images, int [B, N] cell labels at output stride 8) of the probe's val set."""
  source = segdata.segmentation_source(eval_config.data, "val")
  items = [source[i] for i in range(min(num_images, len(source)))]
  images = np.stack([x["image"] for x in items])
  labels = cell_labels(np.stack([x["label"] for x in items]), pixel_shuffle.OUTPUT_STRIDE,
                       synthetic.NUM_CLASSES)
  return images, labels.reshape(len(items), -1)


def measure(model_config, params: dict, batch_stats: dict, images: np.ndarray,
            labels: np.ndarray) -> dict[str, dict[str, float]]:
  """{head: agreement} for the CACL network with these variables (inference mode)."""
  model = model_from_config(model_config)
  apply = jax.jit(lambda v, x: model.apply(v, augment.normalize(x), train=False))
  out = apply({"params": params, "batch_stats": batch_stats}, jnp.asarray(images))
  flat = lambda a: np.asarray(a).reshape(a.shape[0], -1, a.shape[-1])
  return {k: agreement(flat(out[k]), labels) for k in HEADS}


def random_network(config, seed: int, images: np.ndarray) -> tuple[dict, dict]:
  """Random-init CACL variables; backbone BN statistics re-estimated on `images` (the floor's)."""
  model = model_from_config(config.model)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)), train=False)
  backbone, stats = probe.random_backbone(config.model, seed=seed, calibration_images=images)
  params = {**jax.device_get(variables["params"]), "backbone": backbone}
  return params, {**jax.device_get(variables.get("batch_stats", {})), "backbone": stats}


def table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
  lines = ["| run | " + " | ".join(f"{k}: all / objects" for k in HEADS) + " |",
           "|---|" + "---|" * len(HEADS)]
  for name, result in rows.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{result[k]['agree_all']:.2f} / {result[k]['agree_objects']:.2f}" for k in HEADS) + " |")
  first = next(iter(rows.values()))
  lines.append("| chance | " + " | ".join(
      f"{first[k]['chance_all']:.2f} / {first[k]['chance_objects']:.2f}" for k in HEADS) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows, config = {}, None
  for workdir in FLAGS.workdir:
    pre = checkpoint.restore_pretrained(workdir)
    config = pre.config
    if config.data.name != "synthetic" or not config.get("eval_after"):
      raise app.UsageError(f"{workdir}: not a synthetic run with eval_after (the demo's)")
    images, labels = val_frames(config.eval_after, FLAGS.num_images)
    result = measure(config.model, {**pre.heads, "backbone": pre.params},
                     {"backbone": pre.batch_stats}, images, labels)
    result["step"] = pre.step
    paths.write_text_atomic(paths.resolve(workdir) / "neighbours.json", json.dumps(result, indent=1))
    rows[os.path.basename(os.path.dirname(os.path.normpath(workdir))) + "/" +
         os.path.basename(os.path.normpath(workdir))] = result
  if FLAGS.random_seed is not None:
    train = segdata.segmentation_source(config.eval_after.data, "train")
    calib = np.stack([train[i]["image"] for i in range(min(64, len(train)))])
    params, stats = random_network(config, FLAGS.random_seed, calib)
    rows[f"random init (seed {FLAGS.random_seed})"] = measure(config.model, params, stats, images, labels)
  print(table(rows), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: other command-line modules define flags of the same names.
  flags.DEFINE_multi_string("workdir", None, "A pretraining run directory (repeatable).")
  flags.DEFINE_integer("num_images", 64, "Val images to embed.")
  flags.DEFINE_integer("random_seed", None, "Also measure the random-init network of this seed.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
