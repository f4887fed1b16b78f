"""The sweep's summary: per-variant means over seeds, paired differences to a reference variant
with 95 % intervals, docs/demo.md's instrument criteria, as sweep.md tables and the sweep.png figure.

Rows are `cacl_jax.sweep.record` dicts; each done run carries its mIoU per evaluation protocol
(`protocols`: 'linear', and 'cluster' / 'retrieval' where the run's results.json has them) and,
for the demo, the same for its random-init floor and supervised ceiling.

**Paired verdicts.** The seeds are paired: seed s gives every variant the same initialisation and
data order (and the same floor). So for a variant v and the reference r (default `mocov2`) the
evidence is the per-seed difference d_s = mIoU(v, s) − mIoU(r, s), over the seeds both finished;
its mean d̄ with the 95 % Student-t interval d̄ ± t(0.975, n − 1) · sd(d) / √n (sample sd, n − 1
degrees of freedom: t = 12.71, 4.30, 3.18 for n = 2, 3, 4). A t interval rather than a bootstrap:
with 3 seeds a bootstrap has only 10 distinct resamples and its interval is far too narrow. The
verdict reads the interval: 'above' / 'below' when it excludes 0, else 'not resolved'.
"""
from __future__ import annotations

import math

PROTOCOLS = ("linear", "cluster", "retrieval")
RANDOM_INIT = "random init"
SUPERVISED = "supervised (labels)"
# The instrument's criteria (docs/demo.md), checked on the floor and ceiling rows when a sweep has them.
CEILING_MIN, FLOOR_SHARE, STD_SHARE = 40.0, 0.5, 1 / 8


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n − 1; 0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std


def t_quantile(p: float, dof: int) -> float:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(p, dof))


def paired_interval(differences: list[float], level: float = 0.95) -> dict:
  """{'mean', 'low', 'high', 'n', 'verdict'} of per-seed differences (module doc); with one
  seed there is no interval (low = high = None, verdict 'one seed')."""
  n = len(differences)
  mean, sd = mean_std(differences)
  if n < 2:
    return {"mean": mean, "low": None, "high": None, "n": n, "verdict": "one seed"}
  half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
  low, high = mean - half, mean + half
  verdict = "above" if low > 0 else "below" if high < 0 else "not resolved"
  return {"mean": mean, "low": low, "high": high, "n": n, "verdict": verdict}


# ---------------------------------------------------------------- per-seed values


def per_seed(rows: list[dict], name: str, protocol: str) -> dict[int, float]:
  """seed → mIoU of `name` (a variant, RANDOM_INIT or SUPERVISED) under `protocol`. The floor
  and the ceiling depend on the seed only: the first run of each seed that has them gives them."""
  out = {}
  for r in rows:
    if r["status"] != "done":
      continue
    if name in (RANDOM_INIT, SUPERVISED):
      values = r.get("random_init" if name == RANDOM_INIT else "supervised", {})
    elif r["variant"] == name:
      values = r.get("protocols", {"linear": r["miou"]})
    else:
      continue
    if protocol in values:
      out.setdefault(r["seed"], values[protocol])
  return out


def summarise(rows: list[dict], variants: list[str], paper: dict[str, float]) -> dict:
  """name → {'miou_mean', 'miou_std', 'mious', 'seeds' (linear), 'n', 'paper', 'macc_mean'
  (variants), 'protocols': {protocol: {'mean', 'std', 'values', 'seeds'}}} for every variant with
  a finished run, then the random-init and supervised rows when the runs report them."""
  out = {}
  for name in [*variants, RANDOM_INIT, SUPERVISED]:
    protocols = {}
    for p in PROTOCOLS:
      values = per_seed(rows, name, p)
      if values:
        m, s = mean_std(list(values.values()))
        protocols[p] = {"mean": m, "std": s, "values": list(values.values()),
                        "seeds": list(values)}
    if "linear" not in protocols:
      continue
    lin = protocols["linear"]
    out[name] = {"miou_mean": lin["mean"], "miou_std": lin["std"], "mious": lin["values"],
                 "seeds": lin["seeds"], "n": len(lin["values"]), "paper": paper.get(name),
                 "protocols": protocols}
    if name in variants:
      out[name]["macc_mean"] = mean_std([r["macc"] for r in rows if r["variant"] == name
                                         and r["status"] == "done"])[0]
  return out


def paired(rows: list[dict], variants: list[str], reference: str) -> dict:
  """protocol → name → {'seeds', 'differences', 'mean', 'low', 'high', 'n', 'verdict'}: every
  variant but the reference, and the random-init floor, against the reference, seed by seed."""
  out = {}
  for p in PROTOCOLS:
    ref = per_seed(rows, reference, p)
    for name in [v for v in variants if v != reference] + [RANDOM_INIT]:
      values = per_seed(rows, name, p)
      seeds = [s for s in values if s in ref]
      if seeds:
        diffs = [values[s] - ref[s] for s in seeds]
        out.setdefault(p, {})[name] = {"seeds": seeds, "differences": diffs,
                                       **paired_interval(diffs)}
  return out


# ---------------------------------------------------------------- sweep.md


def instrument_lines(summary: dict, reference: str = "mocov2") -> list[str]:
  """docs/demo.md's criteria on the sweep's own floor, ceiling and `reference` rows (linear)."""
  if RANDOM_INIT not in summary or SUPERVISED not in summary:
    return []
  floor, ceiling = summary[RANDOM_INIT], summary[SUPERVISED]
  span = ceiling["miou_mean"] - floor["miou_mean"]
  lines = ["", "Instrument (docs/demo.md): "
           f"ceiling {ceiling['miou_mean']:.1f} (≥ {CEILING_MIN:.0f}: "
           f"{'yes' if ceiling['miou_mean'] >= CEILING_MIN else 'NO'}); "
           f"floor {floor['miou_mean']:.1f} (≤ ½ ceiling = {FLOOR_SHARE * ceiling['miou_mean']:.1f}: "
           f"{'yes' if floor['miou_mean'] <= FLOOR_SHARE * ceiling['miou_mean'] else 'NO'}); "
           f"std allowed ⅛ × (ceiling − floor) = {STD_SHARE * span:.2f}"]
  for name in (RANDOM_INIT, reference):
    if name in summary and summary[name]["n"] > 1:
      ok = summary[name]["miou_std"] <= STD_SHARE * span
      lines.append(f"- std of {name}: {summary[name]['miou_std']:.2f} ({'yes' if ok else 'NO'})")
  return lines


def _signed(x: float) -> str:
  return f"{x:+.1f}".replace("-", "−")


def paired_lines(pairs: dict, reference: str) -> list[str]:
  if not pairs:
    return []
  lines = ["", f"Paired differences to `{reference}` (per seed s: mIoU(variant, s) − "
           f"mIoU({reference}, s), same seed = same initialisation and data order); mean over the "
           "seeds with its 95 % Student-t interval (n − 1 degrees of freedom); the verdict is "
           "'above' / 'below' when the interval excludes 0:", "",
           f"| protocol | variant − {reference} | per seed (seeds) | mean | 95 % interval "
           "| verdict |",
           "|---|---|---|---|---|---|"]
  for p, names in pairs.items():
    for name, d in names.items():
      seeds = ", ".join(_signed(x) for x in d["differences"])
      interval = (f"[{_signed(d['low'])}, {_signed(d['high'])}]" if d["low"] is not None
                  else "–")
      lines.append(f"| {p} | {name} | {seeds} ({', '.join(map(str, d['seeds']))}) | "
                   f"{_signed(d['mean'])} | {interval} | {d['verdict']} |")
  return lines


def markdown(summary: dict, pairs: dict, header: str, reference: str = "mocov2") -> str:
  lines = [header, "", "| variant | linear-probe mIoU (mean ± std) | seeds | mAcc | cluster mIoU | "
           "retrieval mIoU | paper (Cityscapes, R18) |", "|---|---|---|---|---|---|---|"]
  for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["miou_mean"]):
    paper = f"{s['paper']:.1f}" if s.get("paper") is not None else "–"
    macc = f"{s['macc_mean']:.1f}" if "macc_mean" in s else "–"
    seeds = ", ".join(f"{x:.1f}" for x in s["mious"])
    other = [(f"{s['protocols'][p]['mean']:.1f} ± {s['protocols'][p]['std']:.1f}"
              if p in s["protocols"] else "–") for p in ("cluster", "retrieval")]
    lines.append(f"| {name} | {s['miou_mean']:.1f} ± {s['miou_std']:.1f} | {seeds} | {macc} | "
                 f"{other[0]} | {other[1]} | {paper} |")
  lines += instrument_lines(summary, reference) + paired_lines(pairs, reference)
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- sweep.png


def figure(summary: dict, pairs: dict, path: str, title: str, reference: str = "mocov2") -> None:
  """Top row: mean mIoU per variant with the seeds as dots, one panel per protocol; bottom row:
  the paired differences to the reference with their 95 % intervals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  protocols = [p for p in PROTOCOLS if any(p in s["protocols"] for s in summary.values())]
  names = list(summary)
  rows = 2 if pairs else 1
  fig, axes = plt.subplots(rows, len(protocols), squeeze=False,
                           figsize=(max(4.0, 0.9 * len(names) + 1.5) * len(protocols), 3.6 * rows))
  for j, p in enumerate(protocols):
    ax = axes[0, j]
    shown = [n for n in names if p in summary[n]["protocols"]]
    stats = [summary[n]["protocols"][p] for n in shown]
    ax.bar(range(len(shown)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
           capsize=4, color="#7aa6c2")
    for i, s in enumerate(stats):
      ax.plot([i] * len(s["values"]), s["values"], "k.", alpha=0.6)
    ax.set_xticks(range(len(shown)), shown, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"{p} mIoU (%)")
    ax.grid(axis="y", alpha=0.3)
    if rows == 2:
      ax = axes[1, j]
      diffs = pairs.get(p, {})
      for i, (name, d) in enumerate(diffs.items()):
        if d["low"] is not None:
          ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                      fmt="o", color="#c2410c", capsize=4)
        ax.plot([i] * len(d["differences"]), d["differences"], "k.", alpha=0.6)
      ax.axhline(0.0, color="k", lw=0.8)
      ax.set_xlim(-0.5, max(len(diffs), 2) - 0.5)
      ax.set_xticks(range(len(diffs)), list(diffs), rotation=25, ha="right", fontsize=8)
      ax.set_ylabel(f"− {reference}, {p} (95 % t)")
      ax.grid(axis="y", alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
