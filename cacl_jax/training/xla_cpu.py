"""XLA:CPU-only compiler settings of the train step (GPUs and TPUs ignore all of this): Eigen's
convolutions for full-width backbones on a CPU. A setting, not another program: the step's
structure is the same on every platform."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh


# XLA:CPU's default library fusions minus YNNPACK's convolutions (which then go to Eigen).
_EIGEN_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=None)
def _compiler_accepts(option: str, value: str) -> bool:
  """Whether this jaxlib knows `option=value` (the flag is experimental and may change)."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((2,), jnp.float32)).compile(
        compiler_options={option: value})
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def compiler_options(config, mesh: Mesh) -> dict[str, str] | None:
  """XLA options for the train step: on a CPU, full-width backbones get Eigen's convolutions.

  XLA:CPU hands every convolution to YNNPACK, whose kernels lose to Eigen's on the wide,
  dilated stages (28×28×512, dilation 4: forward, input and weight gradient 998 / 1041 / 1568 ms
  against 606 / 646 / 664) and win on the narrow ones. Measured on the whole step (2-core
  CPU, loaded, README "Results"): R18 224 px −22 %, R18 112 px −10 %, R50 112 px −38 %, R18 ÷4
  112 px −4 %, but the ÷4 demo at 64 px +7 %: so only full-width backbones take it. The
  numbers are unchanged (both are float32 convolutions). GPUs and TPUs ignore it.
  """
  platform = mesh.devices.flat[0].platform
  if platform != "cpu" or config.model.get("width_divisor", 1) != 1:
    return None
  (option, value), = _EIGEN_CONVOLUTIONS.items()
  return dict(_EIGEN_CONVOLUTIONS) if _compiler_accepts(option, value) else None
