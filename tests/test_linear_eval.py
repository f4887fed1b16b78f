"""The evaluation program end to end: pipelines, restore across device counts, probe, results.

One pretraining workdir is shared by the module. Its checkpoint (step 7) is a real Orbax
checkpoint of the trainer's `TrainState`, written by `checkpoint.save` from the 8 fake devices
with the trainer's own shardings (`step.state_shardings`: queues split along K). The state's
values are drawn with NumPy into the shapes of `jax.eval_shape(step.init_state)` rather than
by running `train.run`: on this 2-core CPU compiling the initialiser and a train step takes
minutes, and evaluation only reads the saved arrays. Distinctive values (BN statistics
mean = 0.01·i, var = 1 + 0.1·i) make a restore that silently re-initialised fail the test.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cacl_jax.runtime import checkpoint, parallel
from cacl_jax import defaults
from cacl_jax.training import optim, step as step_lib
from cacl_jax.data import synthetic
from cacl_jax.evaluation import probe, segdata
from cacl_jax.models.cacl import model_from_config
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 7
NUM_VAL = 10


def load_config(name, arg=None):
  """Loads configs/<name>.py by path, as `--config` does."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def eval_config(pretrained_dir=""):
  """configs/linear_eval_synthetic.py, shrunk: 32 train images (2 steps), 10 val images
  of 64 px padded to 72² in batches of 8 (so the last batch holds filler samples)."""
  c = load_config("linear_eval_synthetic")
  c.pretrained = pretrained_dir
  c.num_epochs = 1
  c.batch_size = 16
  c.eval_batch_size = 8
  c.log_every_steps = 1
  c.num_figure_images = 2
  c.data.eval_pad_size = (72, 72)
  c.data.synthetic.frame_size = 64
  c.data.synthetic.num_train_images = 32
  c.data.synthetic.num_val_images = NUM_VAL
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(workdir, backbone params, backbone batch_stats) of a checkpoint saved on 8 devices."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  c = defaults.pretrain_config()
  c.batch_size = 8
  c.data.name = "synthetic"
  c.data.image_size = 64
  c.model.width_divisor = 8
  c.model.bn_group_size = 4
  c.queue.size = 64
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  model = model_from_config(c.model)
  tx, _ = optim.make_optimizer(c)
  shapes = jax.eval_shape(lambda: step_lib.init_state(model, tx, c, 0))
  rng = np.random.default_rng(0)
  values = jax.tree.map(
      lambda x: (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
      if np.issubdtype(x.dtype, np.floating) else np.zeros(x.shape, x.dtype), shapes)
  values.batch_stats["backbone"] = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.01 * np.arange(x.size) if path[-1].key == "mean"
                       else 1.0 + 0.1 * np.arange(x.size)).astype(np.float32),
      values.batch_stats["backbone"])
  state = jax.device_put(values, step_lib.state_shardings(shapes, mesh))
  assert not state.queues["global"].sharding.is_fully_replicated   # split over the 8 devices
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, STEP, state, c, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return workdir, values.params["backbone"], values.batch_stats["backbone"]


# ---------------------------------------------------------------------------- data


def test_train_augmentation_shapes_and_labels():
  source = synthetic.SyntheticSegmentation("train", num_images=2, frame_size=64, seed=0)
  item = source[0]
  rng = np.random.default_rng(0)
  out = [segdata.scale_crop_flip(item, rng, 96) for _ in range(6)]
  for o in out:
    assert o["image"].shape == (96, 96, 3) and o["label"].shape == (96, 96)
    assert set(np.unique(o["label"])) <= set(np.unique(item["label"])) | {255}
  # A 64² image scaled by at most 2.0 leaves padding in a 96² crop only when s < 1.5.
  assert any((o["label"] == 255).any() for o in out)
  # Scale 1, crop = image side: the crop is the image itself (or its mirror image).
  same = segdata.scale_crop_flip(item, np.random.default_rng(1), 64, (1.0, 1.0))
  assert (np.array_equal(same["label"], item["label"])
          or np.array_equal(same["label"], item["label"][:, ::-1]))


def test_val_batches_cover_each_image_once_across_processes():
  source = synthetic.SyntheticSegmentation("val", num_images=NUM_VAL, frame_size=64, seed=0)
  config = eval_config().data
  seen, steps = [], []
  for process in range(3):
    batches = list(segdata.val_batches(source, config, 2, process, 3))
    steps.append(len(batches))
    for b in batches:
      assert b["image"].shape == (2, 72, 72, 3) and b["label"].shape == (2, 72, 72)
      for j, image_id in enumerate(b["id"]):
        if image_id:
          seen.append(image_id)
          assert (b["label"][j, 64:] == 255).all() and (b["label"][j, :, 64:] == 255).all()
          np.testing.assert_array_equal(b["label"][j, :64, :64],
                                        source[int(image_id.split("/")[-1])]["label"])
        else:
          assert (b["label"][j] == 255).all()
  assert steps == [2, 2, 2]       # ceil(ceil(10 / 3) / 2): every process runs the same steps
  assert sorted(seen) == sorted(source[i]["id"] for i in range(NUM_VAL))
  with pytest.raises(ValueError, match="larger than data.eval_pad_size"):
    config.eval_pad_size = (32, 32)
    next(segdata.val_batches(source, config, 2))


def test_finetune_subsets_are_seeded_and_nested():
  subsets = {f: segdata.subset_indices(2975, f, seed=0) for f in (0.01, 0.05, 0.10, 1.0)}
  assert [len(s) for s in subsets.values()] == [30, 149, 298, 2975]
  np.testing.assert_array_equal(subsets[0.05], segdata.subset_indices(2975, 0.05, seed=0))
  assert set(subsets[0.01]) < set(subsets[0.05]) < set(subsets[0.10]) < set(subsets[1.0])
  assert set(segdata.subset_indices(2975, 0.05, seed=1)) != set(subsets[0.05])
  assert load_config("finetune_cityscapes", "5pct").finetune_fraction == 0.05
  with pytest.raises(ValueError, match="finetune_fraction"):
    segdata.subset_indices(100, 0.0, seed=0)


# ---------------------------------------------------------------------------- program


@pytest.fixture(scope="module")
def evaluated(pretrained, tmp_path_factory):
  """`linear_eval`'s program on the default mesh (8 devices): (its workdir, results)."""
  workdir = str(tmp_path_factory.mktemp("eval"))
  return workdir, probe.evaluate_checkpoint(eval_config(pretrained[0]), workdir)


def test_linear_eval_end_to_end(evaluated):
  workdir, results = evaluated
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  for key in ("miou", "macc", "per_class_iou", "per_class_acc", "num_images",
              "checkpoint_step", "checkpoint_path", "config"):
    assert key in saved, key
  assert saved["checkpoint_step"] == STEP and saved["num_images"] == NUM_VAL
  assert saved["checkpoint_path"].endswith(os.path.join("checkpoints", str(STEP)))
  assert list(saved["per_class_iou"]) == list(synthetic.CLASS_NAMES)
  assert saved["config"]["data"]["name"] == "synthetic"
  # Full resolution: every real val pixel counted once; padding and fillers ignored.
  assert saved["num_pixels"] == NUM_VAL * 64 * 64
  assert 0.0 <= saved["miou"] <= 100.0 and saved["miou"] == results["miou"]
  present = [v for v in saved["per_class_iou"].values() if v is not None]
  assert saved["miou"] == pytest.approx(np.mean(present), abs=0.051)
  for name in ("confusion_matrix.png", "predictions.png", "probe_metrics.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "probe_metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged] == [1, 2]   # 32 images / batch 16 × 1 epoch
  assert logged[0]["lr"] == pytest.approx(0.6)   # cosine from lr 0.6


def test_checkpoint_from_eight_devices_evaluates_on_one(pretrained, evaluated, tmp_path):
  """The 8-device checkpoint restores exactly, and the probe on a 1-device mesh gives the
  8-device run's numbers."""
  workdir, params, stats = pretrained
  restored = checkpoint.restore_pretrained(workdir)
  assert restored.step == STEP
  jax.tree.map(np.testing.assert_array_equal, restored.params, params)
  jax.tree.map(np.testing.assert_array_equal, restored.batch_stats, stats)
  config = eval_config(workdir)
  config.num_figure_images = 0
  results, state = probe.run_probe(config, restored.params, restored.batch_stats,
                                   restored.config.model, parallel.make_mesh(1), str(tmp_path))
  # The linear protocol freezes the backbone and its BN statistics.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.backbone), params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.batch_stats), stats)
  eight = evaluated[1]
  np.testing.assert_allclose(results["final_loss"], eight["final_loss"], rtol=1e-4)
  cm1, cm8 = np.array(results["confusion_matrix"]), np.array(eight["confusion_matrix"])
  # Identical up to argmax ties that float reassociation may flip: at most a few pixels.
  assert np.abs(cm1 - cm8).sum() <= 20
  assert cm1.sum() == cm8.sum() == NUM_VAL * 64 * 64


def finetune_config(pretrained_dir):
  """Fine-tuning on half the train split (16 images): 2 epochs of one step, a checkpoint after
  each step."""
  config = eval_config(pretrained_dir)
  config.finetune, config.finetune_fraction = True, 0.5
  config.learning_rate, config.weight_decay = 0.05, 1e-4
  config.data.image_size = 32
  config.num_figure_images = 0
  config.num_epochs, config.checkpoint_every_steps = 2, 1
  return config


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
  """(workdir, results, final state) of the fine-tuning probe, uninterrupted."""
  workdir = str(tmp_path_factory.mktemp("finetune"))
  restored = checkpoint.restore_pretrained(pretrained[0])
  results, state = probe.run_probe(finetune_config(pretrained[0]), restored.params,
                                   restored.batch_stats, restored.config.model,
                                   parallel.make_mesh(), workdir)
  return workdir, results, state


def test_finetune_trains_the_backbone_on_the_subset(pretrained, finetuned):
  _, params, stats = pretrained
  workdir, results, state = finetuned
  assert results["mode"] == "finetune" and results["num_train_images"] == 16
  # Every backbone tensor trained, and the running BN statistics moved (SyncBN, train mode).
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), jax.device_get(state.backbone), params)
  assert all(jax.tree.leaves(changed))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), jax.device_get(state.batch_stats), stats)
  assert all(jax.tree.leaves(moved))
  with open(os.path.join(workdir, "finetune_ids.txt")) as f:
    ids = f.read().split()
  source = synthetic.SyntheticSegmentation("train", 32, 64, 0)
  assert ids == [source[int(i)]["id"] for i in segdata.subset_indices(32, 0.5, 0)]
  assert np.isfinite(results["final_loss"]) and results["num_pixels"] == NUM_VAL * 64 * 64


# ---------------------------------------------------------------------------- resume


def test_a_finetune_stopped_after_its_first_step_resumes_to_the_same_numbers(pretrained,
                                                                            finetuned, tmp_path,
                                                                            capsys):
  """The uninterrupted fine-tuning's workdir as a run killed right after checkpoint 1 would
  leave it (checkpoint 2 and the log of step 2 gone): the same call resumes from step 1 and
  ends with the same backbone, BN statistics, head and confusion matrix, bit for bit."""
  workdir, results, state = finetuned
  stopped = str(tmp_path / "stopped")
  shutil.copytree(workdir, stopped)
  shutil.rmtree(os.path.join(stopped, "checkpoints", "2"))
  assert tiny.committed_steps(stopped) == [1]
  restored = checkpoint.restore_pretrained(pretrained[0])
  resumed, resumed_state = probe.run_probe(finetune_config(pretrained[0]), restored.params,
                                           restored.batch_stats, restored.config.model,
                                           parallel.make_mesh(), stopped)
  assert f"resumed the probe from {checkpoint.checkpoint_dir(stopped)}/1" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(resumed_state))):
    np.testing.assert_array_equal(a, b)
  assert resumed["confusion_matrix"] == results["confusion_matrix"]
  assert resumed["final_loss"] == results["final_loss"]
  with open(os.path.join(stopped, "probe_metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]   # each step once


def test_a_resume_with_another_config_or_backbone_is_refused_in_one_line(pretrained, finetuned,
                                                                         tmp_path):
  workdir, _, _ = finetuned
  restored = checkpoint.restore_pretrained(pretrained[0])
  config = finetune_config(pretrained[0])
  config.learning_rate = 0.1
  with pytest.raises(ValueError, match=r"learning_rate 0\.05 -> 0\.1\. These keys change the run"):
    probe.run_probe(config, restored.params, restored.batch_stats, restored.config.model,
                    parallel.make_mesh(), workdir)
  other = jax.tree.map(lambda x: x + 1, restored.params)
  with pytest.raises(ValueError, match="continues a probe of another backbone"):
    probe.run_probe(finetune_config(pretrained[0]), other, restored.batch_stats,
                    restored.config.model, parallel.make_mesh(), workdir)
  with pytest.raises(ValueError, match="is the pretraining run itself"):
    probe.run_probe(finetune_config(pretrained[0]), restored.params, restored.batch_stats,
                    restored.config.model, parallel.make_mesh(), pretrained[0])


RESUME_EPOCHS = 16   # 32 steps: a SIGTERM after the second logged step lands mid-probe


def cli_overrides(pretrained_dir) -> list[str]:
  """eval_config(pretrained_dir) with RESUME_EPOCHS and a checkpoint every 8 steps, as
  `linear_eval` flags (the demo's ceiling off, as the issue's check runs it)."""
  return [f"--config.pretrained={pretrained_dir}", f"--config.num_epochs={RESUME_EPOCHS}",
          "--config.checkpoint_every_steps=8", "--config.batch_size=16",
          "--config.eval_batch_size=8", "--config.log_every_steps=1",
          "--config.num_figure_images=2", "--config.data.eval_pad_size=(72, 72)",
          "--config.data.synthetic.frame_size=64", "--config.data.synthetic.num_train_images=32",
          f"--config.data.synthetic.num_val_images={NUM_VAL}", "--config.supervised.num_epochs=0"]


def test_linear_eval_stopped_by_sigterm_resumes_to_an_uninterrupted_runs_results(pretrained,
                                                                                tmp_path):
  """`python -m cacl_jax.linear_eval`, its process group SIGTERMed after two logged steps:
  exit 0 with the step reached saved and no results.json; the same command again resumes and
  writes the results of an uninterrupted probe (run here, in-process, on the same 8 devices)."""
  config = eval_config(pretrained[0])
  config.num_epochs, config.checkpoint_every_steps = RESUME_EPOCHS, 8
  reference = probe.evaluate_checkpoint(config, str(tmp_path / "uninterrupted"))
  workdir = str(tmp_path / "stopped")
  command = [sys.executable, "-m", "cacl_jax.linear_eval",
             "--config", os.path.join(ROOT, "configs", "linear_eval_synthetic.py"),
             "--workdir", workdir, *cli_overrides(pretrained[0])]
  log = os.path.join(workdir, "probe_metrics.jsonl")
  outputs = []
  for launch in range(2):
    with open(tmp_path / f"launch{launch}.log", "w") as out:
      proc = subprocess.Popen(command, cwd=ROOT, env=tiny.env(8), stdout=out,
                              stderr=subprocess.STDOUT, text=True, process_group=0)
    try:
      if launch == 0:
        tiny.wait_until(lambda: os.path.exists(log) and open(log).read().count("\n") >= 2,
                        [proc], "two logged probe steps")
        os.killpg(proc.pid, signal.SIGTERM)
        stopped_at = len(open(log).read().splitlines())   # the saved step is at or after it
      proc.wait(timeout=tiny.TIMEOUT)
    finally:
      tiny.kill_running([proc])
    outputs.append((proc.returncode, (tmp_path / f"launch{launch}.log").read_text()))
    if launch == 0:
      assert not os.path.exists(os.path.join(workdir, "results.json"))
      saved = tiny.committed_steps(workdir)
  (code, out), (code2, out2) = outputs
  assert code == 0, out[-3000:]
  reached = saved[-1]
  assert stopped_at <= reached < 2 * RESUME_EPOCHS, saved
  assert f"SIGTERM: saved probe step {reached}" in out and "Traceback" not in out
  assert code2 == 0, out2[-3000:]
  assert f"resumed the probe from {checkpoint.checkpoint_dir(workdir)}/{reached}" in out2
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  for key in ("miou", "macc", "per_class_iou", "confusion_matrix", "final_loss", "train_steps"):
    assert results[key] == reference[key], key
  with open(log) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, 2 * RESUME_EPOCHS + 1))


def test_random_backbone_calibrates_bn_statistics():
  """The random-init baseline: BN statistics at their initial values, or re-estimated."""
  model_config = defaults.pretrain_config().model
  model_config.width_divisor = 8
  images = synthetic.SyntheticSegmentation("val", 4, 32, 0)
  images = np.stack([images[i]["image"] for i in range(4)])
  params, plain = probe.random_backbone(model_config, seed=0, image_size=32)
  same_params, calibrated = probe.random_backbone(model_config, 0, 32, images, 30)
  jax.tree.map(np.testing.assert_array_equal, params, same_params)
  np.testing.assert_array_equal(plain["bn1"]["var"], 1.0)
  # bn1 sees conv1 of the normalised images: its running mean converges to their mean
  # (within 0.9^30 ≈ 4% of the gap from the initial 0).
  x = probe.augment.normalize(images)
  conv1 = jax.lax.conv_general_dilated(
      x, params["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  target = np.asarray(conv1.mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(calibrated["bn1"]["mean"], target * (1 - 0.9 ** 30),
                             rtol=1e-3, atol=1e-5)


def test_cli_reports_mistakes_in_one_line(tmp_path):
  def run(*overrides):
    return subprocess.run(
        [sys.executable, "-m", "cacl_jax.linear_eval",
         "--config", os.path.join(ROOT, "configs", "linear_eval_synthetic.py"),
         "--workdir", str(tmp_path / "w"), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})

  missing = run(f"--config.pretrained={tmp_path / 'nowhere'}")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].startswith(
      "linear_eval: error: no checkpoints under")
  unknown = run("--config.no_such_key=1")
  assert unknown.returncode == 1
  assert unknown.stderr.strip() == (
      "linear_eval: error: unknown config key 'no_such_key' in --config.no_such_key=1 "
      "(the --config file and cacl_jax/defaults.py list every key)")
  for out in (missing, unknown):
    assert "Traceback" not in out.stderr
