"""The three CACL projection heads g_G, g_P, g_C (docs/method.md §2; paper "Network structure").

Each head is a pixel-wise MLP: Conv1×1(C→C, bias) → ReLU → Conv1×1(C→D, bias), no BatchNorm.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PixelDense(nn.Module):
  """A 1×1 convolution computed as a matmul over the channel axis: [..., C] → [..., features].

  Same parameters as `nn.Conv(features, (1, 1))` (kernel [1, 1, C, features], lecun-normal;
  bias zeros), so checkpoints and the torch layout are unchanged; as a dot it needs none of the
  layout transposes XLA:CPU puts around a convolution (3 % of the R18 step at 224 px).
  """
  features: int
  dtype: Any = jnp.float32
  out_dtype: Any = None   # the result's dtype (default: `dtype`); the product accumulates in it

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    out = self.out_dtype or self.dtype
    return jnp.einsum("...c,cf->...f", x, kernel[0, 0], preferred_element_type=out) + bias.astype(out)


class Head(nn.Module):
  """h: [B, h, w, C] → [B, h, w, D] float32, whatever the compute dtype.

  The last product accumulates and returns float32: the head's outputs feed the losses (float32,
  docs/method.md §3) and the argmax of the match m(i), where bfloat16 outputs would round nearly equal
  similarities to ties (which go to the lowest j: a top-left bias on accelerators only).
  """
  embed_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    x = PixelDense(h.shape[-1], dtype=self.dtype, name="fc1")(h)
    x = nn.relu(x)
    return PixelDense(self.embed_dim, dtype=self.dtype, out_dtype=jnp.float32, name="fc2")(x)
