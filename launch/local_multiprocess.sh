#!/usr/bin/env bash
# Runs the multi-host code path on one machine: N JAX processes on 127.0.0.1, each with its own
# fake CPU devices, joined by jax.distributed (gloo collectives) exactly as hosts of a pod are.
#
#   launch/local_multiprocess.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#
#   launch/local_multiprocess.sh configs/demo.py /tmp/cacl_mp \
#       --config.total_steps=20 --config.checkpoint_every_steps=10
#
# Arguments:
#   CONFIG    a config file, optionally file.py:variant
#   WORKDIR   the run directory, shared by the processes (process 0 writes the logs;
#             every process writes its part of each checkpoint)
#   ...       passed on to the module unchanged
# Environment:
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4: 2 × 4 = the tests' 8)
#   PORT                 coordinator port on 127.0.0.1 (default 12355)
#   MODULE               cacl_jax.main (default) or cacl_jax.linear_eval
#   PYTHON               interpreter (default python)
#   DRY_RUN=1            print the commands instead of running them
# Output: WORKDIR/logs/process_I.log per process; process 0's log is also streamed here.
# Ctrl-C / SIGTERM is forwarded as SIGTERM to every process (the trainer saves a checkpoint
# of the current step and exits 0). If one process fails, the others are stopped.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
config=$1 workdir=$2
shift 2

num_processes=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-12355}
module=${MODULE:-cacl_jax.main}
python=${PYTHON:-python}
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || { echo "NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2; exit 2; }
[[ $devices =~ ^[1-9][0-9]*$ ]] || { echo "DEVICES_PER_PROCESS must be a positive integer, got '$devices'" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"

args_for() {  # $1 = process id; fills the array `cmd`
  cmd=("$python" -m "$module" --config "$config" --workdir "$workdir"
       --coordinator_address "127.0.0.1:$port" --num_processes "$num_processes" --process_id "$1"
       "${extra[@]}")
}
extra=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    args_for "$i"
    echo "XLA_FLAGS='$XLA_FLAGS' JAX_PLATFORMS=cpu ${cmd[*]}"
  done
  exit 0
fi

mkdir -p "$workdir/logs"
pids=()
stop_all() {  # SIGTERM to the processes this script started, by pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all' INT TERM

for ((i = 0; i < num_processes; i++)); do
  args_for "$i"
  "${cmd[@]}" >"$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started ${#pids[@]} processes (pids ${pids[*]}); logs in $workdir/logs/" >&2
tail -n +1 -f "$workdir/logs/process_0.log" --pid "${pids[0]}" &
tail_pid=$!

# Wait for each process; the first failure stops the rest (their peers would hang otherwise).
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  rc=0
  done_pid=
  wait -n -p done_pid "${remaining[@]}" || rc=$?
  # `wait -n` also returns when a trapped signal arrives: only a process exit is handled here.
  [[ -n ${done_pid:-} ]] || continue
  left=()
  for pid in "${remaining[@]}"; do [[ $pid == "$done_pid" ]] || left+=("$pid"); done
  remaining=("${left[@]}")
  if ((rc != 0)); then
    for i in "${!pids[@]}"; do
      if [[ ${pids[$i]} == "$done_pid" ]]; then
        echo "process $i (pid $done_pid) exited with $rc; see $workdir/logs/process_$i.log" >&2
      fi
    done
    if ((status == 0)); then status=$rc; stop_all; fi
  fi
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
