"""Every pretraining config key, with the paper-scale defaults (docs/method.md §1–§5, §8).

Config files in `configs/` start from `pretrain_config()` and override what their experiment
changes, so an unknown `--config.KEY=VALUE` is rejected by ml_collections with one clear line.
"""
from __future__ import annotations

import ml_collections


def pretrain_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.variant = "cacl"           # the config file's variant (file.py:VARIANT): a label for tables
  c.batch_size = 512            # global: 16 accelerators × 32, as the paper
  c.total_steps = 100_000
  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.viz_every_steps = 5_000     # paper-Fig.-3 affinity PNG in WORKDIR/figures (0 = never)
  c.log_grad_cosines = True     # logging steps: cosines between the heads' backbone gradients
                                # (grad_cosines.py; one extra backward per loss, there only)
  c.eval_after = ml_collections.ConfigDict()  # filled by configs that chain an evaluation (demo)

  # Long runs (docs/reliability.md "Long runs"); none of these changes what a step computes.
  c.allow_fresh_start = False   # True: start at step 0 although checkpoints exist and none restores
  c.max_consecutive_skips = 10  # non-finite steps in a row (each skipped, nonfinite.py) that stop the run
  c.watchdog_seconds = 1800     # no step for this long (after the first): stacks to stderr, exit 3
  c.compilation_cache_dir = "~/.cache/cacl_jax/xla"  # XLA's persistent cache (gs:// too); '' = off;
                                # JAX_COMPILATION_CACHE_DIR in the environment wins
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 0      # > 0: a jax.profiler trace of steps S … S+N-1 in WORKDIR/profile
  c.profile.num_steps = 3       # N
  c.profile.all_processes = False  # False: process 0 alone traces
  c.debug = ml_collections.ConfigDict()   # fault injection, for tests and outside checks
  c.debug.nonfinite_steps = ()  # (K, ...): those steps' loss (and so gradient) is NaN, 1-based
  c.debug.hang_at_step = 0      # K > 0: the loop sleeps forever before step K (the watchdog's test)

  c.data = ml_collections.ConfigDict()
  c.data.name = "kinetics"      # 'synthetic' | 'kinetics' | 'imagenet'
  c.data.root = ""              # prepared data dir (python -m cacl_jax.prepare_data ...)
  c.data.image_size = 224
  c.data.frame_stride = 8       # s, in frames (Table 1b)
  c.data.pair_type = "cross_frame"  # 'cross_frame' | 'same_frame'
  c.data.crop_scale = (0.2, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.num_workers = 8        # grain worker processes per host (0 = in-process)
  c.data.prefetch = 4           # grain per-worker buffer (batches)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_videos = 100_000
  c.data.synthetic.num_frames = 32
  c.data.synthetic.frame_size = 96
  c.data.synthetic.seed = 0
  c.data.synthetic.num_objects = (3, 5)   # objects per video (min, max)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet18"   # 'resnet18' | 'resnet50'
  c.model.width_divisor = 1       # 4 or 8: the narrow CPU variants
  c.model.embed_dim = 128         # D
  c.model.dtype = "float32"       # compute dtype: 'float32' | 'bfloat16' | 'auto' (bf16 on GPU/TPU,
                                  # f32 on CPU); params, BN statistics and losses stay f32
  c.model.pixel_shuffle = True    # eq. 7
  c.model.shuffle_rolls = "shared"  # one roll for v and v+ (README "What the demo shows") | 'independent'
  c.model.padding = "zeros"       # 'zeros' (torchvision, paper) | 'circular' (no position leak)
  c.model.bn_mode = "group"       # 'group' (fixed groups + shuffle-BN for the target) | 'sync'
  c.model.bn_group_size = 32      # the paper's per-GPU batch
  c.model.ema_momentum = 0.999
  c.model.ema_cosine = False      # cosine ramp of m to 1 (BYOL)
  c.model.init_from = ""          # optional: a pretraining workdir whose online backbone starts θo
  c.model.ppm_transform = False   # PixPro's g (a 1×1 linear layer on p) for loss.pixel_loss='pixpro'

  c.loss = ml_collections.ConfigDict()
  c.loss.weights = ml_collections.ConfigDict({"global": 1.0, "pixel": 1.0, "cycle": 1.0})
  c.loss.temperature = ml_collections.ConfigDict({"global": 0.07, "pixel": 0.07, "cycle": 0.07})
  c.loss.pixel_match = "global"   # 'global' (eq. 4) | 'same_position' (Table 1a, pixel head alone)
  c.loss.pixel_negatives = "queue+frame"  # eq. 4's printed {p^i} ∪ p+^m | 'queue' (docs/method.md §3)
  c.loss.global_pool = "before_head"  # g_G(GAP(h)), as MoCo-v2 | 'after_head' l2n(mean g_G(h))
  c.loss.affinity = "global_head"   # A and T from u (paper) | 'backbone': from h (DenseCL; diagnostic)
  c.loss.soft_cycle = True        # the soft cycle trick (KL to the soft target T)
  c.loss.soft_target = "self"     # T: 'self' û ûᵀ | 'cross' û û+ᵀ | 'cycle' (losses.soft_cycle_target)
  c.loss.soft_target_identity = 0.5  # λ: target λ·I + (1−λ)·T (knowledge distillation's mix)
  c.loss.cycle_negatives = False  # Q_C in the cycle path (docs/method.md §3: True; it collapses c, see README)
  # Matmul precision of the losses' large products (queue streams, frame negatives, the cycle's
  # N×N): 'auto' = true float32 on CPUs, TF32 on GPUs, three bfloat16 passes on TPUs, each
  # measured against a float64 reference (README "Accelerator numerics") | 'float32' | 'tf32' |
  # 'bf16_3x' | 'bf16'. The match's affinity and the soft target are always float32.
  c.loss.precision = "auto"
  # The seeds' alternatives (not the paper; docs/CONFIGS.md): the pixel head's loss, eq. 4's
  # 'contrast' or PixPro's 'pixpro' (pixpro.py: T in cell diagonals, γ); debiased negatives
  # (τ⁺ > 0) in L_G and L_P; MoCHi's mixed hard negatives (N̄, s, s') per head (negatives.py).
  c.loss.pixel_loss = "contrast"
  c.loss.pixpro = ml_collections.ConfigDict({"threshold": 1.4, "gamma": 2.0})
  c.loss.debiased_tau_plus = 0.0
  c.loss.mochi_global = (0, 0, 0)
  c.loss.mochi_pixel = (0, 0, 0)

  c.queue = ml_collections.ConfigDict()
  c.queue.size = 16_384           # K
  c.queue.pixels_per_image = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.0           # for base_batch, scaled linearly with batch_size
  c.optim.base_batch = 512
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-6
  c.optim.trust_coefficient = 1e-3
  c.optim.warmup_steps = 0
  return c


def eval_config() -> ml_collections.ConfigDict:
  """Every evaluation (`linear_eval`) key, with the paper's linear protocol (docs/evaluation.md).

  configs/linear_eval_*.py and finetune_cityscapes.py start from this and set the dataset.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = ""                          # pretraining workdir (its checkpoints/ is read)
  c.checkpoint_step = ml_collections.config_dict.placeholder(int)  # None = newest checkpoint
  c.finetune = False                         # True: the whole network trains (Table 4)
  c.finetune_fraction = 1.0                  # share of the train split used when finetune
  c.batch_size = 16                          # global train batch
  c.eval_batch_size = 8                      # global val batch (a multiple of the devices)
  c.num_epochs = 300
  c.learning_rate = 0.6                      # peak, cosine-decayed to 0
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000            # the probe's own checkpoints (WORKDIR/checkpoints);
                                             # also after the last step and on SIGTERM
  c.num_figure_images = 4                    # val samples in the image / GT / prediction grid
  c.protocol = "linear"                      # 'linear' (1×1 conv) | 'cluster' (k-means, no labels)
                                             # | 'retrieval' (nearest-neighbour label transfer)

  c.cluster = ml_collections.ConfigDict()    # protocol='cluster' (evaluation/cluster.py)
  c.cluster.num_clusters = 0                 # k; 0 = the number of classes; more = over-clustering
  c.cluster.fit_pixels = 100_000             # feature cells drawn from the val images to fit k-means
  c.cluster.num_iters = 50                   # Lloyd iterations per restart
  c.cluster.num_restarts = 5                 # k-means++ restarts; the best by total similarity wins

  # protocol='retrieval' (evaluation/retrieval.py): Hummingbird, Balazevic et al. 2023, with the
  # settings of vpariza/open-hummingbird-eval (docs/evaluation.md, "Dense retrieval protocol (Hummingbird)").
  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.memory_size = 10_240_000       # bank cells, 1024·10⁴ (the paper's); 0 = all labelled
  c.retrieval.num_neighbours = 30            # k nearest keys per val cell
  c.retrieval.temperature = 0.02             # softmax temperature over the k cosine similarities
  c.retrieval.augmentation_epochs = 1        # augmented passes over the train split into the memory
  c.retrieval.image_size = 0                 # memory crop side; 0 = data.eval_pad_size's short side
  c.retrieval.block_size = 4096              # query / bank rows per similarity tile (speed, memory)
  c.retrieval.keys_dtype = "float32"         # bank keys: 'float32' | 'bfloat16' (half the bank;
                                             # scores stay float32)
  c.retrieval.max_bank_gib = 0.0             # bank + search budget per device; 0 = the devices'
                                             # reported memory (CPU: host memory / devices)

  c.data = ml_collections.ConfigDict()
  c.data.name = ""                           # 'synthetic' | 'voc' | 'cityscapes'
  c.data.root = ""                           # prepared data (python -m cacl_jax.prepare_data ...)
  c.data.train_split = "train"
  c.data.image_size = 512                    # train crop side
  c.data.scale_range = (0.5, 2.0)            # random scale before the crop
  c.data.eval_pad_size = (512, 512)          # val images are padded (label 255) to this, never resized
  c.data.num_workers = 8
  c.data.prefetch = 2
  return c


def propagation_config() -> ml_collections.ConfigDict:
  """Every `propagate` key: DAVIS-2017 label propagation with CRW's settings (Jabri et al. 2020,
  README of github.com/ajabri/videowalk: --topk 10 --videoLen 20 --radius 12 --temperature 0.05
  --cropSize -1). See cacl_jax/evaluation/propagation.py for the algorithm."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = ""                          # pretraining workdir (or a `convert from-torch` DIR)
  c.checkpoint_step = ml_collections.config_dict.placeholder(int)  # None = newest checkpoint
  c.features = "backbone"                    # 'backbone' (OS8 map) | 'u' | 'p' | 'c' (a head on it)
  c.batch_size = 8                           # frames per feature batch
  c.num_epochs = 0                           # nothing is trained (docs/usage.md §4's evaluation keys)
  c.save_masks = True                        # WORKDIR/masks/<sequence>/<frame>.png
  c.num_figure_sequences = 3                 # overlay figures of the first sequences

  c.propagation = ml_collections.ConfigDict()
  c.propagation.context = 20                 # n: the last n frames besides the first (videoLen)
  c.propagation.topk = 10                    # k
  c.propagation.radius = 12.0                # in feature cells, short-term frames only
  c.propagation.temperature = 0.05           # τ
  c.propagation.query_chunk = 1024           # query cells per affinity block (memory)

  c.data = ml_collections.ConfigDict()
  c.data.name = "davis"
  c.data.root = ""                           # python -m cacl_jax.prepare_data davis --out DATA
  c.data.split = "val"
  c.data.image_size = 0                      # frames' short side for the network; 0 = native 480p
  return c
