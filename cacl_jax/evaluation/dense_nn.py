"""Dense nearest-neighbour retrieval, the math of the Hummingbird protocol (Balazevic et al.,
NeurIPS 2023, "Towards In-context Scene Understanding"; open re-implementation
vpariza/open-hummingbird-eval, `hbird/hbird_eval.py`). Pure jax + numpy; the protocol around it
(data, memory bank, mesh, metrics) is `evaluation/retrieval.py`.

A memory bank holds M keys (L2-normalised feature cells of train crops) with their values (the
class distribution of each cell's 8×8 label patch). Each query cell q (a normalised val feature)
takes its k most similar keys by cosine and the softmax of those similarities over τ weighs their
values:

    label(q) = Σ_{j ∈ topk(q)} softmax_j(⟨q, key_j⟩ / τ) · value_j          (the reference's
                                                                          `cross_attention`)

The search is exact: blocked matmuls (a [query block × bank block] tile of similarities at a
time), a running top-k carried over the bank's blocks; over a mesh the bank is sharded along its
rows, each device searches its own rows for every query, and the candidates are merged by an
all-to-all that brings each query's n·k candidates to the device that holds the query.
Ties (equal similarities) go to the lower bank row, as `lax.top_k` orders them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IGNORE_LABEL = 255
PATCH = 8   # the backbone's output stride: one feature cell covers an 8×8 pixel patch


def l2n(x: jax.Array) -> jax.Array:
  """Unit vectors along the last axis (zero vectors stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def patch_labels(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """The value of every feature cell: the class histogram of its 8×8 label patch.

  labels: int [B, H, W] (255 and values ≥ num_classes ignored), H and W multiples of 8.
  Returns (distribution float32 [B, H/8, W/8, L]: the share of the patch's labelled pixels in
           each class (all 0 when none is labelled),
           valid bool [B, H/8, W/8]: the patch has at least one labelled pixel).
  The reference (`create_memory`: one-hot mean over the patch) first sets 255 to class 0; here
  ignored pixels count for no class, so VOC's object borders do not vote for background, nor
  Cityscapes' void for road.
  """
  b, height, width = labels.shape
  if height % PATCH or width % PATCH:
    raise ValueError(f"label maps must be multiples of {PATCH} pixels, got {height}x{width}")
  one_hot = jax.nn.one_hot(labels.astype(jnp.int32), num_classes, dtype=jnp.float32)
  counts = one_hot.reshape(b, height // PATCH, PATCH, width // PATCH, PATCH, num_classes)
  counts = counts.sum(axis=(2, 4))
  total = counts.sum(axis=-1, keepdims=True)
  return counts / jnp.maximum(total, 1.0), total[..., 0] > 0


def cell_scores(distribution: jax.Array, valid: jax.Array, uniform: jax.Array) -> jax.Array:
  """The reference's sampling score for a bounded memory (`sample_features`), lower is kept.

  Per image, a class's frequency is the number of its patches in which the class occurs; a
  patch's score is the sum of the frequencies of the classes it contains, times U(0, 1): cells
  of rare classes (and of few classes) are kept first. Patches without labels score +inf.
  distribution float [B, N, L], valid bool [B, N], uniform float [B, N] -> float32 [B, N].
  """
  present = (distribution > 0).astype(jnp.float32)
  frequency = present.sum(axis=1, keepdims=True)                      # [B, 1, L]
  score = jnp.sum(present * frequency, axis=-1) * uniform
  return jnp.where(valid, score, jnp.inf)


def keep_cells(scores: jax.Array, n: int) -> jax.Array:
  """int32 [B, n]: the n lowest-scoring cells of each image (scores [B, N])."""
  return jax.lax.top_k(-scores, n)[1]


def _pad_rows(x: jax.Array, multiple: int, value=0) -> jax.Array:
  pad = -x.shape[0] % multiple
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value) if pad else x


def topk_search(queries: jax.Array, keys: jax.Array, values: jax.Array, valid: jax.Array,
                k: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k by inner product, in [block × block] tiles.

  queries [Q, C], keys [R, C] (unit rows), values [R, L], valid bool [R] (invalid keys are never
  returned while k valid ones exist). Returns (similarities float32 [Q, k], descending; their
  values [Q, k, L]). Memory: O(block² + Q·k·L), whatever Q and R.
  """
  q_count = queries.shape[0]
  # A bank block holds at least k rows, so that its own top-k exists (padding rows are invalid).
  block_q, block_r = min(block, q_count), max(min(block, keys.shape[0]), k)
  queries = _pad_rows(jnp.asarray(queries, jnp.float32), block_q)
  keys = _pad_rows(jnp.asarray(keys, jnp.float32), block_r).reshape(-1, block_r, keys.shape[-1])
  values = _pad_rows(jnp.asarray(values, jnp.float32), block_r).reshape(-1, block_r,
                                                                       values.shape[-1])
  valid = _pad_rows(jnp.asarray(valid), block_r, False).reshape(-1, block_r)

  def block_top(q, key_blk, value_blk, valid_blk):
    # HIGHEST: these similarities are ranked; TF32 / bf16 passes would reorder near-ties.
    s = jnp.dot(q, key_blk.T, precision=jax.lax.Precision.HIGHEST)
    top, pos = jax.lax.top_k(jnp.where(valid_blk[None, :], s, -jnp.inf), k)
    return top, value_blk[pos]                                                # [bq, k], [bq, k, L]

  def one_query_block(q):
    def one_key_block(carry, blk):
      top, vals = block_top(q, *blk)
      # The carried best come first, so that ties keep the earlier (lower) bank row.
      return merge_candidates(jnp.concatenate([carry[0], top], axis=1),
                              jnp.concatenate([carry[1], vals], axis=1), k), None

    # The first block starts the running top-k (its values carry the inputs' sharding type,
    # which a constant initial carry would not inside shard_map).
    first = block_top(q, keys[0], values[0], valid[0])
    (s, v), _ = jax.lax.scan(one_key_block, first, (keys[1:], values[1:], valid[1:]))
    return s, v

  s, v = jax.lax.map(one_query_block, queries.reshape(-1, block_q, queries.shape[-1]))
  return s.reshape(-1, k)[:q_count], v.reshape(-1, k, v.shape[-1])[:q_count]


def merge_candidates(sims: jax.Array, values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k best of several candidate lists: sims [Q, m], values [Q, m, L] -> [Q, k], [Q, k, L].
  Stable: among equal similarities the earlier candidate wins."""
  top, pos = jax.lax.top_k(sims, k)
  return top, jnp.take_along_axis(values, pos[..., None], axis=1)


def sharded_search(mesh, axis: str, queries: jax.Array, keys: jax.Array, values: jax.Array,
                   valid: jax.Array, k: int, block: int) -> tuple[jax.Array, jax.Array]:
  """`topk_search` with the bank sharded along its rows over `mesh`'s `axis`.

  queries [Q, C] (Q a multiple of the axis size; any sharding: every device searches all of
  them); keys [R, ..., C] / values [R, ..., L] / valid [R, ...] sharded along R, a device's rows
  being all the cells of its shard (e.g. [crops, slots, cells] of a memory bank). Returns the
  same as `topk_search` — (sims [Q, k], values [Q, k, L]) — sharded along Q over `axis`: device d's k
  best rows for every query are sent by an all-to-all to the device that owns the query's rows,
  which keeps the best k of the n·k it receives (devices in order, so ties keep the lower row).
  """
  n = mesh.shape[axis]

  def local(q, key_shard, value_shard, valid_shard):
    rows = lambda x, tail: x.reshape(-1, *tail)
    s, v = topk_search(q, rows(key_shard, key_shard.shape[-1:]),
                       rows(value_shard, value_shard.shape[-1:]), rows(valid_shard, ()), k, block)
    # Split Q into n chunks, chunk j to device j; received: [Q/n, n·k] in device order.
    s = jax.lax.all_to_all(s, axis, 0, 1, tiled=True)
    v = jax.lax.all_to_all(v, axis, 0, 1, tiled=True)
    return merge_candidates(s, v, k)

  if queries.shape[0] % n:
    raise ValueError(f"{queries.shape[0]} queries do not split over {n} devices")
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)),
                       out_specs=(P(axis), P(axis)))(queries, keys, values, valid)


def transfer_labels(sims: jax.Array, values: jax.Array, temperature: float) -> jax.Array:
  """The reference's label transfer (`cross_attention`, β = temperature): sims [..., k],
  values [..., k, L] -> [..., L], the softmax(sims / τ)-weighted mean of the neighbours' values."""
  weights = jax.nn.softmax(sims / temperature, axis=-1)
  return jnp.einsum("...k,...kl->...l", weights, values)
