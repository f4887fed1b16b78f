"""Linear protocol on Cityscapes (SPEC §6; paper Tables 1, 2): frozen backbone, 1×1-conv head.

  python -m cacl_jax.linear_eval --config configs/linear_eval_cityscapes.py \
      --workdir DIR --config.pretrained=PRETRAIN_DIR --config.data.root=CITYSCAPES_DATA_DIR

19 trainIds; the train split (2,975 images) trains the head for 300 epochs with SGD
(momentum 0.9, lr 0.6, weight decay 0, cosine); the final head is evaluated once on val
(500 images at their full 1024×2048 resolution). The crop side and the batch are not given
in the paper: 768² crops (the usual Cityscapes choice at output stride 8) and 16 images.
"""
from ml_collections import config_dict


def get_config():
  c = config_dict.ConfigDict()
  c.seed = 0
  c.pretrained = ""                         # pretraining workdir (its checkpoints/ is read)
  c.checkpoint_step = config_dict.placeholder(int)   # None = newest checkpoint
  c.finetune = False                        # True: the whole network trains (Table 4)
  c.finetune_fraction = 1.0                 # share of the train split used when finetune
  c.batch_size = 16                         # global train batch
  c.eval_batch_size = 8                     # global val batch (a multiple of the devices)
  c.num_epochs = 300
  c.learning_rate = 0.6                     # peak, cosine-decayed to 0
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.log_every_steps = 100
  c.num_figure_images = 4                   # val samples in the image / GT / prediction grid

  c.data = config_dict.ConfigDict()
  c.data.name = "cityscapes"
  c.data.root = ""                          # prepared Cityscapes (prepare_data cityscapes)
  c.data.train_split = "train"
  c.data.image_size = 768                   # train crop side
  c.data.scale_range = (0.5, 2.0)
  c.data.eval_pad_size = (1024, 2048)       # every Cityscapes image is exactly this size
  c.data.num_workers = 8
  c.data.prefetch = 2
  return c
