"""The method core around the losses: pixel shuffle, EMA, queues, BN groups / shuffle-BN, the
step's random streams, device-count invariance of the one sharded train step (a tolerance), and
a learning signal."""
import functools
import importlib.util
import os
import resource
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacl_jax import defaults
from cacl_jax.method import ema, pixel_shuffle, queue
from cacl_jax.training import optim
from cacl_jax.runtime import cli, parallel
from cacl_jax.training import step as step_lib, streams, xla_cpu
from cacl_jax.data import pipeline
from cacl_jax.models.cacl import model_from_config
from cacl_jax.models.resnet import GroupBatchNorm, compute_dtype

SIZE, BATCH = 32, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  c = defaults.pretrain_config()
  c.batch_size, c.total_steps, c.data.image_size = BATCH, 30, SIZE
  c.model.width_divisor, c.model.bn_group_size, c.model.embed_dim = 8, 4, 32
  c.queue.size = 64
  c.model.ema_momentum = 0.99
  return c


def pair_batch(seed=0):
  """v = random images, v+ = the same images moved by (3, 2) pixels (a 'next frame').

  Pixel noise rather than flat blocks: equal features would make the pixel head's argmax
  matches exact ties, decided by float rounding, which differs between device counts."""
  rng = np.random.default_rng(seed)
  big = rng.integers(0, 256, (BATCH, SIZE + 3, SIZE + 2, 3)).astype(np.uint8)
  return {"v": np.ascontiguousarray(big[:, :SIZE, :SIZE]),
          "v_pos": np.ascontiguousarray(big[:, 3:SIZE + 3, 2:SIZE + 2])}


@functools.lru_cache(maxsize=None)
def compiled(num_devices, base_lr=1.0):
  c = tiny_config()
  c.optim.base_lr = base_lr
  mesh = parallel.make_mesh(num_devices)
  model = model_from_config(c.model)
  tx, schedule = optim.make_optimizer(c)
  state, shardings = step_lib.create_state(model, tx, c, mesh, seed=0)
  return mesh, state, step_lib.jit_train_step(model, tx, schedule, c, mesh, shardings)


# ---------------------------------------------------------------- pixel shuffle

def test_roll_images_is_eq7():
  x = jnp.arange(2 * 16 * 24).reshape(2, 16, 24, 1)
  rolls = jnp.array([[8, 16], [0, 8]])
  y = pixel_shuffle.roll_images(x, rolls)
  for b, (a, c) in enumerate(np.asarray(rolls)):
    for i, j in [(0, 0), (5, 7), (15, 23)]:
      assert y[b, i, j, 0] == x[b, (i + a) % 16, (j + c) % 24, 0]


def test_pixel_shuffle_round_trip_is_exact_on_the_feature_grid():
  x = jax.random.normal(jax.random.key(0), (4, 32, 48, 3))
  pool8 = lambda t: t.reshape(t.shape[0], t.shape[1] // 8, 8, t.shape[2] // 8, 8, -1).mean((2, 4))
  rolls = pixel_shuffle.draw_rolls(jax.random.key(1), 4, 32, 48)
  assert np.all(np.asarray(rolls) % 8 == 0)
  assert len({tuple(r) for r in np.asarray(rolls)}) > 1  # independent per image
  back = pixel_shuffle.unroll_features(pool8(pixel_shuffle.roll_images(x, rolls)), rolls)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(pool8(x)))


def test_roll_gradient_is_autodiffs_bit_for_bit():
  """The custom VJP (the inverse roll, a gather) gives autodiff's scatter-add's exact values."""
  f = jax.random.normal(jax.random.key(0), (4, 4, 6, 3))
  g = jax.random.normal(jax.random.key(2), f.shape)
  rolls = pixel_shuffle.draw_rolls(jax.random.key(1), 4, 32, 48)
  autodiff = lambda t: jax.vmap(lambda a, s: jnp.roll(a, (s[0], s[1]), axis=(0, 1)))(t, rolls // 8)
  y, vjp = jax.vjp(lambda t: pixel_shuffle.unroll_features(t, rolls), f)
  y0, vjp0 = jax.vjp(autodiff, f)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
  np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp0(g)[0]))
  assert not np.array_equal(np.asarray(vjp(g)[0]), np.asarray(g))   # the rolls are not all zero


# ---------------------------------------------------------------- EMA

def test_ema_update_and_cosine_ramp():
  t, o = {"w": jnp.full((3,), 2.0)}, {"w": jnp.full((3,), 4.0)}
  chex.assert_trees_all_close(ema.update(t, o, jnp.float32(0.75)), {"w": jnp.full((3,), 2.5)})
  assert float(ema.momentum_at(jnp.int32(5), 10, 0.999, cosine=False)) == pytest.approx(0.999)
  assert float(ema.momentum_at(jnp.int32(0), 10, 0.99, cosine=True)) == pytest.approx(0.99)
  assert float(ema.momentum_at(jnp.int32(5), 10, 0.99, cosine=True)) == pytest.approx(0.995)
  assert float(ema.momentum_at(jnp.int32(10), 10, 0.99, cosine=True)) == pytest.approx(1.0)


# ---------------------------------------------------------------- queues

def test_queue_holds_the_last_k_keys_in_order_and_wraps():
  k, n, d = 12, 4, 3
  q, ptr = queue.init(jax.random.key(0), k, d), jnp.int32(0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=1), 1.0, rtol=1e-6)
  enqueue = jax.jit(queue.enqueue)
  keys = np.arange(7 * n * d, dtype=np.float32).reshape(7 * n, d)
  for s in range(7):
    q, ptr = enqueue(q, ptr, keys[s * n:(s + 1) * n])
  assert int(ptr) == (7 * n) % k == 4
  np.testing.assert_array_equal(np.asarray(queue.ordered(q, ptr)), keys[-k:])


def test_queue_size_must_be_a_multiple_of_the_enqueue_count():
  with pytest.raises(ValueError, match="multiple of the per-step enqueue count 48"):
    queue.check_size(100, 48, "pixel")
  c = tiny_config()
  c.queue.size = 70
  with pytest.raises(ValueError, match="queue.size=70"):
    step_lib.check_config(c)


def test_sharded_enqueue_matches_unsharded():
  mesh = parallel.make_mesh(8)
  spec = jax.sharding.PartitionSpec("data")
  q = jax.device_put(queue.init(jax.random.key(0), 64, 8), jax.sharding.NamedSharding(mesh, spec))
  keys = jax.random.normal(jax.random.key(1), (16, 8))
  q2, ptr = jax.jit(queue.enqueue)(q, jnp.int32(48), keys)
  want = np.array(queue.init(jax.random.key(0), 64, 8))
  want[48:64] = np.asarray(keys)
  np.testing.assert_array_equal(np.asarray(q2), want)
  assert int(ptr) == 0 and q2.sharding.spec == spec


# ---------------------------------------------------------------- backbone

@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_max_pool_matches_reduce_window_values_and_gradient(padding):
  # ReLU outputs: many exact ties (zeros), where the gradient must go to the first maximum.
  from cacl_jax.models import resnet
  import flax.linen as nn
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 15, 14, 3)))
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  if padding == "circular":
    ref = lambda t: nn.max_pool(jnp.pad(t, pad, mode="wrap"), (3, 3), strides=(2, 2), padding="VALID")
  else:
    ref = lambda t: nn.max_pool(t, (3, 3), strides=(2, 2), padding=pad[1:3])
  ours = lambda t: resnet._max_pool(t, padding)
  g = jax.random.normal(jax.random.key(1), ref(x).shape)
  np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ref(x)))
  np.testing.assert_array_equal(np.asarray(jax.vjp(ours, x)[1](g)[0]), np.asarray(jax.vjp(ref, x)[1](g)[0]))


# ---------------------------------------------------------------- BN groups / shuffle-BN

def test_group_batchnorm_uses_per_group_statistics():
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * jnp.arange(1, 9)[:, None, None, None]
  bn = GroupBatchNorm(group_size=4)
  variables = bn.init(jax.random.key(1), x, train=True)
  y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  for g in range(2):
    xg = np.asarray(x[4 * g:4 * g + 4], np.float64)
    want = (xg - xg.mean((0, 1, 2))) / np.sqrt(xg.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(y[4 * g:4 * g + 4]), want, rtol=1e-4, atol=1e-4)
  means = np.stack([np.asarray(x[:4]).mean((0, 1, 2)), np.asarray(x[4:]).mean((0, 1, 2))]).mean(0)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * means, rtol=1e-5)
  with pytest.raises(ValueError, match="does not divide"):
    bn.apply(variables, x[:6], train=True, mutable=["batch_stats"])


def _tiny_model_and_vars(group):
  c = tiny_config()
  c.model.bn_group_size = group
  c.model.bn_mode = "group" if group else "sync"
  model = model_from_config(c.model)
  variables = model.init(jax.random.key(0), jnp.zeros((group or 2, SIZE, SIZE, 3)), train=True)
  x = jax.random.normal(jax.random.key(2), (BATCH, SIZE, SIZE, 3))
  return model, variables, x


def test_shuffle_bn_outputs_stay_aligned_with_their_inputs():
  # Whole-batch statistics: a permutation must not change any sample's output.
  model, var, x = _tiny_model_and_vars(None)
  perm = jax.random.permutation(jax.random.key(3), BATCH)
  plain, _ = step_lib.forward(model, var["params"], var["batch_stats"], x, None, None)
  shuffled, _ = step_lib.forward(model, var["params"], var["batch_stats"], x, None, perm)
  np.testing.assert_allclose(np.asarray(shuffled["u"]), np.asarray(plain["u"]), rtol=1e-4, atol=1e-5)

  # Groups of 4: sample i's output equals a plain pass over exactly its permuted group.
  model, var, x = _tiny_model_and_vars(4)
  shuffled, _ = step_lib.forward(model, var["params"], var["batch_stats"], x, None, perm)
  perm_np = np.asarray(perm)
  for g in range(BATCH // 4):
    members = perm_np[4 * g:4 * g + 4]
    alone, _ = step_lib.forward(model, var["params"], var["batch_stats"], x[members], None, None)
    np.testing.assert_allclose(np.asarray(shuffled["c"][members]), np.asarray(alone["c"]),
                               rtol=1e-4, atol=1e-5)


def test_shuffle_bn_groups_are_redrawn_every_step():
  """The permutation comes from the state's key, which advances every step."""
  mesh, state, train_step = compiled(1)
  batch = parallel.host_to_global(mesh, pair_batch())
  s1, _ = train_step(jax.tree.map(jnp.copy, state), batch)
  s2, _ = train_step(jax.tree.map(jnp.copy, s1), batch)
  perms = []
  for s in (state, s1):
    perms.append(np.asarray(jax.random.permutation(streams.step_keys(s.rng)[1]["shuffle_bn"], BATCH)))
  assert not np.array_equal(perms[0], perms[1])
  assert not np.array_equal(np.asarray(state.rng), np.asarray(s1.rng))
  # Different groups → the target's BN statistics move differently on identical inputs.
  d1 = jax.tree.map(lambda a, b: a - b, s1.target_batch_stats, state.target_batch_stats)
  d2 = jax.tree.map(lambda a, b: a - b, s2.target_batch_stats, s1.target_batch_stats)
  assert not np.allclose(np.asarray(jax.tree.leaves(d1)[0]), np.asarray(jax.tree.leaves(d2)[0]) / 0.9)


# ---------------------------------------------------------------- the sharded step

def _run_steps(num_devices, steps):
  mesh, state, train_step = compiled(num_devices)
  state = jax.tree.map(jnp.copy, state)
  batch = parallel.host_to_global(mesh, pair_batch())
  history = []
  for _ in range(steps):
    state, metrics = train_step(state, batch)
    history.append(parallel.to_host(metrics))
  return parallel.to_host(state), history


def demo_config():
  """configs/demo.py as `--config configs/demo.py --config.total_steps=6` gives it: six steps,
  so the warm-up is 0 and step 1 already moves the parameters at the full learning rate."""
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.total_steps = 6
  return c


def noise_pairs(batch, size, seed):
  """v = uniform pixel noise, v+ = the same noise moved by (3, 2) pixels: the demo's frames have
  flat regions, whose exact ties in the argmax matches, ReLUs and max-pools turn a rounding
  difference into another decision (docs/reliability.md, "Same numbers on any device count")."""
  big = np.random.default_rng(seed).integers(0, 256, (batch, size + 3, size + 2, 3)).astype(np.uint8)
  return {"v": np.ascontiguousarray(big[:, :size, :size]),
          "v_pos": np.ascontiguousarray(big[:, 3:size + 3, 2:size + 2])}


@functools.lru_cache(maxsize=None)
def demo_steps(num_devices: int, steps: int = 2):
  """The demo's model, losses, optimiser and schedule on `num_devices` devices, `steps` steps
  of pixel-noise pairs: the metrics of each step, and the state after it (on the host)."""
  c = demo_config()
  mesh = parallel.make_mesh(num_devices)
  model = model_from_config(c.model)
  tx, schedule = optim.make_optimizer(c)
  state, shardings = step_lib.create_state(model, tx, c, mesh, c.seed)
  train_step = step_lib.jit_train_step(model, tx, schedule, c, mesh, shardings)
  history, states = [], []
  for step in range(steps):
    batch = noise_pairs(c.batch_size, c.data.image_size, step)
    state, metrics = train_step(state, parallel.host_to_global(mesh, batch))
    history.append(parallel.to_host(metrics))
    states.append(parallel.to_host(state))
  return history, states


def relative_differences(tree, ref) -> dict[str, float]:
  """‖a − b‖ / ‖b‖ per layer: the leaves of one module together (a BN layer's scale and bias, a
  convolution's kernel, a queue), in float64; 0 where both are 0."""
  sums = {}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref)):
    layer = jax.tree_util.keystr(path[:-1]) if len(path) > 1 else jax.tree_util.keystr(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d, n = sums.get(layer, (0.0, 0.0))
    sums[layer] = (d + np.sum((a - b) ** 2), n + np.sum(b ** 2))
  return {k: np.sqrt(d / n) if n else np.sqrt(d) for k, (d, n) in sums.items()}


STATE_PARTS = ("params", "batch_stats", "target_params", "target_batch_stats", "opt_state", "queues")


def test_the_demos_steps_agree_on_1_2_4_and_8_devices():
  """docs/method.md §2: BN groups and the global random streams make the sharding invisible up to
  float reduction order, in the one program every platform runs. The demo's model, losses and
  lr 2.0 from step 1, on 2, 4 and 8 devices against one (on 8 a BN group of 8 spans two
  devices, whose statistics are the groups' all-reduced sums): every loss within 1e-5 relative
  at step 1 and 2e-4 at step 2; after step 1 every parameter leaf within 1e-5 (‖Δ‖/‖θ‖; measured
  ≤ 3.4e-6 here), but the BatchNorm biases within 3e-5 (measured ≤ 1.1e-5 here, ≤ 1.6e-5 on the
  demo's frames: after one step a BN bias is lr × the small residual of sums that cancel, which
  any reordering of the float32 sums moves relatively far); the BN statistics, target and queues
  within 1e-5 per layer (a module's leaves together), the optimiser's momentum (this step's
  gradient) within 1e-4; the step's RNG, queue pointers and step equal. The state after step 2
  is not compared: one step of rounding differences, through the ReLUs and the argmax matches,
  moves a layer by ~2e-3 (docs/reliability.md, "Same numbers on any device count")."""
  ref_hist, ref_states = demo_steps(1)
  for n in (2, 4, 8):
    hist, states = demo_steps(n)
    for step, tol in ((1, 1e-5), (2, 2e-4)):
      a, b = hist[step - 1], ref_hist[step - 1]
      for k in ("loss", "loss_global", "loss_pixel", "loss_cycle"):
        assert abs(a[k] - b[k]) <= tol * abs(b[k]), (k, step, n, a[k], b[k])
    state, ref = states[0], ref_states[0]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref.params)):
      name = jax.tree_util.keystr(path)
      bn_bias = "bn" in name and name.endswith("['bias']")
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.linalg.norm(a - b) <= (3e-5 if bn_bias else 1e-5) * np.linalg.norm(b), (n, name)
    for part in STATE_PARTS:
      worst = max(relative_differences(getattr(state, part), getattr(ref, part)).items(),
                  key=lambda kv: kv[1])
      assert worst[1] <= (1e-4 if part == "opt_state" else 1e-5), (part, n, worst)
    for state, ref in zip(states, ref_states):
      chex.assert_trees_all_equal((state.rng, state.queue_ptrs, state.step),
                                  (ref.rng, ref.queue_ptrs, ref.step))


_BN_BITS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from cacl_jax.models.resnet import GroupBatchNorm
x = jax.random.normal(jax.random.key(0), (32, 32, 32, 8)) * 3 + 1      # the demo's stem: [B, H, W, C]
t = jax.random.normal(jax.random.key(1), x.shape)
bn = GroupBatchNorm(group_size=8)
v = bn.init(jax.random.key(2), x, train=True)
def loss(p, x):
  y, _ = bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
  return jnp.sum(jnp.maximum(y, 0) * t)                       # a ReLU after it, as in the backbone
grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
np.savez(sys.argv[1], *[np.asarray(g) for g in jax.tree.leaves(grads)])
"""


def test_batchnorm_computes_the_same_bits_in_any_thread_pool(tmp_path):
  """XLA:CPU runs a process's reductions on its thread pool, whose size is the core count or
  the fake device count, and a sum with few outputs ([groups, C]) is split across the pool:
  its bits followed the process, and the backward pass through the BatchNorms amplified that
  to 4e-4 per layer after one step between a process of one device and one of eight
  (docs/reliability.md). Per-sample sums first ([B, C]) keep each sum on one thread: the BN
  layer's forward and backward bits are the same with pools of 2, 3 and 8 threads."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
  runs = []
  for i, (devices, pool) in enumerate(((1, 2), (1, 3), (8, 8))):
    out = tmp_path / f"{i}.npz"
    subprocess.run([sys.executable, "-c", _BN_BITS, str(out)], cwd=ROOT, check=True,
                   env=dict(env, PJRT_NPROC=str(pool),
                            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
    runs.append([a for _, a in sorted(np.load(out).items())])
  for run in runs[1:]:
    chex.assert_trees_all_equal(run, runs[0])


def test_a_rerun_on_the_same_layout_is_bit_identical():
  """Same devices, same state, same batch: the same bits (what resume and reruns rely on)."""
  mesh, state, train_step = compiled(4)
  batch = parallel.host_to_global(mesh, pair_batch())
  runs = []
  for _ in range(2):
    s = jax.tree.map(jnp.copy, state)
    for _ in range(2):
      s, metrics = train_step(s, batch)
    runs.append(parallel.to_host((s, metrics)))
  chex.assert_trees_all_equal(runs[0], runs[1])


def test_every_purpose_draws_from_its_own_key():
  """streams.py: no two purposes of a step share a key, nor any purpose the next step's key or
  a purpose of a later step (MoCHi's draws once reused the cycle queue's pixel picks: with
  partitionable threefry, split(k)[i] == fold_in(k, i))."""
  assert jax.config.jax_threefry_partitionable
  rng = np.asarray(jax.random.key_data(jax.random.key(7)))
  seen = {}
  for step in range(3):
    rng, keys = streams.step_keys(rng)
    assert list(keys) == list(streams.PURPOSES)
    for name, key in {**keys, "next step": jax.random.wrap_key_data(rng)}.items():
      data = np.asarray(jax.random.key_data(key)).tobytes()
      assert data not in seen, (step, name, seen.get(data))
      seen[data] = (step, name)
  keys = streams.step_keys(rng)[1]
  picks = [np.asarray(jax.random.randint(keys[p], (8, 4), 0, 64)) for p in
           ("enqueue_pixel", "enqueue_cycle", "mochi_global", "mochi_pixel")]
  assert all(not np.array_equal(a, b) for i, a in enumerate(picks) for b in picks[i + 1:])


def test_the_mesh_follows_the_cpu_devices_order():
  """CPUs: the devices as enumerated (what the multi-process tests' layouts assume); GPUs and
  TPUs take `mesh_utils.create_device_mesh`'s topology order (`parallel.device_order`)."""
  assert list(parallel.make_mesh(4).devices.flat) == jax.devices()[:4]
  assert parallel.make_mesh().devices.shape == (len(jax.devices()),)


_FAULTS = """
import resource, sys
from cacl_jax.runtime import cli
if sys.argv[1] == "reuse":
  cli.reuse_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((1024, 18432), jnp.float32)
f = jax.jit(lambda x: jnp.sin(x).T.cumsum(0)).lower(x).compile()   # 77 MiB of temporaries
temp = f.memory_analysis().temp_size_in_bytes
f(x).block_until_ready()
calls = []                           # page faults of each call
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  calls.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(temp, min(calls))
"""


def test_a_cpu_process_reuses_its_last_executions_memory():
  """`cli.reuse_host_memory` (every entry point calls it): a program whose temporaries exceed
  glibc's mmap limits faults them all in again on every call (the last call's freed block went
  back to the OS); with it the freed block is reused and the faults all but disappear."""
  # A plain user's process: none of the suite's XLA / JAX settings (its compile cache included).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "JAX_", "XLA_"))
         and k not in ("GLIBC_TUNABLES", "PJRT_NPROC")}
  faults = {}
  for mode in ("default", "reuse"):
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True)
    temp, faults[mode] = map(float, out.stdout.split())
  pages = temp / resource.getpagesize()
  assert temp > 64 * 2**20                      # beyond what a worker thread's arena can hold
  assert faults["default"] > 0.5 * pages, (faults, pages)
  # The fewest faults of five calls. Measured, with it: 0-2 a call, now and then one call that
  # faults the block in anew while the heap settles (72 MiB results come and go beside it);
  # without it every call faults the whole block.
  assert faults["reuse"] < 0.05 * pages, (faults, pages)
  assert not cli.reuse_host_memory({"MALLOC_ARENA_MAX": "2", "JAX_CPU_ENABLE_ASYNC_DISPATCH": "1"})


def test_state_layout_queues_sharded_params_replicated():
  mesh, state, train_step = compiled(8)
  assert state.queues["cycle"].sharding.spec == jax.sharding.PartitionSpec("data", None)
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.is_fully_replicated
  new_state, metrics = train_step(jax.tree.map(jnp.copy, state), parallel.host_to_global(mesh, pair_batch()))
  assert new_state.queues["global"].sharding.spec == jax.sharding.PartitionSpec("data", None)
  assert int(new_state.queue_ptrs["global"]) == BATCH and int(new_state.queue_ptrs["pixel"]) == BATCH
  assert set(metrics) >= {"loss", "loss_global", "loss_pixel", "loss_cycle", "lr"}


def test_thirty_steps_on_a_fixed_batch_lower_the_loss():
  """Learning signal against a control. Both runs see the same fixed pair batch, the same
  augmentations, pixel shuffles, BN groups and queue updates; the control puts the online
  parameters back after every step (lr = 0 in effect). Measured: the control's total loss
  stays at ~13 (each head near its chance level with 4 copies of every key in the K = 64
  queue), the trained run falls to ~8, the cycle head from ~3.5 to ~1.6. Asserted: the
  trained total is below 0.75× the control's over the last 5 steps, and each head is lower.
  Random drift cannot do this against a matched control; a broken gradient path (a
  stop-gradient on the online side, the target taking the update) leaves the two equal."""
  # lr 5 at batch 16: LARS (trust 1e-3) moves each kernel by ~0.5% a step.
  mesh, state0, train_step = compiled(1, base_lr=160.0)
  batch = parallel.host_to_global(mesh, pair_batch())
  runs = {}
  for mode in ("trained", "control"):
    state, hist = jax.tree.map(jnp.copy, state0), []
    for _ in range(30):
      new, metrics = train_step(jax.tree.map(jnp.copy, state) if mode == "control" else state, batch)
      if mode == "control":
        new = new.replace(params=state.params, opt_state=state.opt_state, target_params=state.target_params)
      state = new
      hist.append(parallel.to_host(metrics))
    runs[mode] = {k: np.array([h[k] for h in hist[-5:]]).mean() for k in hist[0]}
    assert all(np.isfinite(h["loss"]) for h in hist)
  trained, control = runs["trained"], runs["control"]
  assert trained["loss"] < 0.75 * control["loss"], (trained, control)
  for head in ("loss_global", "loss_pixel", "loss_cycle"):
    assert trained[head] < control[head], (head, trained, control)


def test_bfloat16_compute_keeps_float32_parameters_and_losses():
  c = tiny_config()
  c.model.dtype = "bfloat16"
  mesh = parallel.make_mesh(2)
  model = model_from_config(c.model)
  tx, schedule = optim.make_optimizer(c)
  state, shardings = step_lib.create_state(model, tx, c, mesh, seed=0)
  out = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                    jnp.zeros((4, SIZE, SIZE, 3)), train=False)
  # The backbone computes in bfloat16; the heads, which feed the losses and the match's
  # argmax, accumulate and return float32 (no bfloat16 ties in m(i)).
  assert out["h"].dtype == jnp.bfloat16
  assert all(out[k].dtype == jnp.float32 for k in ("u", "p", "c", "u_gap"))
  train_step = step_lib.jit_train_step(model, tx, schedule, c, mesh, shardings)
  new, metrics = train_step(state, parallel.host_to_global(mesh, pair_batch()))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.queues))
  ref = _run_steps(2, 1)[1][0]
  for k in ("loss_global", "loss_pixel", "loss_cycle"):
    assert metrics[k].dtype == jnp.float32 and np.isfinite(float(metrics[k]))
    # bf16 activations move the losses a little, not a lot.
    np.testing.assert_allclose(float(metrics[k]), ref[k], rtol=0.1, atol=0.05)


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert compute_dtype("auto", "gpu") == jnp.bfloat16 and compute_dtype("auto", "tpu") == jnp.bfloat16
  assert compute_dtype("auto", "cpu") == jnp.float32 and compute_dtype("auto") == jnp.float32  # here
  assert compute_dtype("bfloat16", "cpu") == jnp.bfloat16
  with pytest.raises(ValueError, match="model.dtype"):
    compute_dtype("float16")
  c = tiny_config()
  c.model.dtype = "half"
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    step_lib.check_config(c)


def test_cpu_compiler_options_go_to_full_width_backbones_and_keep_the_numbers():
  c = tiny_config()
  mesh = parallel.make_mesh(1)
  assert xla_cpu.compiler_options(c, mesh) is None          # the narrow variants keep XLA's default
  c.model.width_divisor = 1
  options = xla_cpu.compiler_options(c, mesh)
  assert options == xla_cpu._EIGEN_CONVOLUTIONS
  # The same float32 convolution, another library: equal up to rounding.
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC")))
  default = conv.lower(x, w).compile()
  eigen = conv.lower(x, w).compile(compiler_options=options)
  assert default.as_text() != eigen.as_text()
  np.testing.assert_allclose(np.asarray(eigen(x, w)), np.asarray(default(x, w)), rtol=1e-4, atol=1e-4)
