"""The demo's instrument judged on its own (docs/demo.md): floor and ceiling per seed, no pretraining.

  python -m cacl_jax.evaluation.instrument --config configs/demo.py --seeds 0,1,2 --workdir DIR

For each seed, runs exactly the demo's two rows that involve no self-supervised method — the
random-init floor and the supervised ceiling (`cacl_jax.evaluation.demo.floor` / `.ceiling`,
the functions the demo itself calls, on the config's `eval_after`) — and reports docs/demo.md's
criteria: ceiling ≥ 40 mIoU, floor ≤ ½ × ceiling, seed-to-seed std of the floor ≤ ⅛ ×
(ceiling − floor). (The same bound on MoCo-v2's std needs pretraining runs: `cacl_jax.sweep`
checks it.) Also describes the world at the probe's scale: the background's share of pixels,
classes per frame, each class's share. Writes DIR/instrument.json and DIR/instrument.md; one
seed's runs sit in DIR/seed_S/{random_init,supervised}/. A seed already in instrument.json is
not run again, so an interrupted measurement resumes.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from cacl_jax.runtime import parallel, paths
from cacl_jax.evaluation import demo, segdata

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A pretraining config with `eval_after` (configs/demo.py).")
flags.DEFINE_string("workdir", None, "Where the runs and instrument.json go.")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated model seeds (config.seed).")
flags.mark_flags_as_required(["config", "workdir"])

CEILING_MIN, FLOOR_SHARE, STD_SHARE = 40.0, 0.5, 1 / 8


def world_stats(eval_config, num_images: int = 128) -> dict:
  """The probe's val images at a glance: background share, classes per frame, class shares."""
  source = segdata.segmentation_source(eval_config.data, "val")
  labels = np.stack([source[i]["label"] for i in range(min(num_images, len(source)))])
  names = list(source.class_names)
  shares = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
  per_frame = [len(np.unique(x[(x > 0) & (x < len(names))])) for x in labels]
  return {"images": len(labels), "background_share": float(shares[0]),
          "classes_per_frame": float(np.mean(per_frame)),
          "frames_with_2_or_more_classes": float(np.mean(np.asarray(per_frame) >= 2)),
          "class_shares": {n: float(f) for n, f in zip(names, shares)}}


def criteria(floors: list[float], ceilings: list[float]) -> dict:
  """docs/demo.md on per-seed floor and ceiling mIoUs (sample std over seeds, as `cacl_jax.sweep`)."""
  floor, ceiling = float(np.mean(floors)), float(np.mean(ceilings))
  span = ceiling - floor
  floor_std = float(np.std(floors, ddof=1)) if len(floors) > 1 else None
  return {"floor_mean": floor, "floor_std": floor_std, "ceiling_mean": ceiling,
          "ceiling_std": float(np.std(ceilings, ddof=1)) if len(ceilings) > 1 else None,
          "std_allowed": STD_SHARE * span,
          "ceiling_ok": ceiling >= CEILING_MIN, "floor_ok": floor <= FLOOR_SHARE * ceiling,
          "floor_std_ok": None if floor_std is None else floor_std <= STD_SHARE * span}


def markdown(result: dict) -> str:
  c, w = result["criteria"], result["world"]
  yes = lambda ok: "–" if ok is None else ("yes" if ok else "NO")
  lines = ["| seed | floor (random init) mIoU | ceiling (supervised) mIoU | seconds |", "|---|---|---|---|"]
  for s in result["seeds"]:
    lines.append(f"| {s['seed']} | {s['floor_miou']:.1f} | {s['ceiling_miou']:.1f} | "
                 f"{s['seconds']:.0f} |")
  std = lambda x: "–" if x is None else f"{x:.2f}"
  lines += ["", f"- ceiling {c['ceiling_mean']:.1f} ± {std(c['ceiling_std'])} ≥ {CEILING_MIN:.0f}: "
            f"{yes(c['ceiling_ok'])}",
            f"- floor {c['floor_mean']:.1f} ≤ ½ × ceiling = {FLOOR_SHARE * c['ceiling_mean']:.1f}: "
            f"{yes(c['floor_ok'])}",
            f"- std of the floor {std(c['floor_std'])} ≤ ⅛ × (ceiling − floor) = "
            f"{c['std_allowed']:.2f}: {yes(c['floor_std_ok'])} (MoCo-v2's: see the sweep)",
            f"- world (val, {w['images']} images): background {100 * w['background_share']:.0f} % "
            f"of pixels, {w['classes_per_frame']:.1f} object classes per frame, "
            f"{100 * w['frames_with_2_or_more_classes']:.0f} % of frames with ≥ 2"]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = FLAGS.config
  if not config.get("eval_after"):
    sys.exit("instrument: error: --config has no eval_after section (use configs/demo.py)")
  eval_config = config.eval_after
  if not (eval_config.get("supervised") and eval_config.supervised.num_epochs):
    sys.exit("instrument: error: eval_after has no supervised section with num_epochs > 0: "
             "no ceiling to measure")
  seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
  out = paths.resolve(FLAGS.workdir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "instrument.json"
  done = {s["seed"]: s for s in json.loads(path.read_text())["seeds"]} if path.exists() else {}
  mesh = parallel.make_mesh()
  world = world_stats(eval_config)
  for seed in seeds:
    if seed in done:
      print(f"seed {seed}: done already (floor {done[seed]['floor_miou']:.1f}, "
            f"ceiling {done[seed]['ceiling_miou']:.1f})", flush=True)
      continue
    config.seed = seed
    start = time.time()
    run = os.path.join(str(out), f"seed_{seed}")
    low, params, stats = demo.floor(config, eval_config, os.path.join(run, "random_init"), mesh)
    high = demo.ceiling(config, eval_config, params, stats, os.path.join(run, "supervised"), mesh)
    done[seed] = {"seed": seed, "floor_miou": low["miou"], "ceiling_miou": high["miou"],
                  "floor_per_class_iou": low["per_class_iou"],
                  "ceiling_per_class_iou": high["per_class_iou"], "seconds": time.time() - start}
    print(f"seed {seed}: floor {low['miou']:.1f}, ceiling {high['miou']:.1f} mIoU "
          f"({done[seed]['seconds']:.0f} s)", flush=True)
    rows = [done[s] for s in sorted(done)]
    result = {"command": " ".join(["python -m cacl_jax.evaluation.instrument", *sys.argv[1:]]),
              "seeds": rows, "world": world,
              "criteria": criteria([r["floor_miou"] for r in rows], [r["ceiling_miou"] for r in rows]),
              "eval_after": eval_config.to_dict()}
    paths.write_text_atomic(path, json.dumps(result, indent=1, default=str))
    paths.write_text_atomic(out / "instrument.md", markdown(result))
  print("\n" + (out / "instrument.md").read_text(), flush=True)


if __name__ == "__main__":
  app.run(main)
