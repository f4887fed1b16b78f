"""Decoding raw datasets: PyAV videos, images, VOC palettes, Cityscapes label ids.

Everything here is a pure function of bytes or a file path and imports neither TFDS nor
JAX, so that `prepare_data`'s worker processes start fast. The `*_item` functions at the
bottom are the per-item work units of the ingestion pool (`cacl_jax.data.builders`): each
returns one record (plain Python values and bytes) or raises `Skip` with a short reason.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------
# Class names and label maps (docs/evaluation.md).
# ----------------------------------------------------------------------------------------

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")

CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus",
    "train", "motorcycle", "bicycle")

# labelId -> trainId for the 19 evaluated classes; every other labelId is ignored (255).
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

IGNORE_LABEL = 255


class Skip(Exception):
  """An input item that is skipped, counted and named in the prepare report.

  `kind` is a short category used for counting ('zero_bytes', 'decode_error', ...);
  the message says what exactly was wrong.
  """

  def __init__(self, kind: str, message: str, name: str | None = None):
    super().__init__(message)
    self.kind = kind
    self.name = name  # the offending file, when it is not the item's main one


def cityscapes_lut() -> np.ndarray:
  """Lookup table uint8 [256]: labelId -> trainId (255 for ignored ids)."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
    lut[label_id] = train_id
  return lut


def cityscapes_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps a Cityscapes `*_labelIds.png` array uint8 [H, W] to trainIds uint8 [H, W]."""
  if label_ids.dtype != np.uint8 or label_ids.ndim != 2:
    raise ValueError(f"expected uint8 [H, W] labelIds, got {label_ids.dtype} {label_ids.shape}")
  return cityscapes_lut()[label_ids]


def voc_colormap(num_colors: int = 256) -> np.ndarray:
  """The PASCAL VOC palette, uint8 [num_colors, 3] (index 255 = (224, 224, 192)).

  The devkit's bit-interleaving construction: bit j of the class index goes to bit 7 - k
  of channel j % 3, for k = 0, 1, ... over successive bit triplets.
  """
  cmap = np.zeros((num_colors, 3), np.uint8)
  for i in range(num_colors):
    r = g = b = 0
    c = i
    for k in range(8):
      r |= ((c >> 0) & 1) << (7 - k)
      g |= ((c >> 1) & 1) << (7 - k)
      b |= ((c >> 2) & 1) << (7 - k)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def voc_label_from_image(im: Image.Image) -> np.ndarray:
  """VOC class indices uint8 [H, W] from a label PNG already opened with Pillow.

  Palette ('P') PNGs, as shipped in `SegmentationClass`, store the index itself; grey
  ('L') PNGs (SBD `SegmentationClassAug`) too. RGB PNGs are mapped back through the VOC
  palette; a colour outside it is an error, since guessing would corrupt labels silently.
  """
  if im.mode in ("P", "L"):
    return np.asarray(im, dtype=np.uint8).copy()
  if im.mode in ("RGB", "RGBA"):
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    cmap = voc_colormap().astype(np.int32)
    palette_codes = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    lut = {int(c): i for i, c in enumerate(palette_codes)}
    uniq, inverse = np.unique(code, return_inverse=True)
    missing = [int(u) for u in uniq if int(u) not in lut]
    if missing:
      raise ValueError(f"RGB VOC label has {len(missing)} colours outside the VOC palette")
    return np.asarray([lut[int(u)] for u in uniq], np.uint8)[inverse].reshape(code.shape)
  raise ValueError(f"VOC label PNG has mode {im.mode!r}, expected 'P', 'L' or 'RGB'")


# ----------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ...) to RGB uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """Encodes RGB uint8 [H, W, 3] as JPEG bytes."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def encode_label_png(label: np.ndarray) -> bytes:
  """Encodes a class-index map uint8 [H, W] as a lossless greyscale PNG."""
  if label.dtype != np.uint8 or label.ndim != 2:
    raise ValueError(f"expected uint8 [H, W] label, got {label.dtype} {label.shape}")
  buf = io.BytesIO()
  Image.fromarray(label, mode="L").save(buf, format="PNG")
  return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
  """Decodes a greyscale/palette label PNG to its indices, uint8 [H, W]."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im, dtype=np.uint8).copy()


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) scaled so that min(height, width) == short_side; never upscales."""
  if short_side <= 0 or min(height, width) <= short_side:
    return height, width
  scale = short_side / min(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise Skip("unreadable_file", f"{path}: {e}", path) from e
  if not data:
    raise Skip("zero_bytes", f"{path}: zero-byte file", path)
  return data


def _open_verified(path: str, data: bytes, what: str) -> Image.Image:
  """Fully decodes `data` (catching truncated files) and returns the loaded image."""
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
  except Exception as e:  # Pillow raises several unrelated types for bad files.
    detail = type(e).__name__ if "BytesIO" in str(e) else f"{type(e).__name__}: {e}"
    raise Skip(f"unreadable_{what}", f"{path}: cannot decode {what} ({detail})", path) from e
  return im


# ----------------------------------------------------------------------------------------
# Videos (PyAV).
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoOptions:
  """How videos are stored (see `cacl_jax.data.builders.kinetics` for the trade-offs).

  short_side: frames are resized so that their short side is this many pixels (never
    upscaled; 0 keeps the native size).
  quality: JPEG quality of the stored frames.
  max_seconds: only the first `max_seconds` of each video are kept (Kinetics clips are
    10 s, so the default keeps whole clips).
  min_frames: videos with fewer decodable frames are skipped ('too_short'); a pair at
    stride s needs s + 1 frames, so the default (9) fits the default stride 8.
  """
  short_side: int = 256
  quality: int = 90
  max_seconds: float = 10.0
  min_frames: int = 9


def decode_video(path: str, options: VideoOptions = VideoOptions()) -> dict:
  """Decodes the first `options.max_seconds` of a video into JPEG frames.

  Returns {'jpegs': list[bytes] (every frame, in order), 'fps': float, 'height': int,
  'width': int} with frame size after resizing. Raises `Skip` for zero-byte files,
  undecodable or truncated streams, and videos shorter than `options.min_frames`.
  """
  import av  # pylint: disable=g-import-not-at-top

  if os.path.getsize(path) == 0:
    raise Skip("zero_bytes", f"{path}: zero-byte file")
  jpegs = []
  fps = 0.0
  size = None
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise Skip("no_video_stream", f"{path}: no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate
      fps = float(rate) if rate else 0.0
      # Frame count bound from the nominal rate; without one, fall back to timestamps.
      max_frames = math.ceil(options.max_seconds * fps) if fps > 0 else None
      start = None
      for frame in container.decode(stream):
        if max_frames is not None and len(jpegs) >= max_frames:
          break
        if max_frames is None and frame.time is not None:
          start = frame.time if start is None else start
          if frame.time - start >= options.max_seconds:
            break
        if size is None:
          size = short_side_size(frame.height, frame.width, options.short_side)
        image = frame.to_ndarray(format="rgb24", width=size[1], height=size[0])
        jpegs.append(encode_jpeg(image, options.quality))
  except Skip:
    raise
  except Exception as e:  # PyAV/FFmpeg errors: truncated, corrupt, unsupported files.
    raise Skip("decode_error", f"{path}: {type(e).__name__}: {e}") from e
  if len(jpegs) < options.min_frames:
    raise Skip("too_short", f"{path}: {len(jpegs)} frames < min_frames={options.min_frames}")
  return {"jpegs": jpegs, "fps": fps, "height": size[0], "width": size[1]}


# ----------------------------------------------------------------------------------------
# Per-item work units of the ingestion pool. Each takes one picklable item and returns
# (summary, payload): `summary` is small JSON metadata, `payload` holds the bytes.
# ----------------------------------------------------------------------------------------


def video_item(item: tuple[str, str, int], options: VideoOptions) -> tuple[dict, dict]:
  """item = (video_id, path, label) -> ({'id', 'label', 'num_frames', ...}, {'jpegs'})."""
  video_id, path, label = item
  video = decode_video(path, options)
  summary = {"id": video_id, "label": label, "num_frames": len(video["jpegs"]),
             "fps": video["fps"], "height": video["height"], "width": video["width"],
             "bytes": sum(len(j) for j in video["jpegs"])}
  return summary, {"jpegs": video["jpegs"]}


def image_item(item: tuple[str, str, int]) -> tuple[dict, dict]:
  """item = (image_id, path, label): an ImageNet-style image, stored as its original bytes.

  The file is fully decoded once here so that a broken image is caught at ingestion,
  never in the middle of training.
  """
  image_id, path, label = item
  data = _read_bytes(path)
  with _open_verified(path, data, "image") as im:
    height, width = im.height, im.width
  return ({"id": image_id, "label": label, "num_frames": 1, "height": height,
           "width": width, "bytes": len(data)}, {"jpegs": [data]})


def voc_item(item: tuple[str, str, str]) -> tuple[dict, dict]:
  """item = (image_id, jpeg_path, label_png_path) -> a VOC record (label as index PNG)."""
  image_id, image_path, label_path = item
  return _segmentation_item(image_id, image_path, label_path, voc_label_from_image)


def cityscapes_item(item: tuple[str, str, str]) -> tuple[dict, dict]:
  """item = (image_id, leftImg8bit_path, labelIds_path) -> a record with 19-class trainIds."""
  image_id, image_path, label_path = item

  def to_train_ids(im: Image.Image) -> np.ndarray:
    if im.mode not in ("L", "P", "I", "I;16"):
      raise ValueError(f"labelIds PNG has mode {im.mode!r}, expected single-channel 'L'")
    ids = np.asarray(im)
    if ids.max(initial=0) > 255:
      raise ValueError(f"labelIds up to {ids.max()}, expected < 256")
    return cityscapes_to_train_ids(ids.astype(np.uint8))

  return _segmentation_item(image_id, image_path, label_path, to_train_ids)


def _segmentation_item(image_id, image_path, label_path, label_fn) -> tuple[dict, dict]:
  """Validates an (image, label) pair and re-encodes the label as an index PNG.

  The image keeps its original bytes (JPEG for VOC, PNG for Cityscapes): no quality loss.
  """
  if not os.path.exists(label_path):
    raise Skip("missing_label", f"{label_path}: label file missing for {image_id}", label_path)
  image_bytes = _read_bytes(image_path)
  label_bytes = _read_bytes(label_path)
  with _open_verified(image_path, image_bytes, "image") as im:
    image_size = (im.height, im.width)
  with _open_verified(label_path, label_bytes, "label") as lab:
    try:
      label = label_fn(lab)
    except ValueError as e:
      raise Skip("bad_label", f"{label_path}: {e}", label_path) from e
  if label.shape != image_size:
    raise Skip("size_mismatch", f"{label_path}: label {label.shape[0]}x{label.shape[1]} "
                                f"!= image {image_size[0]}x{image_size[1]}", label_path)
  summary = {"id": image_id, "height": image_size[0], "width": image_size[1],
             "bytes": len(image_bytes)}
  return summary, {"image": image_bytes, "label": encode_label_png(label)}


def run_item(fn, item) -> tuple[dict | None, dict | None, dict | None]:
  """Runs one work unit; returns (summary, payload, None) or (None, None, skip).

  `skip` = {'name', 'kind', 'reason'}. Only `Skip` (bad input) is caught: any other
  exception is a bug in this code and must stop the run.
  """
  try:
    summary, payload = fn(item)
  except Skip as e:
    return None, None, {"name": e.name or str(item[1]), "kind": e.kind, "reason": str(e)}
  return summary, payload, None

