"""The one path layer for every output: local paths, `file://` URLs and object-store URLs.

Every file the programs write (checkpoints, metrics.jsonl, events, figures, results.json, the
probe's logs, the run lock) is reached through `resolve`, so a workdir given as a URL never
turns into a local folder named `gs:` or `file:`:

    /runs/r18, runs/r18      local (made absolute)
    file:///runs/r18         the same local directory (RFC 8089; `file://localhost/...` too)
    gs://bucket/runs/r18     Google Cloud Storage through etils' fsspec backend; needs gcsfs,
                             an extra: `pip install -r requirements-gcs.txt` (launch/tpu_pod.sh
                             setup installs it). Orbax writes the arrays with tensorstore's own
                             GCS driver.
    s3://bucket/runs/r18     the same through s3fs (not pinned; untested here)

Prepared data (`data.root`) stays a local (or mounted) directory: grain reads ArrayRecord
files by path.
"""
from __future__ import annotations

import importlib.util
import os
import urllib.parse

from etils import epath

# URL scheme -> (the fsspec implementation etils needs, how to install it).
OBJECT_STORES = {
    "gs": ("gcsfs", "pip install -r requirements-gcs.txt"),
    "s3": ("s3fs", "pip install s3fs"),
}


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an etils Path every writer can use. Raises ValueError (one line) for an
  unknown URL scheme or an object store whose client library is not installed."""
  text = os.fspath(path)
  if text.startswith("file://"):
    parsed = urllib.parse.urlparse(text)
    if parsed.netloc not in ("", "localhost"):
      raise ValueError(f"{text}: a file:// URL names a path on this machine "
                       f"(file:///abs/path), not on host {parsed.netloc!r}")
    text = urllib.parse.unquote(parsed.path)
  if "://" not in text:
    return epath.Path(os.path.abspath(text))
  scheme = text.split("://", 1)[0]
  if scheme not in OBJECT_STORES:
    raise ValueError(f"{text}: unsupported URL scheme {scheme}:// (use a local path, file://, "
                     f"{', '.join(s + '://' for s in OBJECT_STORES)})")
  module, install = OBJECT_STORES[scheme]
  if importlib.util.find_spec(module) is None:
    raise ValueError(f"{text}: {scheme}:// paths need the {module} package, which is not "
                     f"installed: {install}")
  return epath.Path(text)


def is_local(path: str | os.PathLike) -> bool:
  """True for local paths and file:// URLs (where POSIX files, locks and renames apply)."""
  text = os.fspath(path)
  return text.startswith("file://") or "://" not in text


def local_or_url(path: str | os.PathLike) -> str:
  """The string that libraries taking a path *or* a URL want (tensorboardX, Orbax):
  the plain local path for local and file:// paths, the URL otherwise."""
  return os.fspath(resolve(path))


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Replaces `path` with `text` in one step where the file system allows it (a local rename;
  object stores write whole objects anyway): a reader sees the old or the new file, never half."""
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(path)
