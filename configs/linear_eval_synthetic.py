"""Linear protocol on the embedded synthetic segmentation set (the demo's evidence; CPU-sized).

  python -m cacl_jax.linear_eval --config configs/linear_eval_synthetic.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR

Seven classes (background + six shape/texture objects, `cacl_jax.data.synthetic`); train and
val images come from video streams disjoint from the pretraining videos. Same protocol as
the real datasets (frozen backbone, 1×1 conv, SGD momentum 0.9, lr 0.6, wd 0, cosine, scale
/ crop / flip), shortened to 20 epochs of 256 images so that it runs in under a minute on a
CPU: 128 px frames, trained on 64 px crops, evaluated on whole 128 px frames (16×16 feature
cells; an object spans 5-8 of them).

This file, with the world (`synthetic.WORLD`), is the demo's frozen instrument (docs/demo.md):
its figures were measured before any self-supervised run on it (README "What the demo
shows") and it is not changed after seeing how methods order. Doubling the probe's steps and
quadrupling its images leaves the random-init floor where it is (11.7 → 11.7 mIoU, seed 0):
the probe has converged. The `supervised` section is the ceiling (cacl_jax/evaluation/demo.py):
the whole network from random init trained with labels on 9,600 freshly rendered images × 4
epochs (1,200 steps, batch 32): along that schedule the val mIoU reads 54.3 / 57.1 / 61.1 /
62.2 after 300 / 600 / 900 / 1,200 steps (seed 0), where a 600-step schedule ends at 56.2.
"""
from ml_collections import config_dict

from cacl_jax import defaults


def get_config():
  c = defaults.eval_config()
  c.batch_size = 32
  c.eval_batch_size = 32
  c.num_epochs = 20
  c.log_every_steps = 40

  c.data.name = "synthetic"
  c.data.image_size = 64
  c.data.eval_pad_size = (128, 128)
  c.data.num_workers = 0
  c.data.synthetic = config_dict.ConfigDict()
  c.data.synthetic.num_train_images = 256
  c.data.synthetic.num_val_images = 128
  c.data.synthetic.frame_size = 128
  c.data.synthetic.seed = 0
  # The demo's ceiling (cacl_jax/evaluation/demo.py): the same backbone from random init trained
  # end to end with labels (the fine-tuning protocol's weight decay; the learning rate at which
  # end-to-end SGD is stable); its own train images, rendered on the fly; num_epochs 0 skips it.
  c.supervised = config_dict.ConfigDict({"num_train_images": 9600, "num_epochs": 4,
                                         "learning_rate": 0.1, "weight_decay": 1e-4})
  return c
