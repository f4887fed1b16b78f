"""Weak scaling of the train step (docs/method.md §2), compile-only: per-device work and traffic do not grow
with the device count at a fixed per-device batch (benchmarks/scaling.py measures the sizes)."""
import collections
import os
import sys

import pytest

from cacl_jax.runtime import parallel
import tiny

sys.path.insert(0, os.path.join(tiny.ROOT, "benchmarks"))
import scaling  # noqa: E402  pylint: disable=g-import-not-at-top

PER_DEVICE = 4


def _config(devices):
  """The suite's tiny model at 4 images a device; BN groups of 8 (on 8 devices a group spans
  two devices, and shuffle-BN mixes the whole global batch)."""
  c = tiny.get_config()
  c.batch_size = PER_DEVICE * devices
  c.model.bn_group_size = min(8, c.batch_size)
  return c


@pytest.fixture(scope="module")
def programs():
  return {n: scaling.analyse(_config(n), parallel.make_mesh(n)) for n in (1, 2, 8)}


def test_per_device_flops_do_not_grow_with_the_device_count(programs):
  """Shuffle-BN used to gather the global image batch and run the target on all of it on every
  device: per-device FLOPs then grew linearly with the devices (2.3x from 1 to 8 here)."""
  one = programs[1]["flops"]
  for n in (2, 8):
    assert programs[n]["flops"] == pytest.approx(one, rel=0.05), (n, programs[n]["flops"], one)


def test_nothing_image_or_map_sized_travels(programs):
  """What may grow with the global batch is statistics-sized ([global batch, channels]: BN
  sums, the queues' new keys); the rest (gradients, the queues) stays the same size; in all,
  the bytes a device moves grow by at most 1.25x from 2 to 8 devices."""
  c8 = _config(8)
  widest = max(512 // c8.model.width_divisor, c8.model.embed_dim)
  bound = c8.batch_size * widest * 4
  arrays = lambda n: collections.Counter(a for c in programs[n]["collectives"] for a in c["arrays"]
                                         for _ in range(c["times"]))
  grown = arrays(8) - arrays(2)    # the arrays the larger global batch adds or enlarges
  assert grown, "expected the per-sample BN statistics of the larger batch"
  assert max(grown) <= bound, f"a collective carries {max(grown)} bytes > [B, C] = {bound}: {grown}"
  assert programs[8]["collective_bytes"] <= 1.25 * programs[2]["collective_bytes"]
  assert programs[1]["collective_bytes"] == 0


def test_collectives_parser_counts_tuples_and_loop_trips():
  hlo = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %g = f32[16,8]{1,0} all-gather(%x), channel_id=1, dimensions={0}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %r = (f32[10]{0}, bf16[3,2]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""
  found = {c["kind"]: c for c in scaling.collectives(hlo)}
  assert found["all-reduce"]["bytes"] == 10 * 4 + 6 * 2 and found["all-reduce"]["times"] == 1
  assert found["all-gather"]["bytes"] == 16 * 8 * 4 and found["all-gather"]["times"] == 3
