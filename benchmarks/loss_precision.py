"""The losses' error at each matmul precision, at step 1, against a float64 reference.

  python benchmarks/loss_precision.py                       # demo model at 64 px, R18 at 224 px
  python benchmarks/loss_precision.py --settings r18_224 --images 4

`loss.precision` chooses how the hardware multiplies the float32 operands of the losses' large
products (`loss_kernels.PRECISIONS`): true float32, TF32 (NVIDIA tensor cores), three bfloat16
products (a TPU's HIGH) or one (a TPU's DEFAULT). This script measures what each costs in
accuracy where it matters, the losses of the first step: the network at initialisation on real
frames of the synthetic world, the queues as `init_state` makes them, the defaults' readings
(frame negatives, soft self target; the demo's own config for the demo model). Each loss is
computed at every precision — on this CPU through `loss_kernels.einsum`'s emulation, which
rounds the operands exactly as the hardware does (TF32: 10 mantissa bits, bfloat16: 7; bf16_3x:
the three products of the hi/lo split) and accumulates in float32 — and compared with the float64
NumPy reference of the suite (tests/test_losses.py, written from docs/method.md §3). Also printed: the
relative error of the gradient with respect to the online maps (p and c), against the float32
gradient. A loss's error is |L − L64| / max(|L64|, 1). `losses.AUTO_PRECISION` takes, per platform, the fastest precision within TOLERANCE.
Writes benchmarks/results/loss_precision.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import common

sys.path.insert(0, os.path.join(common.ROOT, "tests"))
# Every loss's error at step 1 must stay below this, relative to the float64 value (absolute
# below 1: L_G at initialisation can be ~1e-3). Why this bound: it is 100× the float32 program's
# own error (≤ 1e-6 here) and far below what the bfloat16 backbone itself moves the step-1
# losses by (`device_check.sh` measures that on a GPU).
TOLERANCE = 1e-4
PRECISIONS = ("float32", "tf32", "bf16_3x", "bf16")
# Speed order on each platform (fastest first) among the precisions it has: TPUs have no TF32;
# on NVIDIA GPUs TF32 tensor cores run at half the bf16 rate, three bf16 passes at a third.
FASTEST_FIRST = {"gpu": ("bf16", "tf32", "bf16_3x", "float32"), "tpu": ("bf16", "bf16_3x", "float32"),
                 "cpu": ("float32",)}


def setting_config(name: str, images: int):
  import importlib.util  # pylint: disable=g-import-not-at-top
  if name == "demo":
    spec = importlib.util.spec_from_file_location("demo", os.path.join(common.ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
  else:
    c = common.step_config("resnet18", 1, 224, images, 16384, readings="defaults")
    c.loss.soft_cycle = True
    c.data.name = "synthetic"
    c.data.synthetic.frame_size = 256
    c.data.synthetic.num_videos = 64
    c.data.num_workers = 0
  c.batch_size = images
  c.model.bn_group_size = images
  return c


def step_one_maps(config, seed: int = 0):
  """Head maps of the online network on v and the target on v+ at initialisation, and the
  queues: ({'u','p','c','u_gap'}, same for v+, {head: [K, D]})."""
  import jax  # pylint: disable=g-import-not-at-top
  from cacl_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from cacl_jax.data import augment, pipeline  # pylint: disable=g-import-not-at-top
  from cacl_jax.models.cacl import model_from_config  # pylint: disable=g-import-not-at-top
  model = model_from_config(config.model)
  tx, _ = optim.make_optimizer(config)
  state = jax.jit(lambda: step_lib.init_state(model, tx, config, seed))()
  batch = next(iter(pipeline.make_pretrain_dataset(config.data, global_batch_size=config.batch_size,
                                                   process_index=0, process_count=1, seed=seed)))
  apply = jax.jit(lambda v, x: model.apply(v, augment.normalize(x), train=True, mutable=["batch_stats"])[0])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out, out_pos = apply(variables, batch["v"]), apply(variables, batch["v_pos"])
  flat = lambda o: {k: o[k].reshape(o[k].shape[0], -1, o[k].shape[-1]) for k in ("u", "p", "c", "u_gap")}
  return flat(out), flat(out_pos), state.queues


def losses_at(precision, out, out_pos, queues, config):
  """(L_G, L_P, L_C) at `precision` (a `loss_kernels.einsum` name) and the gradient of their
  sum with respect to the online p and c maps."""
  import jax  # pylint: disable=g-import-not-at-top
  from cacl_jax.method import losses  # pylint: disable=g-import-not-at-top
  tau, lc = config.loss.temperature, config.loss

  def terms(p, c):
    g_map = out["u_gap"] if lc.global_pool == "before_head" else out["u"]
    g_pos = out_pos["u_gap"] if lc.global_pool == "before_head" else out_pos["u"]
    l_g = losses.global_loss(g_map, g_pos, queues["global"], tau["global"], precision=precision)
    l_p = losses.pixel_loss(p, out_pos["p"], out["u"], out_pos["u"], queues["pixel"], tau["pixel"],
                            match=lc.pixel_match, negatives=lc.pixel_negatives, precision=precision)
    soft = losses.soft_cycle_target(out["u"], out_pos["u"], tau["cycle"], mode=lc.soft_target,
                                    identity_mix=lc.soft_target_identity) if lc.soft_cycle else None
    q_c = queues["cycle"] if lc.cycle_negatives else queues["cycle"][:0]
    l_c = losses.cycle_loss(c, out_pos["c"], q_c, tau["cycle"], soft_target=soft, precision=precision)
    return l_g, l_p, l_c

  values = jax.jit(terms)(out["p"], out["c"])
  grads = jax.jit(jax.grad(lambda p, c: sum(terms(p, c)), argnums=(0, 1)))(out["p"], out["c"])
  return [float(v) for v in values], grads


def reference(out, out_pos, queues, config):
  """Float64 NumPy values of (L_G, L_P, L_C): the suite's reference (tests/test_losses.py)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import test_losses as ref  # pylint: disable=g-import-not-at-top
  f64 = lambda x: np.asarray(x, np.float64)
  tau, lc = config.loss.temperature, config.loss
  key = "u_gap" if lc.global_pool == "before_head" else "u"
  l_g = ref.ref_global(f64(out[key]), f64(out_pos[key]), f64(queues["global"]), tau["global"])
  l_p = ref.ref_pixel(f64(out["p"]), f64(out_pos["p"]), f64(out["u"]), f64(out_pos["u"]),
                      f64(queues["pixel"]), tau["pixel"],
                      "global" if lc.pixel_match == "global" else "same_position", lc.pixel_negatives)
  soft = None
  if lc.soft_cycle:
    soft = ref.ref_soft_target(f64(out["u"]), f64(out_pos["u"]), tau["cycle"], lc.soft_target)
    lam = lc.soft_target_identity
    soft = lam * np.eye(soft.shape[-1]) + (1 - lam) * soft
  q_c = f64(queues["cycle"]) if lc.cycle_negatives else f64(queues["cycle"])[:0]
  l_c = ref.ref_cycle(f64(out["c"]), f64(out_pos["c"]), q_c, tau["cycle"], soft)
  return [float(l_g), float(l_p), float(l_c)]


def choose(rows, tolerance=TOLERANCE) -> dict[str, str]:
  """Per platform, the fastest precision whose every loss error is within `tolerance` in every
  setting measured."""
  worst = {p: max(max(r["loss_rel_err"][p]) for r in rows) for p in PRECISIONS}
  return {platform: next(p for p in order if worst[p] <= tolerance)
          for platform, order in FASTEST_FIRST.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--settings", nargs="+", default=["demo", "r18_224"], choices=["demo", "r18_224"])
  ap.add_argument("--images", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "loss_precision.json"))
  args = ap.parse_args(argv)
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = []
  for name in args.settings:
    config = setting_config(name, args.images)
    out, out_pos, queues = step_one_maps(config)
    ref64 = reference(out, out_pos, queues, config)
    row = {"setting": name, "images": args.images, "pixels": int(out["p"].shape[1]),
           "queue": int(queues["pixel"].shape[0]), "float64": ref64, "losses": {},
           "loss_rel_err": {}, "grad_rel_err": {}}
    base_grads = None
    for p in PRECISIONS:
      values, grads = losses_at("float32" if p == "float32" else f"emulated_{p}", out, out_pos, queues, config)
      base_grads = grads if p == "float32" else base_grads
      row["losses"][p] = values
      row["loss_rel_err"][p] = [abs(v - r) / max(abs(r), 1.0) for v, r in zip(values, ref64)]
      row["grad_rel_err"][p] = [float(np.linalg.norm(np.asarray(g) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
                                for g, b in zip(grads, base_grads)]
    rows.append(row)
    print(f"\n== {name}: {args.images} images, N = {row['pixels']}, K = {row['queue']}; float64 "
          f"L_G {ref64[0]:.6f}, L_P {ref64[1]:.6f}, L_C {ref64[2]:.6f}")
    print("| precision | L_G error | L_P error | L_C error | ∂p rel. error | ∂c rel. error |")
    print("|---|---|---|---|---|---|")
    for p in PRECISIONS:
      e, g = row["loss_rel_err"][p], row["grad_rel_err"][p]
      print(f"| {p} | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} | {g[0]:.1e} | {g[1]:.1e} |")
  chosen = choose(rows)
  print(f"\ntolerance {TOLERANCE:g} (relative, every loss): 'auto' → {chosen}")
  common.write_results(args.out, args, rows=rows, tolerance=TOLERANCE, chosen=chosen)
  return rows, chosen


if __name__ == "__main__":
  main()
