"""PyTorch conversion at full width: numerical agreement, and what converting a ResNet-50 costs.

  python benchmarks/torch_conversion.py [--image_size 224 --batch 2]

For full-width ResNet-18 and ResNet-50 (random weights, random BatchNorm affine parameters and
running statistics from one train-mode pass, inference mode), against torchvision's ResNet
re-stated in plain torch (tests/torch_reference.py), at output stride 8:
  rel_jax_torch     max |JAX − torch| / max |torch| of the backbone map (the tests bound 1e-4)
  rel_torch32_64    the same for torch float32 against torch float64: float32's own floor
Then a MoCo-v2-layout ResNet-50 file (encoder_q with its 2048→2048→128 MLP, encoder_k, the
queue), written with torch.save, through `convert from-torch` and `to-torch`: seconds and MiB.
Needs torch (pip install -r requirements-torch.txt). Prints a table and writes
benchmarks/results/torch_conversion.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from cacl_jax.interop import convert, torch_layout  # noqa: E402
from cacl_jax.models import resnet  # noqa: E402


def reference(arch: str, image_size: int, batch: int):
  torch.manual_seed(0)
  if arch == "resnet18":
    model = ref.dilate_basic_(ref.resnet18())
  else:
    model = ref.resnet50(replace_stride_with_dilation=[False, True, True])
  images = torch.randn(2 * batch, 3, image_size, image_size)
  ref.randomize_bn_(model, images)
  return model, images[:batch]


def agreement(arch: str, image_size: int, batch: int) -> dict:
  model, images = reference(arch, image_size, batch)
  with torch.no_grad():
    y32 = model.features(images).numpy()
    y64 = model.double().features(images.double()).numpy()
  model.float()
  state = {k: v.numpy() for k, v in model.state_dict().items()
           if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  params, stats = torch_layout.torch_to_flax(state, arch)
  net = resnet.ResNet(depth=int(arch[len("resnet"):]))
  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  yj = np.asarray(jax.jit(lambda v, x: net.apply(v, x, False))(
      {"params": params, "batch_stats": stats}, x)).transpose(0, 3, 1, 2)
  scale = np.abs(y32).max()
  return {"arch": arch, "image_size": image_size, "batch": batch, "map": list(y32.shape),
          "rel_jax_torch": float(np.abs(yj - y32).max() / scale),
          "rel_torch32_64": float(np.abs(y32 - y64).max() / np.abs(y64).max()),
          "rel_jax_64": float(np.abs(yj - y64).max() / np.abs(y64).max())}


def mocov2_cost(tmp: str) -> dict:
  q, _ = reference("resnet50", 32, 1)
  k, _ = reference("resnet50", 32, 1)
  for enc in (q, k):
    enc.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                                 torch.nn.Linear(2048, 128))
  state = {f"module.encoder_q.{n}": v for n, v in q.state_dict().items()}
  state.update({f"module.encoder_k.{n}": v for n, v in k.state_dict().items()})
  state["module.queue"] = torch.randn(128, 65536)
  state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  src = os.path.join(tmp, "moco_v2.pth.tar")
  torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state}, src)
  out = os.path.join(tmp, "converted")
  start = time.perf_counter()
  convert.from_torch(src, "resnet50", out)
  t_in = time.perf_counter() - start
  start = time.perf_counter()
  written = convert.to_torch(out, None, os.path.join(tmp, "backbone.pth"))
  t_out = time.perf_counter() - start
  mib = lambda p: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs) / 2**20
  return {"source_mib": os.path.getsize(src) / 2**20, "from_torch_s": t_in,
          "workdir_mib": mib(out), "to_torch_s": t_out,
          "pth_mib": os.path.getsize(written["pth"]) / 2**20,
          "safetensors_mib": os.path.getsize(written["safetensors"]) / 2**20}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "torch_conversion.json"))
  args = parser.parse_args()
  rows = [agreement(arch, args.image_size, args.batch) for arch in ("resnet18", "resnet50")]
  tmp = tempfile.mkdtemp(prefix="torch_conversion_")
  try:
    cost = mocov2_cost(tmp)
  finally:
    shutil.rmtree(tmp)
  print(f"{'arch':<9} {'image':>5} {'map':>18} {'JAX vs torch':>13} {'torch f32 vs f64':>17}")
  for r in rows:
    print(f"{r['arch']:<9} {r['image_size']:>5} {str(tuple(r['map'])):>18} "
          f"{r['rel_jax_torch']:13.2e} {r['rel_torch32_64']:17.2e}")
  print(f"MoCo-v2-layout ResNet-50 file ({cost['source_mib']:.0f} MiB): from-torch "
        f"{cost['from_torch_s']:.1f} s -> workdir {cost['workdir_mib']:.0f} MiB; to-torch "
        f"{cost['to_torch_s']:.1f} s -> .pth {cost['pth_mib']:.0f} MiB, "
        f".safetensors {cost['safetensors_mib']:.0f} MiB")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"agreement": rows, "mocov2_resnet50": cost, "devices": str(jax.devices()),
               "torch": torch.__version__, "jax": jax.__version__, "machine": platform.machine(),
               "cpus": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
  main()
