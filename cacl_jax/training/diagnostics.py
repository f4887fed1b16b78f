"""Diagnostics that tell whether CACL learns pixel-level structure (docs/method.md §6), on logging steps.

The training losses alone cannot say it: they fall for a network whose embeddings are constant
within each image (every head has a near-minimum there, docs/method.md §6). These numbers can. They are
measured on a fixed set of frame pairs — for the synthetic data, pairs of the held-out
pretraining stream whose ground truth the renderer knows (every pixel's class, every scene
point's motion) — with the online network on v and the target network on v+ (the networks
the losses compare), both in inference mode (running BN statistics, no pixel shuffle, no
augmentation), as the linear probe reads them:

  match_true_acc    fraction of pixels i (whose scene point stays visible in v+) for which
                    the match m(i) = argmax_j û_i·û+_j (eq. 4; u, or h under
                    `loss.affinity='backbone'`) lands within
                    one feature cell (Chebyshev) of the true correspondent;
  match_true_still  the same for the match m(i) = i (nothing moves): the score of a match that
                    only knows position, the level a position shortcut reaches;
  match_label_acc   fraction of pixels whose match has the same class (cell majority label);
  match_label_chance  the same for a match drawn uniformly at random: Σ_c P_v(c)·P_v+(c);
  match_object_acc, match_object_chance  the same two over the object pixels of v only
                    (the background covers most of a frame and dominates the two above);
  cos_within_X      mean cosine between two different pixels of one image, X ∈ {h, u, p, c}
                    (backbone h and the three heads); 1 = collapsed within the image;
  cos_cross_X       mean cosine between pixels of different images;
  class_sep_X       (synthetic) mean cosine between object cells of the same class in two
                    different images minus that between object cells of different classes in
                    two different images, X ∈ {h, u, p, c}: > 0 when the embedding groups the
                    classes across images, the structure a linear probe needs;
  soft_target_entropy  mean entropy of the soft cycle target's rows T_i / log N (1 = uniform);
  cycle_return      the cycle's return-to-self rate: fraction of pixels with argmax_j M_ij = i
                    over all N + K columns (eq. 5, the training τ and Q_C).

Ties in argmax are split evenly over the tied columns, so a constant embedding scores exactly
the chance rate instead of whatever column 0 happens to hold. Everything but the set-up is a
pure function of arrays; `make_probe` jits the whole measurement once (a collective on a
multi-host mesh: every process calls it with the same replicated set).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cacl_jax.method import losses, pixel_shuffle
from cacl_jax.data import augment, synthetic

MAPS = ("h", "u", "p", "c")


# ---------------------------------------------------------------- pure measures

def cosine_within_cross(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [B, N, D] -> (mean cosine over pairs i ≠ j of one image, over pairs of two images).

  From sums of unit vectors, O(B·N·D): Σ_{i,j} x̂_i·x̂_j = ‖Σ_i x̂_i‖².
  """
  x = losses.l2n(x.astype(jnp.float32))
  b, n, _ = x.shape
  per_image = jnp.sum(jnp.square(jnp.sum(x, axis=1)), axis=-1)  # [B] incl. i = j
  within = (jnp.sum(per_image) - b * n) / (b * n * (n - 1))
  total = jnp.sum(jnp.square(jnp.sum(x, axis=(0, 1))))
  cross = (total - jnp.sum(per_image)) / max(b * (b - 1) * n * n, 1)
  return within, cross


def class_separation(x: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """x [B, N, D], labels int [B, N] (0 = background, ignored) -> scalar: mean cosine over
  pairs of object cells of one class from different images minus that over pairs of
  different classes from different images. From per-image class sums, O(B·N·D)."""
  x = losses.l2n(x.astype(jnp.float32))
  y = jax.nn.one_hot(labels, num_classes)[..., 1:]  # [B, N, C-1], background dropped
  per_image = jnp.einsum("bnc,bnd->bcd", y, x)       # S_bc
  per_class = jnp.sum(per_image, axis=0)             # T_c
  counts_bc = jnp.sum(y, axis=1)                     # n_bc
  counts_c = jnp.sum(counts_bc, axis=0)
  sq = lambda v: jnp.sum(jnp.square(v), axis=-1)
  same_sum = jnp.sum(sq(per_class)) - jnp.sum(sq(per_image))
  same_n = jnp.sum(jnp.square(counts_c)) - jnp.sum(jnp.square(counts_bc))
  all_sum = sq(jnp.sum(per_class, axis=0)) - jnp.sum(sq(jnp.sum(per_image, axis=1)))
  all_n = jnp.square(jnp.sum(counts_c)) - jnp.sum(jnp.square(jnp.sum(counts_bc, axis=1)))
  same = same_sum / jnp.maximum(same_n, 1)
  diff = (all_sum - same_sum) / jnp.maximum(all_n - same_n, 1)
  return same - diff


def argmax_weights(scores: jax.Array) -> jax.Array:
  """[..., M] -> [..., M] weights: 1/|ties| on every maximal entry, 0 elsewhere."""
  top = scores == jnp.max(scores, axis=-1, keepdims=True)
  return top / jnp.sum(top, axis=-1, keepdims=True)


def match_rate(affinity: jax.Array, hit: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Mean over rows i (valid ones) of Σ_j w_ij·hit_ij, w = argmax_weights(A): the fraction of
  matches m(i) that are hits, ties split. affinity, hit [B, N, N]; valid [B, N] or None."""
  rate = jnp.sum(argmax_weights(affinity) * hit, axis=-1)  # [B, N]
  if valid is None:
    return jnp.mean(rate)
  return jnp.sum(rate * valid) / jnp.maximum(jnp.sum(valid), 1)


def label_chance(labels: jax.Array, labels_pos: jax.Array, num_classes: int,
                 rows: jax.Array | None = None) -> jax.Array:
  """The label agreement of a uniformly random match: mean over pixels i (over `rows`, bool
  [B, N], if given) of P_v+(label_i). labels, labels_pos int [B, N] -> scalar. Over all
  pixels it is Σ_c P_v(c)·P_v+(c) averaged over images."""
  q = jnp.mean(jax.nn.one_hot(labels_pos, num_classes), axis=1)  # [B, C]
  agree = jnp.take_along_axis(q, labels, axis=1)  # [B, N]
  if rows is None:
    return jnp.mean(agree)
  return jnp.sum(agree * rows) / jnp.maximum(jnp.sum(rows), 1)


def entropy_ratio(target: jax.Array) -> jax.Array:
  """Mean row entropy of a row-stochastic [B, N, N] over log N (1 = uniform rows)."""
  n = target.shape[-1]
  ent = -jnp.sum(jnp.where(target > 0, target * jnp.log(jnp.maximum(target, 1e-30)), 0.0), -1)
  return jnp.mean(ent) / np.log(n)


def cell_hits(true_cell: jax.Array, grid_w: int, num_cells: int | None = None) -> jax.Array:
  """true_cell int [B, N] (cell index in v+) -> bool [B, N, M]: cell j of v+'s M cells (default
  M = N) within one cell (Chebyshev) of the true one."""
  j = jnp.arange(num_cells or true_cell.shape[-1])
  jy, jx = j // grid_w, j % grid_w
  ty, tx = true_cell[..., None] // grid_w, true_cell[..., None] % grid_w
  return jnp.maximum(jnp.abs(jy - ty), jnp.abs(jx - tx)) <= 1


def measure(out: dict[str, jax.Array], out_pos: dict[str, jax.Array], queue_c: jax.Array,
            config, truth: dict[str, jax.Array] | None) -> dict[str, jax.Array]:
  """All diagnostics from the maps {'h','u','p','c'} [B, h, w, C] on v (online) and v+ (target).

  truth (synthetic only): 'labels', 'labels_pos' int [B, N] cell classes, 'true_cell' int
  [B, N] the cell of v+ holding each cell centre's scene point, 'valid' bool [B, N].
  """
  flat = {k: out[k].reshape(out[k].shape[0], -1, out[k].shape[-1]) for k in MAPS}
  flat_pos = {k: out_pos[k].reshape(out_pos[k].shape[0], -1, out_pos[k].shape[-1]) for k in MAPS}
  result = {}
  for k in MAPS:
    result[f"cos_within_{k}"], result[f"cos_cross_{k}"] = cosine_within_cross(flat[k])
  a = "h" if config.loss.get("affinity", "global_head") == "backbone" else "u"
  u, u_pos = flat[a], flat_pos[a]   # the map that defines A and T (`loss.affinity`)
  tau_c = config.loss.temperature["cycle"]
  target = losses.soft_cycle_target(u, u_pos, tau_c, mode=config.loss.soft_target)
  result["soft_target_entropy"] = entropy_ratio(target)
  result["cycle_return"] = losses.cycle_back_accuracy(flat["c"], flat_pos["c"], queue_c, tau_c)
  if truth is not None:
    affinity = jnp.einsum("bnd,bmd->bnm", losses.l2n(u.astype(jnp.float32)),
                          losses.l2n(u_pos.astype(jnp.float32)))
    grid_w = out["u"].shape[2]
    hits = cell_hits(truth["true_cell"], grid_w)
    result["match_true_acc"] = match_rate(affinity, hits, truth["valid"])
    still = jnp.broadcast_to(jnp.eye(hits.shape[-1]), affinity.shape)
    result["match_true_still"] = match_rate(still, hits, truth["valid"])
    labels, labels_pos = truth["labels"], truth["labels_pos"]
    same = labels[..., :, None] == labels_pos[..., None, :]
    objects = labels > 0
    result["match_label_acc"] = match_rate(affinity, same)
    result["match_label_chance"] = label_chance(labels, labels_pos, synthetic.NUM_CLASSES)
    result["match_object_acc"] = match_rate(affinity, same, objects)
    result["match_object_chance"] = label_chance(labels, labels_pos, synthetic.NUM_CLASSES, objects)
    for k in MAPS:
      result[f"class_sep_{k}"] = class_separation(flat[k], labels, synthetic.NUM_CLASSES)
  return result


# ---------------------------------------------------------------- the fixed pair set

def cell_labels(labels: np.ndarray, stride: int, num_classes: int) -> np.ndarray:
  """uint8 [B, H, W] -> int32 [B, N]: the majority class of each stride×stride cell (ties:
  the lowest class)."""
  b, hgt, wid = labels.shape
  cells = labels.reshape(b, hgt // stride, stride, wid // stride, stride).transpose(0, 1, 3, 2, 4)
  counts = np.eye(num_classes, dtype=np.int32)[cells.reshape(b, -1, stride * stride)].sum(axis=2)
  return counts.argmax(axis=-1).astype(np.int32)


def synthetic_pairs(data_config, num_pairs: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Frame pairs (t, t + s) of the held-out synthetic pretraining stream, rendered at the
  training image size (no crop), with their ground truth at the feature grid (output stride 8).

  Returns v, v_pos uint8 [P, S, S, 3]; labels, labels_pos, true_cell int32 [P, N]; valid bool [P, N].
  """
  size, stride = int(data_config.image_size), pixel_shuffle.OUTPUT_STRIDE
  s = int(data_config.frame_stride)
  cfg = data_config.synthetic
  grid = size // stride
  centres = (np.arange(grid) * stride + stride / 2).astype(np.float64)
  points = np.stack(np.meshgrid(centres, centres), axis=-1).reshape(-1, 2)  # (x, y), row-major
  out = {k: [] for k in ("v", "v_pos", "labels", "labels_pos", "true_cell", "valid")}
  rng = np.random.default_rng([seed, 7])
  for index in range(num_pairs):
    spec = synthetic.video_spec(cfg.get("seed", 0), synthetic.STREAMS[("pretrain", "val")], index,
                                size, tuple(cfg.get("num_objects", (3, 5))))
    t = int(rng.integers(0, max(cfg.num_frames - s, 1)))
    (v, lab), (v_pos, lab_pos) = synthetic.render(spec, t), synthetic.render(spec, t + s)
    moved, valid = synthetic.correspondence(spec, t, t + s, points)
    cell = np.clip(moved // stride, 0, grid - 1).astype(np.int32)
    out["v"].append(v)
    out["v_pos"].append(v_pos)
    out["labels"].append(lab)
    out["labels_pos"].append(lab_pos)
    out["true_cell"].append(cell[:, 1] * grid + cell[:, 0])
    out["valid"].append(valid)
  out = {k: np.stack(v) for k, v in out.items()}
  for k in ("labels", "labels_pos"):
    out[k] = cell_labels(out[k], stride, synthetic.NUM_CLASSES)
  return out


NUM_PAIRS = 64


def local_pair_set(config, host_batch: dict[str, np.ndarray], num_devices: int,
                   process_index: int, process_count: int) -> dict[str, np.ndarray]:
  """This process' slice of the fixed set the diagnostics run on (sharded on 'data' like a
  batch): synthetic pairs with ground truth (the same set whatever the process count), or
  for real data, without ground truth, the first pairs of this process' first training batch.
  The set has ≥ NUM_PAIRS pairs, a multiple of the device count."""
  total = -(-NUM_PAIRS // num_devices) * num_devices
  local = total // process_count
  if config.data.name == "synthetic":
    full = synthetic_pairs(config.data, total, config.seed)
    return {k: v[process_index * local:(process_index + 1) * local] for k, v in full.items()}
  count = min(local, len(host_batch["v"]))
  count -= count % max(1, num_devices // process_count)
  return {"v": np.asarray(host_batch["v"])[:count], "v_pos": np.asarray(host_batch["v_pos"])[:count]}


# ---------------------------------------------------------------- the jitted probe

def make_probe(model, config, out_sharding):
  """jit: (state, pairs) -> {name: scalar}, the networks in inference mode (module docstring)."""
  def probe(state, pairs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    def apply(params, stats, x):
      return model.apply({"params": params, "batch_stats": stats}, augment.normalize(x),
                         train=False)
    out = apply(state.params, state.batch_stats, pairs["v"])
    out_pos = apply(state.target_params, state.target_batch_stats, pairs["v_pos"])
    q_c = state.queues["cycle"] if config.loss.cycle_negatives else state.queues["cycle"][:0]
    truth = pairs if "true_cell" in pairs else None
    return measure(out, out_pos, q_c, config, truth)
  return jax.jit(probe, out_shardings=out_sharding)


def as_floats(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
