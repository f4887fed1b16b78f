"""Learning curves of variants × seeds on the frozen instrument (docs/demo.md "Longer runs").

    python -m cacl_jax.curves --config configs/demo.py \
        --variants cacl,mocov2,two_heads,pixel_only --seeds 0,1 --workdir DIR

The work (and what it writes) is in `cacl_jax.evaluation.curves`; rerun the same command to
resume.
"""
from absl import app, flags

from cacl_jax.runtime import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Pretraining config file whose variants are run, e.g. "
                    "configs/demo.py (it must chain an evaluation, `eval_after`).")
flags.DEFINE_string("workdir", None, "Directory of the runs, curves.json and curves.png.")
flags.DEFINE_list("variants", None, "Variant names of the config file.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")
flags.DEFINE_integer("long_steps", 10_000, "Steps of the long runs (their schedule's length).")
flags.DEFINE_list("eval_steps", ["500", "2000", "5000", "10000"], "Long runs' evaluated steps.")
flags.DEFINE_integer("short_steps", 2_000, "Steps of the short runs (own schedule); 0 = none.")
flags.DEFINE_integer("checkpoint_every", 500, "Checkpoint interval of every run.")
flags.DEFINE_string("reference", "mocov2", "Variant that the paired differences are taken to.")
flags.DEFINE_multi_string("override", [], "KEY=VALUE for every pretraining (repeatable).")
flags.mark_flags_as_required(["config", "workdir", "variants"])


def main(argv):
  del argv
  import sys  # pylint: disable=g-import-not-at-top
  from cacl_jax.evaluation import curves  # pylint: disable=g-import-not-at-top
  try:
    seeds = [int(s) for s in FLAGS.seeds]
    eval_steps = [int(s) for s in FLAGS.eval_steps]
  except ValueError:
    sys.exit("curves: error: --seeds and --eval_steps must be integers")
  module = cli.load_config_module(FLAGS.config)

  def load(variant):
    try:
      return module.get_config(variant)
    except (ValueError, KeyError, TypeError) as e:
      sys.exit(f"curves: error: {FLAGS.config}:{variant}: {e}")

  curves.main(FLAGS.config, FLAGS.variants, seeds, FLAGS.workdir, FLAGS.long_steps, eval_steps,
              FLAGS.short_steps, FLAGS.checkpoint_every, FLAGS.reference,
              [f"--config.{kv}" for kv in FLAGS.override],
              " ".join(["python -m cacl_jax.curves", *sys.argv[1:]]), load)


def run() -> None:
  """The console script's entry (pyproject.toml): the same as `python -m cacl_jax.curves`."""
  app.run(main, flags_parser=cli.parse_flags("curves"))


if __name__ == "__main__":
  run()
