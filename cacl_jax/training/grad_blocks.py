"""The CPU train step's online network and losses in fixed blocks of samples: a loss and a
gradient whose float sums do not depend on the number of devices (docs/method.md §2,
"device-count invariance").

A parameter gradient is a sum over the batch. Left to XLA, that sum is taken inside each
convolution's weight-gradient kernel over the samples a device holds, and then across devices
by an all-reduce: 32 samples at once on one device, 4 × 8 plus an all-reduce on four. Those are
different float sums (an ulp apart), and within two steps a flipped ReLU or argmax match turns
an ulp into 1e-3 of the loss. The losses have the same problem at a smaller scale: XLA:CPU
splits a row's reduction (an L2 norm) by the shape of the whole array, [32, D] or [8, D]. Here
every shape and every order is fixed instead:

  * the batch is cut into blocks of `block` consecutive samples (whole BN groups, so that a
    block's forward and backward need no other block);
  * each block's loss and gradient are computed on their own: one `jax.value_and_grad` per
    block of a device, inside `shard_map`. A block has the same shape on every layout, so
    every kernel runs the same way and gives the same bits (no padding sample is needed: a
    device's last block is computed like its first);
  * the per-block results are gathered and combined in one balanced pairwise tree over the
    global block index (`fixed_order.tree_sum`), the same expression on 1, 2, 4 or 8 devices.

This decomposes the step exactly because every loss term is a mean over the batch of
per-sample terms in which the target's maps and the queues are constants: the batch's loss is
the mean of its blocks' losses. Only the CPU program uses it (`xla_cpu.layout_blocks`); GPUs and
TPUs keep one value_and_grad with XLA's all-reduce, which gathers no per-block gradients.

One thing a program cannot fix: XLA:CPU's dot and convolution kernels also block their sums by
the size of the process' thread pool, which grows with the number of fake devices;
`runtime/cli.use_fake_cpu_devices` gives processes with fake devices one pool size.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cacl_jax.runtime.parallel import DATA


def copies_per_block(num_blocks: int, num_devices: int) -> int:
  """How many devices compute each block: 1 when the devices share the blocks evenly; k > 1
  when they cannot (8 devices, 4 blocks: k = 2). Then k devices compute the same block and
  only its first copy counts, so that no block is ever split over devices."""
  return num_devices // math.gcd(num_blocks, num_devices)


def blockwise_value_and_grad(fn: Callable, params: Any, consts: Any, inputs: Any, block: int,
                             mesh: Mesh) -> tuple[jax.Array, Any, Any]:
  """fn's value, aux and parameter gradient for each block of `block` consecutive samples.

  fn(params, consts, block_inputs, index) → (value: float32 [], aux: pytree), where
  block_inputs holds block `index` (int32 []) of `inputs` ([block, ...] leaves). params: the
  differentiated pytree and consts (no gradient), both replicated; inputs: a pytree of
  [B, ...] arrays sharded on the mesh's 'data' axis, B a multiple of `block`.

  Returns (values [n], aux [n, ...], grads [n, ...params]) for the n = B/block blocks in
  block order, replicated on the mesh: each block computed alone, whatever the layout.
  """
  batch = jax.tree.leaves(inputs)[0].shape[0]
  n = batch // block
  copies = copies_per_block(n, mesh.devices.size)
  on_data = lambda t: jax.lax.with_sharding_constraint(t, NamedSharding(mesh, P(DATA)))
  split = lambda t: on_data(t.reshape(n, block, *t.shape[1:]).repeat(copies, axis=0))
  blocks = jax.tree.map(split, inputs)                     # [n·copies, block, ...]
  index = on_data(jnp.repeat(jnp.arange(n, dtype=jnp.int32), copies))

  def local(params, consts, blocks, index):                # one device's blocks, one by one
    # Unrolled, not `lax.map`: inside a while loop's body XLA:CPU leaves the convolutions'
    # transposes in forms that go to Eigen instead of YNNPACK (the ÷4 step was 5x slower).
    # The price is compile time: one copy of the network per block (the demo's 4: 9 → 18 s).
    results = [jax.value_and_grad(fn, has_aux=True)(params, consts,
                                                    jax.tree.map(lambda t: t[i], blocks), index[i])
               for i in range(len(index))]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[(v, a, g) for (v, a), g in results])

  # check_vma=False: the losses' scans start from constant carries, which the check would have
  # to be told are device-varying; every output is per block (P(DATA)) anyway.
  results = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA)),
                          out_specs=P(DATA), check_vma=False)(params, consts, blocks, index)
  first = lambda t: t.reshape(n, copies, *t.shape[1:])[:, 0]   # each block's first copy
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda t: jax.lax.with_sharding_constraint(first(t), replicated), results)
