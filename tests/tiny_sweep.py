"""Config file of the sweep test: tests/tiny.py's pretraining with its chained tiny evaluation
(`tiny.py:eval`, plus a one-step supervised ceiling) and two Table 1a variants, so `python -m cacl_jax.sweep` runs end to end in
seconds and shares the trainer tests' compiled programs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import cacl_r18_kinetics  # noqa: E402
import tiny  # noqa: E402

VARIANTS = {name: cacl_r18_kinetics.VARIANTS[name] for name in ("cacl", "mocov2")}
PAPER_MIOU = {"cacl": 38.2, "mocov2": 33.2}


def get_config(variant=None):
  c = tiny.get_config("eval")
  c.total_steps, c.checkpoint_every_steps, c.viz_every_steps, c.log_every_steps = 4, 4, 0, 2
  # A one-step ceiling, so that the sweep's floor / ceiling rows and criteria run end to end.
  c.eval_after.supervised = type(c)({"num_train_images": 16, "num_epochs": 1,
                                     "learning_rate": 0.1, "weight_decay": 1e-4})
  return cacl_r18_kinetics.apply_variant(c, variant or "cacl", VARIANTS, "tiny_sweep.py")
