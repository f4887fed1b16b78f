"""Augmentations of docs/method.md §1, each placed where it is cheapest.

Host (NumPy / Pillow, inside grain workers): the shared geometry. One RandomResizedCrop box
(torchvision's sampler: scale 0.2-1.0 of the area, log-uniform aspect 3/4-4/3, 10 tries then
a centre crop) and one horizontal-flip decision serve both frames of a pair; Pillow crops and
resizes in a single antialiased bilinear pass (`Image.resize(box=...)`).

Device (pure JAX, jittable, inside the train step): the photometric part, drawn independently
per image (MoCo-v2): ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 (torchvision semantics:
brightness, contrast against the grey mean, saturation against the grey image, hue shift in
HSV; each clipped to [0, 1]), grayscale p = 0.2, Gaussian blur σ ~ U[0.1, 2.0] with p = 0.5
(separable, reflect padding, kernel side ≈ 10% of the image, odd), then ImageNet mean/std.
The four jitter operations are applied in a fixed order (brightness, contrast, saturation,
hue), as torchvision did before 0.8's random permutation: a per-image random order under
`vmap` would evaluate every operation at every position (4x the jitter cost, hue included)
for an effect of second order.

Why this split (`benchmarks/input_pipeline.py`, CPU ms per image on the 2-core dev box):
* crop + resize: Pillow 1.2 (paper, 340x256 -> 224) / 0.23 (demo, 64 -> 64) vs JAX
  `scale_and_translate` on CPU 6.9 / 0.11. It changes the array shape, so on the host the
  device receives fixed-size uint8 crops (4x less than float32, no full frames), and the
  host does it cheaply; it stays on the host.
* photometric: Pillow 6.8 (224 px) / 1.0 (64 px) vs JAX on CPU 13.0 / 0.66. At paper size
  it would more than double the host's work per pair (JPEG decode 1.0 + crop 1.2 per frame),
  the host being the input bottleneck at 512 pairs per step, whereas on an accelerator it is
  a few elementwise passes next to a ResNet forward. At demo size it is cheaper in JAX even
  on the CPU. So it runs on the device.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


# ----------------------------------------------------------------------------------------
# Host: shared RandomResizedCrop + flip.
# ----------------------------------------------------------------------------------------
def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            ) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params. Returns (top, left, h, w) in pixels."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centre crop whose aspect is inside `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(frames: np.ndarray, box: tuple[int, int, int, int], size: int,
                flip: bool) -> np.ndarray:
  """Crops `box` (top, left, h, w) of every frame, resizes to size², flips if asked.

  frames: uint8 [n, H, W, 3] -> uint8 [n, size, size, 3].
  """
  top, left, h, w = box
  out = np.empty((len(frames), size, size, 3), np.uint8)
  for i, frame in enumerate(frames):
    image = Image.fromarray(frame)
    out[i] = np.asarray(image.resize((size, size), Image.BILINEAR,
                                     box=(left, top, left + w, top + h)))
  return out[:, :, ::-1] if flip else out


def shared_crop_flip(rng: np.random.Generator, frames: np.ndarray, size: int,
                     scale: tuple[float, float] = (0.2, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """One crop box and one flip decision (p = 0.5) for all frames (docs/method.md §1, "same position").

  frames: uint8 [n, H, W, 3] -> uint8 [n, size, size, 3].
  """
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(
        f'shared_crop_flip wants uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}')
  box = random_resized_crop_box(rng, frames.shape[1], frames.shape[2], scale, ratio)
  return crop_resize(frames, box, size, flip=bool(rng.random() < 0.5))


# ----------------------------------------------------------------------------------------
# Device: photometric augmentation and normalisation. Images are float in [0, 1] inside.
# ----------------------------------------------------------------------------------------
def normalize(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] -> float32 (x / 255 - ImageNet mean) / std. Used for evaluation too."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def _grey(x: jax.Array) -> jax.Array:
  """[H, W, 3] -> [H, W, 1] luma."""
  return jnp.sum(x * jnp.asarray(_GREY, x.dtype), axis=-1, keepdims=True)


def _blend(a: jax.Array, b: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision's _blend: clip(factor * a + (1 - factor) * b)."""
  return jnp.clip(factor * a + (1 - factor) * b, 0.0, 1.0)


def _rgb_to_hsv(x: jax.Array) -> jax.Array:
  """RGB -> HSV, channels last, [..., 3] in [0, 1] (torchvision's _rgb2hsv, nested selects)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
  cr = maxc - minc
  s = jnp.where(maxc > 0, cr / jnp.maximum(maxc, 1e-12), 0.0)
  crs = jnp.maximum(cr, 1e-12)
  h = jnp.where(maxc == r, (g - b) / crs,
                jnp.where(maxc == g, 2.0 + (b - r) / crs, 4.0 + (r - g) / crs))
  h = jnp.where(cr > 0, jnp.mod(h / 6.0, 1.0), 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def _hsv_to_rgb(x: jax.Array) -> jax.Array:
  """HSV -> RGB, channels last, in closed form (same values as torchvision's _hsv2rgb).

  Channel n in (R, G, B) = v - v s clip(min(k, 4 - k), 0, 1), k = (n' + 6 h) mod 6 with
  n' = 5, 3, 1: elementwise, no gather, so it compiles and fuses well.
  """
  h, s, v = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  k = jnp.mod(jnp.asarray((5.0, 3.0, 1.0), x.dtype) + 6.0 * h, 6.0)
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
  hsv = _rgb_to_hsv(x)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return _hsv_to_rgb(hsv)


def _gaussian_blur(x: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of one [H, W, 3] image, reflect padding (torchvision)."""
  half = kernel_size // 2
  taps = jnp.arange(-half, half + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (taps / sigma) ** 2)
  k = k / jnp.sum(k)
  height, width = x.shape[:2]
  xp = jnp.pad(x, ((half, half), (0, 0), (0, 0)), mode='reflect')
  x = sum(k[j] * xp[j:j + height] for j in range(kernel_size))
  xp = jnp.pad(x, ((0, 0), (half, half), (0, 0)), mode='reflect')
  return sum(k[j] * xp[:, j:j + width] for j in range(kernel_size))


def blur_kernel_size(side: int) -> int:
  """Odd kernel side ≈ 10% of the image side (23 at 224 px, 7 at 64 px), at least 3."""
  k = int(round(0.1 * side))
  return max(3, k + 1 - k % 2)


def _photometric_one(x: jax.Array, u: jax.Array, jitter_p: float, grey_p: float,
                     blur_p: float, strength: tuple[float, float, float, float],
                     kernel_size: int) -> jax.Array:
  """One image [H, W, 3] float in [0, 1] -> augmented, same range.

  u: [8] uniform [0, 1) draws: four jitter factors, three coins, the blur σ.
  """
  bri, con, sat, hue = strength
  between = lambda v, lo, hi: lo + (hi - lo) * v
  # ColorJitter: torchvision's factors, brightness etc. in [max(0, 1 - s), 1 + s].
  y = _blend(x, jnp.zeros_like(x), between(u[0], max(0.0, 1 - bri), 1 + bri))
  y = _blend(y, jnp.mean(_grey(y)), between(u[1], max(0.0, 1 - con), 1 + con))
  y = _blend(y, _grey(y), between(u[2], max(0.0, 1 - sat), 1 + sat))
  y = _adjust_hue(y, between(u[3], -hue, hue))
  x = jnp.where(u[4] < jitter_p, y, x)
  x = jnp.where(u[5] < grey_p, jnp.broadcast_to(_grey(x), x.shape), x)
  blurred = _gaussian_blur(x, between(u[7], 0.1, 2.0), kernel_size)
  return jnp.where(u[6] < blur_p, blurred, x)


def photometric(key: jax.Array, images: jax.Array, *, jitter_p: float = 0.8,
                grey_p: float = 0.2, blur_p: float = 0.5,
                strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)) -> jax.Array:
  """MoCo-v2 photometric augmentation, independent per image, then ImageNet normalisation.

  key: PRNG key; images: uint8 [B, S, S, 3] -> float32 [B, S, S, 3]. Jittable (the
  probabilities and strengths are static Python floats). With all p = 0 it equals
  `normalize(images)`.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'photometric wants [B, H, W, 3] images, got {images.shape}')
  # One draw of all per-image parameters: one PRNG call compiles far faster than 8 per image.
  u = jax.random.uniform(key, (images.shape[0], 8), jnp.float32)
  kernel_size = blur_kernel_size(min(images.shape[1:3]))
  x = jax.vmap(lambda im, ui: _photometric_one(im, ui, jitter_p, grey_p, blur_p, tuple(strength),
                                               kernel_size))(images.astype(jnp.float32) / 255.0, u)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std
