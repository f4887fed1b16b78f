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
batch is sharded over (up to float reduction order); `bn_group_size=None` is SyncBN over the whole
batch.

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


def group_of(group: int, perm: jax.Array) -> jax.Array:
  """Under shuffle-BN, each sample's BN group, int32 [B]: the group of the position the sample
  takes in x[perm], argsort(perm)[i] // group."""
  return jnp.argsort(perm) // group


def group_sums(x: jax.Array, group: int, members: jax.Array | None) -> jax.Array:
  """x [B, ..., C] → its sums per BN group [G, C], G = B / group.

  First each sample's sums over its positions [B, C], then the groups'. Consecutive groups
  (members None): a reshape to [G, group, C] and a sum, which on a mesh with the batch on 'data'
  stays on the devices that hold the group (a group spanning devices is summed over just
  those). Shuffle-BN's groups (members: float32 one-hot [B, G]): a product with the membership,
  so that each device adds up its own samples and one all-reduce of [G, C] completes the sums —
  G rows per BN layer, not the B per-sample rows a gather would move (docs/method.md §2, "Weak
  scaling"). HIGHEST: a TPU's default float32 product would round the statistics to bfloat16;
  a product (unlike a scatter-add) is also deterministic on GPUs.

  Why per sample first: XLA:CPU splits a sum with few outputs (one group sum over
  [G, group · positions, C]: G·C values) across the process's thread pool, whose size follows the
  core or fake-device count, so its bits did too, and the backward pass through the BatchNorms
  amplified that to 4e-4 per layer after one step between a process of one device and one of
  eight. [B, C] sums keep each on one thread (`tests/test_step.py`, thread pools of 2, 3, 8)."""
  b, c = x.shape[0], x.shape[-1]
  sums = x.reshape(b, -1, c).sum(axis=1)                                          # [B, C]
  if members is None:
    return sums.reshape(b // group, group, c).sum(axis=1)
  return jnp.einsum("bg,bc->gc", members, sums, precision=jax.lax.Precision.HIGHEST)


def per_sample(stat: jax.Array, group: int, members: jax.Array | None, ndim: int) -> jax.Array:
  """Group statistics [G, C] → each sample's own group's, [B, 1, ..., 1, C] with `ndim` axes:
  a repeat for consecutive groups, a product with the one-hot membership [B, G] otherwise (exact:
  one term per row; its transpose, the gradient, is again a sum per group)."""
  stat = (jnp.repeat(stat, group, axis=0) if members is None else
          jnp.einsum("bg,gc->bc", members, stat, precision=jax.lax.Precision.HIGHEST))
  return stat.reshape((stat.shape[0],) + (1,) * (ndim - 2) + (stat.shape[-1],))


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
  samples. What crosses devices is each group's sum over its members ([G, C], `group_sums`),
  never images, feature maps or per-sample rows; consecutive groups are summed where they lie.
  """
  group_size: int | None = None
  momentum: float = 0.9  # = 1 − torch momentum 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

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

    b = x.shape[0]
    g = self.group_size or b
    if b % g:
      raise ValueError(f"BatchNorm group size {g} does not divide the batch of {b} samples "
                       "(set model.bn_group_size to a divisor of the global batch)")
    n = g * (x.size // (b * c))                                        # values per group and channel
    members = (None if perm is None else
               jax.nn.one_hot(group_of(g, perm), b // g, dtype=jnp.float32))  # [B, G]

    x32 = x.astype(jnp.float32)
    mean = group_sums(x32, g, members) / n                                         # [G, C]
    # The variance's centred values per sample ([B, positions, C]) and the output's in x's: two
    # expressions, so that XLA fuses each into its consumer instead of keeping one centred copy
    # of x for the gradient (~0.2 GiB per device for ResNet-18 at 224 px and 8 images,
    # `benchmarks/scaling.py`'s peak). Not y = x·a + (b − μ·a): the gradient of that form
    # cancels (2.6e-4 apart across device counts after one step).
    centred = x32.reshape(b, -1, c) - per_sample(mean, g, members, 3)       # [B, positions, C]
    var = group_sums(jnp.square(centred), g, members) / n
    if not self.is_initializing():
      unbiased = var.mean(axis=0) * n / max(n - 1, 1)
      ra_mean.value = moving_average(ra_mean.value, mean.mean(axis=0), self.momentum)
      ra_var.value = moving_average(ra_var.value, unbiased, self.momentum)
    spread = lambda stat: per_sample(stat, g, members, x.ndim)                      # [B, 1.., C]
    y = (x32 - spread(mean)) * spread(jax.lax.rsqrt(var + self.epsilon))
    return (y * scale + bias).astype(self.dtype)


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

  def conv(self, features, kernel, stride=1, dilation=1, name=None):
    return _conv(features, kernel, stride, dilation, self.dtype, name, self.padding)


class BasicBlock(_Block):
  """ResNet-18/34 block: 3×3 → 3×3, identity or 1×1 projection shortcut."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, perm: jax.Array | None = None):
    bn = lambda name: functools.partial(GroupBatchNorm(self.bn_group_size, dtype=self.dtype, name=name),
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
    bn = lambda name: functools.partial(GroupBatchNorm(self.bn_group_size, dtype=self.dtype, name=name),
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
    x = nn.relu(GroupBatchNorm(self.bn_group_size, dtype=self.dtype, name="bn1")(x, train, perm))
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
                  name=f"layer{stage}_{j}")(x, train, perm)
        in_ch = out_ch
    return x


DTYPES = ("float32", "bfloat16", "auto")


def compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
  """`model.dtype` → the activations' dtype. 'auto' is bfloat16 on GPU and TPU (their matrix
  units' native type; parameters, BN statistics and losses stay float32) and float32 on a CPU,
  where a bfloat16 step is no faster (`python benchmarks/train_step.py --dtype bfloat16` beside
  `--dtype float32`, 2-core AVX-512 EPYC: 192 / 111 / 323 against 197 / 108 / 340 ms,
  benchmarks/results/train_step_cpu_{bfloat16,float32}.json) and float32 keeps the numbers the
  float64 references check. A precision choice, not another program: the same ops."""
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
