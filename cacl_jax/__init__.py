"""cacl_jax: Cycle-Attention Contrastive Learning (Pang et al., AAAI 2022) in JAX/Flax."""
