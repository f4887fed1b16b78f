"""DAVIS-2017 val, semi-supervised video object segmentation by label propagation (CRW's protocol).

  python -m cacl_jax.prepare_data davis --src DAVIS --out DATA
  python -m cacl_jax.propagate --config configs/davis_propagation.py --workdir DIR \
      --config.pretrained=RUN --config.data.root=DATA

The frozen backbone's OS8 features (`--config.features=u|p|c` for a head's) at native 480p;
context = the first frame + the last 20, top-10 affinities, radius 12 cells, τ = 0.05
(CRW, Jabri et al. 2020). DIR/results.json: j, f, j_and_f (percent) and per_sequence.
"""
from cacl_jax import defaults


def get_config():
  return defaults.propagation_config()
