"""CACL, ResNet-18, pretrained on Kinetics-400 (paper Tables 1a/1b/1c, 2, 4: the R18 rows).

  python -m cacl_jax.main --config configs/cacl_r18_kinetics.py --workdir DIR \
      --config.data.root=KINETICS_DATA_DIR                       # CACL, Table 2: 38.2 mIoU
  python -m cacl_jax.main --config configs/cacl_r18_kinetics.py:mocov2 --workdir DIR \
      --config.data.root=KINETICS_DATA_DIR                       # a variant (file.py:variant)

then the linear protocol on the run (configs/linear_eval_cityscapes.py, --config.pretrained=DIR)
or limited-sample fine-tuning (configs/finetune_cityscapes.py:1pct ...). docs/CONFIGS.md maps
every paper row to its command.

Variants (default 'cacl'; each changes only the keys listed, the rest is the CACL setting):
  Table 1a (heads):
    mocov2        global head alone (MoCo-v2 on frame pairs)     loss.weights = 1/0/0
    two_heads     global + pixel heads                           loss.weights = 1/1/0
    pixel_only    pixel head alone, positive = same position     loss.weights = 0/1/0,
                                                                 loss.pixel_match = same_position
    global_cycle  global + cycle-attention heads                 loss.weights = 1/0/1
    cacl          all three heads (the paper's CACL)             (the defaults)
  Table 1b (positive pairs; "cross video frames" = the global-head setting on frame pairs,
  "decide by global head" = 2 heads, "+ cycle-attention head" = CACL):
    same_frame                  global head, only augmentation   data.pair_type = same_frame, s = 0
    cross_frame_s2 / _s4 / _s8  global head, frames t, t+s       data.frame_stride = s
    global_match_s4 / _s8       2 heads at stride s
    cacl_s4 / cacl_s8           CACL at stride s (cacl_s8 = cacl)
  Table 1c (key elements):
    simple              no pixel shuffle, hard cycle             model.pixel_shuffle = False,
                                                                 loss.soft_cycle = False
    no_soft_cycle       + pixel shuffle, hard cycle              loss.soft_cycle = False
    with_cycle_negatives  CACL with Q_C in the cycle (eqs. 5-6 as printed; docs/method.md §3)
  The seeds' pixel-level alternatives (seed 001; not the paper, each one change from CACL;
  docs/CONFIGS.md quotes their papers):
    pixpro      the pixel head's loss is PixPro's pixel-to-propagation consistency: positives
                = every cell within 1.4 cell diagonals of m(i), no negatives
                                                                 loss.pixel_loss = pixpro,
                                                                 model.ppm_transform = True
    debiased    debiased negatives in L_G and L_P (Chuang et al. 2020), class prior τ⁺ = 0.1
                                                                 loss.debiased_tau_plus = 0.1
    mochi       hard negative mixing (Kalantidis et al. 2020) from Q_G and Q_P
                                                                 loss.mochi_global, loss.mochi_pixel
  A diagnostic (not the paper; README "What the demo shows"):
    cacl_same_position  CACL whose pixel head takes the same position of v+ as the positive
                        (pixel_only's match) instead of u's affinity (eq. 4)
                                                                 loss.pixel_match = same_position
  The first build's readings (docs/method.md §3 before §9; every head collapses, README "What the demo
  shows"):
    spec3_readings      GAP after g_G, queue-only pixel negatives, T = û û+ᵀ, no identity
                        mix, Q_C in the cycle, independent shuffle rolls

Decisions (the paper is silent):
  * Training length: 200 epochs of one pair per video (the paper's "for each video we randomly
    choose one pair of frames") over the paper's 240k Kinetics-400 train videos at batch 512:
    200 · 240,000 / 512 = 93,750 steps. `num_epochs` is an ordinary key, and `total_steps`
    follows both it and `batch_size` (an ml_collections reference), so `--config.batch_size=1024`
    still trains 200 epochs; `--config.total_steps=N` sets the length directly.
  * Every variant keeps pixel shuffle (eq. 7) except `simple`: the ablations change one
    factor at a time from the CACL setting, and with weights of 0 the unused heads cost
    nothing in the loss.
  * LARS lr 1.0 at batch 512 with cosine decay, no warm-up, m = 0.999, K = 16384, τ = 0.07,
    image 224, shuffle-BN over groups of 32: the paper's settings (cacl_jax.defaults).
  * Mixed precision (the paper does not say): `model.dtype = 'auto'`
    runs the convolutions and heads in bfloat16 on GPUs and TPUs (parameters, BN statistics and
    all losses stay float32) and in float32 on a CPU. `--config.model.dtype=float32` for float32.
"""
from cacl_jax import defaults

KINETICS_TRAIN_VIDEOS = 240_000   # paper, "Dataset": 240k training videos
NUM_EPOCHS = 200

# Overrides per variant, as dotted key → value. A variant sets exactly these keys.
_MOCOV2 = {"loss.weights.global": 1.0, "loss.weights.pixel": 0.0, "loss.weights.cycle": 0.0}
_TWO_HEADS = {"loss.weights.global": 1.0, "loss.weights.pixel": 1.0, "loss.weights.cycle": 0.0}
_CACL = {}
# The seeds' alternatives (cacl_jax/method/pixpro.py, cacl_jax/method/negatives.py). τ⁺ = 0.1: the value
# Chuang et al.'s code uses for ImageNet-scale class counts. MoCHi (N̄, s, s'): N̄ hardest of
# the queue, s negatives mixed from pairs of them, s' from the query and one of them; for L_P,
# fewer per pixel (its [B·N, s + s', D] synthetic block is per pixel).
ALTERNATIVES = {
    "pixpro": {"loss.pixel_loss": "pixpro", "model.ppm_transform": True},
    "debiased": {"loss.debiased_tau_plus": 0.1},
    "mochi": {"loss.mochi_global": (1024, 1024, 128), "loss.mochi_pixel": (256, 32, 8)},
}
# The readings docs/method.md §3 first decided; the defaults now read the paper as README "What the demo
# shows" explains (cacl_jax.defaults).
SPEC3_READINGS = {"loss.global_pool": "after_head", "loss.pixel_negatives": "queue",
                  "loss.soft_target": "cross", "loss.soft_target_identity": 0.0,
                  "loss.cycle_negatives": True, "model.shuffle_rolls": "independent"}

VARIANTS = {
    # Table 1a
    "mocov2": _MOCOV2,
    "two_heads": _TWO_HEADS,
    "pixel_only": {"loss.weights.global": 0.0, "loss.weights.pixel": 1.0, "loss.weights.cycle": 0.0,
                   "loss.pixel_match": "same_position"},
    "global_cycle": {"loss.weights.global": 1.0, "loss.weights.pixel": 0.0, "loss.weights.cycle": 1.0},
    "cacl": _CACL,
    # Table 1b
    "same_frame": {**_MOCOV2, "data.pair_type": "same_frame", "data.frame_stride": 0},
    "cross_frame_s2": {**_MOCOV2, "data.frame_stride": 2},
    "cross_frame_s4": {**_MOCOV2, "data.frame_stride": 4},
    "cross_frame_s8": {**_MOCOV2, "data.frame_stride": 8},
    "global_match_s4": {**_TWO_HEADS, "data.frame_stride": 4},
    "global_match_s8": {**_TWO_HEADS, "data.frame_stride": 8},
    "cacl_s4": {**_CACL, "data.frame_stride": 4},
    "cacl_s8": {**_CACL, "data.frame_stride": 8},
    # Table 1c
    "simple": {"model.pixel_shuffle": False, "loss.soft_cycle": False},
    "no_soft_cycle": {"loss.soft_cycle": False},
    "with_cycle_negatives": {"loss.cycle_negatives": True},
    # The seeds' alternatives
    **ALTERNATIVES,
    # A diagnostic: is eq. 4's positive, chosen by u's affinity, what the pixel head lacks?
    "cacl_same_position": {"loss.pixel_match": "same_position"},
    # docs/method.md §3 as first built
    "spec3_readings": SPEC3_READINGS,
}


def apply_variant(config, variant: str, variants: dict, filename: str):
  """Sets the dotted keys of `variants[variant]` on `config`; unknown name → ValueError."""
  if variant not in variants:
    raise ValueError(f"{filename}: unknown variant {variant!r}; valid variants: "
                     f"{', '.join(variants)}")
  for dotted, value in variants[variant].items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:   # a typo here would silently add a key the trainer never reads
      raise KeyError(f"{filename}: variant {variant!r} sets unknown key {dotted!r}")
    node[leaf] = value
  config.variant = variant
  return config


def kinetics_config(backbone: str):
  """The paper's Kinetics-400 pretraining setting for `backbone`, CACL with all three heads."""
  c = defaults.pretrain_config()
  c.model.backbone = backbone
  c.model.dtype = "auto"    # bfloat16 activations on GPU / TPU, float32 on a CPU
  c.data.name = "kinetics"
  c.data.pair_type = "cross_frame"
  c.data.frame_stride = 8   # "we randomly choose one pair of frames with stride 8"
  c.num_epochs = NUM_EPOCHS
  # Lazy: recomputed when --config.num_epochs or --config.batch_size is overridden.
  c.total_steps = c.get_ref("num_epochs") * KINETICS_TRAIN_VIDEOS // c.get_ref("batch_size")
  return c


def get_config(variant=None):
  variant = variant or "cacl"
  return apply_variant(kinetics_config("resnet18"), variant, VARIANTS, "cacl_r18_kinetics.py")
