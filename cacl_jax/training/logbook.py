"""What a logging step writes (process 0): the record to metrics.jsonl (`metrics_log.Writer`,
off the loop's thread), the same scalars to TensorBoard, one console line with the losses, the
diagnostics, the speed, where the window's time went and the goodput.
"""
from __future__ import annotations

import math
import os

import jax
from etils import epath

from cacl_jax.runtime import metrics_log
from cacl_jax.training import diagnostics, step as step_lib


class Logger:
  """metrics.jsonl (through a `metrics_log.Writer`: appended off the loop's thread) +
  TensorBoard + console (process 0 only)."""

  def __init__(self, workdir: epath.Path, total_steps: int):
    self.active = jax.process_index() == 0
    self.total = total_steps
    self.workdir = workdir
    self.writer = self.log_file = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.fspath(workdir))
      self.log_file = metrics_log.Writer(workdir)

  def log(self, step: int, metrics: dict[str, float], rate: float, batch_hash: int,
          state_hash: int) -> None:
    if not self.active:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "steps_per_sec": rate}
    self.log_file.append({**record, "batch_hash": batch_hash, "state_hash": state_hash})
    for k, v in record.items():
      if k != "step":
        self.writer.add_scalar(f"train/{k}", v, step)
    self.writer.flush()
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    heads = " ".join(f"{h[0].upper()}={record.get('loss_' + h, math.nan):.3f}" for h in step_lib.HEADS)
    within = "/".join(f"{record.get('cos_within_' + k, float('nan')):.2f}" for k in diagnostics.MAPS)
    match = (f" match true {record['match_true_acc']:.2f} label {record['match_label_acc']:.2f}"
             if "match_true_acc" in record else "")
    split = " ".join(f"{k} {record.get(k + '_s', 0.0):.1f}s" for k in ("data_wait", "step", "checkpoint", "log"))
    skipped = f" skipped {int(record['skipped_steps'])}" if record.get("skipped_steps") else ""
    print(f"[{step:>7d}/{self.total}] loss {record.get('loss', math.nan):.4f} ({heads}) "
          f"cos-within h/u/p/c {within}{match} return {record.get('cycle_return', float('nan')):.2f} "
          f"lr {record['lr']:.4g}{skipped} | {rate:.2f} steps/s, ETA {_duration(eta)} | {split}, "
          f"goodput {record.get('goodput', 0.0):.0%}", flush=True)

  def flush(self) -> None:
    if self.log_file is not None:
      self.log_file.flush()

  def close(self):
    if self.log_file is not None:
      self.log_file.close()
    if self.writer is not None:
      self.writer.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def logged_losses(window: list[tuple[int, dict]], carried: dict | None) -> tuple[dict, dict | None]:
  """The losses a record carries: the metrics of the newest step of its window that was
  applied; if every step of the window was skipped (their loss is NaN by definition), those of
  the newest applied step before it, with `loss_step` naming it (the state has not changed
  since). Returns (metrics, the newest applied step's metrics to carry on)."""
  host = jax.device_get([m for _, m in window])
  for (step, _), metrics in zip(reversed(window), reversed(host)):
    if not float(metrics.get("skipped", 0.0)):
      carried = {"step": step, **{k: float(v) for k, v in metrics.items()}}
      break
  own = {k: float(v) for k, v in host[-1].items()}
  if carried is None:   # no step of this start was applied yet: no loss to report
    return {k: v for k, v in own.items() if not k.startswith("loss")}, None
  if carried["step"] == window[-1][0]:
    return own, carried
  losses = {k: v for k, v in carried.items() if k.startswith("loss")}
  return {**own, **losses, "loss_step": float(carried["step"])}, carried
