"""The demo's comparison at the scale one GPU reaches in minutes (issue 24, part 6).

  benchmarks/gpu_sweep_h200.sh           # cacl and mocov2, seeds 0 and 1, via cacl_jax.sweep
  python -m cacl_jax.main --config configs/demo_gpu.py:mocov2 --workdir DIR

configs/demo.py — the same synthetic world, variants, recipe (batch 32, LARS lr 2.0, warm-up 50,
EMA 0.99, K = 2048, circular padding) and the same frozen probe chained after pretraining
(`eval_after`: linear, cluster and retrieval protocols, floor and ceiling) — with what the 2-core
CPU cannot afford: a full-width ResNet-18 (not ⅛), pretrained on 128 px crops (not 64) for
5,000 steps (not 500), computing in bfloat16 on the accelerator (`model.dtype='auto'`; float32
on a CPU). Evidence at a larger scale on the same world, not a claim about the paper's datasets.

The host renders the synthetic frames (~165 pairs/s per core, README "Speed and memory"): one
process cannot feed 5,000 steps of 32 pairs in minutes, so pretraining and the chained
evaluation (the ceiling renders 9,600 images × 4 epochs) read through 12 grain workers — a
loader setting; the probe's data, schedule and world are the frozen ones.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  pylint: disable=g-import-not-at-top

VARIANTS = demo.VARIANTS
PAPER_MIOU = demo.PAPER_MIOU


def get_config(variant=None):
  c = demo.get_config(variant)
  c.model.width_divisor = 1
  c.model.dtype = "auto"
  c.data.image_size = 128
  c.data.num_workers = 12
  c.data.prefetch = 4
  c.eval_after.data.num_workers = 12
  c.total_steps = 5000
  c.checkpoint_every_steps = 5000   # the evaluation reads the last step; no time spent saving others
  c.log_every_steps = 100
  c.viz_every_steps = 0
  return c
