"""Run machinery that knows nothing of the method: mesh and hosts, the one Orbax module, paths,
the workdir lock, the metrics log, config diffs, fingerprints, flags and figures. It never
imports `method/`, `models/` or `training/` (tests/test_layers.py checks it)."""
