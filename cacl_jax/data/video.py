"""The `Video` record: what every pretraining source yields (see `cacl_jax.data`).

A `Video` is a small picklable object that decodes frames on demand, so that a grain
worker that samples one pair (t, t + s) decodes exactly two frames.
"""
from __future__ import annotations

import abc
import io
from typing import Sequence

import numpy as np


class Video(abc.ABC):
  """A clip of `num_frames` RGB frames of one size."""

  @property
  @abc.abstractmethod
  def num_frames(self) -> int:
    ...

  @abc.abstractmethod
  def frames(self, indices: Sequence[int]) -> np.ndarray:
    """Decodes the given frames. Returns uint8 [len(indices), H, W, 3]."""

  name: str = ""


class ArrayVideo(Video):
  """Frames already in memory: uint8 [T, H, W, 3]."""

  def __init__(self, frames: np.ndarray, name: str = ""):
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"ArrayVideo wants uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    self._frames = frames
    self.name = name

  @property
  def num_frames(self) -> int:
    return self._frames.shape[0]

  def frames(self, indices: Sequence[int]) -> np.ndarray:
    return self._frames[np.asarray(indices)]


class EncodedVideo(Video):
  """Frames stored as encoded images (JPEG/PNG bytes), decoded with Pillow on demand."""

  def __init__(self, encoded: Sequence[bytes], name: str = ""):
    if not encoded:
      raise ValueError(f"EncodedVideo {name!r} has no frames")
    self._encoded = list(encoded)
    self.name = name

  @property
  def num_frames(self) -> int:
    return len(self._encoded)

  def frames(self, indices: Sequence[int]) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    out = []
    for i in indices:
      with Image.open(io.BytesIO(self._encoded[i])) as im:
        out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)
