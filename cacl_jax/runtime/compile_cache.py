"""XLA's persistent compilation cache, on by default: a restart (a preempted Spot slice, a
SLURM requeue, the same demo twice) reads its programs back instead of compiling them again.

`configure(directory)` must run before the process compiles anything (JAX reads the setting
once, at its first compile). JAX_COMPILATION_CACHE_DIR in the environment wins over the config
(the tests' shared cache, a user's own), and JAX_ENABLE_COMPILATION_CACHE=false still turns the
cache off (the tests' multi-process runs). A gs:// directory is read and written by JAX itself.
"""
from __future__ import annotations

import os

import jax

# Programs that compile faster than this are not written (JAX's default is 1 s): the train
# step, the diagnostics and figure probes are all above it on a CPU; below are the small
# eager ops, thousands of entries that would cost more to write than to compile.
MIN_COMPILE_TIME_S = 0.5


def configure(directory: str) -> str | None:
  """Points JAX's persistent cache at `directory` ('' = off; `~` expanded); returns the
  directory in use (the environment's if set), or None."""
  from_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if from_env:
    return from_env
  if not directory:
    return None
  path = directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
