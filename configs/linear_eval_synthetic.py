"""Linear protocol on the embedded synthetic segmentation set (the demo's evidence; CPU-sized).

  python -m cacl_jax.linear_eval --config configs/linear_eval_synthetic.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR

Seven classes (background + six shape/texture objects, `cacl_jax.data.synthetic`); train and
val images come from video streams disjoint from the pretraining videos. Same protocol as
the real datasets (frozen backbone, 1×1 conv, SGD momentum 0.9, lr 0.6, wd 0, cosine, scale
/ crop / flip), shortened to 20 epochs of 256 images so that it runs in well under a minute on a CPU.
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
  c.data.eval_pad_size = (64, 64)
  c.data.num_workers = 0
  c.data.synthetic = config_dict.ConfigDict()
  c.data.synthetic.num_train_images = 256
  c.data.synthetic.num_val_images = 128
  c.data.synthetic.frame_size = 64
  c.data.synthetic.seed = 0
  # The demo's supervised reference row (cacl_jax/evaluation/demo.py): the whole network from
  # random init, trained with these labels; the fine-tuning protocol's weight decay, and the
  # learning rate at which end-to-end SGD on 256 images is stable.
  c.supervised = config_dict.ConfigDict({"learning_rate": 0.1, "weight_decay": 1e-4})
  return c
