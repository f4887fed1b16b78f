"""Limited-sample fine-tuning on Cityscapes (docs/evaluation.md; paper Table 4): the whole network trains.

  python -m cacl_jax.linear_eval --config configs/finetune_cityscapes.py:10pct \
      --workdir DIR --config.pretrained=PRETRAIN_DIR --config.data.root=CITYSCAPES_DATA_DIR

Variants: '1pct', '5pct', '10pct', '100pct' (default '10pct') — the share of the 2,975 train
images, drawn with `seed` (nested: the 1% subset is inside the 5% subset, and so on); the
chosen ids are written to DIR/finetune_ids.txt. Paper: ResNet-18 pretrained on Kinetics,
1000 epochs at lr 0.3 (SGD momentum 0.9, cosine). Not in the paper, our choices: weight
decay 1e-4 on conv kernels (the usual segmentation fine-tuning value), BatchNorm in training
mode with statistics over the whole global batch (SyncBN), 768² crops, batch 16.
"""
import os
import sys

# The linear config next to this file is the base (config_flags loads files by path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_eval_cityscapes  # noqa: E402  pylint: disable=g-import-not-at-top

FRACTIONS = {"1pct": 0.01, "5pct": 0.05, "10pct": 0.10, "100pct": 1.0}


def get_config(arg: str = "10pct"):
  if arg not in FRACTIONS:
    raise ValueError(f"finetune_cityscapes variant must be one of {sorted(FRACTIONS)}, got {arg!r}")
  c = linear_eval_cityscapes.get_config()
  c.finetune = True
  c.finetune_fraction = FRACTIONS[arg]
  c.num_epochs = 1000
  c.learning_rate = 0.3
  c.weight_decay = 1e-4
  c.log_every_steps = 50
  return c
