r"""PyTorch ResNet weights ⇄ this project's pretraining workdirs (SPEC §8).

  python -m cacl_jax.convert from-torch --src FILE.pth[.tar] --arch resnet50 --out DIR
  python -m cacl_jax.convert to-torch --workdir RUN [--step S] --out backbone.pth

**from-torch** reads a torchvision ResNet-18 / ResNet-50 state dict, or a MoCo-v1 / v2
checkpoint (`{'state_dict': {'module.encoder_q.*': ...}}`; `encoder_k`, the queue and the
optimiser are dropped), with `torch.load(..., weights_only=True)`: a file that needs code to
unpickle is refused. It writes DIR as a step-0 pretraining workdir (`DIR/checkpoints/0/`, the
trainer's own Orbax layout through `cacl_jax.checkpoint`), so every consumer of a pretraining
run takes it: `--config.model.init_from=DIR` (pretraining) and `--config.pretrained=DIR`
(`linear_eval`, `propagate`). A MoCo-v2 MLP head `fc.0` (C→C) / `fc.2` (C→D) becomes g_G
(a 1×1-conv MLP of the same shapes); a classifier `fc` (or MoCo-v1's single 128-d `fc`) has no
place in the model and is dropped. The other heads, the queues and the optimiser state start
fresh. DIR/converted_from.json names the source (sha256), the key prefix read and every
group of tensors dropped.

**to-torch** writes the online backbone of a workdir's newest (or `--step`) checkpoint as a
torchvision state dict: it loads with `strict=True` into
`torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])` whose `fc` is
`torch.nn.Identity()` (ResNet-18: into `resnet18()` with `fc = Identity()`; torchvision's
BasicBlock refuses dilation, the keys and shapes are the same, see README "Use with PyTorch").
The same tensors go to a `.safetensors` file beside it (written without torch).

Layout (`cacl_jax.models.resnet`): flax `layer3_0/conv2/kernel` [kh, kw, in, out] ↔ torch
`layer3.0.conv2.weight` [out, in, kh, kw]; `downsample_conv` / `downsample_bn` ↔
`downsample.0` / `downsample.1`; BN `scale, bias` (params) and `mean, var` (batch_stats) ↔
`weight, bias, running_mean, running_var`. Both directions are exact (a transpose of float32).
The dilation convention matched: output stride 8; in stage 3 (4) the first block's first 3×3
conv keeps dilation 1 (2) and its stride becomes 1, every later 3×3 conv of the stage has
dilation 2 (4) — torchvision's `replace_stride_with_dilation` rule.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pickle
import re
import sys
from typing import Any, Mapping

import numpy as np

ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
# Where a ResNet may sit inside a checkpoint's state dict, tried in this order.
PREFIXES = ("module.encoder_q.", "encoder_q.", "module.", "backbone.", "encoder.", "")
# flax leaf ↔ torch leaf; kernels are transposed HWIO ↔ OIHW.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_SUBMODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
INSTALL = ("PyTorch is needed to read and write .pth files: "
           "pip install -r requirements-torch.txt (the CPU build)")
DILATION = ("output stride 8: layer3 and layer4 trade their stride for dilation 2 and 4; the "
            "first block of each keeps the previous dilation in its first 3x3 conv "
            "(torchvision's replace_stride_with_dilation=[False, True, True])")


class ConvertError(ValueError):
  """Bad input (file, architecture, workdir): `main` prints it as one line."""


# ----------------------------------------------------------------------------- layout


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


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
  """(path, leaf) of a nested dict in insertion order."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaves(v, prefix + (k,))
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
    for path, shape in _leaves(shapes):
      x = np.asarray(_get(tree, path), np.float32)
      if x.shape != shape.shape:
        raise ConvertError(f"{'/'.join(path)} has shape {x.shape}, expected {shape.shape} for "
                           f"{arch} (width ÷{width_divisor})")
      out[torch_key(path)] = _to_torch_layout(path, x)
  # torchvision order: per module weight, bias, running_mean, running_var, num_batches_tracked.
  order = list(_torch_module_order(p_shapes))
  ordered = {}
  for module in order:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      if f"{module}.{leaf}" in out:
        ordered[f"{module}.{leaf}"] = out[f"{module}.{leaf}"]
    if f"{module}.running_mean" in out:
      ordered[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
  return ordered


def _torch_module_order(p_shapes: Mapping) -> list[str]:
  seen = []
  for path, _ in _leaves(p_shapes):
    module = torch_key(path).rsplit(".", 1)[0]
    if module not in seen:
      seen.append(module)
  # torchvision registers downsample after the block's own convs; flax creates it last too,
  # but a Bottleneck's conv3/bn3 must precede it: sort within a block by torchvision's order.
  rank = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5, "downsample": 6}
  def key(module):
    parts = module.split(".")
    if parts[0].startswith("layer"):
      return (int(parts[0][5:]), int(parts[1]), rank[parts[2]], module)
    return (0, 0, rank[parts[0]], module)
  return sorted(seen, key=key)


def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def torch_to_flax(state_dict: Mapping[str, np.ndarray], arch: str,
                  width_divisor: int = 1) -> tuple[dict, dict]:
  """A torchvision-named backbone state dict (prefix stripped) → flax (params, batch_stats).

  Raises ConvertError naming the missing keys or the first shape that disagrees.
  """
  p_shapes, s_shapes = template(arch, width_divisor)
  trees, missing = ({}, {}), []
  for tree, shapes in zip(trees, (p_shapes, s_shapes)):
    for path, shape in _leaves(shapes):
      key = torch_key(path)
      if key not in state_dict:
        missing.append(key)
        continue
      x = np.asarray(state_dict[key], np.float32)
      if path[-1] == "kernel":
        x = np.transpose(x, (2, 3, 1, 0))
      if x.shape != shape.shape:
        raise ConvertError(f"{key} has shape {tuple(np.asarray(state_dict[key]).shape)}, "
                           f"which does not fit {arch} (width ÷{width_divisor})")
      _set(tree, path, np.ascontiguousarray(x))
  if missing:
    raise ConvertError(f"{len(missing)} {arch} tensors missing, e.g. {', '.join(missing[:3])}")
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
    raise ConvertError(f"holds a ResNet with {kind} blocks {'-'.join(map(str, counts))} per "
                       f"stage: neither resnet18 (basic 2-2-2-2) nor resnet50 (bottleneck 3-4-6-3)")
  channels = np.asarray(state_dict["conv1.weight"]).shape[0]
  if channels <= 0 or 64 % channels:
    raise ConvertError(f"has {channels} conv1 output channels; expected 64 (or 64 / k)")
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
    raise ConvertError(f"holds a {type(obj).__name__}, not a ResNet state dict")
  for prefix in PREFIXES:
    if f"{prefix}conv1.weight" in container:
      break
  else:
    keys = list(container)[:4]
    raise ConvertError(f"is not a ResNet state dict: no conv1.weight under any of the prefixes "
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


# ----------------------------------------------------------------------------- workdir


def backbone_state(config, params: dict, batch_stats: dict, head_g: dict | None = None):
  """A step-0 `TrainState` of `config` whose online and target backbones (and BN statistics)
  are `params` / `batch_stats`, g_G is `head_g` when given; the other heads, the queues and
  the optimiser state are fresh, as `step.init_state` makes them.

  Built from `jax.eval_shape(step.init_state)` rather than by running it: initialising a
  ResNet-50 runs (and compiles) a forward pass, 20–40 s on a CPU, for values thrown away.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cacl_jax import optim, queue, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  from cacl_jax.models.heads import Head  # pylint: disable=g-import-not-at-top

  model = model_from_config(config.model)
  tx, _ = optim.make_optimizer(config)
  shapes = jax.eval_shape(lambda: step_lib.init_state(model, tx, config, config.seed))
  k_heads, k_queues, k_state = jax.random.split(jax.random.key(config.seed), 3)
  # One compiled initialiser per kind of part (eager Flax / jnp calls would compile every op).
  init_head = jax.jit(lambda k: Head(model.embed_dim).init(
      k, jnp.zeros((1, 1, 1, model.backbone.num_features)))["params"])
  init_queue = jax.jit(lambda k: queue.init(k, config.queue.size, model.embed_dim))
  host = {}
  for name, k in zip(shapes.params, jax.random.split(k_heads, len(shapes.params))):
    if name == "backbone":
      host[name] = params
    elif name == "head_G" and head_g is not None:
      host[name] = head_g
    else:
      host[name] = jax.device_get(init_head(k))
  stats = {"backbone": batch_stats}
  online = jax.device_put(host)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=online, batch_stats=jax.device_put(stats),
      target_params=jax.device_put(host), target_batch_stats=jax.device_put(stats),
      opt_state=jax.jit(tx.init)(online),
      queues={h: init_queue(k) for h, k in zip(shapes.queues, jax.random.split(k_queues, len(shapes.queues)))},
      queue_ptrs={h: jnp.zeros((), jnp.int32) for h in shapes.queues},
      rng=jax.random.key_data(k_state))
  # If the train state ever gains a part this function does not fill, say so here rather
  # than write a checkpoint that `restore_pretrained` cannot read.
  if jax.tree.structure(state) != jax.tree.structure(shapes) or not all(jax.tree.leaves(
      jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state, shapes))):
    raise ConvertError("the train state no longer has the layout convert.backbone_state builds; "
                       "update cacl_jax/convert.py")
  return state


def converted_config(arch: str, width_divisor: int, embed_dim: int = 128):
  """The pretraining config saved with a converted backbone (paper defaults otherwise)."""
  from cacl_jax import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.pretrain_config()
  config.model.backbone = arch
  config.model.width_divisor = width_divisor
  config.model.embed_dim = embed_dim
  config.total_steps = 1   # nothing was trained here; keeps the saved schedule well-defined
  return config


def write_workdir(out: str, config, params: dict, batch_stats: dict,
                  head_g: dict | None = None) -> str:
  """Saves `backbone_state(...)` as checkpoint 0 of the workdir `out`; returns its path."""
  from cacl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if os.path.isdir(checkpoint.checkpoint_dir(out)) and os.listdir(checkpoint.checkpoint_dir(out)):
    raise ConvertError(f"{out} already holds checkpoints; pass a new --out (nothing is overwritten)")
  state = backbone_state(config, params, batch_stats, head_g)
  mngr = checkpoint.manager(out, max_to_keep=1)
  checkpoint.save(mngr, 0, state, None, config, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(checkpoint.checkpoint_dir(out), "0")


# ----------------------------------------------------------------------------- torch files


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConvertError(INSTALL) from e
  return torch


def load_torch(path: str) -> Any:
  """`torch.load(path, weights_only=True)` on the CPU, with tensors turned into numpy."""
  torch = _torch()
  if not os.path.isfile(path):
    raise ConvertError(f"--src {path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand [^\s]+)", str(e))
    raise ConvertError(f"{path} needs code to unpickle ({found.group(1) if found else 'not plain tensors'}): "
                       "refused, only weights are read (torch.load weights_only=True)") from e
  except Exception as e:  # torch raises RuntimeError / EOFError / zipfile errors for bad files
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConvertError(f"cannot read {path} as a PyTorch file ({first})") from e

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    if isinstance(x, Mapping):
      return {k: to_numpy(v) for k, v in x.items()}
    return x
  return to_numpy(obj)


def save_torch(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  torch = _torch()
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.array(v, copy=True)))
                                     for k, v in state_dict.items()), path)


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str, metadata: dict) -> None:
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConvertError("writing .safetensors needs the safetensors package: "
                       "pip install -r requirements-torch.txt") from e
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
                     metadata={k: str(v) for k, v in metadata.items()})


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# ----------------------------------------------------------------------------- commands


def from_torch(src: str, arch: str, out: str) -> dict:
  """The `from-torch` command; returns the record written to OUT/converted_from.json."""
  if arch not in ARCHS:
    raise ConvertError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
  obj = load_torch(src)
  try:
    backbone, prefix, dropped = find_resnet(obj)
    found, width = detect_arch(backbone)
  except ConvertError as e:
    raise ConvertError(f"{src} {e}") from e
  if found != arch:
    raise ConvertError(f"{src} holds a {found} (blocks {'-'.join(map(str, ARCHS[found][1]))}), "
                       f"not {arch}: pass --arch {found}")
  channels = (512 if arch == "resnet18" else 2048) // width
  head_g, head_dropped = split_head(backbone, channels)
  dropped.update(head_dropped)
  tracked = [k for k in backbone if k.endswith("num_batches_tracked")]
  for k in tracked:
    backbone.pop(k)
  try:
    params, stats = torch_to_flax(backbone, arch, width)
  except ConvertError as e:
    raise ConvertError(f"{src}: {e}") from e
  expected = {torch_key(p) for tree in (params, stats) for p, _ in _leaves(tree)}
  extra = sorted(set(backbone) - expected)
  if extra:
    raise ConvertError(f"{src}: {len(extra)} tensors under {prefix!r} are not part of a "
                       f"torchvision {arch}, e.g. {', '.join(extra[:3])}")
  embed_dim = head_g["fc2"]["kernel"].shape[-1] if head_g is not None else 128
  config = converted_config(arch, width, embed_dim)
  path = write_workdir(out, config, params, stats, head_g)
  record = {"source": os.path.abspath(src), "sha256": _sha256(src), "arch": arch,
            "width_divisor": width, "prefix": prefix, "backbone_tensors": len(expected),
            "head_G_from": "fc.0 / fc.2 (MoCo-v2 MLP)" if head_g is not None else None,
            "dropped": dropped, "checkpoint": path}
  with open(os.path.join(out, "converted_from.json"), "w") as f:
    json.dump(record, f, indent=1)
  return record


def to_torch(workdir: str, step: int | None, out: str) -> dict:
  """The `to-torch` command; returns {'pth', 'safetensors', 'arch', 'step', 'num_tensors'}."""
  from cacl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if not out.endswith((".pth", ".pt", ".safetensors")):
    raise ConvertError(f"--out {out}: expected a .pth, .pt or .safetensors file name")
  if not out.endswith(".safetensors"):
    _torch()   # before the (slow) restore: a missing torch is reported at once
  try:
    pre = checkpoint.restore_pretrained(workdir, step)
  except FileNotFoundError as e:
    raise ConvertError(str(e)) from e
  arch, width = pre.config.model.backbone, int(pre.config.model.get("width_divisor", 1))
  state_dict = flax_to_torch(pre.params, pre.batch_stats, arch, width)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  stem = out.rsplit(".", 1)[0]
  written = {"pth": None, "safetensors": stem + ".safetensors"}
  if not out.endswith(".safetensors"):
    save_torch(state_dict, out)
    written["pth"] = out
  save_safetensors(state_dict, written["safetensors"],
                   {"format": "pt", "arch": arch, "width_divisor": width, "step": pre.step,
                    "source": pre.path, "dilation": DILATION})
  return {**written, "arch": arch, "width_divisor": width, "step": pre.step,
          "num_tensors": len(state_dict)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m cacl_jax.convert",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-torch", help="torchvision / MoCo .pth[.tar] -> pretraining workdir")
  p.add_argument("--src", required=True, help="a torchvision state dict or MoCo checkpoint")
  p.add_argument("--arch", required=True, choices=sorted(ARCHS))
  p.add_argument("--out", required=True, help="the workdir to create (DIR/checkpoints/0)")
  t = sub.add_parser("to-torch", help="pretraining workdir -> torchvision state dict")
  t.add_argument("--workdir", required=True, help="a pretraining run (or a converted DIR)")
  t.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  t.add_argument("--out", required=True, help="backbone.pth (+ backbone.safetensors beside it)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.command == "from-torch":
    record = from_torch(args.src, args.arch, args.out)
    dropped = ", ".join(f"{k} ({n})" for k, n in sorted(record["dropped"].items())) or "nothing"
    print(f"{args.src}: {record['arch']} (width ÷{record['width_divisor']}) under "
          f"{record['prefix'] or 'no prefix'!r}, {record['backbone_tensors']} backbone tensors; "
          f"g_G {'from ' + record['head_G_from'] if record['head_G_from'] else 'fresh'}; "
          f"dropped: {dropped}\nwrote {record['checkpoint']}: use it as "
          f"--config.model.init_from={args.out} or --config.pretrained={args.out}")
    return record
  written = to_torch(args.workdir, args.step, args.out)
  target = (f"torchvision.models.{written['arch']}("
            + ("replace_stride_with_dilation=[False, True, True]" if written["arch"] == "resnet50" else "")
            + ") with fc = torch.nn.Identity()")
  note = "" if written["width_divisor"] == 1 else (
      f" (this backbone is ÷{written['width_divisor']} width: torchvision has no such model)")
  files = " and ".join(f for f in (written["pth"], written["safetensors"]) if f)
  print(f"wrote {files}: {written['num_tensors']} tensors of the online backbone at step "
        f"{written['step']}; loads with strict=True into {target}{note}; {DILATION}")
  return written


if __name__ == "__main__":
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)   # Orbax's per-save info lines
  try:
    main()
  except ConvertError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(2)
