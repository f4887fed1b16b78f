"""Backbone f + the three heads (paper eq. 2): h = f(v); u, p, c = g_G(h), g_P(h), g_C(h)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cacl_jax.models.heads import Head, PixelDense
from cacl_jax.models.resnet import ResNet, backbone_from_config, pad_blocks, unpad_blocks


class CACL(nn.Module):
  """x: [B, H, W, 3] → {'h': [B,H/8,W/8,C], 'u','p','c': [B,H/8,W/8,D], 'u_gap': [B,1,1,D]}.
  perm (int32 [B], optional): shuffle-BN — BatchNorm groups are formed over x[perm] while the
  samples stay in place (`resnet.GroupBatchNorm`).

  'u_gap' = g_G(GAP(h)): the global head applied to the pooled backbone map, as MoCo-v2 and
  "image-level contrastive learning frameworks" do (`loss.global_pool='before_head'`); the
  per-pixel u = g_G(h) is the same head applied to every pixel. Unused outputs cost nothing
  under jit. The online and the target network are this same module applied with two
  parameter trees.

  With `backbone.layout_blocks` = the number of devices (the train step on a CPU,
  `with_layout_blocks`), the batch is padded with one zero sample per device before the
  network and unpadded after it, so that every real sample is computed bit for bit the same
  whatever the device count (`resnet.pad_blocks`); the parameters are the same.
  """
  backbone: ResNet
  embed_dim: int = 128
  ppm_transform: bool = False   # PixPro's g: a 1×1 linear layer on p, output 'p_value' (pixpro.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, perm: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    blocks = self.backbone.layout_blocks
    h = self.backbone(pad_blocks(x, blocks), train, perm)
    heads = {k: Head(self.embed_dim, self.backbone.dtype, name=f"head_{k.upper()}")
             for k in ("g", "p", "c")}
    u_gap = heads["g"](jnp.mean(h, axis=(1, 2), keepdims=True))
    out = {"h": h, "u": heads["g"](h), "p": heads["p"](h), "c": heads["c"](h), "u_gap": u_gap}
    if self.ppm_transform:
      out["p_value"] = PixelDense(self.embed_dim, self.backbone.dtype, jnp.float32, name="head_PPM")(out["p"])
    return {k: unpad_blocks(v, blocks) for k, v in out.items()}


def with_layout_blocks(model: CACL, blocks: int) -> CACL:
  """The same network (same parameters) computing on a batch split over `blocks` devices."""
  return with_backbone(model, layout_blocks=blocks)


def with_backbone(model: CACL, **fields) -> CACL:
  """The same network (same parameters) with these backbone fields changed."""
  return model.clone(backbone=model.backbone.clone(**fields))


def model_from_config(model_config) -> CACL:
  return CACL(backbone=backbone_from_config(model_config).clone(name="backbone"),
              embed_dim=model_config.get("embed_dim", 128),
              ppm_transform=model_config.get("ppm_transform", False))
