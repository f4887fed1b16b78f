"""The embedded demo: CACL on synthetic videos, then the linear probe, on a CPU in minutes.

  python -m cacl_jax.main --config configs/demo.py --workdir /tmp/cacl_demo

Pretrains a ⅛-width dilated ResNet-18 on 64×64 crops of 128×128 frame pairs of the
in-process synthetic video set (`cacl_jax.data.synthetic`: six shape-and-texture object
classes over panning textured backgrounds, no download), with all three heads, pixel shuffle,
shuffle-BN and the queues; then runs the linear protocol (configs/linear_eval_synthetic.py,
whole 128 px frames) on the synthetic segmentation set for the pretrained backbone, for a
randomly initialised one (the floor) and for the same backbone trained with labels (the
ceiling), and prints them in one table (WORKDIR/linear_eval/results.json).

What is scaled down from the paper, and why: width ÷8, 64 px crops, batch 32, K = 2048 and
500 steps fit a 2-core CPU; a short run needs a larger learning rate (LARS lr 2.0 instead of
1.0·32/512), a warm-up, and a faster EMA (m = 0.99) so that the target follows within the run;
circular padding, because at 8×8 every feature cell touches the border. Evaluating at twice
the pretraining resolution follows the usual practice (MoCo-v2's 224 px crops, the
segmentation benchmarks' 512-1024 px images).
"""
import os
import sys

from cacl_jax import defaults

# The synthetic evaluation config next to this file is chained after pretraining
# (config_flags loads files by path, so the folder is put on the path, as the other configs do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cacl_r18_kinetics  # noqa: E402  pylint: disable=g-import-not-at-top
import linear_eval_synthetic  # noqa: E402  pylint: disable=g-import-not-at-top

# Table 1a's head combinations, as in the paper-scale config (`demo.py:VARIANT`).
TABLE_1A = ("cacl", "two_heads", "mocov2", "pixel_only", "global_cycle")
# The seeds' pixel-level alternatives (not the paper), as in the paper-scale config; MoCHi's
# sizes follow the demo's queue (K = 2048 instead of 16384).
ALTERNATIVES = {**cacl_r18_kinetics.ALTERNATIVES,
                "mochi": {"loss.mochi_global": (256, 256, 32), "loss.mochi_pixel": (64, 16, 4)}}
# A diagnostic (not the paper): CACL with pixel_only's match (README "What the demo shows").
DIAGNOSTICS = ("cacl_same_position",)
VARIANTS = {**{name: cacl_r18_kinetics.VARIANTS[name] for name in TABLE_1A + DIAGNOSTICS},
            **ALTERNATIVES}
# The paper's Cityscapes linear mIoU for those rows (ResNet-18, Table 1a); `sweep` prints
# them beside the demo's numbers: the ordering is what the demo can reproduce, not the values.
PAPER_MIOU = {"cacl": 38.2, "two_heads": 35.9, "mocov2": 33.2, "pixel_only": 28.7,
              "global_cycle": 34.3}


def get_config(variant=None):
  c = defaults.pretrain_config()
  c.seed = 0
  c.batch_size = 32
  c.total_steps = 500
  c.checkpoint_every_steps = 250
  c.log_every_steps = 50
  c.viz_every_steps = 250

  c.data.name = "synthetic"
  c.data.image_size = 64
  c.data.frame_stride = 4
  c.data.num_workers = 0   # grain worker processes take seconds to spawn; the demo is compute-bound
  c.data.prefetch = 2
  c.data.synthetic.num_videos = 4096
  c.data.synthetic.num_frames = 24
  c.data.synthetic.frame_size = 128   # the probe's frames: objects at the scale it sees

  c.model.backbone = "resnet18"
  c.model.width_divisor = 8
  c.model.bn_group_size = 8
  c.model.ema_momentum = 0.99
  # 64 px gives an 8×8 map in which every cell reads the dilated convs' zero padding: features
  # then encode the position relative to the border, which pixel shuffle only moves around.
  # Circular padding makes the network exactly roll-equivariant (README "What the demo shows").
  c.model.padding = "circular"

  c.queue.size = 2048

  c.optim.base_lr = 32.0   # → lr 2.0 at batch 32
  c.optim.warmup_steps = 50

  c.eval_after = linear_eval_synthetic.get_config()
  return cacl_r18_kinetics.apply_variant(c, variant or "cacl", VARIANTS, "demo.py")
