"""Turns raw datasets into TFDS ArrayRecord datasets that training reads with grain.

  python -m cacl_jax.prepare_data {kinetics|imagenet|voc|cityscapes|davis} --src RAW --out DATA

The work is done by `cacl_jax.data.prepare`.
"""
import sys

from cacl_jax.data import prepare


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.prepare_data`."""
  # TFDS warns through absl that the (not yet written) output has no dataset_info.json.
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    prepare.main()
  except (FileNotFoundError, ValueError) as e:
    # Bad input is the user's to fix: one line, no traceback.
    print(f"prepare_data: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    # Disk full, quota, a file system gone: finished work is cached; the rerun resumes.
    print(f"prepare_data: error: {e}; the work done so far is kept in --out/.cache: fix this "
          "and rerun the same command to resume", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
