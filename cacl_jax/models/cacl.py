"""Backbone f + the three heads (paper eq. 2): h = f(v); u, p, c = g_G(h), g_P(h), g_C(h)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cacl_jax.models.heads import Head, PixelDense
from cacl_jax.models.resnet import ResNet, backbone_from_config


class CACL(nn.Module):
  """x: [B, H, W, 3] → {'h': [B,H/8,W/8,C], 'u','p','c': [B,H/8,W/8,D], 'u_gap': [B,1,1,D]}.
  perm (int32 [B], optional): shuffle-BN — BatchNorm groups are formed over x[perm] while the
  samples stay in place (`resnet.GroupBatchNorm`).

  'u_gap' = g_G(GAP(h)): the global head applied to the pooled backbone map, as MoCo-v2 and
  "image-level contrastive learning frameworks" do (`loss.global_pool='before_head'`); the
  per-pixel u = g_G(h) is the same head applied to every pixel. Unused outputs cost nothing
  under jit. The online and the target network are this same module applied with two
  parameter trees.
  """
  backbone: ResNet
  embed_dim: int = 128
  ppm_transform: bool = False   # PixPro's g: a 1×1 linear layer on p, output 'p_value' (pixpro.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, perm: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    h = self.backbone(x, train, perm)
    heads = {k: Head(self.embed_dim, self.backbone.dtype, name=f"head_{k.upper()}")
             for k in ("g", "p", "c")}
    u_gap = heads["g"](jnp.mean(h, axis=(1, 2), keepdims=True))
    out = {"h": h, "u": heads["g"](h), "p": heads["p"](h), "c": heads["c"](h), "u_gap": u_gap}
    if self.ppm_transform:
      out["p_value"] = PixelDense(self.embed_dim, self.backbone.dtype, jnp.float32, name="head_PPM")(out["p"])
    return out


def model_from_config(model_config) -> CACL:
  return CACL(backbone=backbone_from_config(model_config).clone(name="backbone"),
              embed_dim=model_config.get("embed_dim", 128),
              ppm_transform=model_config.get("ppm_transform", False))
