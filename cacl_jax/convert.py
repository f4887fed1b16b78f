"""PyTorch ResNet weights ⇄ this project's pretraining workdirs.

  python -m cacl_jax.convert from-torch --src FILE.pth[.tar] --arch resnet50 --out DIR
  python -m cacl_jax.convert to-torch --workdir RUN [--step S] --out backbone.pth

The work is done by `cacl_jax.interop.convert`.
"""
import sys

from cacl_jax.interop import convert


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.convert`."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)   # Orbax's per-save info lines
  try:
    convert.main()
  except convert.ConvertError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
