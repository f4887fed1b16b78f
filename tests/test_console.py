"""The console at default verbosity: the run's own lines, not the libraries' INFO chatter; each
evaluation one line, its per-class table in a file; rows named by the variant pretrained."""
import logging
import os
import sys

import numpy as np

from cacl_jax.evaluation import demo, metrics
from cacl_jax.runtime import cli

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import demo as demo_config  # noqa: E402  pylint: disable=g-import-not-at-top


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "a line", None, None)


def test_default_console_keeps_own_lines_and_drops_library_info():
  keep = cli._OwnLines().filter  # pylint: disable=protected-access
  site = "/venv/lib/python3.11/site-packages"
  assert keep(_record("/repo/cacl_jax/training/train.py", logging.INFO))
  assert not keep(_record(f"{site}/orbax/checkpoint/_src/checkpoint_manager.py", logging.INFO))
  assert not keep(_record(f"{site}/orbax/checkpoint/_src/checkpoint_manager.py", logging.WARNING))
  assert not keep(_record(f"{site}/jax/_src/xla_bridge.py", logging.INFO))
  assert keep(_record(f"{site}/jax/_src/xla_bridge.py", logging.WARNING))
  assert keep(_record(f"{site}/orbax/checkpoint/_src/checkpoint_manager.py", logging.ERROR))


def test_an_evaluation_logs_one_line_and_writes_its_table(tmp_path, caplog):
  results = metrics.metrics_from_confusion(np.array([[3, 1], [0, 4]]), ("background", "disc"))
  with caplog.at_level(logging.DEBUG, logger="absl"):
    path = metrics.log_results(results, str(tmp_path), "linear probe")
  text = open(path).read()
  assert text.startswith("linear probe\n") and "background" in text and "disc" in text
  info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
  assert info == [f"linear probe: mIoU {results['miou']:.1f}, mAcc {results['macc']:.1f} "
                  f"(per class: {path})"]
  assert any("background" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_the_summary_names_the_variant_that_was_pretrained():
  assert demo.pretrained_name(demo_config.get_config()) == "cacl pretrained"
  assert demo.pretrained_name(demo_config.get_config("mocov2")) == "mocov2 pretrained"
  assert demo.pretrained_name(demo_config.get_config("two_heads")) == "two_heads pretrained"
