#!/usr/bin/env bash
# The first measurements on one GPU, in one command (benchmarks/device_check.py says what it measures).
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/device_check.sh --tiny          # the dry run on a CPU, every part at toy size
#
# The GPU image brings JAX with CUDA, flax, optax, orbax, chex and torch with CUDA; what the step
# needs beyond them travels as wheels in .whl/ (made here by `bash benchmarks/device_check.sh
# --wheels`: ml_collections, for Python 3.12), and the PyTorch peer, which lives outside the
# repository, as .peer/torch_peer.py (copied from ../shared/bench by --wheels). Both folders are
# ignored by git. Results: benchmarks/results/device_check.json, and $OUT/ where $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  grep -qx '/.peer/' .git/info/exclude 2>/dev/null || echo '/.peer/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl ml_collections==1.1.0 || exit 1
  mkdir -p .peer && cp ../shared/bench/torch_peer.py .peer/ || exit 1
  ls -l .whl .peer
  exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
peer=.peer/torch_peer.py
[ -f "$peer" ] || peer=../shared/bench/torch_peer.py
export PYTHONUNBUFFERED=1
# The device is JAX's alone until its part ends (the peer runs after, in its own process).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
out=benchmarks/results/device_check.json
[[ " $* " == *" --tiny "* ]] && out=/tmp/device_check_tiny.json && set -- "$@" --budget_s 3600
python3 benchmarks/device_check.py --peer "$peer" --out "$out" "$@" 2>&1 | tee /tmp/device_check.log
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp "$out" /tmp/device_check.log "$OUT"/ 2>/dev/null; fi
exit "$rc"
