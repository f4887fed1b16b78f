"""Memory and CPU time of the cycle loss (docs/method.md §3) against one N×(N+K) float32 matrix.

    python benchmarks/cycle_loss_memory.py            # full table (compiles N up to 4096)
    python benchmarks/cycle_loss_memory.py --quick    # N <= 1024 only

For each (B, N, K, variant) the loss is compiled with `jax.ShapeDtypeStruct` inputs (nothing
big is allocated) and XLA's `temp_size_in_bytes` is read for the forward and for
`value_and_grad` (what training runs). Small sizes are also run and timed on the CPU.
Variants: 'hard' / 'soft' are `cacl_jax.losses.cycle_loss`; 'explicit_M' is the textbook
hard loss that forms M = P1 P2 (the N×(N+K) product) for comparison; 'pixel' is
`pixel_loss` at the paper's per-device size, to show which head dominates memory there, and
'pixel_frame' the same with the defaults' negatives (the queue and the frame's other pixels).
Writes benchmarks/results/cycle_loss_memory.json.
"""
import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Runnable as a script from anywhere: the package is the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cacl_jax.method import losses  # noqa: E402  pylint: disable=g-import-not-at-top

TAU = 0.07
D = 128
TIME_MAX_N = 1024  # run and time only up to this N (2 CPU cores)


def explicit_m_hard(c, c_pos, queue, temperature):
  """−mean log diag(P1 P2) with M formed explicitly: the baseline the module avoids."""
  c_hat = losses.l2n(c.astype(jnp.float32))
  c_pos_hat = losses.l2n(jax.lax.stop_gradient(c_pos).astype(jnp.float32))
  keys = jnp.concatenate([c_hat, jnp.broadcast_to(losses.l2n(queue), (c.shape[0],) + queue.shape)],
                         axis=1)
  p1 = jax.nn.softmax(jnp.einsum('bnd,bmd->bnm', c_hat, c_pos_hat) / temperature, axis=-1)
  p2 = jax.nn.softmax(jnp.einsum('bnd,bmd->bnm', c_pos_hat, keys) / temperature, axis=-1)
  m = jnp.einsum('bij,bjk->bik', p1, p2)  # [B, N, N+K]
  return -jnp.mean(jnp.log(jnp.diagonal(m, axis1=1, axis2=2)))


def make_fn(variant, b, n):
  """(loss(x, x_pos, queue), extra inputs) for one variant."""
  if variant == 'hard':
    return functools.partial(losses.cycle_loss, temperature=TAU)
  if variant == 'soft':
    return lambda c, c_pos, q, t: losses.cycle_loss(c, c_pos, q, TAU, soft_target=t)
  if variant == 'explicit_M':
    return functools.partial(explicit_m_hard, temperature=TAU)
  if variant == 'pixel':
    return lambda p, p_pos, q, u: losses.pixel_loss(p, p_pos, u, p_pos, q, TAU)
  if variant == 'pixel_frame':   # the defaults' negatives: the queue and the frame's own pixels
    return lambda p, p_pos, q, u: losses.pixel_loss(p, p_pos, u, p_pos, q, TAU,
                                                    negatives='queue+frame')
  raise ValueError(f'unknown variant {variant!r}')


def inputs(variant, b, n, k, concrete):
  shapes = [(b, n, D), (b, n, D), (k, D)]
  if variant == 'soft':
    shapes.append((b, n, n))
  if variant in ('pixel', 'pixel_frame'):
    shapes.append((b, n, D))
  if not concrete:
    return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=s).astype(np.float32) for s in shapes]
  if variant == 'soft':
    arrays[3] = np.asarray(losses.soft_cycle_target(arrays[0], arrays[1], TAU))
  return [jnp.asarray(a) for a in arrays]


def cpu_seconds(compiled, args, repeats=5):
  """Best of `repeats` calls: the least disturbed by other processes on a shared host."""
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.min(times))


def measure(variant, b, n, k):
  fn = make_fn(variant, b, n)
  row = {'variant': variant, 'B': b, 'N': n, 'K': k}
  one_matrix = b * n * (n + k) * 4
  row['one_matrix_bytes'] = one_matrix
  for name, f in (('fwd', fn), ('fwd_bwd', jax.value_and_grad(fn))):
    compiled = jax.jit(f).lower(*inputs(variant, b, n, k, concrete=False)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    row[f'{name}_temp_bytes'] = int(temp)
    row[f'{name}_ratio'] = temp / one_matrix
    if n <= TIME_MAX_N and b == 1:
      row[f'{name}_cpu_s'] = cpu_seconds(compiled, inputs(variant, b, n, k, concrete=True))
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='only N <= 1024')
  args = parser.parse_args()
  cases = [(v, 1, n, k) for n in (256, 1024, 4096) for k in (0, 16384)
           for v in ('hard', 'soft', 'explicit_M')]
  # The paper's per-device batch: 32 images of 28×28 pixels (224 / 8), K = 16384.
  cases += [(v, 32, 784, 16384) for v in ('hard', 'soft', 'pixel', 'pixel_frame')]
  if args.quick:
    cases = [c for c in cases if c[2] <= TIME_MAX_N and c[1] == 1]

  header = (f'{"variant":>10} {"B":>3} {"N":>5} {"K":>6} | {"fwd MiB":>9} {"ratio":>6} '
            f'{"fwd+bwd MiB":>11} {"ratio":>6} | {"fwd ms":>8} {"fwd+bwd ms":>10}')
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; ratio = temp bytes / '
        f'(B·N·(N+K)·4), one N×(N+K) float32 matrix per image; D = {D}, τ = {TAU}')
  print(header)
  print('-' * len(header))
  rows = []
  for case in cases:
    row = measure(*case)
    rows.append(row)
    ms = lambda key: f'{1e3 * row[key]:.1f}' if key in row else '-'
    print(f'{row["variant"]:>10} {row["B"]:>3} {row["N"]:>5} {row["K"]:>6} | '
          f'{row["fwd_temp_bytes"] / 2**20:>9.1f} {row["fwd_ratio"]:>6.2f} '
          f'{row["fwd_bwd_temp_bytes"] / 2**20:>11.1f} {row["fwd_bwd_ratio"]:>6.2f} | '
          f'{ms("fwd_cpu_s"):>8} {ms("fwd_bwd_cpu_s"):>10}', flush=True)

  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                     'cycle_loss_memory.json')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump({'jax': jax.__version__, 'platform': jax.devices()[0].platform, 'D': D,
               'tau': TAU, 'queue_chunk': losses._QUEUE_CHUNK, 'rows': rows}, f, indent=1)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
