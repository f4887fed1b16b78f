r"""PyTorch ResNet weights ⇄ this project's pretraining workdirs (docs/usage.md §4).

  python -m cacl_jax.convert from-torch --src FILE.pth[.tar] --arch resnet50 --out DIR
  python -m cacl_jax.convert to-torch --workdir RUN [--step S] --out backbone.pth

**from-torch** reads a torchvision ResNet-18 / ResNet-50 state dict, or a MoCo-v1 / v2
checkpoint (`{'state_dict': {'module.encoder_q.*': ...}}`; `encoder_k`, the queue and the
optimiser are dropped), with `torch.load(..., weights_only=True)`: a file that needs code to
unpickle is refused. It writes DIR as a step-0 pretraining workdir (`DIR/checkpoints/0/`, the
trainer's own Orbax layout through `cacl_jax.runtime.checkpoint`), so every consumer of a pretraining
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

The key map is `cacl_jax.interop.torch_layout` (exact both ways: a renaming and an OIHW ↔ HWIO
transpose of float32). The dilation convention matched: output stride 8; in stage 3 (4) the
first block's first 3×3 conv keeps dilation 1 (2) and its stride becomes 1, every later 3×3
conv of the stage has dilation 2 (4) — torchvision's `replace_stride_with_dilation` rule.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np

from cacl_jax.interop import torch_layout as layout

INSTALL = ("PyTorch is needed to read and write .pth files: "
           "pip install -r requirements-torch.txt (the CPU build)")
DILATION = ("output stride 8: layer3 and layer4 trade their stride for dilation 2 and 4; the "
            "first block of each keeps the previous dilation in its first 3x3 conv "
            "(torchvision's replace_stride_with_dilation=[False, True, True])")


class ConvertError(ValueError):
  """Bad input (file, architecture, workdir): `main` prints it as one line."""


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
  from cacl_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.method import queue
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
      rng=jax.random.key_data(k_state), skipped_steps=jnp.zeros((), jnp.int32))
  # If the train state ever gains a part this function does not fill, say so here rather
  # than write a checkpoint that `restore_pretrained` cannot read.
  if jax.tree.structure(state) != jax.tree.structure(shapes) or not all(jax.tree.leaves(
      jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state, shapes))):
    raise ConvertError("the train state no longer has the layout convert.backbone_state builds; "
                       "update cacl_jax/interop/convert.py")
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
  from cacl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  if os.path.isdir(checkpoint.checkpoint_dir(out)) and os.listdir(checkpoint.checkpoint_dir(out)):
    raise ConvertError(f"{out} already holds checkpoints; pass a new --out (nothing is overwritten)")
  state = backbone_state(config, params, batch_stats, head_g)
  mngr = checkpoint.manager(out, max_to_keep=1)
  checkpoint.save(mngr, 0, state, config, force=True)
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
  if arch not in layout.ARCHS:
    raise ConvertError(f"--arch must be one of {sorted(layout.ARCHS)}, got {arch!r}")
  obj = load_torch(src)
  try:
    backbone, prefix, dropped = layout.find_resnet(obj)
    found, width = layout.detect_arch(backbone)
    if found != arch:
      raise layout.LayoutError(f"holds a {found} (blocks {'-'.join(map(str, layout.ARCHS[found][1]))}), "
                               f"not {arch}: pass --arch {found}")
    channels = (512 if arch == "resnet18" else 2048) // width
    head_g, head_dropped = layout.split_head(backbone, channels)
    dropped.update(head_dropped)
    for key in [k for k in backbone if k.endswith("num_batches_tracked")]:
      backbone.pop(key)   # a counter of train-mode passes, not a weight
    params, stats = layout.torch_to_flax(backbone, arch, width)
    extra = sorted(set(backbone) - {layout.torch_key(p) for tree in (params, stats)
                                    for p, _ in layout.leaves(tree)})
    if extra:
      raise layout.LayoutError(f"has {len(extra)} tensors under {prefix!r} that are not part of "
                               f"a torchvision {arch}, e.g. {', '.join(extra[:3])}")
  except layout.LayoutError as e:
    raise ConvertError(f"{src} {e}") from e
  embed_dim = head_g["fc2"]["kernel"].shape[-1] if head_g is not None else 128
  config = converted_config(arch, width, embed_dim)
  path = write_workdir(out, config, params, stats, head_g)
  record = {"source": os.path.abspath(src), "sha256": _sha256(src), "arch": arch,
            "width_divisor": width, "prefix": prefix,
            "backbone_tensors": sum(1 for tree in (params, stats) for _ in layout.leaves(tree)),
            "head_G_from": "fc.0 / fc.2 (MoCo-v2 MLP)" if head_g is not None else None,
            "dropped": dropped, "checkpoint": path}
  with open(os.path.join(out, "converted_from.json"), "w") as f:
    json.dump(record, f, indent=1)
  return record


def to_torch(workdir: str, step: int | None, out: str) -> dict:
  """The `to-torch` command; returns {'pth', 'safetensors', 'arch', 'width_divisor', 'step',
  'padding', 'num_tensors'}."""
  from cacl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  if not out.endswith((".pth", ".pt", ".safetensors")):
    raise ConvertError(f"--out {out}: expected a .pth, .pt or .safetensors file name")
  if not out.endswith(".safetensors"):
    _torch()   # before the (slow) restore: a missing torch is reported at once
  try:
    pre = checkpoint.restore_pretrained(workdir, step)
  except FileNotFoundError as e:
    raise ConvertError(str(e)) from e
  arch, width = pre.config.model.backbone, int(pre.config.model.get("width_divisor", 1))
  padding = pre.config.model.get("padding", "zeros")
  try:
    state_dict = layout.flax_to_torch(pre.params, pre.batch_stats, arch, width)
  except layout.LayoutError as e:
    raise ConvertError(f"{pre.path}: {e}") from e
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  stem = out.rsplit(".", 1)[0]
  written = {"pth": None, "safetensors": stem + ".safetensors"}
  if not out.endswith(".safetensors"):
    save_torch(state_dict, out)
    written["pth"] = out
  save_safetensors(state_dict, written["safetensors"],
                   {"format": "pt", "arch": arch, "width_divisor": width, "step": pre.step,
                    "source": pre.path, "dilation": DILATION, "padding": padding})
  return {**written, "arch": arch, "width_divisor": width, "step": pre.step, "padding": padding,
          "num_tensors": len(state_dict)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m cacl_jax.convert",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-torch", help="torchvision / MoCo .pth[.tar] -> pretraining workdir")
  p.add_argument("--src", required=True, help="a torchvision state dict or MoCo checkpoint")
  p.add_argument("--arch", required=True, choices=sorted(layout.ARCHS))
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
  if written["padding"] == "circular":   # the weights load; the features differ unless told
    note += ("; NOTE: trained with model.padding='circular': for the same features set "
             "padding_mode='circular' on every torch Conv2d and wrap-pad (1 px) before the max-pool")
  files = " and ".join(f for f in (written["pth"], written["safetensors"]) if f)
  print(f"wrote {files}: {written['num_tensors']} tensors of the online backbone at step "
        f"{written['step']}; loads with strict=True into {target}{note}; {DILATION}")
  return written
