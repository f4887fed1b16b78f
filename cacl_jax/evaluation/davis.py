"""The DAVIS-2017 label-propagation program behind `python -m cacl_jax.propagate`.

Restores the frozen online backbone (BatchNorm in inference mode) of `config.pretrained`,
computes L2-normalised features of every frame of every val sequence (the backbone's OS8 map,
or one head applied to it: `features = 'u' | 'p' | 'c'`), propagates the first frame's
objects through each video (`propagation.py`: CRW's protocol and defaults) and scores J and F
as the DAVIS benchmark does (`metrics.davis_sequence_scores`).

Means are DAVIS': J-Mean is the mean over all objects of all sequences of each object's mean
over its scored frames (frames 1..T−2), likewise F; J&F = (J + F) / 2; J/F-Recall is the share
of scored frames above 0.5. `per_sequence` averages a sequence's objects; `per_object` is
DAVIS' own per-sequence table ('<sequence>_<id>'). Everything in percent, one decimal.

Writes WORKDIR/results.json, WORKDIR/masks/<sequence>/<frame>.png (palette PNGs, the layout
davis2017-evaluation reads, for a cross-check with the official code) and
WORKDIR/figures/<sequence>.png overlays of a few frames. A sequence that cannot be scored
(no object in its first annotation, fewer than 3 frames, an undecodable record) is skipped,
counted and named, never fatal.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from cacl_jax.runtime import paths, viz
from cacl_jax.data import augment
from cacl_jax.data import davis as davis_data
from cacl_jax.evaluation import metrics as metrics_lib
from cacl_jax.evaluation import propagation
from cacl_jax.evaluation import segdata
from cacl_jax.models import resnet
from cacl_jax.models.heads import Head

HEADS = {"u": "head_G", "p": "head_P", "c": "head_C"}   # paper eq. 2: u = g_G(h), p, c


def make_encoder(pretrained, features: str) -> Callable[[np.ndarray], jax.Array]:
  """uint8 frames [B, H, W, 3] (H, W multiples of 8) → float32 [B, H/8, W/8, C], L2-normalised
  along C: the frozen backbone (inference BN), optionally followed by one head."""
  if features != "backbone" and features not in HEADS:
    raise ValueError(f"features must be 'backbone' or one of {sorted(HEADS)}, got {features!r}")
  backbone = resnet.backbone_from_config(pretrained.config.model)
  variables = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
  head, head_params = None, None
  if features != "backbone":
    head = Head(pretrained.config.model.get("embed_dim", 128), backbone.dtype)
    head_params = pretrained.heads[HEADS[features]]

  @jax.jit
  def encode(variables, head_params, frames):
    h = backbone.apply(variables, augment.normalize(frames), False)
    if head is not None:
      h = head.apply({"params": head_params}, h)
    h = h.astype(jnp.float32)
    return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)

  return lambda frames: encode(variables, head_params, jnp.asarray(frames))


def sequence_features(encode, frames: np.ndarray, batch_size: int) -> jax.Array:
  """Features of all T frames [T, H, W, 3], `batch_size` at a time (the last batch padded, so
  one compiled shape serves every batch)."""
  out = []
  for start in range(0, len(frames), batch_size):
    batch = frames[start:start + batch_size]
    count = len(batch)
    if count < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
    out.append(encode(batch)[:count])
  return jnp.concatenate(out)


def network_frames(images: np.ndarray, short_side: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(frames as the network sees them, their size before padding): resized so that the short
  side is `short_side` (0: native), then padded bottom/right with the mean colour to
  multiples of the output stride 8."""
  if short_side:
    t, h, w = images.shape[:3]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    images = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in images])
  t, h, w = images.shape[:3]
  canvas = np.empty((t, math.ceil(h / 8) * 8, math.ceil(w / 8) * 8, 3), np.uint8)
  canvas[:] = segdata.MEAN_RGB
  canvas[:, :h, :w] = images
  return canvas, (h, w)


def predict_sequence(seq: davis_data.Sequence, encode, config) -> np.ndarray:
  """Predicted object ids uint8 [T, H, W] of one sequence (frame 0 = its annotation)."""
  first = np.where(seq.labels[0] == metrics_lib.IGNORE_LABEL, 0, seq.labels[0])
  ids = np.arange(int(first.max()) + 1)
  frames, size = network_frames(seq.images, int(config.data.get("image_size", 0)))
  canvas = frames.shape[1:3]
  grid = (canvas[0] // 8, canvas[1] // 8)
  given = first
  if size != first.shape:   # frames were resized: the labels follow, by nearest neighbour
    given = np.asarray(Image.fromarray(first.astype(np.uint8)).resize(size[::-1], Image.NEAREST))
  p = config.propagation
  soft = propagation.propagate(
      sequence_features(encode, frames, int(config.batch_size)),
      propagation.labels_to_grid(given, ids, grid, canvas), context=int(p.context),
      topk=int(p.topk), radius=float(p.radius), temperature=float(p.temperature),
      chunk=int(p.query_chunk))
  preds = np.stack([propagation.grid_to_labels(s, ids, canvas, size, first.shape) for s in soft])
  preds[0] = first
  return preds.astype(np.uint8)


def _pct(x) -> float:
  return round(100 * float(x), 1)


def save_masks(folder: str, frames: list[str], preds: np.ndarray) -> None:
  target = paths.resolve(folder)   # local, file:// or gs://
  target.mkdir(parents=True, exist_ok=True)
  palette = viz.voc_palette(256).reshape(-1).tolist()
  for name, pred in zip(frames, preds):
    im = Image.fromarray(pred, mode="P")
    im.putpalette(palette)
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    (target / f"{name}.png").write_bytes(buffer.getvalue())


def format_table(results: dict) -> str:
  rows = results["per_sequence"]
  width = max([len(n) for n in rows] + [8])
  lines = [f"{'sequence':<{width}}  obj  frames      J      F    J&F", "-" * (width + 37)]
  for name, r in rows.items():
    lines.append(f"{name:<{width}} {r['num_objects']:4d} {r['num_frames']:7d} "
                 f"{r['j']:6.1f} {r['f']:6.1f} {r['j_and_f']:6.1f}")
  lines.append("-" * (width + 37))
  lines.append(f"{'mean (objects)':<{width}} {results['num_objects']:4d} {'':7s} "
               f"{results['j']:6.1f} {results['f']:6.1f} {results['j_and_f']:6.1f}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `propagate` program: restore → features → propagate → J & F → WORKDIR/results.json."""
  from cacl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  if not config.get("pretrained"):
    raise ValueError("config.pretrained must name a pretraining workdir "
                     "(--config.pretrained=PRETRAIN_DIR, or a `convert from-torch` DIR)")
  if config.data.name != "davis":
    raise ValueError(f"data.name must be 'davis', got {config.data.name!r}")
  if not os.path.isdir(config.data.get("root") or ""):
    raise FileNotFoundError(
        f"data.root={config.data.get('root')!r} is not a directory: prepare DAVIS-2017 with "
        "`python -m cacl_jax.prepare_data davis --src RAW --out DATA` and pass "
        "--config.data.root=DATA")
  source = davis_data.davis_source(config.data.root, config.data.get("split", "val"))
  pretrained = checkpoint.restore_pretrained(config.pretrained, config.get("checkpoint_step"))
  encode = make_encoder(pretrained, config.features)
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  logging.info("restored %s (step %d); %d sequences", pretrained.path, pretrained.step, len(source))

  per_sequence, per_object, skipped, figures = {}, {}, [], {}
  all_j, all_f, recall_j, recall_f = [], [], [], []
  for i in range(len(source)):
    name, t0 = source.names[i], time.time()
    try:
      seq = source[i]
    except (OSError, ValueError) as e:   # an undecodable record: named, not fatal
      skipped.append({"name": name, "reason": f"cannot decode: {e}"})
      continue
    num_objects = int(np.where(seq.labels[0] == 255, 0, seq.labels[0]).max())
    if num_objects == 0 or len(seq.frames) < 3:
      skipped.append({"name": name, "reason": "no object in the first frame's annotation"
                      if num_objects == 0 else f"{len(seq.frames)} frames; DAVIS scores 1..T-2"})
      continue
    preds = predict_sequence(seq, encode, config)
    j, f = metrics_lib.davis_sequence_scores(seq.labels, preds)
    jm, fm = j.mean(axis=1), f.mean(axis=1)          # per object, over its scored frames
    all_j += list(jm)
    all_f += list(fm)
    recall_j += list((j > 0.5).mean(axis=1))
    recall_f += list((f > 0.5).mean(axis=1))
    for o in range(num_objects):
      per_object[f"{name}_{o + 1}"] = {"j": _pct(jm[o]), "f": _pct(fm[o])}
    per_sequence[name] = {"j": _pct(jm.mean()), "f": _pct(fm.mean()),
                          "j_and_f": _pct((jm.mean() + fm.mean()) / 2),
                          "num_objects": num_objects, "num_frames": len(seq.frames)}
    if config.get("save_masks", True):
      save_masks(os.path.join(workdir, "masks", name), seq.frames, preds)
    if len(figures) < int(config.get("num_figure_sequences", 3)):
      shown = sorted({1, len(seq.frames) // 2, len(seq.frames) - 2})
      figures[name] = viz.propagation_figure(
          [seq.images[t] for t in shown], [seq.labels[t] for t in shown],
          [preds[t] for t in shown], [f"{name} {seq.frames[t]}" for t in shown],
          os.path.join(workdir, "figures", f"{name}.png"))
    print(f"[{i + 1}/{len(source)}] {name}: {num_objects} objects, {len(seq.frames)} frames, "
          f"J {per_sequence[name]['j']:.1f} F {per_sequence[name]['f']:.1f} "
          f"({time.time() - t0:.1f} s)", flush=True)
  if not per_sequence:
    raise ValueError(f"no sequence could be scored ({len(skipped)} skipped: "
                     f"{'; '.join(s['name'] + ': ' + s['reason'] for s in skipped[:3])})")

  j_mean, f_mean = float(np.mean(all_j)), float(np.mean(all_f))
  results: dict[str, Any] = {
      "j": _pct(j_mean), "f": _pct(f_mean), "j_and_f": _pct((j_mean + f_mean) / 2),
      "j_recall": _pct(np.mean(recall_j)), "f_recall": _pct(np.mean(recall_f)),
      "per_sequence": per_sequence, "per_object": per_object,
      "num_sequences": len(per_sequence), "num_objects": len(all_j),
      "num_skipped": len(skipped), "skipped": skipped,
      "features": config.features, "checkpoint_step": pretrained.step,
      "checkpoint_path": pretrained.path, "figures": figures,
      "config": json.loads(config.to_json_best_effort())}
  paths.write_text_atomic(paths.resolve(workdir) / "results.json", json.dumps(results, indent=1))
  print(format_table(results), flush=True)
  if skipped:
    print(f"skipped {len(skipped)} sequences: "
          + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped), flush=True)
  return results
