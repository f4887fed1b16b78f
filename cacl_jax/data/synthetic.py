"""The embedded synthetic video dataset: the demo's data, generated in-process, no download.

Each video is a camera panning over a procedural background (two-octave value noise under
a random two-colour ramp) while 3-5 textured objects translate, scale and rotate in front
of it and occlude one another. An object's class is the pair (shape, texture pattern):

    1 striped disc     2 checkered square   3 dotted triangle
    4 spoked ring      5 hatched cross      6 bullseye star

The world is the demo's measuring instrument (docs/demo.md; README "What the demo shows") and is
frozen: `WORLD` below must not change after a self-supervised run was measured on it. Its
objects are large (radius 0.15-0.25 of the side: 5-8 feature cells across at 128 px and
output stride 8), each video holds 3-5 objects of distinct classes (so most frames hold
several classes and an image-level code cannot label pixels), and colour is a weak cue: an
instance draws its two colours' hues from a quarter of the hue circle around its class's own
hue (saturation and value random, the two colours randomly assigned to the pattern's phases),
and backgrounds draw any hue — so random convolutions do not already separate the classes
(the random-init floor), but features that learn shape and texture do (the supervised ceiling).
The patterns live in the object's own coordinates, so they move, turn and scale with it.

A video is a pure function of (seed, stream, index): `video_spec` draws a small set of
parameters, and `render(spec, t)` draws frame t analytically (pixel-centre sampling, hard
edges), so a `SyntheticVideo` renders only the frames a pair sampler asks for. Pixels of
each object are computed inside its bounding box only: a 64 px frame takes ~1.5 ms.

Streams keep the sets disjoint: pretraining videos use stream 0 ('train') or 1 ('val'),
segmentation images use stream 2 ('train') or 3 ('val'); the segmentation val set is
fixed by its seed (default 0) and never overlaps anything the model is pretrained on.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cacl_jax.data import video as video_lib

CLASS_NAMES = ('background', 'striped_disc', 'checkered_square', 'dotted_triangle',
               'spoked_ring', 'hatched_cross', 'bullseye_star')
NUM_CLASSES = len(CLASS_NAMES)  # including background (label 0)

STREAMS = {('pretrain', 'train'): 0, ('pretrain', 'val'): 1,
            ('segmentation', 'train'): 2, ('segmentation', 'val'): 3}


# ----------------------------------------------------------------------------------------
# Shapes and textures, in object coordinates (u, v): unit = object radius, the shape fits
# in the unit disc so that a box of ±radius around the centre bounds it at any rotation.
# ----------------------------------------------------------------------------------------
def _disc(u, v):
  return u * u + v * v <= 1.0


def _square(u, v):
  return np.maximum(np.abs(u), np.abs(v)) <= 0.7


def _triangle(u, v):
  # Equilateral, circumradius 1: three half-planes at distance 1/2 from the centre.
  return (v <= 0.5) & (0.866 * u - 0.5 * v <= 0.5) & (-0.866 * u - 0.5 * v <= 0.5)


def _ring(u, v):
  r2 = u * u + v * v
  return (r2 <= 1.0) & (r2 >= 0.5 ** 2)


def _cross(u, v):
  au, av = np.abs(u), np.abs(v)
  return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))


def _star(u, v):
  # Five-pointed star: the radius limit swings between 0.45 (notches) and 1 (tips).
  phi = np.arctan2(v, u)
  limit = 0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 3
  return u * u + v * v <= limit * limit


def _stripes(u, v):
  return np.mod(u, 0.5) < 0.25


def _checker(u, v):
  return (np.floor(u / 0.35) + np.floor(v / 0.35)) % 2 == 0


def _dots(u, v):
  du = np.mod(u, 0.45) - 0.225
  dv = np.mod(v, 0.45) - 0.225
  return du * du + dv * dv < 0.13 ** 2


def _spokes(u, v):
  return np.mod(np.arctan2(v, u) * (8 / (2 * np.pi)), 1.0) < 0.5


def _hatch(u, v):
  return (np.mod(u + v, 0.42) < 0.12) | (np.mod(u - v, 0.42) < 0.12)


def _bullseye(u, v):
  return np.mod(np.sqrt(u * u + v * v), 0.3) < 0.15


_SHAPES = (_disc, _square, _triangle, _ring, _cross, _star)
_TEXTURES = (_stripes, _checker, _dots, _spokes, _hatch, _bullseye)


# ----------------------------------------------------------------------------------------
# Video parameters.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  """One object. Pose at frame t (pixels, radians), periodic so it stays in view.

  centre(t) = centre + amp * sin(2π t / period + phase)   (per axis)
  radius(t) = radius * (1 + 0.2 sin(2π t / scale_period + scale_phase))
  angle(t)  = angle + spin * t
  """
  label: int  # 1..6
  shape: int  # index into _SHAPES
  texture: int  # index into _TEXTURES
  pattern_scale: float  # the texture's period, relative to its class's
  pattern_offset: np.ndarray  # [2] the texture's shift in object coordinates
  centre: np.ndarray  # [2] (x, y)
  amp: np.ndarray  # [2]
  period: np.ndarray  # [2]
  phase: np.ndarray  # [2]
  radius: float
  scale_period: float
  scale_phase: float
  angle: float
  spin: float
  colours: np.ndarray  # [2, 3] float in [0, 255]: pattern-on, pattern-off

  def pose(self, t: float) -> tuple[float, float, float, float]:
    cx, cy = self.centre + self.amp * np.sin(2 * np.pi * t / self.period + self.phase)
    r = self.radius * (1 + 0.2 * np.sin(2 * np.pi * t / self.scale_period + self.scale_phase))
    return float(cx), float(cy), float(r), float(self.angle + self.spin * t)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """Everything needed to render any frame of one video."""
  frame_size: int
  noise_seed: int
  cells: tuple[float, float]  # value-noise lattice cell sizes (pixels), coarse and fine
  pan_start: np.ndarray  # [2] camera offset at t = 0 (pixels)
  pan_velocity: np.ndarray  # [2] pixels per frame
  background: np.ndarray  # [2, 3] colour ramp ends
  objects: tuple[ObjectSpec, ...]  # back to front


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  i = int(h * 6) % 6
  f = h * 6 - np.floor(h * 6)
  p, q, w = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  rgb = [(v, w, p), (q, v, p), (p, v, w), (p, q, v), (w, p, v), (v, p, q)][i]
  return 255.0 * np.asarray(rgb)


def _colour_pair(rng: np.random.Generator, contrast: tuple[float, float],
                 hues: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """Two colours whose values differ by `contrast`, random order; each hue independent and
  uniform in `hues` (a range of the hue circle, wrapping)."""
  bright = rng.uniform(contrast[1] + 0.05, 1.0)
  dark = bright - rng.uniform(*contrast)
  hue = lambda: rng.uniform(*hues) % 1.0
  pair = np.stack([_hsv_to_rgb(hue(), rng.uniform(0.2, 1.0), bright),
                   _hsv_to_rgb(hue(), rng.uniform(0.2, 1.0), dark)])
  return pair[rng.permutation(2)]


def _class_hues(label: int, width: float) -> tuple[float, float]:
  """The hue range of class `label`'s colours: `width` of the hue circle centred on the
  class's own hue (classes spaced evenly); width 1 = any hue (colour says nothing)."""
  centre = (label - 1) / (NUM_CLASSES - 1)
  return centre - width / 2, centre + width / 2


@dataclasses.dataclass(frozen=True)
class World:
  """What the videos are made of.

  radius: an object's radius as a fraction of the frame side (uniform in the range).
  distinct: the objects of one video have distinct classes (so most frames hold several).
  pattern_scale: per-instance factor on the texture's period (uniform in the range).
  classes: 'shape+texture' (class k = shape k with texture k), 'shape' (class k = shape k,
    each instance wears a random texture: only the outline tells the class) or 'texture'
    (class k = texture k on a random shape: only the surface tells the class).
  class_hue: the width of the hue range, as a fraction of the circle, around the class's own
    hue from which an instance's colours are drawn; 1 = colour says nothing of the class.
  """
  radius: tuple[float, float] = (0.15, 0.25)
  distinct: bool = True
  pattern_scale: tuple[float, float] = (1.0, 1.0)
  classes: str = 'shape+texture'
  class_hue: float = 0.25


# The demo's frozen world (docs/demo.md). The previous world, on which labels reached 17 mIoU at
# 64 px, was World(radius=(0.12, 0.2), distinct=False, class_hue=1.0).
WORLD = World()


def video_spec(seed: int, stream: int, index: int, frame_size: int,
               num_objects: tuple[int, int] = (3, 5), world: World | None = None) -> VideoSpec:
  """Draws video `index` of `stream`: a pure function of its arguments."""
  world = WORLD if world is None else world
  rng = np.random.default_rng([seed, stream, index])
  size = float(frame_size)
  count = int(rng.integers(num_objects[0], num_objects[1] + 1))
  if world.distinct:
    labels = rng.permutation(NUM_CLASSES - 1)[:count] + 1
  else:
    labels = rng.integers(1, NUM_CLASSES, size=count)
  objects = []
  for label in labels:
    texture = int(rng.integers(len(_TEXTURES))) if world.classes == 'shape' else int(label) - 1
    shape = int(rng.integers(len(_SHAPES))) if world.classes == 'texture' else int(label) - 1
    objects.append(ObjectSpec(
        label=int(label),
        shape=shape,
        texture=texture,
        pattern_scale=float(rng.uniform(*world.pattern_scale)),
        pattern_offset=rng.uniform(0, 1, size=2),
        centre=rng.uniform(0.2, 0.8, size=2) * size,
        amp=rng.uniform(0.05, 0.22, size=2) * size,
        period=rng.uniform(40, 120, size=2),
        phase=rng.uniform(0, 2 * np.pi, size=2),
        radius=rng.uniform(*world.radius) * size,
        scale_period=rng.uniform(40, 120),
        scale_phase=rng.uniform(0, 2 * np.pi),
        angle=rng.uniform(0, 2 * np.pi),
        spin=rng.uniform(-0.06, 0.06),
        colours=_colour_pair(rng, (0.3, 0.5), _class_hues(int(label), world.class_hue))))
  speed = rng.uniform(0.3, 1.5) * size / 64
  heading = rng.uniform(0, 2 * np.pi)
  coarse = rng.uniform(0.15, 0.35) * size
  return VideoSpec(
      frame_size=frame_size,
      noise_seed=int(rng.integers(2 ** 31)),
      cells=(coarse, coarse / rng.uniform(2.5, 4.0)),
      pan_start=rng.uniform(-1000, 1000, size=2),
      pan_velocity=speed * np.array([np.cos(heading), np.sin(heading)]),
      background=_colour_pair(rng, (0.15, 0.4)),
      objects=tuple(objects))


# ----------------------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------------------
def _lattice(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
  """Hash of integer lattice points -> uniform [0, 1). uint32 arithmetic wraps by design."""
  h = (ix.astype(np.uint32) * np.uint32(374761393) + iy.astype(np.uint32) * np.uint32(668265263)
       + np.uint32(seed))
  h = (h ^ (h >> np.uint32(13))) * np.uint32(1274126177)
  h = h ^ (h >> np.uint32(16))
  return h.astype(np.float32) / np.float32(2 ** 32)


def _smoothstep(t: np.ndarray) -> np.ndarray:
  return t * t * (3 - 2 * t)


def _interpolation_weights(coords: np.ndarray, cell: float) -> tuple[int, np.ndarray]:
  """1-D lattice weights for world coordinates [S]: (first lattice index, float32 [S, n])
  with 1 − t at a point's lower lattice neighbour and t (smoothstep) at the upper one."""
  f = coords / cell
  i = np.floor(f).astype(np.int64)
  t = _smoothstep(f - i).astype(np.float32)
  first = int(i.min())
  weights = np.zeros((len(coords), int(i.max()) - first + 2), np.float32)
  rows = np.arange(len(coords))
  weights[rows, i - first] = 1 - t
  weights[rows, i - first + 1] = t
  return first, weights


def _value_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int) -> np.ndarray:
  """Smooth value noise on the grid of world coordinates x [W] × y [H] (float64): the
  bilinear-smoothstep interpolation of lattice hashes, float32 [H, W].

  Interpolation is separable, so it is two small matrix products with the hashes of the few
  lattice points the frame covers (W_y · L · W_xᵀ), not per-pixel hashing.
  """
  x0, wx = _interpolation_weights(x, cell)
  y0, wy = _interpolation_weights(y, cell)
  lattice = _lattice(np.arange(x0, x0 + wx.shape[1])[None, :],
                     np.arange(y0, y0 + wy.shape[1])[:, None], seed)
  return wy @ lattice @ wx.T


def _object_window(obj: ObjectSpec, t: float, size: int):
  """The pixels of frame t that object `obj` may cover: (y0, y1, x0, x1, u, v) with (u, v)
  its object coordinates at the window's pixel centres, or None when it is out of view."""
  cx, cy, r, angle = obj.pose(t)
  x0, x1 = max(0, int(cx - r) - 1), min(size, int(cx + r) + 2)
  y0, y1 = max(0, int(cy - r) - 1), min(size, int(cy + r) + 2)
  if x0 >= x1 or y0 >= y1:
    return None
  dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - np.float32(cx))[None, :]
  dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - np.float32(cy))[:, None]
  cos, sin = np.float32(np.cos(angle) / r), np.float32(np.sin(angle) / r)
  return y0, y1, x0, x1, cos * dx + sin * dy, cos * dy - sin * dx


def render(spec: VideoSpec, t: float) -> tuple[np.ndarray, np.ndarray]:
  """Frame t of a video. Returns (uint8 [S, S, 3] RGB, uint8 [S, S] labels, 0 = background)."""
  size = spec.frame_size
  centres = np.arange(size, dtype=np.float64) + 0.5
  # The camera pans over the infinite background; objects move in view coordinates.
  cam = spec.pan_start + spec.pan_velocity * t
  n = (0.65 * _value_noise(centres + cam[0], centres + cam[1], spec.cells[0], spec.noise_seed)
       + 0.35 * _value_noise(centres + cam[0], centres + cam[1], spec.cells[1], spec.noise_seed + 1))
  lo, hi = spec.background.astype(np.float32)
  image = lo + n[..., None] * (hi - lo)   # float32 [S, S, 3]
  labels = np.zeros((size, size), np.uint8)
  for obj in spec.objects:
    window = _object_window(obj, t, size)
    if window is None:
      continue
    y0, y1, x0, x1, u, v = window
    mask = _SHAPES[obj.shape](u, v)
    # The texture lives in the object's own coordinates, shifted and scaled per instance.
    on = _TEXTURES[obj.texture](u / obj.pattern_scale + obj.pattern_offset[0],
                                v / obj.pattern_scale + obj.pattern_offset[1])
    colours = obj.colours.astype(np.float32)
    colour = np.where(on[..., None], colours[0], colours[1])
    np.copyto(image[y0:y1, x0:x1], colour, where=mask[..., None])
    labels[y0:y1, x0:x1][mask] = obj.label
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def instances(spec: VideoSpec, t: float) -> np.ndarray:
  """int16 [S, S]: index of the visible (front-most) object at each pixel of frame t, −1 for
  the background. The same masks as `render`, without the colours."""
  size = spec.frame_size
  out = np.full((size, size), -1, np.int16)
  for k, obj in enumerate(spec.objects):
    window = _object_window(obj, t, size)
    if window is not None:
      y0, y1, x0, x1, u, v = window
      out[y0:y1, x0:x1][_SHAPES[obj.shape](u, v)] = k
  return out


def correspondence(spec: VideoSpec, t: float, t_pos: float, points: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Where the scene points seen at `points` (float [P, 2] (x, y) pixels) of frame t are in
  frame t_pos: the ground truth of the match diagnostics.

  A point on object k moves with k's pose (object coordinates (u, v) are fixed: translate,
  scale and turn with it); a background point moves against the camera pan. Returns
  (float [P, 2] positions in frame t_pos, bool [P] valid): valid when the position lies in the
  frame and the same surface (object k, or the background) is visible there, not occluded.
  """
  size = spec.frame_size
  points = np.asarray(points, np.float64)
  inst_t, inst_pos = instances(spec, t), instances(spec, t_pos)
  ix = np.clip(points.astype(int), 0, size - 1)
  owner = inst_t[ix[:, 1], ix[:, 0]]
  moved = points - spec.pan_velocity * (t_pos - t)  # the background
  for k, obj in enumerate(spec.objects):
    on = owner == k
    if not on.any():
      continue
    cx, cy, r, angle = obj.pose(t)
    cx2, cy2, r2, angle2 = obj.pose(t_pos)
    d = points[on] - (cx, cy)
    c, s = np.cos(angle), np.sin(angle)
    uv = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=-1) / r
    c2, s2 = np.cos(angle2), np.sin(angle2)
    moved[on] = (cx2, cy2) + r2 * np.stack([c2 * uv[:, 0] - s2 * uv[:, 1],
                                           s2 * uv[:, 0] + c2 * uv[:, 1]], axis=-1)
  inside = np.all((moved >= 0) & (moved < size), axis=-1)
  jx = np.clip(moved.astype(int), 0, size - 1)
  valid = inside & (inst_pos[jx[:, 1], jx[:, 0]] == owner)
  return moved, valid


class SyntheticVideo(video_lib.Video):
  """A synthetic clip of `num_frames` frames; renders only the frames asked for."""

  def __init__(self, spec: VideoSpec, num_frames: int, name: str = ''):
    self.spec = spec
    self._num_frames = num_frames
    self.name = name

  @property
  def num_frames(self) -> int:
    return self._num_frames

  def _check(self, indices: Sequence[int]) -> None:
    bad = [i for i in indices if not 0 <= i < self._num_frames]
    if bad:
      raise IndexError(f'{self.name}: frame indices {bad} outside [0, {self._num_frames})')

  def frames(self, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), S, S, 3]."""
    self._check(indices)
    return np.stack([render(self.spec, i)[0] for i in indices])

  def labels(self, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), S, S], 0 = background, 1..6 = CLASS_NAMES[1:]. Evaluation only."""
    self._check(indices)
    return np.stack([render(self.spec, i)[1] for i in indices])


def _check_args(num: int, num_frames: int, frame_size: int, split: str) -> None:
  if num < 1 or num_frames < 1:
    raise ValueError(f'synthetic data wants >= 1 videos/images and frames, got {num}, {num_frames}')
  if frame_size < 16:
    raise ValueError(f'synthetic frame_size must be >= 16 pixels, got {frame_size}')
  if split not in ('train', 'val'):
    raise ValueError(f"synthetic split must be 'train' or 'val', got {split!r}")


class SyntheticVideoSource:
  """grain random-access source of `SyntheticVideo`s for pretraining.

  Video i is a pure function of (seed, split, i); `num_videos` may be as large as wanted
  (nothing is stored). Items are cheap to build; frames are rendered on demand.
  """

  def __init__(self, num_videos: int, num_frames: int, frame_size: int, seed: int = 0, *,
               split: str = 'train', num_objects: tuple[int, int] = (3, 5)):
    _check_args(num_videos, num_frames, frame_size, split)
    self.num_videos, self.num_frames, self.frame_size = num_videos, num_frames, frame_size
    self.seed, self.split, self.num_objects = seed, split, tuple(num_objects)
    self._stream = STREAMS[('pretrain', split)]

  def __len__(self) -> int:
    return self.num_videos

  def __getitem__(self, index: int) -> SyntheticVideo:
    index = int(index)
    if not 0 <= index < self.num_videos:
      raise IndexError(f'video {index} outside [0, {self.num_videos})')
    spec = video_spec(self.seed, self._stream, index, self.frame_size, self.num_objects)
    return SyntheticVideo(spec, self.num_frames, name=f'synthetic/{self.split}/{self.seed}/{index}')

  def __repr__(self) -> str:
    return (f'SyntheticVideoSource(num_videos={self.num_videos}, num_frames={self.num_frames}, '
            f'frame_size={self.frame_size}, seed={self.seed}, split={self.split!r})')


class SyntheticSegmentation:
  """Segmentation source: image i is one frame (random t) of segmentation video i.

  Items: {'image': uint8 [S, S, 3], 'label': uint8 [S, S], 'id': str}. Train and val use
  disjoint video streams, both disjoint from the pretraining videos; val is fixed by `seed`.
  """
  class_names = CLASS_NAMES

  def __init__(self, split: str = 'train', num_images: int = 512, frame_size: int = 64,
               seed: int = 0, *, num_frames: int = 64, num_objects: tuple[int, int] = (3, 5)):
    _check_args(num_images, num_frames, frame_size, split)
    self.split, self.num_images, self.frame_size = split, num_images, frame_size
    self.seed, self.num_frames, self.num_objects = seed, num_frames, tuple(num_objects)
    self._stream = STREAMS[('segmentation', split)]

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
    index = int(index)
    if not 0 <= index < self.num_images:
      raise IndexError(f'image {index} outside [0, {self.num_images})')
    spec = video_spec(self.seed, self._stream, index, self.frame_size, self.num_objects)
    t = np.random.default_rng([self.seed, self._stream, index, 1]).integers(self.num_frames)
    image, label = render(spec, int(t))
    return {'image': image, 'label': label, 'id': f'synthetic/{self.split}/{self.seed}/{index}'}

  def __repr__(self) -> str:
    return (f'SyntheticSegmentation(split={self.split!r}, num_images={self.num_images}, '
            f'frame_size={self.frame_size}, seed={self.seed})')
