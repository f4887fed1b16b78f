#!/usr/bin/env bash
# Multi-host GPU training: one JAX process per host, each using all of its local GPUs, joined
# by jax.distributed (--coordinator_address HOST:PORT --num_processes N --process_id I).
#
#   launch/multihost_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Three ways to give the process layout:
#   1. On each host, by hand or from your scheduler:
#        COORDINATOR=host0:12355 NUM_PROCESSES=4 PROCESS_ID=$i \
#          launch/multihost_gpu.sh configs/cacl_r18_kinetics.py /shared/runs/r18_cacl \
#          --config.data.root=/data/kinetics
#   2. Under SLURM (one task per node: sbatch --nodes=4 --ntasks-per-node=1): the layout is read
#      from SLURM_PROCID, SLURM_NTASKS and the first host of SLURM_JOB_NODELIST; run it with
#      `srun launch/multihost_gpu.sh CONFIG WORKDIR ...`.
#   3. From one machine: HOSTS="h0 h1 h2 h3" starts process i on the i-th host over ssh
#      (passwordless ssh; the checkout at the same path on every host), in the background,
#      logging to WORKDIR/logs/process_I.log; h0 is the coordinator.
#
# Arguments:
#   CONFIG    a config file, optionally file.py:variant
#   WORKDIR   the run directory. It must be storage every host sees at the same path (NFS,
#             Lustre, a gcsfuse mount; or gs://, after `pip install -r requirements-gcs.txt`
#             on every host): every process writes its part of each checkpoint, and a resumed
#             run reads them all back, on any number of processes.
#   ...       passed on to the module unchanged
# Environment:
#   COORDINATOR     HOST:PORT of process 0 (mode 1; default for 2 and 3: first host, PORT)
#   PORT            coordinator port for modes 2 and 3 (default 12355)
#   NUM_PROCESSES   number of hosts (mode 1)
#   PROCESS_ID      this host's index, 0 … NUM_PROCESSES-1 (mode 1)
#   HOSTS           space-separated host names (mode 3)
#   MODULE          cacl_jax.main (default) or cacl_jax.linear_eval
#   PYTHON          interpreter on the hosts (default python)
#   DRY_RUN=1       print the commands instead of running them
# The global batch (`batch_size`) is split over the processes: it must divide by N, and the
# device count must divide it (the trainer checks both before any work).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "multihost_gpu.sh: $*" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
config=$1 workdir=$2
shift 2
extra=("$@")

port=${PORT:-12355}
module=${MODULE:-cacl_jax.main}
python=${PYTHON:-python}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

run() {  # prints under DRY_RUN=1, runs otherwise
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

train_args() {  # $1 coordinator, $2 number of processes, $3 process id → array `cmd`
  cmd=("$python" -m "$module" --config "$config" --workdir "$workdir"
       --coordinator_address "$1" --num_processes "$2" --process_id "$3" "${extra[@]}")
}

if [[ -n ${HOSTS:-} ]]; then
  # ---- mode 3: start every process over ssh from here.
  read -r -a hosts <<<"$HOSTS"
  coordinator=${COORDINATOR:-${hosts[0]}:$port}
  for i in "${!hosts[@]}"; do
    train_args "$coordinator" "${#hosts[@]}" "$i"
    remote="cd $(printf '%q' "$repo") && mkdir -p $(printf '%q' "$workdir/logs") || exit 1; "
    remote+="PYTHONPATH=. nohup $(printf '%q ' "${cmd[@]}") < /dev/null"
    remote+=" > $(printf '%q' "$workdir/logs/process_$i.log") 2>&1 &"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      echo "ssh -o BatchMode=yes ${hosts[$i]} '$remote'"
    else
      ssh -o BatchMode=yes "${hosts[$i]}" "$remote"
    fi
  done
  echo "started ${#hosts[@]} processes; follow: ssh ${hosts[0]} tail -f $workdir/logs/process_0.log" >&2
  exit 0
fi

if [[ -n ${SLURM_PROCID:-} && -z ${PROCESS_ID:-} ]]; then
  # ---- mode 2: the layout from SLURM.
  first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  COORDINATOR=${COORDINATOR:-$first_host:$port}
  NUM_PROCESSES=$SLURM_NTASKS
  PROCESS_ID=$SLURM_PROCID
fi

# ---- mode 1: this host is process PROCESS_ID.
[[ -n ${COORDINATOR:-} ]] || die "set COORDINATOR=HOST:PORT (or HOSTS=..., or run under srun)"
[[ ${NUM_PROCESSES:-} =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '${NUM_PROCESSES:-}'"
[[ ${PROCESS_ID:-} =~ ^[0-9]+$ ]] && ((PROCESS_ID < NUM_PROCESSES)) \
  || die "PROCESS_ID must be in 0..$((NUM_PROCESSES - 1)), got '${PROCESS_ID:-}'"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
train_args "$COORDINATOR" "$NUM_PROCESSES" "$PROCESS_ID"
run "${cmd[@]}"
