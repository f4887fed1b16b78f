"""Linear protocol on PASCAL VOC 2012 (docs/evaluation.md; paper Table 3): frozen backbone, 1×1-conv head.

  python -m cacl_jax.linear_eval --config configs/linear_eval_voc.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR --config.data.root=VOC_DATA_DIR

21 classes (background included); the head trains on the train split prepared by
`prepare_data voc` (trainaug, 10,582 images, when SBD was given) for 300 epochs, SGD momentum
0.9, lr 0.6, weight decay 0, cosine; the final head is evaluated once on the 1,449 val images
at full resolution (each padded to 512² with label 255, so nothing is resized). Crop 512²
and batch 16 are our choices; the paper does not give them.
"""
from cacl_jax import defaults


def get_config():
  c = defaults.eval_config()
  c.data.name = "voc"
  c.data.image_size = 512
  c.data.eval_pad_size = (512, 512)         # VOC images are at most 500 on a side
  return c
