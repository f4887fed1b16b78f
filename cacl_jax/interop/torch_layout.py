"""torchvision ResNet state dicts ⇄ this project's flax backbone trees: the pure key map.

`cacl_jax.models.resnet` names its modules after torchvision's, so the map is mechanical:
flax `layer3_0/conv2/kernel` [kh, kw, in, out] ↔ torch `layer3.0.conv2.weight`
[out, in, kh, kw]; `downsample_conv` / `downsample_bn` ↔ `downsample.0` / `downsample.1`; BN
`scale, bias` (params) and `mean, var` (batch_stats) ↔ `weight, bias, running_mean,
running_var`. Values are float32 numpy arrays; both directions are exact. No torch needed
(`cacl_jax.convert` reads and writes the files).
"""
from __future__ import annotations

import collections
import re
from typing import Any, Mapping

import numpy as np

ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
# Where a ResNet may sit inside a checkpoint's state dict, tried in this order.
PREFIXES = ("module.encoder_q.", "encoder_q.", "module.", "backbone.", "encoder.", "")
# flax leaf ↔ torch leaf; kernels are transposed HWIO ↔ OIHW.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_SUBMODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


class LayoutError(ValueError):
  """A state dict that is not the ResNet asked for (one line for the user)."""



def template(arch: str, width_divisor: int = 1) -> tuple[dict, dict]:
  """(params, batch_stats) of the flax backbone as ShapeDtypeStruct trees, in module order."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cacl_jax.models import resnet  # pylint: disable=g-import-not-at-top
  net = resnet.ResNet(depth=int(arch[len("resnet"):]), width_divisor=width_divisor)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), False))
  return shapes["params"], shapes["batch_stats"]


def torch_key(path: tuple[str, ...]) -> str:
  """('layer3_0', 'downsample_bn', 'mean') → 'layer3.0.downsample.1.running_mean'."""
  *modules, leaf = path
  parts = [_SUBMODULE.get(m, m.replace("_", ".") if m.startswith("layer") else m) for m in modules]
  return ".".join(parts + [_LEAF[leaf]])


def leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
  """(path, leaf) of a nested dict in insertion order."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))) if path[-1] == "kernel" else x


def flax_to_torch(params: Mapping, batch_stats: Mapping, arch: str,
                  width_divisor: int = 1) -> dict[str, np.ndarray]:
  """The backbone as a torchvision state dict (name → numpy), in torchvision's key order.

  BatchNorm entries get `num_batches_tracked` = 0 (int64), so the key set is exactly that of
  `torchvision.models.<arch>().state_dict()` without `fc`.
  """
  p_shapes, s_shapes = template(arch, width_divisor)
  out = {}
  for tree, shapes in ((params, p_shapes), (batch_stats, s_shapes)):
    for path, shape in leaves(shapes):
      x = np.asarray(_get(tree, path), np.float32)
      if x.shape != shape.shape:
        raise LayoutError(f"{'/'.join(path)} has shape {x.shape}, expected {shape.shape} for "
                          f"{arch} (width ÷{width_divisor})")
      out[torch_key(path)] = _to_torch_layout(path, x)
  # torchvision's order: modules as registered, per module weight, bias, running_mean,
  # running_var, num_batches_tracked.
  ordered = {}
  for module in sorted({k.rsplit(".", 1)[0] for k in out}, key=_module_rank):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      if f"{module}.{leaf}" in out:
        ordered[f"{module}.{leaf}"] = out[f"{module}.{leaf}"]
    if f"{module}.running_mean" in out:
      ordered[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
  return ordered


def _module_rank(module: str) -> tuple:
  """torchvision registers conv1, bn1, layer1.0 … layer4.N; within a block conv1, bn1, conv2,
  bn2 (, conv3, bn3), downsample.0, downsample.1."""
  within = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
  parts = module.split(".")
  if parts[0].startswith("layer"):
    return (int(parts[0][len("layer"):]), int(parts[1]), within.index(parts[2]), module)
  return (0, 0, within.index(parts[0]), module)


def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def torch_to_flax(state_dict: Mapping[str, np.ndarray], arch: str,
                  width_divisor: int = 1) -> tuple[dict, dict]:
  """A torchvision-named backbone state dict (prefix stripped) → flax (params, batch_stats).

  Raises LayoutError naming the missing keys or the first shape that disagrees.
  """
  p_shapes, s_shapes = template(arch, width_divisor)
  trees, missing = ({}, {}), []
  for tree, shapes in zip(trees, (p_shapes, s_shapes)):
    for path, shape in leaves(shapes):
      key = torch_key(path)
      if key not in state_dict:
        missing.append(key)
        continue
      x = np.asarray(state_dict[key], np.float32)
      if path[-1] == "kernel":
        x = np.transpose(x, (2, 3, 1, 0))
      if x.shape != shape.shape:
        raise LayoutError(f"has {key} of shape {tuple(np.asarray(state_dict[key]).shape)}, "
                          f"which does not fit {arch} (width ÷{width_divisor})")
      _set(tree, path, np.ascontiguousarray(x))
  if missing:
    raise LayoutError(f"lacks {len(missing)} {arch} tensors, e.g. {', '.join(missing[:3])}")
  return trees


def detect_arch(state_dict: Mapping[str, Any]) -> tuple[str, int]:
  """(architecture name, width divisor) of a torchvision-named ResNet state dict."""
  blocks = collections.Counter()
  for key in state_dict:
    m = re.match(r"layer([1-4])\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(m.group(2)) + 1)
  kind = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
  counts = tuple(blocks[i] for i in (1, 2, 3, 4))
  found = [name for name, (k, c) in ARCHS.items() if (k, c) == (kind, counts)]
  if not found:
    raise LayoutError(f"holds a ResNet with {kind} blocks {'-'.join(map(str, counts))} per "
                       f"stage: neither resnet18 (basic 2-2-2-2) nor resnet50 (bottleneck 3-4-6-3)")
  channels = np.asarray(state_dict["conv1.weight"]).shape[0]
  if channels <= 0 or 64 % channels:
    raise LayoutError(f"has {channels} conv1 output channels; expected 64 (or 64 / k)")
  return found[0], 64 // channels


def find_resnet(obj: Any) -> tuple[dict[str, Any], str, dict[str, int]]:
  """(backbone state dict with the prefix stripped, the prefix, {dropped group: count}).

  `obj` is what `torch.load` returned: a state dict, or a checkpoint that holds one under
  'state_dict' (MoCo, most trainers) or 'model'.
  """
  container = obj
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), Mapping):
        container = obj[key]
        break
  if not isinstance(container, Mapping):
    raise LayoutError(f"holds a {type(obj).__name__}, not a ResNet state dict")
  for prefix in PREFIXES:
    if f"{prefix}conv1.weight" in container:
      break
  else:
    keys = list(container)[:4]
    raise LayoutError(f"is not a ResNet state dict: no conv1.weight under any of the prefixes "
                       f"{[p for p in PREFIXES if p]} or none (its first keys: {keys})")
  backbone, dropped = {}, collections.Counter()
  for key, value in container.items():
    if key.startswith(prefix):
      backbone[key[len(prefix):]] = value
    else:   # e.g. MoCo's module.encoder_k.* (the key encoder), module.queue, module.queue_ptr
      parts = key.split(".")
      dropped[".".join(parts[:2]) if parts[0] == "module" and len(parts) > 2 else key] += 1
  return backbone, prefix, dict(dropped)


def split_head(backbone: dict[str, Any], channels: int) -> tuple[dict | None, dict[str, int]]:
  """Removes the `fc*` entries; returns (g_G params when they form a MoCo-v2 MLP C→C→D, else
  None, {dropped group: count})."""
  fc = {k: backbone.pop(k) for k in [k for k in backbone if k.startswith("fc.")]}
  if not fc:
    return None, {}
  names = {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
  if set(fc) == names:
    w0, w2 = np.asarray(fc["fc.0.weight"], np.float32), np.asarray(fc["fc.2.weight"], np.float32)
    if w0.shape == (channels, channels) and w2.ndim == 2 and w2.shape[1] == channels:
      return {"fc1": {"kernel": np.ascontiguousarray(w0.T[None, None]),
                      "bias": np.asarray(fc["fc.0.bias"], np.float32)},
              "fc2": {"kernel": np.ascontiguousarray(w2.T[None, None]),
                      "bias": np.asarray(fc["fc.2.bias"], np.float32)}}, {}
  return None, {"fc (a classifier, or a projection that is not a C->C->D MLP)": len(fc)}
