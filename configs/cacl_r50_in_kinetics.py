"""CACL, ResNet-50, ImageNet MoCo-v2 init then Kinetics-400 (paper Tables 1a, 1c, 2, 3: R50 rows).

Two stages. The paper starts from the public MoCo-v2 ImageNet weights; we train that stage
ourselves with configs/mocov2_r50_imagenet.py, then point `model.init_from` at its workdir:

  python -m cacl_jax.main --config configs/mocov2_r50_imagenet.py --workdir IN_DIR \
      --config.data.root=IMAGENET_DATA_DIR
  python -m cacl_jax.main --config configs/cacl_r50_in_kinetics.py --workdir DIR \
      --config.data.root=KINETICS_DATA_DIR --config.model.init_from=IN_DIR     # CACL: 49.1 mIoU
  python -m cacl_jax.main --config configs/cacl_r50_in_kinetics.py:mocov2 --workdir DIR \
      --config.data.root=KINETICS_DATA_DIR --config.model.init_from=IN_DIR     # a variant

`model.init_from` (a pretraining workdir) starts the online and target backbones and their BN
statistics from that run's newest checkpoint; heads, queues and optimiser start fresh. It is
read only when DIR holds no checkpoint yet (a resumed run restores its own state). Left
empty, the run starts from random weights: that is not the paper's IN + Kinetics setting.
Evaluate with configs/linear_eval_cityscapes.py or configs/linear_eval_voc.py
(--config.pretrained=DIR); docs/CONFIGS.md maps every paper row to its command.

Variants (default 'cacl'; the same overrides as configs/cacl_r18_kinetics.py):
  mocov2         global head alone                   loss.weights = 1/0/0   (Tables 1a, 2, 3)
  two_heads      global + pixel heads                loss.weights = 1/1/0   (Tables 1a, 2)
  cacl           all three heads                     (the defaults)         (Tables 1a, 1c, 2, 3)
  simple         no pixel shuffle, hard cycle        model.pixel_shuffle = False,
                                                     loss.soft_cycle = False (Table 1c)
  no_soft_cycle  + pixel shuffle, hard cycle         loss.soft_cycle = False (Table 1c)

Decisions: the Kinetics stage has the same length as the R18 runs (200 epochs of one pair per
video, 93,750 steps at batch 512; `num_epochs` and `batch_size` drive `total_steps`), so the
R18 and R50 rows differ only in the backbone and its initialisation.
"""
import os
import sys

# The R18 file next to this one holds the shared Kinetics setting and the variant table
# (config_flags loads config files by path, so the directory is not importable by itself).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cacl_r18_kinetics  # noqa: E402  pylint: disable=g-import-not-at-top

VARIANTS = {name: cacl_r18_kinetics.VARIANTS[name]
            for name in ("mocov2", "two_heads", "cacl", "simple", "no_soft_cycle")}


def get_config(variant=None):
  variant = variant or "cacl"
  c = cacl_r18_kinetics.kinetics_config("resnet50")
  c.model.init_from = ""   # set to the workdir of configs/mocov2_r50_imagenet.py (see above)
  return cacl_r18_kinetics.apply_variant(c, variant, VARIANTS, "cacl_r50_in_kinetics.py")
