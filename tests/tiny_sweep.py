"""Config file of the sweep test: tests/tiny.py's pretraining with two Table 1a variants and
a chained, tiny linear probe (so `python -m cacl_jax.sweep` runs end to end in seconds)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import cacl_r18_kinetics  # noqa: E402
import linear_eval_synthetic  # noqa: E402
import tiny  # noqa: E402

VARIANTS = {name: cacl_r18_kinetics.VARIANTS[name] for name in ("cacl", "mocov2")}
PAPER_MIOU = {"cacl": 38.2, "mocov2": 33.2}


def get_config(variant=None):
  c = tiny.get_config()
  c.total_steps, c.checkpoint_every_steps, c.viz_every_steps, c.log_every_steps = 4, 4, 0, 2
  e = linear_eval_synthetic.get_config()
  e.batch_size, e.eval_batch_size, e.num_epochs, e.log_every_steps = 8, 8, 1, 2
  e.data.image_size, e.data.eval_pad_size = 32, (32, 32)
  e.data.synthetic.num_train_images, e.data.synthetic.num_val_images = 16, 8
  e.data.synthetic.frame_size = 32
  c.eval_after = e
  return cacl_r18_kinetics.apply_variant(c, variant or "cacl", VARIANTS, "tiny_sweep.py")
