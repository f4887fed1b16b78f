"""Training: the train state, the pure step and its jit over the mesh, the optimiser and
schedules, the pretraining loop, its diagnostics, and the CPU-only compiler workarounds."""
