"""PyTorch weights in and out (`python -m cacl_jax.convert`), against torchvision's ResNet
re-stated in plain torch (tests/torch_reference.py).

The reference networks are random, with random BatchNorm affine parameters and running
statistics taken from a train-mode pass, and run in inference mode: backbone maps (layer4, output
stride 8) must agree to relative 1e-4 (max |jax − torch| / max |torch|; float32 through 50
layers is itself ~7e-5 away from float64 at ResNet-50, so the bound sits at float32's floor).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed (pip install -r requirements-torch.txt)")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import torch_reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)

from cacl_jax.runtime import checkpoint, parallel  # noqa: E402
from cacl_jax.interop import convert, torch_layout
from cacl_jax import defaults
from cacl_jax.training import step as step_lib, train
from cacl_jax.models import resnet  # noqa: E402
from cacl_jax.models.cacl import model_from_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 1e-4


def reference(arch, width_divisor=1, size=48, seed=0):
  """(torch model at output stride 8 in eval mode, images [2, 3, size, size])."""
  torch.manual_seed(seed)
  if arch == "resnet18":
    model = ref.dilate_basic_(ref.resnet18(width_divisor=width_divisor))
  else:
    model = ref.resnet50(replace_stride_with_dilation=[False, True, True],
                         width_divisor=width_divisor)
  images = torch.randn(4, 3, size, size)
  ref.randomize_bn_(model, images)
  return model, images[:2]


def jax_features(arch, width_divisor, params, batch_stats, images):
  net = resnet.ResNet(depth=int(arch[len("resnet"):]), width_divisor=width_divisor)
  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  y = jax.jit(lambda v, x: net.apply(v, x, False))({"params": params, "batch_stats": batch_stats}, x)
  return np.asarray(y).transpose(0, 3, 1, 2)


def relative_difference(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def numpy_state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
  """A full-width ResNet-18 saved as torchvision saves it, converted by `from-torch`."""
  tmp = tmp_path_factory.mktemp("r18")
  model, images = reference("resnet18", size=64)
  torch.save(model.state_dict(), tmp / "resnet18.pth")
  out = str(tmp / "converted")
  record = convert.main(["from-torch", "--src", str(tmp / "resnet18.pth"), "--arch", "resnet18",
                         "--out", out])
  return model, images, out, record, tmp


def test_resnet18_converted_workdir_computes_torchs_maps(r18):
  model, images, out, record, _ = r18
  assert record["arch"] == "resnet18" and record["width_divisor"] == 1 and record["prefix"] == ""
  assert record["dropped"] == {"fc (a classifier, or a projection that is not a C->C->D MLP)": 2}
  # What linear_eval / propagate / init_from read: the trainer's restore of checkpoint 0.
  pre = checkpoint.restore_pretrained(out)
  assert pre.step == 0 and pre.config.model.backbone == "resnet18"
  with torch.no_grad():
    expected = model.features(images).numpy()
  got = jax_features("resnet18", 1, pre.params, pre.batch_stats, images)
  assert got.shape == expected.shape == (2, 512, 8, 8)
  diff = relative_difference(got, expected)
  print(f"resnet18 max relative difference {diff:.2e}")
  assert diff < REL_TOL


def test_resnet50_maps_agree_and_map_back_exactly():
  """Full-width ResNet-50 (torchvision's dilated v1.5) through the key map both ways."""
  model, images = reference("resnet50", size=48)
  with torch.no_grad():
    expected = model.features(images).numpy()
  original = numpy_state(model)
  backbone, _, _ = torch_layout.find_resnet(original)
  assert torch_layout.detect_arch(backbone) == ("resnet50", 1)
  head, _ = torch_layout.split_head(backbone, 2048)
  assert head is None   # a 1000-way classifier is no projection head
  backbone = {k: v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
  params, stats = torch_layout.torch_to_flax(backbone, "resnet50")
  got = jax_features("resnet50", 1, params, stats, images)
  assert got.shape == expected.shape == (2, 2048, 6, 6)
  diff = relative_difference(got, expected)
  print(f"resnet50 max relative difference {diff:.2e}")
  assert diff < REL_TOL
  back = torch_layout.flax_to_torch(params, stats, "resnet50")
  assert list(back) == [k for k in original if not k.startswith("fc.")]
  for k, v in back.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(v, original[k], err_msg=k)
  model.fc = torch.nn.Identity()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_to_torch_loads_strict_and_round_trips_exactly(r18):
  """in → out: to-torch of the converted R18 gives back the original tensors bit for bit, with
  torchvision's key set; the .pth loads strict into resnet18() with fc = Identity()."""
  model, _, out, _, tmp = r18
  written = convert.main(["to-torch", "--workdir", out, "--out", str(tmp / "back" / "r18.pth")])
  assert written["step"] == 0 and written["arch"] == "resnet18"
  loaded = torch.load(written["pth"], weights_only=True)
  original = model.state_dict()
  assert list(loaded) == [k for k in original if not k.startswith("fc.")]
  for k, v in loaded.items():
    if not k.endswith("num_batches_tracked"):
      assert v.dtype == torch.float32 and torch.equal(v, original[k]), k
  plain = ref.resnet18()          # torchvision's own (undilated) ResNet-18
  plain.fc = torch.nn.Identity()
  plain.load_state_dict(loaded, strict=True)
  sealed = safetensors_numpy.load_file(written["safetensors"])
  assert set(sealed) == set(loaded)
  for k in loaded:
    np.testing.assert_array_equal(sealed[k], loaded[k].numpy())


def convert_optimizer(c):
  from cacl_jax.training import optim  # pylint: disable=g-import-not-at-top
  return optim.make_optimizer(c)[0]


def mocov2_checkpoint(path, width_divisor=8, dim=32):
  """A MoCo-v2-style file: {'state_dict': module.encoder_q.* (MLP fc) + module.encoder_k.* +
  the queue}, with the optimiser state beside it, as MoCo's main_moco.py saves."""
  q, _ = reference("resnet18", width_divisor, seed=1)
  k, _ = reference("resnet18", width_divisor, seed=2)
  channels = 512 // width_divisor
  for enc in (q, k):
    enc.fc = torch.nn.Sequential(torch.nn.Linear(channels, channels), torch.nn.ReLU(),
                                 torch.nn.Linear(channels, dim))
  state = {f"module.encoder_q.{n}": v for n, v in q.state_dict().items()}
  state.update({f"module.encoder_k.{n}": v for n, v in k.state_dict().items()})
  state["module.queue"] = torch.nn.functional.normalize(torch.randn(dim, 256), dim=0)
  state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state,
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9,
                                                           "params": [0, 1]}]}}, path)
  return q


def test_mocov2_checkpoint_is_read_accepted_by_init_from_and_round_trips(tmp_path):
  q = mocov2_checkpoint(tmp_path / "moco_v2.pth.tar")
  out = str(tmp_path / "moco")
  record = convert.from_torch(str(tmp_path / "moco_v2.pth.tar"), "resnet18", out)
  assert record["prefix"] == "module.encoder_q." and record["width_divisor"] == 8
  assert record["head_G_from"] is not None
  assert record["dropped"] == {"module.encoder_k": len(q.state_dict()), "module.queue": 1,
                               "module.queue_ptr": 1}
  with open(os.path.join(out, "converted_from.json")) as f:
    assert json.load(f)["dropped"] == record["dropped"]
  pre = checkpoint.restore_pretrained(out)
  assert pre.config.model.embed_dim == 32
  sd = numpy_state(q)
  np.testing.assert_array_equal(pre.params["layer4_1"]["conv2"]["kernel"],
                                sd["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(pre.batch_stats["layer2_0"]["downsample_bn"]["var"],
                                sd["layer2.0.downsample.1.running_var"])
  # The MLP became g_G: fc.0 (C→C) → fc1, fc.2 (C→D) → fc2, as 1×1 convs.
  np.testing.assert_array_equal(pre.heads["head_G"]["fc1"]["kernel"][0, 0], sd["fc.0.weight"].T)
  np.testing.assert_array_equal(pre.heads["head_G"]["fc2"]["bias"], sd["fc.2.bias"])

  # --config.model.init_from=DIR: the trainer's own initialisation from another workdir.
  c = defaults.pretrain_config()
  c.batch_size, c.model.width_divisor, c.model.embed_dim, c.queue.size = 8, 8, 32, 64
  c.model.bn_group_size, c.data.image_size = 4, 32
  mesh = parallel.make_mesh()
  shapes = jax.eval_shape(lambda: step_lib.init_state(model_from_config(c.model),
                                                      convert_optimizer(c), c, 0))
  shardings = step_lib.state_shardings(shapes, mesh)
  fresh = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), shardings)
  started = train._init_backbone_from(fresh, out, shardings)
  for tree in (started.params, started.target_params):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree["backbone"]), pre.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.batch_stats["backbone"]),
               pre.batch_stats)

  # out → torch → in: this workdir to torch, loaded strict, and read back in (the key map
  # from-torch applies; the file → workdir path is the R18 test's): the same backbone.
  written = convert.to_torch(out, None, str(tmp_path / "moco_r18.pth"))
  loaded = torch.load(written["pth"], weights_only=True)
  narrow = ref.dilate_basic_(ref.resnet18(width_divisor=8))
  narrow.fc = torch.nn.Identity()
  narrow.load_state_dict(loaded, strict=True)
  again = torch_layout.torch_to_flax({k: v.numpy() for k, v in loaded.items()}, "resnet18", 8)
  jax.tree.map(np.testing.assert_array_equal, again, (pre.params, pre.batch_stats))


# ---------------------------------------------------------------------------- bad input


class NotAWeight:
  """A pickled object that only code can rebuild: weights_only loading must refuse it."""

  def __init__(self):
    self.payload = torch.zeros(2)


def test_bad_files_are_one_clear_error(r18, tmp_path):
  _, _, out, _, tmp = r18
  r18_file = str(tmp / "resnet18.pth")
  cases = {}
  torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "linear.pth")
  cases["linear.pth"] = ("resnet50", "is not a ResNet state dict: no conv1.weight")
  torch.save({"model": NotAWeight()}, tmp_path / "code.pth")
  cases["code.pth"] = ("resnet50", "needs code to unpickle (Unsupported global: GLOBAL "
                       "test_convert.NotAWeight")
  with open(r18_file, "rb") as f:
    (tmp_path / "truncated.pth").write_bytes(f.read()[:5000])
  cases["truncated.pth"] = ("resnet18", "cannot read")
  torch.save([torch.zeros(1)], tmp_path / "list.pth")
  cases["list.pth"] = ("resnet18", "holds a list, not a ResNet state dict")
  for name, (arch, message) in cases.items():
    with pytest.raises(convert.ConvertError, match=None) as e:
      convert.from_torch(str(tmp_path / name), arch, str(tmp_path / f"out_{name}"))
    assert message in str(e.value), (name, str(e.value))
    assert not os.path.exists(tmp_path / f"out_{name}" / "checkpoints")
  with pytest.raises(convert.ConvertError, match="holds a resnet18 .* pass --arch resnet18"):
    convert.from_torch(r18_file, "resnet50", str(tmp_path / "wrong_arch"))
  with pytest.raises(convert.ConvertError, match="already holds checkpoints"):
    convert.from_torch(r18_file, "resnet18", out)
  with pytest.raises(convert.ConvertError, match="no checkpoints under"):
    convert.to_torch(str(tmp_path / "nowhere"), None, str(tmp_path / "x.pth"))


def test_missing_torch_names_the_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now raises ImportError
  with pytest.raises(convert.ConvertError, match="pip install -r requirements-torch.txt"):
    convert.load_torch(str(tmp_path / "x.pth"))


def test_cli_prints_one_line_without_traceback(r18):
  r18_file = str(r18[4] / "resnet18.pth")
  result = subprocess.run(
      [sys.executable, "-m", "cacl_jax.convert", "from-torch", "--src", r18_file,
       "--arch", "resnet50", "--out", str(r18[4] / "cli")],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"convert: error: {r18_file} holds a resnet18 (blocks 2-2-2-2), not resnet50: "
      "pass --arch resnet18")
