"""Linear protocol on Cityscapes (docs/evaluation.md; paper Tables 1, 2): frozen backbone, 1×1-conv head.

  python -m cacl_jax.linear_eval --config configs/linear_eval_cityscapes.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR --config.data.root=CITYSCAPES_DATA_DIR

19 trainIds; the train split (2,975 images) trains the head for 300 epochs with SGD
(momentum 0.9, lr 0.6, weight decay 0, cosine); the final head is evaluated once on val
(500 images at their full 1024×2048 resolution). The crop side and the batch are not given
in the paper: 768² crops (the usual Cityscapes choice at output stride 8) and 16 images.
"""
from cacl_jax import defaults


def get_config():
  c = defaults.eval_config()
  c.data.name = "cityscapes"
  c.data.image_size = 768                   # train crop side
  c.data.eval_pad_size = (1024, 2048)       # every Cityscapes image is exactly this size
  return c
