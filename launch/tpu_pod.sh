#!/usr/bin/env bash
# Cloud TPU pod slice (v4, v5e, v5p, v6e), created as a queued resource (on demand or Spot):
# create it, install this checkout on every worker, train / evaluate on all workers at once,
# read every worker's log, stop; after a Spot preemption, recreate it and resume in one command.
#
#   launch/tpu_pod.sh create                     # queue the slice, wait until ACTIVE, mount the data disk
#   launch/tpu_pod.sh setup                      # copy this checkout + install, every worker
#   launch/tpu_pod.sh train CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh eval  CONFIG WORKDIR [--config.KEY=VALUE ...]   # cacl_jax.linear_eval
#   launch/tpu_pod.sh resume train|eval CONFIG WORKDIR [...]   # recreate a preempted slice, set it up, start again
#   launch/tpu_pod.sh status                     # the queued resource's state
#   launch/tpu_pod.sh logs [RUN]                 # the end of every worker's log (FOLLOW=1: follow them)
#   launch/tpu_pod.sh stop                       # SIGTERM on every worker: the step is saved, exit 0
#   launch/tpu_pod.sh ssh                        # a shell on worker ${WORKER:-0}
#   launch/tpu_pod.sh delete                     # the slice and its queued resource
#
# Example (ResNet-18 CACL on a Spot v5e slice of 16 chips, global batch 512 = 32 per chip):
#   export TPU_NAME=cacl-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 SPOT=1
#   DATA_DISK=kinetics-prepared launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train configs/cacl_r18_kinetics.py gs://BUCKET/runs/r18_cacl \
#       --config.data.root=/mnt/data/kinetics
#   # preempted (status: SUSPENDED)? the same arguments again, after `resume train`:
#   launch/tpu_pod.sh resume train configs/cacl_r18_kinetics.py gs://BUCKET/runs/r18_cacl \
#       --config.data.root=/mnt/data/kinetics
#
# Preemption: a Spot slice cannot be restarted, only recreated. Before it goes, every worker gets
# SIGTERM: the trainer (and linear_eval) saves the step reached to WORKDIR and exits 0. `resume`
# deletes the queued resource if it is not ACTIVE (SUSPENDED, FAILED), creates it again, waits,
# mounts the data disk, runs `setup` and starts the same command, which resumes from WORKDIR's
# newest checkpoint (an ACTIVE slice is only started again). `train` points XLA's persistent
# compilation cache at WORKDIR's folder (`DIR/xla_cache` for WORKDIR `DIR/RUN`) unless the
# arguments set `--config.compilation_cache_dir`: a recreated slice reads its compiled step
# back instead of compiling it again.
#
# WORKDIR must be storage that every worker sees: a gs:// bucket path (Orbax reads and writes
# gs:// directly; every worker writes its shard of each checkpoint, and a resumed or re-sharded
# run reads them back). A local path on a pod would split the checkpoint across the workers'
# disks. The data (`--config.data.root`, prepared by `cacl_jax.prepare_data`) is read by every
# worker from a local path: DATA_DISK names a disk holding the prepared data, attached read-only
# to all workers and mounted at DATA_ROOT by its stable name, /dev/disk/by-id/google-DEVICE (v4,
# v5e, v5p: a Persistent Disk; v6e: a Hyperdisk, it has no Persistent Disk); or DATA_GCS=gs://...
# copies it from a bucket at `setup` (to DATA_ROOT on every worker's boot disk).
#
# Multi-host start-up: each worker runs the same command; on a TPU VM `jax.distributed.initialize()`
# needs no arguments and the trainer calls it by itself. DIST=explicit instead passes
# --coordinator_address (worker 0's internal IP, port 8476), --num_processes and --process_id,
# read on each worker from the TPU VM metadata server.
#
# Environment:
#   TPU_NAME          the TPU (node) name (required); the queued resource is named the same
#   ZONE              its zone (required), e.g. us-central2-b (v4), us-west4-a (v5e),
#                     us-east5-a (v5p), us-east5-b (v6e)
#   PROJECT           gcloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  v4-N, v5litepod-N, v5p-N or v6e-N (default v4-32)
#   RUNTIME_VERSION   TPU software version (default by generation: tpu-ubuntu2204-base for v4,
#                     v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
#   SPOT=1            a Spot slice (preemptible at any time, much cheaper)
#   DATA_DISK         a disk with the prepared data, attached read-only at create
#   DATA_DEVICE       its name under /dev/disk/by-id/ (default google-persistent-disk-1: the
#                     first disk after the boot disk; `ls -l /dev/disk/by-id/` on a worker lists them)
#   DATA_ROOT         where the data lives on each worker (default /mnt/data)
#   DATA_GCS          optional gs:// path of prepared data, copied to DATA_ROOT by setup
#   PYTHON_VERSION    Python of the worker venv (default 3.11, installed by uv)
#   DIST              auto (default) or explicit (see above)
#   WAIT_S            seconds between state checks while the slice is queued (default 30)
#   WORKER            worker index for `ssh` (default 0)
#   LINES_PER_WORKER  lines `logs` shows of each worker's log (default 30)
#   FOLLOW=1          `logs` keeps following every worker's log
#   DRY_RUN=1         print the gcloud commands instead of running them
# No credentials are read or stored here: gcloud uses your own login.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
action=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
accelerator=${ACCELERATOR_TYPE:-v4-32}
data_root=${DATA_ROOT:-/mnt/data}
data_device=/dev/disk/by-id/${DATA_DEVICE:-google-persistent-disk-1}
python_version=${PYTHON_VERSION:-3.11}
remote_repo='$HOME/cacl_jax'
remote_venv='$HOME/cacl_venv'
remote_logs='$HOME/cacl_logs'

runtime_version() {  # the TPU software version of a generation (docs: "TPU software versions")
  if [[ -n ${RUNTIME_VERSION:-} ]]; then echo "$RUNTIME_VERSION"; return; fi
  case $accelerator in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) die "ACCELERATOR_TYPE '$accelerator' is not v4-N, v5litepod-N, v5p-N or v6e-N (or set RUNTIME_VERSION)" ;;
  esac
}

need_tpu() {
  [[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME (the TPU name)"
  [[ -n ${ZONE:-} ]] || die "set ZONE (e.g. us-central2-b)"
  where=(--zone "$ZONE")
  [[ -z ${PROJECT:-} ]] || where+=(--project "$PROJECT")
}

dry() { [[ ${DRY_RUN:-0} == 1 ]]; }

run() {  # prints under DRY_RUN=1, runs otherwise
  if dry; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_workers() {  # $1 = worker selector (all | N), $2 = remote bash command
  if dry; then
    echo "gcloud compute tpus tpu-vm ssh $TPU_NAME ${where[*]} --worker=$1 --command '$2'"
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command "$2"
  fi
}

quote_args() { printf '%q ' "$@"; }

state() {  # the queued resource's state (ACTIVE, SUSPENDED, FAILED, ...); NOT_FOUND if none
  gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" \
    --format='value(state.state)' 2>/dev/null || echo NOT_FOUND
}

create() {  # queue the slice, wait until it is ACTIVE, attach and mount the data disk
  local runtime
  runtime=$(runtime_version)   # an unknown generation stops here (set -e)
  local args=(gcloud compute tpus queued-resources create "$TPU_NAME" "${where[@]}"
              --node-id "$TPU_NAME" --accelerator-type "$accelerator" --runtime-version "$runtime")
  [[ ${SPOT:-0} != 1 ]] || args+=(--spot)
  run "${args[@]}"
  if dry; then
    echo "# until ACTIVE, every ${WAIT_S:-30} s:"
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)'
  else
    local now
    while now=$(state) && [[ $now != ACTIVE ]]; do
      case $now in
        FAILED|SUSPENDED) die "queued resource $TPU_NAME is $now: delete it, or run resume" ;;
      esac
      echo "tpu_pod.sh: $TPU_NAME is $now; waiting" >&2
      sleep "${WAIT_S:-30}"
    done
  fi
  if [[ -n ${DATA_DISK:-} ]]; then
    # Read-only: one disk shared by every worker of the slice.
    run gcloud alpha compute tpus tpu-vm attach-disk "$TPU_NAME" "${where[@]}" --disk "$DATA_DISK" --mode read-only
    on_workers all "sudo mkdir -p $data_root && sudo mount -o ro,noload $data_device $data_root && echo \"\$(hostname): $data_device on $data_root\""
  fi
}

delete() {
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
}

setup() {
  # This checkout as it is now (tracked and untracked files, not the ignored ones).
  archive=$(mktemp -t cacl_jax_src.XXXXXX.tgz)   # global: the EXIT trap removes it
  trap 'rm -f "$archive"' EXIT
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -co --exclude-standard -z | tar czf "$archive" --null -T -)
  else
    tar czf "$archive" -C "$repo" --exclude=.git --exclude=__pycache__ .
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:cacl_jax_src.tgz" "${where[@]}" --worker=all
  local jax_version install
  jax_version=$(sed -n 's/^jax==\(.*\)$/\1/p' "$repo/requirements.txt")
  [[ -n $jax_version ]] || die "no 'jax==VERSION' line in requirements.txt"
  install="rm -rf ${remote_repo} && mkdir -p ${remote_repo} && tar xzf \$HOME/cacl_jax_src.tgz -C ${remote_repo}"
  # uv brings its own Python $python_version (TPU VM images ship an older system Python).
  install+=" && python3 -m pip install --user --quiet --upgrade uv"
  install+=" && \$HOME/.local/bin/uv venv --quiet --allow-existing --python $python_version ${remote_venv}"
  install+=" && \$HOME/.local/bin/uv pip install --quiet --python ${remote_venv}/bin/python"
  # requirements-gcs.txt: gcsfs, which gs:// workdirs need (cacl_jax/runtime/paths.py).
  install+=" -r ${remote_repo}/requirements.txt -r ${remote_repo}/requirements-gcs.txt 'jax[tpu]==$jax_version'"
  install+=" && ${remote_venv}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  on_workers all "$install"
  if [[ -n ${DATA_GCS:-} ]]; then
    on_workers all "sudo mkdir -p $data_root && sudo chown \$USER $data_root && gcloud storage rsync --recursive --quiet $(printf '%q' "$DATA_GCS") $data_root"
  fi
}

start_module() {  # $1 module; then CONFIG WORKDIR [flags]: nohup on every worker
  local module=$1
  shift
  [[ $# -ge 2 ]] || die "usage: tpu_pod.sh ${action} CONFIG WORKDIR [--config.KEY=VALUE ...]"
  local config=$1 workdir=$2
  shift 2
  if [[ $workdir != gs://* ]]; then
    echo "tpu_pod.sh: warning: WORKDIR '$workdir' is not gs://; it must be one directory that" \
         "every worker shares (e.g. the same NFS / gcsfuse mount), or checkpoints will be split" >&2
  fi
  local run_name dist=""
  run_name=$(basename "$workdir")
  if [[ ${DIST:-auto} == explicit ]]; then
    # Worker list and index from the TPU VM metadata (the same source JAX's own detection uses).
    dist='md() { curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; '
    dist+='workers=$(md worker-network-endpoints); first=${workers%%,*}; '
    dist+='dist_args="--coordinator_address ${first##*:}:8476 --num_processes $(tr , "\n" <<<"$workers" | wc -l) '
    dist+='--process_id $(md agent-worker-number)"; '
  elif [[ ${DIST:-auto} != auto ]]; then
    die "DIST must be auto or explicit, got '${DIST}'"
  fi
  local extra=()
  if [[ $module == cacl_jax.main && " $* " != *" --config.compilation_cache_dir="* ]]; then
    # XLA's persistent cache beside the workdir (shared by the runs in its folder): a Spot
    # slice is recreated with fresh disks, and a resume then reads its programs back instead
    # of compiling them again (cacl_jax/runtime/compile_cache.py).
    extra=(--config.compilation_cache_dir="${workdir%/*}/xla_cache")
  fi
  local cmd
  cmd="${dist}mkdir -p ${remote_logs} && cd ${remote_repo} || exit 1; "
  cmd+="PYTHONPATH=. nohup ${remote_venv}/bin/python -m ${module} $(quote_args --config "$config" --workdir "$workdir" "$@" "${extra[@]}")"
  [[ -z $dist ]] || cmd+=' $dist_args'
  # Appended, not truncated: a resumed run's log follows the preempted one's.
  cmd+=" < /dev/null >> ${remote_logs}/${run_name}.log 2>&1 & echo \$! > ${remote_logs}/current.pid; "
  cmd+="echo \"worker \$(hostname): pid \$(cat ${remote_logs}/current.pid)\""
  on_workers all "$cmd"
  echo "started on all workers of $TPU_NAME; read them with: launch/tpu_pod.sh logs $run_name" >&2
}

module_of() {
  case $1 in
    train) echo cacl_jax.main ;;
    eval) echo cacl_jax.linear_eval ;;
    *) die "resume takes train or eval, then CONFIG WORKDIR [...], got '$1'" ;;
  esac
}

case $action in
  create)
    need_tpu
    create
    ;;
  setup)
    need_tpu
    setup
    ;;
  train)
    need_tpu
    start_module cacl_jax.main "$@"
    ;;
  eval)
    need_tpu
    start_module cacl_jax.linear_eval "$@"
    ;;
  resume)
    need_tpu
    [[ $# -ge 3 ]] || die "usage: tpu_pod.sh resume train|eval CONFIG WORKDIR [--config.KEY=VALUE ...]"
    module=$(module_of "$1")
    shift
    # Under DRY_RUN the state is not asked: the commands of a preempted slice are printed.
    now=$(dry && echo SUSPENDED || state)
    if [[ $now != ACTIVE ]]; then
      echo "tpu_pod.sh: $TPU_NAME is $now: recreating it" >&2
      [[ $now == NOT_FOUND ]] || delete
      create
      setup
    fi
    start_module "$module" "$@"
    ;;
  status)
    need_tpu
    if dry; then
      run gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)'
    else
      state
    fi
    ;;
  logs)
    need_tpu
    # Every worker's log, each line led by its worker's host name (worker 0 has process 0).
    log=${1:-'*'}
    tail_args="-n ${LINES_PER_WORKER:-30}"
    [[ ${FOLLOW:-0} != 1 ]] || tail_args+=" -F"
    on_workers all "tail $tail_args ${remote_logs}/${log}.log 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
    ;;
  stop)
    need_tpu
    # SIGTERM to the process `train` / `eval` started (its pid file), on every worker.
    on_workers all "if [ -f ${remote_logs}/current.pid ]; then kill -TERM \$(cat ${remote_logs}/current.pid) && echo \"\$(hostname): SIGTERM sent\"; fi"
    ;;
  ssh)
    need_tpu
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="${WORKER:-0}"
    ;;
  delete)
    need_tpu
    delete
    ;;
  *)
    die "unknown action '$action' (create | setup | train | eval | resume | status | logs | stop | ssh | delete)"
    ;;
esac
