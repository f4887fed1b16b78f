"""The shared shape of the four TFDS builders: list → ingest (pool, cache) → write in order.

Each builder reads its raw source from `src` (nothing is downloaded), runs `ingest.run`
per split, and writes ArrayRecord shards (no TensorFlow) in generation order, so that
record i of a split is item i of the split's table in `metadata.json` (the readers in
`cacl_jax.data.real` rely on it).

Writing bypasses TFDS's shuffling writer (`_generate_splits` is overridden): beyond 1 GB
per split that writer spills to disk buckets through `tf.io.gfile`, i.e. it needs
TensorFlow, and it would only reorder records that must stay in order anyway. Everything
else (`download_and_prepare`, the incomplete-dir commit, dataset_info.json, shard naming,
`tfds.data_source` reading) is stock TFDS. After `download_and_prepare`,
`builder.report` holds the per-split counts and skipped items for `prepare_report.json`.
"""
from __future__ import annotations

import abc
import collections
import hashlib
import json
import os
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import file_adapters

from cacl_jax.data.builders import ingest

VERSION = tfds.core.Version("1.0.0")
SHARD_BYTES = 256 << 20  # Target shard size: few files, yet many per host for sharded reads.


def cache_root(data_dir: str, name: str, options: Any) -> str:
  """DATA/.cache/<name>-<hash of options>: changing the storage options never reuses
  frames cached under other ones."""
  digest = hashlib.sha1(repr(options).encode()).hexdigest()[:8]
  return os.path.join(data_dir, ".cache", f"{name}-{digest}")


def summarize(results: list[ingest.TaskResult], listing_skips: list[dict]) -> dict:
  """Counts and names for one split of the prepare report.

  `listing_skips` are items rejected while listing the source (e.g. a video absent from
  the annotation csv), before any decoding.
  """
  ok = [s for r in results for s in r.summaries if s is not None]
  skips = list(listing_skips) + [s for r in results for s in r.skips]
  return {
      "num_ok": len(ok),
      "num_skipped": len(skips),
      "skipped_by_kind": dict(collections.Counter(s["kind"] for s in skips)),
      "skipped": skips,
      "stored_bytes": int(sum(s.get("bytes", 0) for s in ok)),
  }


class OrderedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for the CACL builders. Subclasses define the features, the listing of a split
  into tasks, the item function, and how a cached payload becomes examples."""

  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point `--src` of `python -m cacl_jax.prepare_data` at the raw data."
  # Nothing is downloaded, so there are no checksums. TFDS would otherwise look for a
  # checksums file beside this package via `importlib_resources`, which is not installed.
  url_infos = None

  def __init__(self, *, src: str = "", num_workers: int = 0, options: Any = None, **kwargs):
    self._src = src
    self._num_workers = num_workers
    self._options = options
    self._data_root = os.fspath(kwargs.get("data_dir") or os.path.expanduser("~/tensorflow_datasets"))
    self.report: dict[str, dict] = {}
    # Split -> items rejected while listing ({'name', 'kind', 'reason'}), for the report.
    self.listing_skips: dict[str, list[dict]] = collections.defaultdict(list)
    self._tasks: dict[str, list[ingest.Task]] | None = None
    super().__init__(**kwargs)

  # -- what subclasses provide -----------------------------------------------------------

  @abc.abstractmethod
  def _features(self) -> tfds.features.FeaturesDict:
    """The per-record features."""

  @abc.abstractmethod
  def _list_splits(self) -> dict[str, list[ingest.Task]]:
    """Split name -> tasks, in write order. Raises FileNotFoundError/ValueError naming the
    expected layout when `src` does not have it."""

  @abc.abstractmethod
  def _item_fn(self) -> Callable[[Any], tuple[dict, dict]]:
    """The picklable per-item work function (see `cacl_jax.data.decode`)."""

  @abc.abstractmethod
  def _records(self, summary: dict, payload: dict, index: int) -> Iterator[dict]:
    """The examples of one ingested item (`index` = its position among kept items)."""

  def _split_metadata(self, summaries: list[dict]) -> dict:
    """Per-split table stored in metadata.json (default: ids only)."""
    return {"ids": [s["id"] for s in summaries]}

  def _dataset_metadata(self) -> dict:
    """Dataset-wide metadata (class names, storage options)."""
    return {}

  def list_source(self) -> dict[str, list[ingest.Task]]:
    """Split -> tasks of the raw source (listed once). Raises FileNotFoundError/ValueError
    naming the expected layout, so a bad `src` fails before any work."""
    if self._tasks is None:
      self._tasks = self._list_splits()
    return self._tasks

  # -- TFDS hooks ------------------------------------------------------------------------

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=self._features(), disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: `src` is read directly.
    splits = self.list_source()
    cache = cache_root(self._data_root, self.name, self._options)
    generators = {}
    self.info.metadata.update(self._dataset_metadata())
    for split, tasks in splits.items():
      results = ingest.run(tasks, self._item_fn(), os.path.join(cache, split),
                           self._num_workers, desc=f"{self.name} {split}")
      self.report[split] = summarize(results, self.listing_skips[split])
      summaries = [s for r in results for s in r.summaries if s is not None]
      if not summaries:
        raise ValueError(f"{self.name} {split}: every item was skipped "
                         f"({self.report[split]['skipped_by_kind']}); nothing to write")
      self.info.metadata[split] = self._split_metadata(summaries)
      generators[split] = self._generate_examples(os.path.join(cache, split), results)
    self.info.metadata["report"] = json.loads(json.dumps(self.report))
    return generators

  def _generate_examples(self, cache_dir: str, results: list[ingest.TaskResult]):
    """Yields (i, record) for record i of the split, in order, from the cache."""
    i = 0
    index = 0
    for result in results:
      if all(s is None for s in result.summaries):
        continue
      payloads = ingest.load_payloads(cache_dir, result.key)
      for summary, payload in zip(result.summaries, payloads):
        if summary is None:
          continue
        for record in self._records(summary, payload, index):
          yield i, record
          i += 1
        index += 1

  def _generate_splits(self, dl_manager, download_config):
    """Writes each split's records, in order, to ~SHARD_BYTES ArrayRecord shards.

    Replaces TFDS's shuffling writer (see the module docstring); returns the SplitInfos.
    """
    del download_config
    serializer = example_serializer.ExampleSerializer(self.info.features.get_serialized_info())
    adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    split_infos = []
    for split, generator in self._split_generators(dl_manager).items():
      template = self._get_filename_template(split_name=split)
      tmp_paths, lengths, num_bytes = [], [], 0
      serialized = (serializer.serialize_example(self.info.features.encode_example(example))
                    for _, example in generator)
      for shard in _shards(serialized, SHARD_BYTES):
        tmp_paths.append(os.fspath(template.data_dir / f"{split}.tmp-{len(tmp_paths):05d}"))
        _write_shard(adapter, tmp_paths[-1], shard)
        lengths.append(len(shard))
        num_bytes += sum(len(r) for r in shard)
      # The shard count is part of each file name, known only now.
      for index, tmp in enumerate(tmp_paths):
        os.replace(tmp, template.sharded_filepath(shard_index=index, num_shards=len(tmp_paths)))
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                             num_bytes=num_bytes, filename_template=template))
      print(f"{self.name} {split}: wrote {sum(lengths)} records in {len(lengths)} shards "
            f"({num_bytes / 2**20:.1f} MiB)")
    return split_infos


def _write_shard(adapter, path: str, records: list[bytes]) -> None:
  """Writes one ArrayRecord shard. The ArrayRecord writer reports a failed write (disk full,
  quota) as RuntimeError('write() failed: ...'): that becomes the OSError it is, which
  prepare_data reports in one line."""
  try:
    adapter.write_examples(path, ((None, r) for r in records))
  except RuntimeError as e:
    if "write() failed" not in str(e) and "Failed to" not in str(e):
      raise
    raise OSError(f"writing {path} failed: {str(e).split(';')[0]}") from e


def _shards(records: Iterator[bytes], shard_bytes: int) -> Iterator[list[bytes]]:
  """Groups a stream of serialized records into lists of about `shard_bytes` bytes."""
  shard, size = [], 0
  for record in records:
    shard.append(record)
    size += len(record)
    if size >= shard_bytes:
      yield shard
      shard, size = [], 0
  if shard:
    yield shard
