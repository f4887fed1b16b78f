"""cacl_jax: Cycle-Attention Contrastive Learning (Pang et al., AAAI 2022) in JAX/Flax.

Layers, top to bottom (tests/test_layers.py checks that imports only point down):
  entries      main, linear_eval, prepare_data, sweep, convert, propagate: flags → one call
  training/    evaluation/    interop/         the step and its loop; the protocols; torch
  method/      models/        data/            pure losses and queues; networks; inputs
  runtime/                                     mesh, checkpoints, paths, logs, flags, figures
`losses` is the public path of the method's losses; `defaults` lists every config key.
"""
