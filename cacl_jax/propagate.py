"""DAVIS-2017 label-propagation entry (CRW's protocol, DAVIS' J and F).

  python -m cacl_jax.propagate --config configs/davis_propagation.py --workdir DIR \
      --config.pretrained=RUN --config.data.root=DATA [--config.KEY=VALUE ...]

RUN is a pretraining workdir or a `python -m cacl_jax.convert from-torch` DIR; DATA comes from
`python -m cacl_jax.prepare_data davis`. Writes DIR/results.json (j, f, j_and_f in percent,
per_sequence, per_object, skipped), DIR/masks/ and DIR/figures/ (cacl_jax/evaluation/davis.py).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cacl_jax.runtime import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Propagation config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, masks and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cacl_jax.evaluation import davis  # pylint: disable=g-import-not-at-top
  try:
    results = davis.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"propagate: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"J&F {results['j_and_f']:.1f}  J {results['j']:.1f}  F {results['f']:.1f}  "
        f"({results['num_sequences']} sequences, {results['num_objects']} objects, "
        f"{results['num_skipped']} skipped)")


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.propagate`."""
  app.run(main, flags_parser=cli.parse_flags("propagate"))


if __name__ == "__main__":
  run()
