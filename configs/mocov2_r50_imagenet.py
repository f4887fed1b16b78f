"""MoCo-v2-style ResNet-50 on ImageNet: the initialisation of the R50 IN + Kinetics rows.

  python -m cacl_jax.main --config configs/mocov2_r50_imagenet.py --workdir IN_DIR \
      --config.data.root=IMAGENET_DATA_DIR      # prepared by `prepare_data imagenet`

then configs/cacl_r50_in_kinetics.py[:variant] with --config.model.init_from=IN_DIR. No
variants. The paper loads the public MoCo-v2 ImageNet weights (Chen et al. 2020b, 200 epochs);
this stage trains their equivalent with our trainer: global head alone (loss.weights 1/0/0),
one image per pair (`data.pair_type = 'same_frame'`, s = 0), dilated ResNet-50 at output
stride 8 (dilation adds no parameters, so the weights are those of a plain ResNet-50).

Decisions (what differs from the CACL defaults, and why):
  * MoCo-v2's own contrastive settings: τ = 0.2 and K = 65,536 (the CACL paper's τ = 0.07 and
    K = 16,384 are its Kinetics settings; "a quarter of MoCo" refers to this K).
  * No pixel shuffle: it is a CACL trick (eq. 7) that the MoCo-v2 weights never saw.
  * Length: MoCo-v2's 200 epochs over ImageNet-1k's 1,281,167 train images at batch 512:
    200 · 1,281,167 // 512 = 500,455 steps (`num_epochs` and `batch_size` drive `total_steps`).
  * Kept from the defaults (docs/method.md §5): LARS, lr 1.0 at batch 512 with cosine decay, m = 0.999,
    shuffle-BN over groups of 32, image 224. MoCo-v2 itself used SGD lr 0.03 at batch 256.
  * Mixed precision: `model.dtype = 'auto'` (bfloat16 activations on GPU / TPU, float32 on a
    CPU; parameters, BN statistics and the loss stay float32), as configs/cacl_r18_kinetics.py.
  * Known difference: docs/method.md §1 shares one crop box between the two views of a pair, so on
    images the views differ only in photometry (MoCo-v2 draws two independent crops).
"""
from cacl_jax import defaults

IMAGENET_TRAIN_IMAGES = 1_281_167
NUM_EPOCHS = 200


def get_config(variant=None):
  if variant:
    raise ValueError(f"mocov2_r50_imagenet.py: unknown variant {variant!r}; this config has "
                     "no variants (use configs/mocov2_r50_imagenet.py)")
  c = defaults.pretrain_config()
  c.model.backbone = "resnet50"
  c.model.dtype = "auto"    # bfloat16 activations on GPU / TPU, float32 on a CPU
  c.model.pixel_shuffle = False

  c.data.name = "imagenet"
  c.data.pair_type = "same_frame"
  c.data.frame_stride = 0

  c.loss.weights.update({"global": 1.0, "pixel": 0.0, "cycle": 0.0})
  c.loss.temperature["global"] = 0.2
  c.queue.size = 65_536

  c.num_epochs = NUM_EPOCHS
  # Lazy: recomputed when --config.num_epochs or --config.batch_size is overridden.
  c.total_steps = c.get_ref("num_epochs") * IMAGENET_TRAIN_IMAGES // c.get_ref("batch_size")
  return c
