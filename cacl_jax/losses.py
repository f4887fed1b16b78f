"""The CACL losses (Pang et al., AAAI 2022, eqs. 3–6): the public path.

    from cacl_jax import losses
    losses.global_loss(u, u_pos, queue, 0.07)       # L_G, MoCo-v2's InfoNCE on pooled maps
    losses.pixel_loss(p, p_pos, u, u_pos, queue, 0.07)   # L_P, the matched-pixel contrast
    losses.cycle_loss(c, c_pos, queue, 0.07)        # L_C, the cycle-attention contrast

Users' scripts and outside checks import the losses from here; the math, with shapes and
equation numbers, lives in `cacl_jax.method.losses` (and its kernels in `method.loss_kernels`).
"""
from cacl_jax.method.losses import (AUTO_PRECISION, PIXEL_NEGATIVES, SOFT_TARGETS,
                                    cycle_back_accuracy, cycle_loss, global_key, global_loss,
                                    global_match, l2n, loss_precision, pixel_loss,
                                    soft_cycle_target)

__all__ = ["AUTO_PRECISION", "PIXEL_NEGATIVES", "SOFT_TARGETS", "cycle_back_accuracy",
           "cycle_loss", "global_key", "global_loss", "global_match", "l2n", "loss_precision",
           "pixel_loss", "soft_cycle_target"]
