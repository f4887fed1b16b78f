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
time), a running top-k carried over the bank's blocks, each block sliced from the bank where it
lies (a bank at paper scale fills a device: it is allocated with `padded_rows` rows and never
padded, reshaped into a copy or sliced off whole). Over a mesh the bank is sharded along its
rows, each device searches its own rows for every query, and the candidates are merged by an
all-to-all that brings each query's n·k candidates to the device that holds the query.
Ties (equal similarities) go to the lower bank row, as `lax.top_k` orders them. `bank_bytes` and
`search_bytes` give what a device holds, so a run can refuse a bank that would not fit before
computing anything.
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


def search_block(rows: int, block: int) -> int:
  """The bank rows per similarity tile for a bank of `rows` rows: `block`, or all the rows when
  they are fewer (one tile)."""
  return min(block, rows)


def padded_rows(rows: int, block: int) -> int:
  """The rows to allocate for `rows` bank rows so that the search tiles them without a copy:
  `rows` itself up to one block, else the next multiple of `block` (the extra rows invalid)."""
  return rows if rows <= block else -(-rows // block) * block


def bank_bytes(rows: int, channels: int, num_classes: int, key_bytes: int = 4) -> int:
  """Bytes of a bank of `rows` rows: keys [rows, C] (`key_bytes` each), values float32
  [rows, L], valid bool [rows]."""
  return rows * (channels * key_bytes + num_classes * 4 + 1)


def search_bytes(queries: int, channels: int, num_classes: int, k: int, block: int,
                 bank_block: int) -> int:
  """A device's working set beside its bank while it searches `queries` query rows (every device
  searches all of them): the queries float32 [Q, C]; three [Q, k] candidate lists with their
  values (its own top-k, the all-to-all's, the merge's); one [block × bank block] similarity
  tile and its mask; the running and the new top-k of a query block. An upper estimate: XLA
  may reuse some of these buffers."""
  block_q = min(block, queries)
  candidates = queries * k * (num_classes + 1) * 4
  return (queries * channels * 4 + 3 * candidates + 2 * block_q * bank_block * 4
          + 2 * block_q * 2 * k * (num_classes + 1) * 4)


def _pad_queries(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[0] % multiple
  return jnp.pad(x, [(0, pad), (0, 0)]) if pad else x


def topk_search(queries: jax.Array, keys: jax.Array, values: jax.Array, valid: jax.Array,
                k: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k by inner product, in [block × bank block] tiles.

  queries [Q, C] float32, keys [R, C] (unit rows; float32, or bfloat16 to halve the bank: each
  tile is widened to float32, so the scores are float32 products of the rounded keys), values
  [R, L], valid bool [R] (invalid keys are never returned while k valid ones exist; with fewer,
  the list ends in -inf similarities, which weigh nothing in `transfer_labels`). R must be a
  multiple of `search_block(R, block)` (`padded_rows` allocates such a bank): the bank is
  tiled in place, never padded or copied, since at paper scale it fills a device. Returns
  (similarities float32 [Q, k], descending; their values [Q, k, L]). Memory beside the bank:
  O(block² + Q·k·L) (`search_bytes`).
  """
  q_count, rows = queries.shape[0], keys.shape[0]
  block_q, block_r = min(block, q_count), search_block(rows, block)
  if rows % block_r:
    raise ValueError(f"a bank of {rows} rows does not tile in blocks of {block_r}: allocate "
                     f"dense_nn.padded_rows({rows}, {block}) rows, the extra ones invalid")
  num_blocks = rows // block_r
  queries = _pad_queries(jnp.asarray(queries, jnp.float32), block_q)
  width = min(k, block_r)   # a block smaller than k (a small shard) offers all its rows

  def block_top(q, i):
    key_blk = jax.lax.dynamic_slice_in_dim(keys, i * block_r, block_r).astype(jnp.float32)
    value_blk = jax.lax.dynamic_slice_in_dim(values, i * block_r, block_r)
    valid_blk = jax.lax.dynamic_slice_in_dim(valid, i * block_r, block_r)
    # HIGHEST: these similarities are ranked; TF32 / bf16 passes would reorder near-ties.
    s = jnp.dot(q, key_blk.T, precision=jax.lax.Precision.HIGHEST)
    top, pos = jax.lax.top_k(jnp.where(valid_blk[None, :], s, -jnp.inf), width)
    vals = value_blk[pos].astype(jnp.float32)                                # [bq, width, L]
    if width < k:
      top = jnp.pad(top, [(0, 0), (0, k - width)], constant_values=-jnp.inf)
      vals = jnp.pad(vals, [(0, 0), (0, k - width), (0, 0)])
    return top, vals

  def one_query_block(q):
    def one_key_block(i, carry):
      top, vals = block_top(q, i)
      # The carried best come first, so that ties keep the earlier (lower) bank row.
      return merge_candidates(jnp.concatenate([carry[0], top], axis=1),
                              jnp.concatenate([carry[1], vals], axis=1), k)

    # The first block starts the running top-k (its values carry the inputs' sharding type,
    # which a constant initial carry would not inside shard_map); the others are sliced from
    # the bank in place.
    return jax.lax.fori_loop(1, num_blocks, one_key_block, block_top(q, 0))

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
  them); keys [R, C] / values [R, L] / valid [R] sharded along R, each device's R / n rows a
  multiple of `search_block` (as `padded_rows` allocates them; the memory bank's rows). Returns
  the same as `topk_search` — (sims [Q, k], values [Q, k, L]) — sharded along Q over `axis`:
  device d's k best rows for every query are sent by an all-to-all to the device that owns the
  query's rows, which keeps the best k of the n·k it receives (devices in order, so ties keep
  the lower row). A device with fewer than k valid rows sends -inf for the rest.
  """
  n = mesh.shape[axis]

  def local(q, key_shard, value_shard, valid_shard):
    s, v = topk_search(q, key_shard, value_shard, valid_shard, k, block)
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
