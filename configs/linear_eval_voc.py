"""Linear protocol on PASCAL VOC 2012 (SPEC §6; paper Table 3): frozen backbone, 1×1-conv head.

  python -m cacl_jax.linear_eval --config configs/linear_eval_voc.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR --config.data.root=VOC_DATA_DIR

21 classes (background included); the head trains on the train split prepared by
`prepare_data voc` (trainaug, 10,582 images, when SBD was given) for 300 epochs, SGD momentum
0.9, lr 0.6, weight decay 0, cosine; the final head is evaluated once on the 1,449 val images
at full resolution (each padded to 512² with label 255, so nothing is resized). Crop 512²
and batch 16 are our choices; the paper does not give them.
"""
from ml_collections import config_dict


def get_config():
  c = config_dict.ConfigDict()
  c.seed = 0
  c.pretrained = ""
  c.checkpoint_step = config_dict.placeholder(int)
  c.finetune = False
  c.finetune_fraction = 1.0
  c.batch_size = 16
  c.eval_batch_size = 8
  c.num_epochs = 300
  c.learning_rate = 0.6
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.log_every_steps = 100
  c.num_figure_images = 4

  c.data = config_dict.ConfigDict()
  c.data.name = "voc"
  c.data.root = ""
  c.data.train_split = "train"
  c.data.image_size = 512
  c.data.scale_range = (0.5, 2.0)
  c.data.eval_pad_size = (512, 512)         # VOC images are at most 500 on a side
  c.data.num_workers = 8
  c.data.prefetch = 2
  return c
