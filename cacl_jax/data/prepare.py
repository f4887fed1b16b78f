r"""Turns raw datasets into TFDS ArrayRecord datasets that training reads with grain.

  python -m cacl_jax.prepare_data {kinetics|imagenet|voc|cityscapes|davis} --src RAW --out DATA

Raw layouts are those of docs/usage.md §1 (see each builder in `cacl_jax.data.builders`). The work
runs in `--workers` processes (default: all cores) with a progress bar, and is resumable:
each decoded video / image chunk is cached under DATA/.cache, so a killed run restarts
where it stopped, and a finished dataset is not rebuilt. Broken inputs are skipped, counted
and named in DATA/prepare_report.json and summarised on the console; a missing or wrongly
laid out source stops with one error line naming the expected layout.

Output: DATA/cacl_<dataset>/1.0.0/ (ArrayRecord shards, dataset_info.json, metadata.json),
read by `cacl_jax.data.real` (`data.name = kinetics | imagenet | voc | cityscapes`,
`data.root = DATA`). Needs no TensorFlow.

Kinetics storage (defaults: short side 256, JPEG quality 90, first 10 s, every frame): see
`cacl_jax.data.builders.kinetics` for the scheme and `benchmarks/data_ingest.py` for the
measured bytes per video.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from cacl_jax.data import decode

DATASETS = ("kinetics", "imagenet", "voc", "cityscapes", "davis")
REPORT_FILE = "prepare_report.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m cacl_jax.prepare_data",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset", choices=DATASETS)
  parser.add_argument("--src", required=True, help="raw dataset root (layouts: docs/usage.md §1)")
  parser.add_argument("--out", required=True, help="prepared data dir (DATA; = data.root)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="decoding processes (0: in this process)")
  parser.add_argument("--short_side", type=int, default=256, help="kinetics: frame short side")
  parser.add_argument("--quality", type=int, default=90, help="kinetics: JPEG quality")
  parser.add_argument("--max_seconds", type=float, default=10.0,
                      help="kinetics: keep the first N seconds of each video")
  parser.add_argument("--min_frames", type=int, default=9,
                      help="kinetics: skip videos with fewer frames (stride s needs s + 1)")
  parser.add_argument("--keep_cache", action="store_true",
                      help="keep DATA/.cache after a successful build (it doubles disk use)")
  return parser.parse_args(argv)


def make_builder(args: argparse.Namespace):
  """The TFDS builder for `args.dataset`, writing ArrayRecord under `args.out`."""
  from cacl_jax.data import builders  # pylint: disable=g-import-not-at-top  (TFDS import is slow)
  kwargs = dict(src=args.src, num_workers=args.workers, data_dir=args.out,
                file_format="array_record")
  if args.dataset == "kinetics":
    if args.short_side < 0 or not 1 <= args.quality <= 100 or args.max_seconds <= 0 or args.min_frames < 1:
      raise ValueError("expected --short_side >= 0, 1 <= --quality <= 100, --max_seconds > 0, "
                       "--min_frames >= 1")
    kwargs["options"] = decode.VideoOptions(args.short_side, args.quality, args.max_seconds,
                                            args.min_frames)
  return builders.builder_class(args.dataset)(**kwargs)


def _update_report(out: str, dataset: str, entry: dict) -> str:
  """Merges one dataset's entry into DATA/prepare_report.json (several datasets share DATA)."""
  path = os.path.join(out, REPORT_FILE)
  report = {}
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
  report[dataset] = entry
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, path)
  return path


def _print_summary(name: str, splits: dict, report_path: str, max_names: int = 10) -> None:
  for split, r in splits.items():
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["skipped_by_kind"].items()))
    print(f"{name} {split}: {r['num_ok']} stored ({r['stored_bytes'] / 2**20:.1f} MiB), "
          f"{r['num_skipped']} skipped" + (f" ({kinds})" if kinds else ""))
    for skip in r["skipped"][:max_names]:
      print(f"  skipped [{skip['kind']}] {skip['reason']}")
    if r["num_skipped"] > max_names:
      print(f"  ... {r['num_skipped'] - max_names} more in {report_path}")


def _remove_incomplete(dataset_dir: str) -> None:
  """Deletes the `incomplete.*` build directories a killed run left (TFDS builds in one and
  renames it when done; the readers never take one for the dataset). One prepare_data per
  DATA dir at a time: a running build's directory would be deleted too."""
  for name in sorted(os.listdir(dataset_dir)) if os.path.isdir(dataset_dir) else ():
    if name.startswith("incomplete."):
      print(f"removing {os.path.join(dataset_dir, name)}, left by an interrupted run")
      shutil.rmtree(os.path.join(dataset_dir, name))


def main(argv: list[str] | None = None) -> dict:
  """Prepares one dataset; returns its prepare-report entry ({'tfds_name', 'splits', ...})."""
  args = parse_args(argv)
  if not os.path.isdir(args.src):
    raise FileNotFoundError(f"--src {args.src} is not a directory (the raw {args.dataset} root, "
                            "laid out as in docs/usage.md §1)")
  os.makedirs(args.out, exist_ok=True)
  builder = make_builder(args)
  if builder.is_prepared():
    print(f"{builder.name} already prepared in {builder.data_dir}; nothing to do "
          f"(delete that directory to rebuild)")
    path = os.path.join(args.out, REPORT_FILE)
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f).get(args.dataset, {})
  builder.list_source()  # a wrongly laid out source fails here, before any work
  _remove_incomplete(os.path.dirname(os.fspath(builder.data_dir)))
  builder.download_and_prepare()
  entry = {"tfds_name": builder.name, "data_dir": os.fspath(builder.data_dir),
           "options": dict(builder.info.metadata.get("options", {})), "splits": builder.report}
  report_path = _update_report(args.out, args.dataset, entry)
  _print_summary(builder.name, builder.report, report_path)
  cache = os.path.join(args.out, ".cache")
  if not args.keep_cache:
    for d in os.listdir(cache) if os.path.isdir(cache) else ():
      if d.startswith(builder.name + "-"):
        shutil.rmtree(os.path.join(cache, d))
  return entry
