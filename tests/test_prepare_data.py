"""prepare_data: real mp4 files (PyAV) in both Kinetics layouts, broken files, resume, errors."""
import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from tensorflow_datasets.core import shuffle as tfds_shuffle

from cacl_jax.data import prepare as prepare_data
from cacl_jax.data import decode
from cacl_jax.data import real
from cacl_jax.data.builders import base
from cacl_jax.data.builders import ingest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frame_image(i: int, h: int = 48, w: int = 64) -> np.ndarray:
  """Frame i of a test video: red level 8·i (recoverable after lossy coding) + a moving bar."""
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = (8 * i) % 256
  img[:, (3 * i) % w, 1] = 255
  return img


def write_video(path: str, num_frames: int = 20, h: int = 48, w: int = 64, fps: int = 25) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "10"}
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(frame_image(i, h, w), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def add_broken_videos(folder: str, good: str, suffix: str = "") -> None:
  """A truncated mp4 (moov atom lost), a zero-byte file and a too-short video in `folder`."""
  with open(good, "rb") as f:
    data = f.read()
  with open(os.path.join(folder, f"truncated{suffix}.mp4"), "wb") as f:
    f.write(data[:len(data) // 2])
  open(os.path.join(folder, f"empty{suffix}.mp4"), "wb").close()
  write_video(os.path.join(folder, f"short{suffix}.mp4"), num_frames=5)


def red_levels(frames: np.ndarray) -> np.ndarray:
  """Recovers each frame's index from its red level (frame_image)."""
  return np.round(frames[..., 0].mean(axis=(1, 2)) / 8).astype(int)


@pytest.fixture(scope="module")
def class_folder_kinetics(tmp_path_factory):
  """Class-folder layout, prepared with a real 2-process pool. Returns (src, out, entry)."""
  src = str(tmp_path_factory.mktemp("k400_raw"))
  write_video(f"{src}/train/abseiling/a1.mp4", num_frames=20)
  write_video(f"{src}/train/abseiling/a2.mp4", num_frames=30, h=96, w=128)
  write_video(f"{src}/train/bowling/b1.mp4", num_frames=24)
  add_broken_videos(f"{src}/train/bowling", f"{src}/train/abseiling/a2.mp4")
  write_video(f"{src}/val/bowling/v1.mp4", num_frames=12)
  out = str(tmp_path_factory.mktemp("k400_data"))
  entry = prepare_data.main(["kinetics", "--src", src, "--out", out, "--workers", "2",
                             "--short_side", "64", "--keep_cache"])
  return src, out, entry


def test_class_folder_layout_counts_and_names_broken_files(class_folder_kinetics):
  src, out, entry = class_folder_kinetics
  train = entry["splits"]["train"]
  assert train["num_ok"] == 3 and train["num_skipped"] == 3
  assert train["skipped_by_kind"] == {"decode_error": 1, "zero_bytes": 1, "too_short": 1}
  named = {os.path.basename(s["name"]): s["kind"] for s in train["skipped"]}
  assert named == {"truncated.mp4": "decode_error", "empty.mp4": "zero_bytes", "short.mp4": "too_short"}
  assert entry["splits"]["val"]["num_ok"] == 1
  # The same counts are on disk, merged per dataset.
  with open(os.path.join(out, "prepare_report.json")) as f:
    assert json.load(f)["kinetics"]["splits"]["train"]["skipped_by_kind"]["zero_bytes"] == 1


def test_class_folder_frames_read_back_in_order(class_folder_kinetics):
  _, out, _ = class_folder_kinetics
  source = real.kinetics_source(out, "train")
  assert len(source) == 3
  assert source.label_names == ("abseiling", "bowling")
  videos = [source[i] for i in range(3)]
  assert [(v.name, v.label, v.num_frames) for v in videos] == [
      ("abseiling/a1", 0, 20), ("abseiling/a2", 0, 30), ("bowling/b1", 1, 24)]
  for v in videos:
    frames = v.frames(np.arange(v.num_frames))
    np.testing.assert_array_equal(red_levels(frames), np.arange(v.num_frames))
  # a2 is 96x128: short side 96 -> 64 keeps the aspect ratio; the others stay native.
  assert videos[1].frames([0]).shape == (1, 64, 85, 3)
  assert videos[0].frames([0, 5]).shape == (2, 48, 64, 3)
  val = real.kinetics_source(out, "val")
  assert len(val) == 1 and val[0].label == 1 and val[0].num_frames == 12
  with pytest.raises(IndexError):
    videos[0].frames([20])


def test_rerun_is_a_no_op_and_resume_skips_cached_videos(class_folder_kinetics, tmp_path,
                                                         monkeypatch):
  src, out, entry = class_folder_kinetics
  # A finished dataset is not rebuilt.
  assert prepare_data.main(["kinetics", "--src", src, "--out", out, "--workers", "0",
                            "--short_side", "64"]) == entry
  # A killed run: only some videos were decoded into the cache. The rerun must keep those
  # files untouched and decode only the rest.
  out2 = str(tmp_path / "data")
  cache = os.path.join(out2, ".cache")
  builder = prepare_data.make_builder(prepare_data.parse_args(
      ["kinetics", "--src", src, "--out", out2, "--workers", "0", "--short_side", "64"]))
  tasks = builder.list_source()["train"]
  split_cache = os.path.join(base.cache_root(out2, builder.name, builder._options), "train")  # pylint: disable=protected-access
  ingest.run(tasks[:2], builder._item_fn(), split_cache, 0, "partial")  # pylint: disable=protected-access
  before = {f: os.stat(os.path.join(split_cache, f)).st_mtime_ns for f in os.listdir(split_cache)}
  assert len(before) == 4
  seen = []
  original = decode.video_item

  def counting_item(item, options):
    seen.append(item[0])
    return original(item, options)

  monkeypatch.setattr(decode, "video_item", counting_item)
  entry2 = prepare_data.main(["kinetics", "--src", src, "--out", out2, "--workers", "0",
                              "--short_side", "64", "--keep_cache"])
  assert sorted(seen) == sorted({t.items[0][0] for t in tasks[2:]} | {"bowling/v1"})
  for f, mtime in before.items():
    assert os.stat(os.path.join(split_cache, f)).st_mtime_ns == mtime
  assert entry2["splits"]["train"]["num_ok"] == 3
  assert os.path.isdir(cache)


def test_flat_cvdf_layout_with_annotation_csv(tmp_path):
  src, out = str(tmp_path / "raw"), str(tmp_path / "data")
  write_video(f"{src}/train/yt1_000010_000020.mp4", num_frames=16)
  write_video(f"{src}/train/yt2_000000_000010.mp4", num_frames=18)
  write_video(f"{src}/train/unlisted_000000_000010.mp4", num_frames=18)
  add_broken_videos(f"{src}/train", f"{src}/train/yt1_000010_000020.mp4", "_000000_000010")
  write_video(f"{src}/val/yt3_000005_000015.mp4", num_frames=10)
  os.makedirs(f"{src}/annotations")
  rows = {"train": [("tying tie", "yt1", 10, 20), ("bowling", "yt2", 0, 10),
                    ("bowling", "truncated", 0, 10), ("bowling", "empty", 0, 10),
                    ("bowling", "short", 0, 10), ("bowling", "missing_file", 0, 10)],
          "val": [("tying tie", "yt3", 5, 15)]}
  for split, split_rows in rows.items():
    with open(f"{src}/annotations/{split}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
      w.writerows([(*r, split) for r in split_rows])
  entry = prepare_data.main(["kinetics", "--src", src, "--out", out, "--workers", "0"])
  train = entry["splits"]["train"]
  assert train["skipped_by_kind"] == {"not_in_annotations": 1, "decode_error": 1,
                                     "zero_bytes": 1, "too_short": 1}
  assert {os.path.basename(s["name"]): s["kind"] for s in train["skipped"]} == {
      "unlisted_000000_000010.mp4": "not_in_annotations", "short_000000_000010.mp4": "too_short",
      "empty_000000_000010.mp4": "zero_bytes", "truncated_000000_000010.mp4": "decode_error"}
  source = real.kinetics_source(out, "train")
  assert source.label_names == ("bowling", "tying tie")
  assert [(source[i].name, source[i].label, source[i].num_frames) for i in range(len(source))] == [
      ("yt1_000010_000020", 1, 16), ("yt2_000000_000010", 0, 18)]
  np.testing.assert_array_equal(red_levels(source[1].frames([0, 8, 17])), [0, 8, 17])
  assert real.kinetics_source(out, "val")[0].label == 1
  # Cache removed after a successful build unless --keep_cache.
  assert not os.listdir(os.path.join(out, ".cache"))


def test_records_in_order_without_tfds_shuffle_buckets(tmp_path, monkeypatch):
  """TFDS's own writer spills splits over 1 GB to disk buckets through tf.io.gfile (needs
  TensorFlow). Forcing that threshold to 0 proves the builders never take that path, and
  that records come out in video-then-frame order."""
  monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 0)
  monkeypatch.setattr(base, "SHARD_BYTES", 30_000)  # several shards, read back as one split
  src, out = str(tmp_path / "raw"), str(tmp_path / "data")
  for i in range(4):
    write_video(f"{src}/train/c{i % 2}/v{i}.mp4", num_frames=10 + i)
  prepare_data.main(["kinetics", "--src", src, "--out", out, "--workers", "0"])
  source = real.kinetics_source(out, "train")
  records = source[0]._records  # pylint: disable=protected-access
  got = [(int(r["video"]), int(r["frame"])) for r in records.__getitems__(range(len(records)))]
  assert got == [(v, f) for v in range(4) for f in range(10 + [0, 2, 1, 3][v])]


def test_errors_name_the_expected_layout(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"train,val\}/<label>/\*\.mp4"):
    prepare_data.main(["kinetics", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "d")])
  (tmp_path / "flat" / "train").mkdir(parents=True)
  write_video(str(tmp_path / "flat" / "train" / "x.mp4"), num_frames=9)
  with pytest.raises(FileNotFoundError, match=r"annotations/train\.csv is missing"):
    prepare_data.main(["kinetics", "--src", str(tmp_path / "flat"), "--out", str(tmp_path / "d")])
  with pytest.raises(FileNotFoundError, match=r"VOC2012/JPEGImages"):
    prepare_data.main(["voc", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "d")])
  with pytest.raises(FileNotFoundError, match=r"leftImg8bit"):
    prepare_data.main(["cityscapes", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "d")])
  with pytest.raises(FileNotFoundError, match=r"train/<wnid>/\*\.JPEG"):
    prepare_data.main(["imagenet", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "d")])
  with pytest.raises(FileNotFoundError, match="prepare_data kinetics"):
    real.kinetics_source(str(tmp_path / "empty"))


def test_cli_missing_source_is_one_error_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "cacl_jax.prepare_data", "cityscapes", "--src", str(tmp_path / "nope"),
       "--out", str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "is not a directory" in lines[0] and "nope" in lines[0]


# ---------------------------------------------------------------- faults

def run_prepare(args: list[str], file_limit: int | None = None, die_at_limit: bool = False,
                background: bool = False):
  """`python -m cacl_jax.prepare_data ARGS`, optionally under a file-size limit (RLIMIT_FSIZE,
  set in the child itself): writing past it fails with EFBIG, as a full disk fails with
  ENOSPC; with `die_at_limit` the process is killed there instead (SIGXFSZ, which Python
  otherwise ignores): a kill in the middle of a write, at a byte the test chooses."""
  code = ["import resource, runpy, signal"]
  if file_limit is not None:
    code.append(f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_limit}, {file_limit}))")
  if die_at_limit:
    code.append("signal.signal(signal.SIGXFSZ, signal.SIG_DFL)")
  code.append("runpy.run_module('cacl_jax.prepare_data', run_name='__main__', alter_sys=True)")
  command = [sys.executable, "-c", "; ".join(code), *args]
  if background:
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def all_records(out: str) -> list[tuple]:
  source = real.kinetics_source(out, "train")
  records = source[0]._records  # pylint: disable=protected-access
  return [(bytes(r["jpeg"]), int(r["video"]), int(r["frame"]))
          for r in records.__getitems__(range(len(records)))]


def test_killed_and_disk_full_runs_resume_to_the_records_of_an_uninterrupted_run(tmp_path):
  """One source, prepared uninterrupted, and again through every fault in turn: SIGKILL while
  ingesting, the disk filling up while the ArrayRecord shard is written (one error line), a kill
  in the middle of that write, and a planted pickle in the cache. The final rerun must give the
  uninterrupted run's records byte for byte, without executing the pickle."""
  src = str(tmp_path / "raw")
  for i in range(6):
    write_video(f"{src}/train/c{i % 2}/v{i}.mp4", num_frames=14 + i)
  args = lambda out: ["kinetics", "--src", src, "--out", out, "--workers", "0", "--keep_cache"]
  reference = str(tmp_path / "reference")
  prepare_data.main(args(reference))
  expected = all_records(reference)
  out = str(tmp_path / "data")
  builder = prepare_data.make_builder(prepare_data.parse_args(args(out)))
  cache = os.path.join(base.cache_root(out, builder.name, builder._options), "train")  # pylint: disable=protected-access
  done = lambda: sorted(f for f in os.listdir(cache) if f.endswith(".json")) if os.path.isdir(cache) else []

  # 1. SIGKILL while ingesting: some videos cached, not all.
  proc = run_prepare(args(out), background=True)
  deadline = time.monotonic() + 120
  while len(done()) < 2 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.kill()
  proc.communicate()
  assert 2 <= len(done()) < 6, done()

  # 2. Disk full while writing the shard: one error line, exit 2, no dataset.
  largest_cache_file = max(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
  shard = sum(os.path.getsize(os.path.join(reference, builder.name, "1.0.0", f))
              for f in os.listdir(os.path.join(reference, builder.name, "1.0.0")) if ".array_record" in f)
  shard_limit = (largest_cache_file + shard) // 2   # every cache file fits, the shard does not
  assert largest_cache_file < shard_limit < shard
  full = run_prepare(args(out), file_limit=shard_limit)
  assert full.returncode == 2, full.stderr[-2000:]
  errors = [l for l in full.stderr.splitlines() if "error" in l.lower()]   # besides progress bars
  assert len(errors) == 1 and errors[0].startswith("prepare_data: error: "), full.stderr[-2000:]
  assert "File too large" in errors[0] and "rerun the same command" in errors[0]
  assert "Traceback" not in full.stderr
  assert len(done()) == 6   # the ingestion finished and is kept
  assert not os.path.isdir(os.path.join(out, builder.name, "1.0.0"))

  # 3. Killed in the middle of that write: TFDS's incomplete.* build directory stays behind.
  killed = run_prepare(args(out), file_limit=shard_limit, die_at_limit=True)
  assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
  leftovers = [d for d in os.listdir(os.path.join(out, builder.name)) if d.startswith("incomplete.")]
  assert leftovers
  # A build killed after writing its dataset_info.json is never taken for the dataset.
  shutil.copytree(os.path.join(reference, builder.name, "1.0.0"),
                  os.path.join(out, builder.name, "incomplete.ZZZZZZ_1.0.0"))
  with pytest.raises(FileNotFoundError, match="no prepared kinetics"):
    real.kinetics_source(out, "train")

  # 4. A planted pickle where a cached payload would be: redone, never unpickled.
  marker = tmp_path / "executed"
  victim = done()[0][:-len(".json")]

  class Planted:
    def __reduce__(self):
      return (open, (str(marker), "w"))
  with open(os.path.join(cache, victim + ingest.PAYLOAD_SUFFIX), "wb") as f:
    pickle.dump(Planted(), f)

  final = run_prepare(args(out))
  assert final.returncode == 0, final.stderr[-3000:]
  assert "reused 5 of 6 tasks" in final.stderr
  assert "left by an interrupted run" in final.stdout
  assert not marker.exists()
  assert not [d for d in os.listdir(os.path.join(out, builder.name)) if d.startswith("incomplete.")]
  assert all_records(out) == expected


def test_a_replaced_video_gets_a_new_cache_key(tmp_path):
  src = str(tmp_path / "raw")
  write_video(f"{src}/train/c/v.mp4", num_frames=10)
  builder = prepare_data.make_builder(prepare_data.parse_args(
      ["kinetics", "--src", src, "--out", str(tmp_path / "data")]))
  before = builder.list_source()["train"][0].key
  write_video(f"{src}/train/c/v.mp4", num_frames=12)   # same name, new content
  after = prepare_data.make_builder(prepare_data.parse_args(
      ["kinetics", "--src", src, "--out", str(tmp_path / "data")])).list_source()["train"][0].key
  assert before.startswith("c__v-") and after.startswith("c__v-") and before != after


def test_cache_format_round_trip_and_refuses_other_files():
  payloads = [{"jpegs": [b"\x00\x01", b""]}, None,
              {"image": b"xyz", "label": np.arange(6, dtype=np.uint8).reshape(2, 3), "n": 3}]
  back = ingest.decode_payloads(ingest.encode_payloads(payloads))
  assert back[0] == {"jpegs": [b"\x00\x01", b""]} and back[1] is None
  assert back[2]["image"] == b"xyz" and back[2]["n"] == 3
  np.testing.assert_array_equal(back[2]["label"], payloads[2]["label"])
  with pytest.raises(ValueError, match="not an ingestion cache"):
    ingest.decode_payloads(pickle.dumps(payloads))
  with pytest.raises(TypeError):
    ingest.encode_payloads([{"x": object()}])
