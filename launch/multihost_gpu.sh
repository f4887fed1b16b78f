#!/usr/bin/env bash
# Multi-host GPU training: one JAX process per host, each using all of its local GPUs, joined
# by jax.distributed (--coordinator_address HOST:PORT --num_processes N --process_id I).
#
#   launch/multihost_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# (Under SLURM, launch/slurm.sbatch is simpler: one process per GPU, which `srun python -m
# cacl_jax.main` joins without any flag. This script runs one process per node instead.)
# Three ways to give the process layout:
#   1. On each host, by hand or from your scheduler:
#        COORDINATOR=host0:12355 NUM_PROCESSES=4 PROCESS_ID=$i \
#          launch/multihost_gpu.sh configs/cacl_r18_kinetics.py /shared/runs/r18_cacl \
#          --config.data.root=/data/kinetics
#   2. Under SLURM, one task per node, each with all of the node's GPUs and the CPUs for its
#      grain workers (data.num_workers, default 8, plus a few for the trainer):
#        srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=16 \
#          launch/multihost_gpu.sh configs/cacl_r18_kinetics.py /shared/runs/r18_cacl ...
#      The layout is read from SLURM_PROCID, SLURM_NTASKS and the first host of
#      SLURM_JOB_NODELIST and passed as flags, which switch JAX's own SLURM detection off (it
#      would give each process one GPU, SLURM_LOCALID).
#   3. From one machine: HOSTS="h0 h1 h2 h3" starts process i on the i-th host over ssh
#      (passwordless ssh; the checkout and PYTHON at the same paths on every host), in the
#      background, logging on each host to LOG_DIR/process_I.log; h0 is the coordinator.
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
#   PYTHON          interpreter on the hosts (default: this shell's python3, by its absolute
#                   path, so that a virtual environment active here is the one every host runs)
#   LOG_DIR         mode 3: where each host logs (default WORKDIR/logs; for a gs:// WORKDIR,
#                   ~/cacl_logs on each host)
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
python=${PYTHON:-$(command -v python3 || true)}
[[ -n $python ]] || die "no python3 on PATH: set PYTHON to the interpreter with requirements.txt installed"
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
  # Logs on each host's own disk when the workdir is a URL (a path would be taken as local).
  if [[ -n ${LOG_DIR:-} ]]; then log_dir=$(printf '%q' "$LOG_DIR")
  elif [[ $workdir == *://* ]]; then log_dir='$HOME/cacl_logs'
  else log_dir=$(printf '%q' "$workdir/logs"); fi
  for i in "${!hosts[@]}"; do
    train_args "$coordinator" "${#hosts[@]}" "$i"
    remote="cd $(printf '%q' "$repo") && mkdir -p $log_dir || exit 1; "
    remote+="PYTHONPATH=. nohup $(printf '%q ' "${cmd[@]}") < /dev/null"
    remote+=" >> $log_dir/process_$i.log 2>&1 &"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      echo "ssh -o BatchMode=yes ${hosts[$i]} '$remote'"
    else
      ssh -o BatchMode=yes "${hosts[$i]}" "$remote"
    fi
  done
  echo "started ${#hosts[@]} processes; follow: ssh ${hosts[0]} tail -f $log_dir/process_0.log" >&2
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
