"""Test set-up, before JAX starts: 8 fake CPU devices, fast XLA compiles, a shared compile
cache (subprocess tests reuse what earlier tests compiled), absl flags parsed for grain."""
import os

from cacl_jax.runtime import cli  # absl and the standard library only: JAX has not started

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The suite's models are tiny: XLA's CPU backend optimisations cost ~3x the compile time and
# buy nothing measurable at these sizes (see README, "Tests"). Numerics are unchanged.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
cli.use_fake_cpu_devices()   # XLA's default scheduler
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/cacl_jax_test_compile_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
cli.reuse_host_memory()      # as every entry point does (imports JAX, after its settings above)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
