"""cacl_jax: Cycle-Attention Contrastive Learning (Pang et al., AAAI 2022) in JAX/Flax."""
import os
import re

# Several CPU devices in one process (XLA_FLAGS=--xla_force_host_platform_device_count=N, the
# tests' and the device-count checks' setting): XLA:CPU's concurrency-optimised scheduler can
# order one device's collectives so that each device waits in a rendezvous another cannot reach.
# The demo's train step on 4 CPU devices deadlocked every time with it (all-gathers over device
# pairs against the gradients' all-reduce; XLA aborts after 40 s); with XLA's default scheduler
# it runs, with the same arithmetic (scheduling orders the ops, it does not change them). Set
# here, before JAX creates its CPU client; a user's own setting of the flag wins.
_FLAGS = os.environ.get("XLA_FLAGS", "")
_DEVICES = re.search(r"xla_force_host_platform_device_count=(\d+)", _FLAGS)
if _DEVICES and int(_DEVICES.group(1)) > 1 and "concurrency_optimized_scheduler" not in _FLAGS:
  os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
