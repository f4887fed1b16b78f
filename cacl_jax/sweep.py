"""Variants × seeds of pretraining + evaluation, summarised in one table (any ablation).

    python -m cacl_jax.sweep --config configs/demo.py --variants cacl,two_heads,mocov2 \
        --seeds 0,1,2 --workdir DIR [--config.KEY=VALUE ...]

The work (and the description of what a sweep writes) is in `cacl_jax.evaluation.sweep`.
"""
from absl import app

from cacl_jax.evaluation import sweep
from cacl_jax.runtime import cli


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.sweep`."""
  app.run(sweep.main, flags_parser=cli.parse_flags("sweep"))


if __name__ == "__main__":
  run()
