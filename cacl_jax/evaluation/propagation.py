"""Label propagation through a video by feature affinity: the DAVIS-2017 semi-supervised
protocol of CRW (Jabri et al., "Space-Time Correspondence as a Contrastive Random Walk",
NeurIPS 2020; code: github.com/ajabri/videowalk, `code/test.py`, `code/utils/test_utils.py`),
as DINO and VFS also use it.

Given L2-normalised feature maps f_t [h, w, C] of every frame and the first frame's labels as
a soft map y_0 [h, w, L] (one channel per object id, background included), each later frame t
gets, for every query pixel q,

    context   M = {frame 0} ∪ {frames t − n, …, t − 1}  (indices below 0 repeat frame 0)
    A(q, (m, p)) = ⟨f_m(p), f_t(q)⟩ / τ, with p restricted to ‖p − q‖₂ < radius (feature cells)
                 in the n short-term frames (frame 0 is searched everywhere)
    y_t(q) = Σ_{(m,p) ∈ top-k A(q, ·)} softmax_k(A)(m, p) · y_m(p)

where y_m of a context frame is its own soft prediction (never thresholded). Defaults are
CRW's DAVIS command (README: `--topk 10 --videoLen 20 --radius 12 --temperature 0.05
--cropSize -1`, i.e. k = 10, n = 20, radius 12, τ = 0.05, native 480p resolution).

Resolution: the first frame's one-hot labels are resampled to the feature grid bilinearly at
cell centres (CRW: cv2.resize, INTER_LINEAR), and each prediction is upsampled bilinearly to
the frame and argmaxed (CRW: `dump_predictions`). Frames are padded bottom/right to a multiple
of the output stride 8 (CRW's network takes ceil(H/8) × ceil(W/8) cells the same way).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MASKED = -1e10   # CRW adds this to affinities outside the radius, before the temperature


def context_indices(t: int, context: int) -> list[int]:
  """Frames whose labels predict frame t ≥ 1: [0, t − n, …, t − 1], clamped at 0 (CRW's
  `context_index_bank` with long_mem = [0] on a video padded with n copies of frame 0)."""
  return [0] + [max(0, t - context + j) for j in range(context)]


def radius_mask(h: int, w: int, radius: float) -> np.ndarray:
  """bool [h·w, h·w]: cell q may attend to cell p when ‖p − q‖₂ < radius (CRW MaskedAttention)."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  y, x = y.reshape(-1), x.reshape(-1)
  return (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < radius ** 2


@functools.partial(jax.jit, static_argnames=("topk", "chunk"))
def affinity_topk(query: jax.Array, keys: jax.Array, local: jax.Array, temperature: float,
                  topk: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """The k strongest context cells of every query cell and their softmax weights.

  Args:
    query: float [N, C] the target frame's normalised features (N = h·w).
    keys: float [M, N, C] the context frames' features; keys[0] is the first frame (searched
      everywhere), keys[1:] the short-term frames (searched within the radius).
    local: bool [N, N] `radius_mask`.
    temperature: τ.
    topk: k.
    chunk: query cells per block: the block's affinities are chunk × M·N floats.

  Returns:
    (weights float32 [N, k] summing to 1 per row, indices int32 [N, k] into M·N).
  """
  m, n, c = keys.shape
  flat = keys.reshape(m * n, c).astype(jnp.float32)
  pad = -n % chunk
  q = jnp.pad(query.astype(jnp.float32), ((0, pad), (0, 0))).reshape(-1, chunk, c)
  near = jnp.pad(local, ((0, pad), (0, 0)), constant_values=True).reshape(-1, chunk, n)

  def block(args):
    qs, near_q = args
    a = (qs @ flat.T).reshape(chunk, m, n)
    far = jnp.where(near_q, 0.0, MASKED)[:, None, :]
    a = a.at[:, 1:].add(far)
    weights, index = jax.lax.top_k(a.reshape(chunk, m * n) / temperature, topk)
    return jax.nn.softmax(weights, axis=-1), index

  weights, index = jax.lax.map(block, (q, near))
  return weights.reshape(-1, topk)[:n], index.reshape(-1, topk)[:n]


def propagate(features: jax.Array, first: np.ndarray, *, context: int = 20, topk: int = 10,
              radius: float = 12.0, temperature: float = 0.05, chunk: int = 1024) -> np.ndarray:
  """Soft labels of every frame.

  Args:
    features: float [T, h, w, C], L2-normalised along C.
    first: float [h, w, L], frame 0's labels on the feature grid (`labels_to_grid`).
    context, topk, radius, temperature: n, k, the spatial radius (cells) and τ.
    chunk: query cells per affinity block (memory: chunk × (n + 1)·h·w floats).

  Returns:
    float32 [T, h, w, L]; frame 0 is `first` itself.
  """
  t_len, h, w, c = features.shape
  n = h * w
  if topk > n * (context + 1):
    raise ValueError(f"topk={topk} exceeds the {n * (context + 1)} context cells")
  feats = jnp.asarray(features).reshape(t_len, n, c)
  local = jnp.asarray(radius_mask(h, w, radius))
  labels = np.zeros((t_len, n, first.shape[-1]), np.float32)
  labels[0] = first.reshape(n, -1)
  for t in range(1, t_len):
    idx = context_indices(t, context)
    weights, index = affinity_topk(feats[t], feats[np.asarray(idx)], local, temperature,
                                   topk, min(chunk, n))
    neighbours = labels[idx].reshape(-1, labels.shape[-1])[np.asarray(index)]   # [N, k, L]
    labels[t] = np.einsum("nk,nkl->nl", np.asarray(weights), neighbours)
  return labels.reshape(t_len, h, w, -1)


def labels_to_grid(label: np.ndarray, ids: np.ndarray, grid: tuple[int, int],
                   canvas: tuple[int, int]) -> np.ndarray:
  """Frame 0's ids uint8 [H, W] → float32 [h, w, L] one-hot over `ids`, resampled bilinearly
  at cell centres (no antialiasing, as cv2.resize INTER_LINEAR) after padding the labels with
  background to the network's `canvas` (H_pad, W_pad) = 8·(h, w)."""
  padded = np.zeros(canvas, label.dtype)
  padded[:label.shape[0], :label.shape[1]] = label
  onehot = (padded[..., None] == np.asarray(ids)[None, None, :]).astype(np.float32)
  return np.asarray(jax.image.resize(onehot, (*grid, len(ids)), "linear", antialias=False))


def grid_to_labels(soft: np.ndarray, ids: np.ndarray, canvas: tuple[int, int],
                   size: tuple[int, int], native: tuple[int, int] | None = None) -> np.ndarray:
  """A soft map float [h, w, L] → ids [H, W]: bilinear upsampling to the padded `canvas`,
  cropped to the frame `size`, resized bilinearly to the `native` annotation size when the
  frames were resized for the network, argmax over L."""
  up = jax.image.resize(jnp.asarray(soft), (*canvas, soft.shape[-1]), "linear")[:size[0], :size[1]]
  if native is not None and tuple(native) != tuple(size):
    up = jax.image.resize(up, (*native, soft.shape[-1]), "linear")
  return np.asarray(ids)[np.asarray(jnp.argmax(up, axis=-1))]
