"""The three CACL projection heads g_G, g_P, g_C (SPEC §2; paper "Network structure").

Each head is a pixel-wise MLP: Conv1×1(C→C, bias) → ReLU → Conv1×1(C→D, bias), no BatchNorm.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Head(nn.Module):
  """h: [B, h, w, C] → [B, h, w, D]."""
  embed_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    c = h.shape[-1]
    x = nn.Conv(c, (1, 1), use_bias=True, dtype=self.dtype, name="fc1")(h)
    x = nn.relu(x)
    return nn.Conv(self.embed_dim, (1, 1), use_bias=True, dtype=self.dtype, name="fc2")(x)
