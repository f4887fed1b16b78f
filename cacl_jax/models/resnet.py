"""Dilated ResNet-18 / ResNet-50 with output stride 8 (docs/method.md §2), Flax linen.

Layout and names follow torchvision so that torchvision / MoCo-v2 weights map 1:1:
`conv1, bn1, layer{1..4}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3],downsample_conv,downsample_bn}`
(torchvision: `layer1.0.conv1.weight` ↔ `params['layer1_0']['conv1']['kernel']` transposed
OIHW → HWIO; BN `weight, bias, running_mean, running_var` ↔ `scale, bias` in 'params' and
`mean, var` in 'batch_stats'). ResNet-50 puts the stride on the 3×3 conv (torchvision v1.5).

Stages 3 and 4 replace their stride 2 by dilation 2 and 4 (DeepLab / PSPNet). As in
torchvision's `replace_stride_with_dilation`, the first block of a dilated stage uses the
previous stage's dilation in its first 3×3 conv and the new dilation afterwards.

BatchNorm takes its statistics over fixed groups of `bn_group_size` consecutive samples of the
global batch (docs/method.md §2, "BatchNorm groups"), so results do not depend on how many devices the
batch is sharded over; `bn_group_size=None` is SyncBN over the whole batch.

Padding (`model.padding`): 'zeros' as torchvision and the paper, or 'circular' in every conv and
the max-pool. With circular padding the network is exactly equivariant to rolls by multiples of
the output stride (tested), so no absolute position can reach the features and pixel shuffle
(eq. 7) only undoes its roll. The paper names zero padding as the position leak that pixel
shuffle fights; on small images every cell of the dilation-4 stage reads the padding, which is
where the choice matters (README, "What the demo shows"). Parameters are the same either way.
"""
from __future__ import annotations

from typing import Any

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming fan_out


def pad_blocks(x: jax.Array, blocks: int, fill: float = 0.0) -> jax.Array:
  """[B, ...] → [blocks·(B/blocks + 1), ...]: one `fill` sample after each of `blocks` equal blocks.

  The train step splits the batch over devices in `blocks` blocks; with this padding every
  device's last real sample sits in the middle of its convolutions' rows, never at their end,
  where XLA:CPU's kernels take a remainder path that rounds the last output pixels differently
  (1 ulp: enough to flip a ReLU). So every real sample is computed the same way whatever the
  device count (`CACL.layout_blocks`). blocks = 0: no padding.
  """
  if not blocks:
    return x
  x = x.reshape(blocks, x.shape[0] // blocks, *x.shape[1:])
  x = jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
  return x.reshape(-1, *x.shape[2:])


def unpad_blocks(x: jax.Array, blocks: int) -> jax.Array:
  """The inverse of `pad_blocks`: the real samples, in order."""
  if not blocks:
    return x
  x = x.reshape(blocks, x.shape[0] // blocks, *x.shape[1:])[:, :-1]
  return x.reshape(-1, *x.shape[2:])


def per_sample_sums(x: jax.Array) -> jax.Array:
  """Σ over each sample's positions: [B, ..., C] → [B, C], the same bits however many samples a
  device holds. Written as a product with a vector of ones: XLA:CPU hands a plain reduction to
  YNNPACK, which splits it by the shape of the whole array (a 4×4 map's sums came out an ulp
  apart for 2 and 17 samples on a device, enough to flip ReLUs downstream); the product is
  summed per sample alike (tests/test_step.py, the bit-identical forward pass)."""
  x = x.reshape(x.shape[0], -1, x.shape[-1])
  return jnp.einsum("bnc,n->bc", x, jnp.ones(x.shape[1], x.dtype), precision=jax.lax.Precision.HIGHEST)


def ordered_group_sum(s: jax.Array, group: int, perm: jax.Array | None = None) -> jax.Array:
  """Per-sample sums s [B, C] → group sums [B/group, C]; group g holds the samples
  perm[g·group : (g+1)·group] (consecutive samples when perm is None).

  The order of the additions is fixed by the expression, not by the layout: the group's samples
  are added pairwise in their order within the group. A device-count-dependent reduction order
  changed the statistics by 1 ulp, and that flipped ReLUs downstream. With a permutation only
  these [B, C] sums are gathered into the permuted order, never the samples themselves
  (shuffle-BN without moving images, docs/method.md §2 "Weak scaling").
  """
  if perm is not None:
    s = jnp.take(s, perm, axis=0)
  s = s.reshape(-1, group, s.shape[-1])
  while s.shape[1] > 1:
    if s.shape[1] % 2:
      s = jnp.pad(s, ((0, 0), (0, 1), (0, 0)))
    s = s[:, 0::2] + s[:, 1::2]
  return s[:, 0]


def per_sample_stats(stat: jax.Array, group: int, perm: jax.Array | None) -> jax.Array:
  """Group statistics [G, C] → each sample's group's [B, C], in the samples' own order: group
  i // group, or with a permutation that of the position the sample takes in it
  (argsort(perm)[i] // group). Without a permutation a repeat, whose gradient is a plain sum
  over the group (the target, which takes the permutation, gets no gradient)."""
  if perm is None:
    return jnp.repeat(stat, group, axis=0)
  return jnp.take(stat, jnp.argsort(perm) // group, axis=0)


def moving_average(old: jax.Array, new: jax.Array, momentum: float) -> jax.Array:
  """A running statistic's update: momentum·old + (1 − momentum)·new."""
  return momentum * old + (1 - momentum) * new


class GroupBatchNorm(nn.Module):
  """BatchNorm whose batch statistics are per group of `group_size` samples.

  x: [B, ..., C]. Training: each group g normalises with its own mean / biased variance
  over (samples in g, spatial); the running statistics move towards the average of the
  group statistics (variance unbiased, like PyTorch). Inference: running statistics.
  Statistics and normalisation are computed in float32; the output has `dtype`.

  Groups are consecutive samples, or with `perm` (int32 [B], shuffle-BN) the samples
  perm[g·size : (g+1)·size]: the samples stay where they are and each is normalised with the
  statistics of the group the permutation puts it in, so that a device computes only its own
  samples and exchanges per-sample statistics ([B, C]), never images or feature maps. The
  statistics are summed in a layout-independent order (`ordered_group_sum`): the same bits
  as permuting the samples first. With `layout_blocks` the batch carries `pad_blocks`
  padding, which they skip.
  """
  group_size: int | None = None
  momentum: float = 0.9  # = 1 − torch momentum 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  layout_blocks: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, perm: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if not train:
      y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      return (y * scale + bias).astype(self.dtype)

    real = unpad_blocks(x32, self.layout_blocks)
    b = real.shape[0]
    g = self.group_size or b
    if b % g:
      raise ValueError(f"BatchNorm group size {g} does not divide the batch of {b} samples "
                       "(set model.bn_group_size to a divisor of the global batch)")
    n = g * (real.size // (b * c))                           # values per group and channel
    # Per-sample statistics in x's layout (padding samples: mean 0, factor 1; dropped later).
    per_sample = lambda stat, fill: pad_blocks(per_sample_stats(stat, g, perm), self.layout_blocks,
                                               fill).reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (c,))
    mean = ordered_group_sum(per_sample_sums(real), g, perm) / n           # [G, C]
    if perm is None:
      centred = real.reshape(b // g, g, -1, c) - mean[:, None, None]
    else:
      centred = real.reshape(b, -1, c) - per_sample_stats(mean, g, perm)[:, None]
    var = ordered_group_sum(per_sample_sums(jnp.square(centred).reshape(b, -1, c)), g, perm) / n
    if not self.is_initializing():
      # On a CPU (`layout_blocks`) the groups' average in a fixed pairwise order: `mean(axis=0)`
      # over groups that span devices (the target's) was summed in a layout-dependent order.
      # GPUs and TPUs keep XLA's reduction, which costs them no collectives per BN layer.
      groups = mean.shape[0]
      average = ((lambda stat: ordered_group_sum(stat, groups)[0] / groups) if self.layout_blocks
                 else (lambda stat: stat.mean(axis=0)))
      unbiased = average(var) * n / max(n - 1, 1)
      ra_mean.value = moving_average(ra_mean.value, average(mean), self.momentum)
      ra_var.value = moving_average(ra_var.value, unbiased, self.momentum)
    mu = per_sample(mean, 0.0)
    inv = per_sample(jax.lax.rsqrt(var + self.epsilon), 1.0)
    return (((x32 - mu) * inv) * scale + bias).astype(self.dtype)


PADDINGS = ("zeros", "circular")


def _conv(features, kernel, stride=1, dilation=1, dtype=jnp.float32, name=None, padding="zeros"):
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 kernel_dilation=(dilation, dilation),
                 padding="CIRCULAR" if padding == "circular" and pad else ((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name)


def _max_pool(x, padding):
  """3×3 / stride-2 max-pool; zero padding is -inf padding (torchvision), circular wraps.

  Written as a running max over the window's nine strided slices, in window order, keeping
  the earlier value on ties: the same values and the same gradient (all of it to the first
  maximal element) as `reduce_window` max, whose gradient XLA:CPU builds from four index
  iotas, a variadic reduce-window and a scatter — 6-13x slower than these fused elementwise
  passes on the stem's [B, H/2, W/2, 64] map (benchmarks/profile_step.py).
  """
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  x = jnp.pad(x, pad, mode="wrap") if padding == "circular" else jnp.pad(x, pad, constant_values=-jnp.inf)
  b, hp, wp, c = x.shape
  h, w = (hp - 3) // 2 + 1, (wp - 3) // 2 + 1
  out = None
  for i in range(3):
    for j in range(3):
      s = jax.lax.slice(x, (0, i, j, 0), (b, i + 2 * h - 1, j + 2 * w - 1, c), (1, 2, 2, 1))
      out = s if out is None else jnp.where(s > out, s, out)
  return out


class _Block(nn.Module):
  """Fields shared by both block kinds; `first_dilation` is the first 3×3 conv's dilation."""
  planes: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1
  project: bool = False
  bn_group_size: int | None = None
  dtype: Any = jnp.float32
  padding: str = "zeros"
  layout_blocks: int = 0
  bn_momentum: float = 0.9

  def conv(self, features, kernel, stride=1, dilation=1, name=None):
    return _conv(features, kernel, stride, dilation, self.dtype, name, self.padding)


class BasicBlock(_Block):
  """ResNet-18/34 block: 3×3 → 3×3, identity or 1×1 projection shortcut."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, perm: jax.Array | None = None):
    bn = lambda name: functools.partial(GroupBatchNorm(self.bn_group_size, momentum=self.bn_momentum,
                                                       dtype=self.dtype, name=name,
                                                       layout_blocks=self.layout_blocks),
                                        perm=perm)
    y = self.conv(self.planes, 3, self.stride, self.first_dilation, "conv1")(x)
    y = nn.relu(bn("bn1")(y, train))
    y = self.conv(self.planes, 3, 1, self.dilation, "conv2")(y)
    y = bn("bn2")(y, train)
    if self.project:
      x = self.conv(self.planes, 1, self.stride, 1, "downsample_conv")(x)
      x = bn("downsample_bn")(x, train)
    return nn.relu(y + x)


class Bottleneck(_Block):
  """ResNet-50 block (v1.5: stride on the 3×3): 1×1 → 3×3 → 1×1 (×4)."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, perm: jax.Array | None = None):
    bn = lambda name: functools.partial(GroupBatchNorm(self.bn_group_size, momentum=self.bn_momentum,
                                                       dtype=self.dtype, name=name,
                                                       layout_blocks=self.layout_blocks),
                                        perm=perm)
    y = self.conv(self.planes, 1, 1, 1, "conv1")(x)
    y = nn.relu(bn("bn1")(y, train))
    y = self.conv(self.planes, 3, self.stride, self.first_dilation, "conv2")(y)
    y = nn.relu(bn("bn2")(y, train))
    y = self.conv(self.planes * 4, 1, 1, 1, "conv3")(y)
    y = bn("bn3")(y, train)
    if self.project:
      x = self.conv(self.planes * 4, 1, self.stride, 1, "downsample_conv")(x)
      x = bn("downsample_bn")(x, train)
    return nn.relu(y + x)


_LAYOUT = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
  """Dilated ResNet, output stride 8.

  x: float [B, H, W, 3] (normalised RGB) → features [B, H/8, W/8, C] with
  C = 512/width_divisor (ResNet-18) or 2048/width_divisor (ResNet-50). perm: int32 [B] or
  None, shuffle-BN's permutation of the BN groups (`GroupBatchNorm`).
  """
  depth: int = 18
  width_divisor: int = 1
  bn_group_size: int | None = None
  dtype: Any = jnp.float32
  padding: str = "zeros"   # 'zeros' | 'circular'
  layout_blocks: int = 0   # the batch carries `pad_blocks` padding for this many devices (train step)
  # The running statistics' momentum (`GroupBatchNorm.momentum`); 0: the BN layers' running
  # statistics come out as this batch's own (`step.losses_in_blocks` averages them over blocks).
  bn_momentum: float = 0.9

  @property
  def num_features(self) -> int:
    block, _ = _LAYOUT[self.depth]
    return 512 // self.width_divisor * block.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, perm: jax.Array | None = None) -> jax.Array:
    if self.depth not in _LAYOUT:
      raise ValueError(f"ResNet depth must be one of {sorted(_LAYOUT)}, got {self.depth}")
    if x.shape[1] % 8 or x.shape[2] % 8:
      raise ValueError(f"image side must be a multiple of the output stride 8, got {x.shape[1:3]}")
    block, counts = _LAYOUT[self.depth]
    w = 64 // self.width_divisor
    x = x.astype(self.dtype)
    if self.padding not in PADDINGS:
      raise ValueError(f"model.padding must be one of {PADDINGS}, got {self.padding!r}")
    x = _conv(w, 7, 2, 1, self.dtype, "conv1", self.padding)(x)
    x = nn.relu(GroupBatchNorm(self.bn_group_size, momentum=self.bn_momentum, dtype=self.dtype,
                               layout_blocks=self.layout_blocks, name="bn1")(x, train, perm))
    x = _max_pool(x, self.padding)
    in_ch, dilation = w, 1
    # (stride, dilate) per stage: stages 3 and 4 trade their stride for dilation.
    for stage, (count, (stride, dilate)) in enumerate(
        zip(counts, [(1, False), (2, False), (2, True), (2, True)]), start=1):
      planes = w * 2 ** (stage - 1)
      prev = dilation
      if dilate:
        dilation, stride = dilation * stride, 1
      for j in range(count):
        s = stride if j == 0 else 1
        out_ch = planes * block.expansion
        x = block(planes, stride=s, dilation=dilation,
                  first_dilation=prev if j == 0 else dilation,
                  project=(j == 0 and (s != 1 or in_ch != out_ch)),
                  bn_group_size=self.bn_group_size, dtype=self.dtype, padding=self.padding,
                  layout_blocks=self.layout_blocks, bn_momentum=self.bn_momentum,
                  name=f"layer{stage}_{j}")(x, train, perm)
        in_ch = out_ch
    return x


DTYPES = ("float32", "bfloat16", "auto")


def compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
  """`model.dtype` → the activations' dtype. 'auto' is bfloat16 on GPU and TPU (their matrix
  units' native type; parameters, BN statistics and losses stay float32) and float32 on a CPU,
  where XLA has no bfloat16 arithmetic of its own and a bfloat16 step is slower than float32
  (README, "Results")."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
  if name == "auto":
    name = "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
  return jnp.dtype(name)


def backbone_from_config(model_config) -> ResNet:
  """`model.backbone` ('resnet18' | 'resnet50'), `model.width_divisor`, `model.dtype`, BN mode."""
  name = model_config.backbone
  if name not in ("resnet18", "resnet50"):
    raise ValueError(f"model.backbone must be 'resnet18' or 'resnet50', got {name!r}")
  group = None if model_config.get("bn_mode", "group") == "sync" else model_config.get("bn_group_size", None)
  return ResNet(depth=int(name[len("resnet"):]), width_divisor=model_config.get("width_divisor", 1),
                bn_group_size=group, dtype=compute_dtype(model_config.get("dtype", "float32")),
                padding=model_config.get("padding", "zeros"))
