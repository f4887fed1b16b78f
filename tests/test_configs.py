"""Configs and launch scripts: every config file and variant loads through ml_collections'
`file.py:variant` flag, has the docs/usage.md §4 keys, passes the trainer's pre-flight checks on 8
devices, and each variant sets exactly the paper setting it names (Tables 1a/1b/1c, 2, 4).
No training runs here."""
import os
import re
import stat
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from cacl_jax.runtime import parallel
from cacl_jax.training import step, train
from cacl_jax.models.cacl import model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
LAUNCH = os.path.join(ROOT, "launch")

R18_VARIANTS = ["mocov2", "two_heads", "pixel_only", "global_cycle", "cacl", "same_frame",
                "cross_frame_s2", "cross_frame_s4", "cross_frame_s8", "global_match_s4",
                "global_match_s8", "cacl_s4", "cacl_s8", "simple", "no_soft_cycle",
                "with_cycle_negatives", "spec3_readings", "pixpro", "debiased", "mochi",
                "cacl_same_position"]
R50_VARIANTS = ["mocov2", "two_heads", "cacl", "simple", "no_soft_cycle"]
PRETRAIN = {"cacl_r18_kinetics.py": [None] + R18_VARIANTS,
            "cacl_r50_in_kinetics.py": [None] + R50_VARIANTS,
            "mocov2_r50_imagenet.py": [None],
            "demo.py": [None, "cacl", "two_heads", "mocov2", "pixel_only", "global_cycle",
                        "pixpro", "debiased", "mochi", "cacl_same_position"]}
EVAL = {"linear_eval_cityscapes.py": [None], "linear_eval_voc.py": [None],
        "linear_eval_synthetic.py": [None],
        "finetune_cityscapes.py": [None, "1pct", "5pct", "10pct", "100pct"]}
PRETRAIN_KEYS = ["seed", "batch_size", "total_steps", "checkpoint_every_steps", "log_every_steps",
                 "data.name", "data.root", "data.image_size", "model.backbone"]
EVAL_KEYS = ["seed", "pretrained", "batch_size", "num_epochs", "data.name", "data.root",
             "data.image_size"]
PROPAGATE = {"davis_propagation.py": [None]}

# The paper's rows, written out by hand: (w_G, w_P, w_C), pixel match, pixel shuffle, soft
# cycle, Q_C in the cycle, pair type, stride s.
CACL = ((1.0, 1.0, 1.0), "global", True, True, False, "cross_frame", 8)
MOCO = ((1.0, 0.0, 0.0), "global", True, True, False, "cross_frame", 8)
TWO = ((1.0, 1.0, 0.0), "global", True, True, False, "cross_frame", 8)
EXPECTED = {
    None: CACL,
    "cacl": CACL,
    "mocov2": MOCO,                                                          # Table 1a, 2
    "two_heads": TWO,                                                        # Table 1a, 2
    "pixel_only": ((0.0, 1.0, 0.0), "same_position", True, True, False, "cross_frame", 8),
    "global_cycle": ((1.0, 0.0, 1.0), "global", True, True, False, "cross_frame", 8),
    "same_frame": ((1.0, 0.0, 0.0), "global", True, True, False, "same_frame", 0),   # Table 1b
    "cross_frame_s2": MOCO[:-1] + (2,),
    "cross_frame_s4": MOCO[:-1] + (4,),
    "cross_frame_s8": MOCO,
    "global_match_s4": TWO[:-1] + (4,),
    "global_match_s8": TWO,
    "cacl_s4": CACL[:-1] + (4,),
    "cacl_s8": CACL,
    "simple": ((1.0, 1.0, 1.0), "global", False, False, False, "cross_frame", 8),      # Table 1c
    "no_soft_cycle": ((1.0, 1.0, 1.0), "global", True, False, False, "cross_frame", 8),
    "with_cycle_negatives": ((1.0, 1.0, 1.0), "global", True, True, True, "cross_frame", 8),
    "spec3_readings": ((1.0, 1.0, 1.0), "global", True, True, True, "cross_frame", 8),
    "pixpro": CACL, "debiased": CACL, "mochi": CACL,     # the seeds' alternatives: CACL + one change
    "cacl_same_position": ((1.0, 1.0, 1.0), "same_position", True, True, False, "cross_frame", 8),
}
# What each of the seeds' alternatives changes, written out by hand (docs/CONFIGS.md).
ALTERNATIVE_KEYS = {
    "pixpro": {"loss.pixel_loss": "pixpro", "model.ppm_transform": True},
    "debiased": {"loss.debiased_tau_plus": 0.1},
    "mochi": {"loss.mochi_global": (1024, 1024, 128), "loss.mochi_pixel": (256, 32, 8)},
}
DESCRIBED = {"loss.weights.global", "loss.weights.pixel", "loss.weights.cycle", "loss.pixel_match",
             "model.pixel_shuffle", "loss.soft_cycle", "loss.cycle_negatives", "data.pair_type",
             "data.frame_stride", "variant"}   # variant: the name, a label


def load(name, variant=None, *overrides):
  """The config exactly as `--config configs/NAME[:VARIANT] --config.K=V` gives it to main."""
  spec = os.path.join(CONFIGS, name) + (f":{variant}" if variant else "")
  argv = ["test", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  # config_flags finds the --config.KEY overrides in sys_argv (default: the real sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def describe(c):
  return (tuple(c.loss.weights[h] for h in ("global", "pixel", "cycle")), c.loss.pixel_match,
          c.model.pixel_shuffle, c.loss.soft_cycle, c.loss.cycle_negatives, c.data.pair_type,
          c.data.frame_stride)


def flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def lookup(c, dotted):
  for name in dotted.split("."):
    c = c[name]
  return c


def cases(table):
  return [(name, v) for name, variants in table.items() for v in variants]


# ------------------------------------------------------------------------- loading, docs/usage.md §4

def test_every_config_file_is_listed_here():
  files = {f for f in os.listdir(CONFIGS) if f.endswith(".py") and not f.startswith("_")}
  assert files == set(PRETRAIN) | set(EVAL) | set(PROPAGATE)


@pytest.mark.parametrize("name,variant", cases(PRETRAIN))
def test_pretrain_config_loads_and_passes_the_trainer_checks(name, variant, tmp_path):
  c = load(name, variant)
  for key in PRETRAIN_KEYS:
    lookup(c, key)   # KeyError / AttributeError if missing
  assert c.data.name in ("synthetic", "kinetics", "imagenet")
  assert c.model.backbone in ("resnet18", "resnet50")
  step.check_config(c)
  c.data.root = str(tmp_path)   # validate() also checks that the data directory exists
  train.validate(c, parallel.make_mesh())   # 8 fake devices: batch, queue sharding, schedule


@pytest.mark.parametrize("name,variant", cases(EVAL))
def test_eval_config_loads_with_the_spec_keys(name, variant):
  c = load(name, variant)
  for key in EVAL_KEYS:
    lookup(c, key)
  assert c.data.name in ("synthetic", "voc", "cityscapes")
  assert c.num_epochs > 0 and c.batch_size > 0


def test_propagation_config_has_the_spec_keys_and_crws_settings():
  c = load("davis_propagation.py")
  for key in EVAL_KEYS:
    lookup(c, key)
  assert c.data.name == "davis" and c.features == "backbone" and c.data.image_size == 0
  p = c.propagation
  assert (p.context, p.topk, p.radius, p.temperature) == (20, 10, 12.0, 0.05)   # CRW's README


# ------------------------------------------------------------------------- variants

@pytest.mark.parametrize("variant", [None] + R18_VARIANTS)
def test_r18_variant_sets_exactly_its_paper_setting(variant):
  c, base = load("cacl_r18_kinetics.py", variant), load("cacl_r18_kinetics.py", "cacl")
  assert describe(c) == EXPECTED[variant]
  described = DESCRIBED
  if variant == "spec3_readings":   # docs/method.md §3's first readings, written out by hand
    first = {"loss.global_pool": "after_head", "loss.pixel_negatives": "queue",
             "loss.soft_target": "cross", "loss.soft_target_identity": 0.0,
             "model.shuffle_rolls": "independent"}
    assert {k: lookup(c, k) for k in first} == first
    assert all(lookup(base, k) != v for k, v in first.items())
    described = DESCRIBED | set(first)
  if variant in ALTERNATIVE_KEYS:
    changed = ALTERNATIVE_KEYS[variant]
    assert {k: lookup(c, k) for k in changed} == changed
    assert all(lookup(base, k) != v for k, v in changed.items())
    described = DESCRIBED | set(changed)
  rest = {k: v for k, v in flatten(c.to_dict()).items() if k not in described}
  assert rest == {k: v for k, v in flatten(base.to_dict()).items() if k not in described}


@pytest.mark.parametrize("variant", [None] + R50_VARIANTS)
def test_r50_variant_is_the_r18_variant_on_resnet50(variant):
  c, r18 = load("cacl_r50_in_kinetics.py", variant), load("cacl_r18_kinetics.py", variant)
  assert describe(c) == EXPECTED[variant]
  diff = {k for k, v in flatten(c.to_dict()).items() if flatten(r18.to_dict())[k] != v}
  assert diff == {"model.backbone"}
  assert c.model.backbone == "resnet50" and c.model.init_from == ""


@pytest.mark.parametrize("name,bad", [("cacl_r18_kinetics.py", "mocov3"),
                                      ("cacl_r50_in_kinetics.py", "pixel_only"),
                                      ("mocov2_r50_imagenet.py", "cacl")])
def test_unknown_variant_is_one_clear_error(name, bad):
  with pytest.raises(Exception, match=rf"unknown variant '{bad}'"):
    load(name, bad)


def test_unknown_variant_message_lists_the_valid_ones():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("r50", os.path.join(CONFIGS, "cacl_r50_in_kinetics.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(ValueError, match="valid variants: mocov2, two_heads, cacl, simple, no_soft_cycle"):
    module.get_config("global_cycle")


# ------------------------------------------------------------------------- paper-scale values

def test_paper_scale_kinetics_settings():
  c = load("cacl_r18_kinetics.py")
  assert (c.batch_size, c.data.image_size, c.model.bn_group_size) == (512, 224, 32)
  assert (c.queue.size, c.model.embed_dim, c.model.ema_momentum) == (16384, 128, 0.999)
  assert dict(c.loss.temperature) == {"global": 0.07, "pixel": 0.07, "cycle": 0.07}
  assert (c.optim.base_lr, c.optim.base_batch, c.optim.weight_decay) == (1.0, 512, 1e-6)
  assert (c.data.name, c.model.backbone, c.num_epochs) == ("kinetics", "resnet18", 200)
  assert c.total_steps == 93_750   # 200 epochs × 240,000 videos / 512


def test_imagenet_stage_is_mocov2():
  c = load("mocov2_r50_imagenet.py")
  assert (c.data.name, c.data.pair_type, c.data.frame_stride) == ("imagenet", "same_frame", 0)
  assert dict(c.loss.weights) == {"global": 1.0, "pixel": 0.0, "cycle": 0.0}
  assert (c.loss.temperature["global"], c.queue.size, c.model.pixel_shuffle) == (0.2, 65536, False)
  assert (c.model.backbone, c.batch_size) == ("resnet50", 512)
  assert c.total_steps == 500_455  # 200 epochs × 1,281,167 images // 512


@pytest.mark.parametrize("overrides,steps", [
    (["--config.batch_size=1024"], 46_875),
    (["--config.num_epochs=100"], 46_875),
    (["--config.batch_size=256", "--config.num_epochs=50"], 46_875),
    (["--config.total_steps=7"], 7),
])
def test_total_steps_follows_epochs_and_batch(overrides, steps):
  c = load("cacl_r18_kinetics.py", "mocov2", *overrides)
  assert c.total_steps == steps
  assert load("mocov2_r50_imagenet.py", None, "--config.batch_size=256").total_steps == 1_000_911


@pytest.mark.parametrize("name,count", [("cacl_r18_kinetics.py", 11_176_512),
                                        ("cacl_r50_in_kinetics.py", 23_508_032)])
def test_backbone_is_the_torchvision_network(name, count):
  """Parameter count of torchvision's resnet18 / resnet50 without `fc` (BN γ, β included)."""
  c = load(name)
  model = model_from_config(c.model)
  x = jnp.zeros((c.model.bn_group_size, 64, 64, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
  total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]["backbone"]))
  assert total == count


def test_every_config_command_in_the_docs_loads():
  with open(os.path.join(ROOT, "docs", "CONFIGS.md")) as f:
    text = f.read()
  found = set(re.findall(r"configs/(\w+\.py)(?::(\w+))?", text))
  assert len(found) >= 20
  for name, variant in found:
    assert (variant or None) in {**PRETRAIN, **EVAL}[name], f"configs/{name}:{variant}"
    load(name, variant or None)


# ------------------------------------------------------------------------- launch scripts

SCRIPTS = ["tpu_pod.sh", "multihost_gpu.sh", "local_multiprocess.sh"]


def sh(script, *args, env=None, cwd=ROOT):
  full_env = {**os.environ, "DRY_RUN": "1", **(env or {})}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env, cwd=cwd,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_parses(script):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
  assert os.stat(path).st_mode & stat.S_IXUSR
  with open(path) as f:
    assert "set -euo pipefail" in f.read()


def test_local_multiprocess_commands():
  out = sh("local_multiprocess.sh", "configs/demo.py", "/tmp/w", "--config.total_steps=3",
           env={"NUM_PROCESSES": "3", "DEVICES_PER_PROCESS": "2", "PORT": "4321"})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "--xla_force_host_platform_device_count=2" in line
    assert line.endswith(f"--coordinator_address 127.0.0.1:4321 --num_processes 3 --process_id {i} "
                         "--config.total_steps=3")
    assert "-m cacl_jax.main --config configs/demo.py --workdir /tmp/w" in line


def test_multihost_gpu_commands_and_errors():
  env = {"COORDINATOR": "h0:9999", "NUM_PROCESSES": "4", "PROCESS_ID": "3", "PYTHON": "/opt/py/bin/python3"}
  out = sh("multihost_gpu.sh", "configs/cacl_r18_kinetics.py:mocov2", "/nfs/r", env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["/opt/py/bin/python3", "-m", "cacl_jax.main", "--config",
                                "configs/cacl_r18_kinetics.py:mocov2", "--workdir", "/nfs/r",
                                "--coordinator_address", "h0:9999", "--num_processes", "4",
                                "--process_id", "3"]
  # Without PYTHON: this shell's python3 by its absolute path (hosts may not share a PATH).
  plain = sh("multihost_gpu.sh", "c.py", "/w", env={k: v for k, v in env.items() if k != "PYTHON"})
  assert plain.returncode == 0 and plain.stdout.split()[0].startswith("/")
  bad = sh("multihost_gpu.sh", "c.py", "/w", env={**env, "PROCESS_ID": "4"})
  assert bad.returncode == 2 and "PROCESS_ID must be in 0..3" in bad.stderr
  ssh = sh("multihost_gpu.sh", "c.py", "/w", env={"HOSTS": "a b", "PORT": "7"})
  assert ssh.returncode == 0
  assert [l.split()[3] for l in ssh.stdout.splitlines()] == ["a", "b"]
  assert all("--coordinator_address a:7 --num_processes 2" in l for l in ssh.stdout.splitlines())


def test_tpu_pod_train_runs_the_same_command_on_all_workers():
  env = {"TPU_NAME": "pod", "ZONE": "us-central2-b"}
  out = sh("tpu_pod.sh", "train", "configs/cacl_r18_kinetics.py", "gs://b/runs/r18",
           "--config.data.root=/mnt/data/k400", env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all")
  assert ("-m cacl_jax.main --config configs/cacl_r18_kinetics.py --workdir gs://b/runs/r18 "
          "--config.data.root=/mnt/data/k400") in out.stdout
  assert "--coordinator_address" not in out.stdout   # TPU pods find their peers themselves
  missing = sh("tpu_pod.sh", "train", "c.py", "gs://b/r", env={"ZONE": "z", "TPU_NAME": ""})
  assert missing.returncode == 2 and "TPU_NAME" in missing.stderr


def test_tpu_pod_explicit_layout_from_metadata(tmp_path):
  """DIST=explicit: run the remote command with a fake metadata server and python."""
  out = sh("tpu_pod.sh", "train", "configs/demo.py", "gs://b/r", env={
      "TPU_NAME": "pod", "ZONE": "z", "DIST": "explicit"})
  remote = out.stdout.split("--command '", 1)[1].rstrip().removesuffix("'")
  home = tmp_path
  (home / "cacl_jax").mkdir()
  (home / "cacl_venv" / "bin").mkdir(parents=True)
  fake_python = home / "cacl_venv" / "bin" / "python"
  fake_python.write_text('#!/bin/sh\necho "$@"\n')
  fake_python.chmod(0o755)
  fake_curl = ('curl() { case "$*" in *worker-network-endpoints*) '
               'echo "w-0:0:10.1.0.2,w-1:1:10.1.0.3,w-2:2:10.1.0.4,w-3:3:10.1.0.5";; *) echo 2;; esac; }; ')
  run = subprocess.run(["bash", "-c", fake_curl + remote + "; wait"], env={**os.environ, "HOME": str(home)},
                       capture_output=True, text=True, timeout=30)
  assert run.returncode == 0, run.stderr
  log = (home / "cacl_logs" / "r.log").read_text().split()
  assert log[-6:] == ["--coordinator_address", "10.1.0.2:8476", "--num_processes", "4",
                      "--process_id", "2"]
  assert (home / "cacl_logs" / "current.pid").read_text().strip().isdigit()


FAKE_PROCESS = """#!/bin/bash
# Stands in for `python -m MODULE ...`: process 1 fails when FAIL is set; SIGTERM exits 0.
trap 'echo "SIGTERM $*"; exit 0' TERM
echo "started $*"
if [[ -n ${FAIL:-} && $* == *"--process_id 1"* ]]; then sleep 0.5; exit 3; fi
while true; do sleep 0.1; done
"""


def _fake_python(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE_PROCESS)
  path.chmod(0o755)
  return str(path)


def test_local_multiprocess_stops_all_when_one_fails(tmp_path):
  env = {**os.environ, "PYTHON": _fake_python(tmp_path), "FAIL": "1"}
  env.pop("DRY_RUN", None)
  out = subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "c.py", str(tmp_path / "w")],
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 3
  assert "process 1 (pid" in out.stderr and "exited with 3" in out.stderr
  assert "SIGTERM" in (tmp_path / "w" / "logs" / "process_0.log").read_text()


def test_local_multiprocess_forwards_sigterm(tmp_path):
  env = {**os.environ, "PYTHON": _fake_python(tmp_path), "NUM_PROCESSES": "3"}
  env.pop("DRY_RUN", None)
  proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "c.py", str(tmp_path / "w")],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  logs = [tmp_path / "w" / "logs" / f"process_{i}.log" for i in range(3)]
  for _ in range(100):   # until all three have started
    if all(p.exists() and "started" in p.read_text() for p in logs):
      break
    time.sleep(0.1)
  proc.terminate()   # SIGTERM to the launcher, by its own pid
  assert proc.wait(timeout=30) == 0
  for p in logs:
    assert "SIGTERM -m cacl_jax.main --config c.py" in p.read_text()
