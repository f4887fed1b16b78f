"""Flag parsing shared by the entry points: every flag or config mistake is one line; the
settings a process must carry before JAX starts (XLA flags, host memory); and a quiet console
(the libraries' INFO lines only with --verbosity)."""
from __future__ import annotations

import logging
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging


def parse_flags(program: str):
  """An absl `flags_parser` for `app.run` that reports mistakes as `PROGRAM: error: ...`.

  An unknown `--config.KEY` makes ml_collections raise AttributeError / KeyError from inside
  the parser, and a config file that raises (e.g. an unknown `file.py:variant`) arrives as a
  flags.Error whose text ends with the file's traceback: both would print pages by default.
  """
  def parse(argv: list[str]) -> list[str]:
    use_fake_cpu_devices()
    reuse_host_memory()
    try:
      rest = flags.FLAGS(argv)
      if not flags.FLAGS["verbosity"].present:
        absl_logging.get_absl_handler().addFilter(_OwnLines())
      return rest
    except flags.Error as e:
      sys.exit(f"{program}: error: {_last_line(str(e))}")
    except (AttributeError, KeyError) as e:
      while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
        e = e.args[0]
      key = "; ".join(str(e.args[0] if e.args else e).splitlines())  # 'key' [; Did you mean ...]
      given = " ".join(a for a in argv[1:] if a.startswith("--config."))
      sys.exit(f"{program}: error: unknown config key {key} in {given} "
               "(the --config file and cacl_jax/defaults.py list every key)")
    except (TypeError, ValueError) as e:
      sys.exit(f"{program}: error: bad --config override: {e}")
  return parse


def use_fake_cpu_devices(environ=os.environ) -> None:
  """Settings for a process with fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
  N > 1: the tests' and the device-count checks' setting). Call it before JAX creates its CPU
  client (every entry point does, through `parse_flags`); a user's own setting wins.

  XLA's default scheduler: XLA:CPU's concurrency-optimised scheduler can order one device's
  collectives so that each device waits in a rendezvous another cannot reach. The demo's train
  step on 4 CPU devices deadlocked every time with it (all-gathers over device pairs against the
  gradients' all-reduce; XLA aborts after 40 s); the default scheduler runs the same arithmetic
  (scheduling orders the ops, it does not change them).
  """
  flags = environ.get("XLA_FLAGS", "")
  devices = re.search(r"xla_force_host_platform_device_count=(\d+)", flags)
  if devices and int(devices.group(1)) > 1 and "concurrency_optimized_scheduler" not in flags:
    environ["XLA_FLAGS"] = (flags + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_host_memory(environ=os.environ) -> bool:
  """Lets a CPU process reuse the memory of its last step instead of faulting it in again.

  XLA:CPU mallocs each execution's temporaries in one block (61 MiB for the ResNet-18 ¼-width
  step at 64 px, 446 MiB at 112 px) and frees it afterwards. glibc serves a block that large
  with mmap and returns it with munmap, so every step page-faulted its whole temporary memory
  again: 15.5k / 117k faults per step, 11-20 % of the step (`benchmarks/step_vs_pytorch.py`'s
  shapes, docs/performance.md). Two settings keep it:

  * mallopt(M_MMAP_MAX, 0) and a 1 GiB M_TRIM_THRESHOLD: large blocks come from the heap and
    stay there when freed, to be handed out again;
  * `jax_cpu_enable_async_dispatch=False`: a CPU execution runs on the calling thread, whose
    heap (glibc's main arena) can grow to any size; a worker thread's arena cannot grow past
    64 MiB and maps larger blocks anyway.

  The arithmetic is untouched (same bits); GPUs and TPUs run their steps on their own clients.
  Call it before JAX creates its CPU client (every entry point does, through `parse_flags`).
  A user's own malloc settings (MALLOC_*_ or GLIBC_TUNABLES, a preloaded allocator) or
  JAX_CPU_ENABLE_ASYNC_DISPATCH win. Returns whether the malloc settings were applied.
  """
  if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in environ:
    import jax  # pylint: disable=g-import-not-at-top
    try:
      jax.config.update("jax_cpu_enable_async_dispatch", False)
    except AttributeError:   # a JAX without the option
      pass
  if (any(k.startswith("MALLOC_") for k in environ) or "GLIBC_TUNABLES" in environ
      or "malloc" in environ.get("LD_PRELOAD", "")):
    return False
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to set
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class _OwnLines(logging.Filter):
  """The console at default verbosity: this package's own lines, warnings (not Orbax's: one per
  read-only manager) and errors. Orbax alone writes ~40 INFO lines per checkpoint saved or read;
  `--verbosity=0` (or any --verbosity) shows everything again, `--verbosity=1` also the
  evaluations' per-class tables (which are written to files either way)."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return ("/cacl_jax/" in path or record.levelno >= logging.ERROR
            or (record.levelno >= logging.WARNING and "/orbax/" not in path))


def _last_line(text: str) -> str:
  """The exception line at the end of a message that quotes a traceback."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def load_config_module(config_file: str):
  """The config file as a module (its `get_config(variant)` and optional `PAPER_MIOU`)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_config_file", config_file)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(config_file)))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module
