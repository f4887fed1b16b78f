"""Resume only with the config the run was started with (docs/usage.md §4).

A checkpoint holds the state of one run: its shapes (backbone, widths, D, K), its data
position (`batch_size`, `seed`, the data keys: the global batch of step t is a function of
them and t), its learning-rate schedule (`total_steps`, `optim.*`), its losses. Resuming it
under another value of any of those would either fail inside Orbax or, worse, silently change
the run (another `batch_size` rescales the lr, repeats or skips data and breaks the queue
pointers' alignment). So a resume compares the saved config with the new one, key by key:

* keys in MAY_CHANGE (and everything under them) change nothing the run computes: logging,
  figure and checkpoint cadence, where the prepared data lives, the grain worker count, the
  evaluation chained after pretraining;
* any other difference is refused with one line naming each key with its old and new value.

A key the saved config lacks (a run started before the key existed) counts as unchanged when
the new value is the key's default (`defaults.py`): that is what the old code did.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from cacl_jax import defaults

MAY_CHANGE = (
    "variant",             # a label (the keys the variant sets are compared themselves)
    "log_every_steps", "viz_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "eval_after",          # the evaluation run after pretraining (demo)
    "data.root",           # the same prepared data, moved or mounted elsewhere
    "data.num_workers", "data.prefetch",   # the stream does not depend on them (pipeline.py)
    "model.init_from",     # read only when a run starts from step 0
    # How a long run is watched, cached, profiled and fault-injected (docs/reliability.md)
    "allow_fresh_start", "max_consecutive_skips", "watchdog_seconds", "compilation_cache_dir",
    "profile", "debug",
)
_ABSENT = object()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}. Empty dicts stay as leaves."""
  if isinstance(tree, dict) and tree:
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _as_json(config: ml_collections.ConfigDict | dict) -> dict:
  """Both sides as JSON values (tuples become lists), as the checkpoint stores them."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def _may_change(key: str, may_change: tuple[str, ...] = MAY_CHANGE) -> bool:
  return any(key == k or key.startswith(k + ".") for k in may_change)


def changed_keys(saved: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict | dict,
                 may_change: tuple[str, ...] = MAY_CHANGE) -> list[tuple[str, Any, Any]]:
  """(key, saved value, new value) for every key outside `may_change` whose value differs."""
  old, now = flatten(_as_json(saved)), flatten(_as_json(new))
  default = flatten(_as_json(defaults.pretrain_config()))
  changes = []
  for key in sorted(set(old) | set(now)):
    if _may_change(key, may_change):
      continue
    a, b = old.get(key, _ABSENT), now.get(key, _ABSENT)
    if a is _ABSENT and b == default.get(key, _ABSENT):
      continue
    if a != b:
      changes.append((key, a, b))
  return changes


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def check_resume(saved: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict,
                 checkpoint: str, may_change: tuple[str, ...] = MAY_CHANGE) -> None:
  """Raises ValueError (one line) if `new` changes a key that changes the run (any key outside
  `may_change`: pretraining's MAY_CHANGE by default; the evaluation passes its own)."""
  changes = changed_keys(saved, new, may_change)
  if not changes:
    return
  listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changes)
  raise ValueError(
      f"the config differs from the one {checkpoint} was saved with: {listed}. These keys "
      f"change the run; resume with the saved values, or start a fresh run with another "
      f"--workdir (keys that may change on resume: {', '.join(may_change)})")
