"""Smoke test of benchmarks/mfu.py (tiny shapes, no timed asserts: timings live in benchmarks/)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import mfu  # noqa: E402  pylint: disable=g-import-not-at-top


def test_peak_table_lookup():
  assert mfu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert mfu.peak_tflops("NVIDIA H200") == 989.0
  assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert mfu.peak_tflops("TPU v5 lite") == 197.0 and mfu.peak_tflops("TPU v5p") == 459.0
  assert mfu.peak_tflops("TPU v6 lite") == 918.0 and mfu.peak_tflops("TPU v4") == 275.0
  assert mfu.peak_tflops("cpu") is None
  assert mfu.ANCHOR_MFU == pytest.approx(0.194, abs=1e-3)


def test_mfu_runs_the_real_step_and_reports_consistent_numbers(tmp_path, capsys):
  out = tmp_path / "mfu.json"
  rows = mfu.main(["--tiny", "--peak_tflops", "0.001", "--out", str(out)])
  (row,) = rows
  assert row["devices"] == 8 and row["global_batch"] == 16 and row["dtype"] == "bfloat16"
  assert row["flops_per_step_per_device"] > 1e6           # XLA counted the step's work
  assert row["pairs_per_s"] == pytest.approx(16 / (row["ms_per_step"] / 1e3))
  assert row["tflops_per_device"] == pytest.approx(
      row["flops_per_step_per_device"] / (row["ms_per_step"] / 1e3) / 1e12)
  assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.001)
  assert json.loads(out.read_text())["rows"][0]["flops_per_step_per_device"] == row["flops_per_step_per_device"]
  table = capsys.readouterr().out
  assert "| resnet18 | 32 | bfloat16 | 2 |" in table and "MFU" in table
