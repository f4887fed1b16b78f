#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install this checkout on every worker, train / evaluate on
# all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`), follow, stop, delete.
#
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh setup                       # copy this checkout + install, every worker
#   launch/tpu_pod.sh train CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh eval  CONFIG WORKDIR [--config.KEY=VALUE ...]   # cacl_jax.linear_eval
#   launch/tpu_pod.sh logs  [RUN]                 # follow worker 0's log (RUN = basename WORKDIR)
#   launch/tpu_pod.sh stop                        # SIGTERM: the trainer saves, then exits 0
#   launch/tpu_pod.sh ssh                         # a shell on worker ${WORKER:-0}
#   launch/tpu_pod.sh delete
#
# Example (ResNet-18 CACL on a v4-32, 16 chips, global batch 512 = the paper's 16 × 32):
#   export TPU_NAME=cacl-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train configs/cacl_r18_kinetics.py gs://BUCKET/runs/r18_cacl \
#       --config.data.root=/mnt/data/kinetics
#
# WORKDIR must be storage that every worker sees: a gs:// bucket path (Orbax reads and writes
# gs:// directly; every worker writes its shard of each checkpoint, and a resumed or
# re-sharded run reads them back). A local path on a pod would split the checkpoint across
# the workers' disks. The data (`--config.data.root`, prepared by `cacl_jax.prepare_data`) is
# read by every worker from a local path: give it with DATA_DISK (a persistent disk holding
# the prepared data, attached read-only to all workers at create and mounted at DATA_ROOT) or
# copy it from a bucket with `DATA_GCS=gs://... launch/tpu_pod.sh setup` (to DATA_ROOT on
# every worker; needs the space on the boot disk, see BOOT_DISK_SIZE).
#
# Multi-host start-up: each worker runs the same command; on a TPU pod
# `jax.distributed.initialize()` needs no arguments and the trainer calls it by itself.
# DIST=explicit instead passes --coordinator_address (worker 0's internal IP, port 8476),
# --num_processes and --process_id, read on each worker from the TPU VM metadata server.
#
# Environment:
#   TPU_NAME          the TPU VM name (required)
#   ZONE              its zone (required)
#   PROJECT           gcloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  for create, e.g. v4-32, v5p-32, v5litepod-16 (default v4-32)
#   RUNTIME_VERSION   TPU VM image for create (default tpu-ubuntu2204-base)
#   SPOT=1            create a Spot TPU (preemptible: the trainer saves on SIGTERM; rerun
#                     `train` with the same WORKDIR to resume)
#   DATA_DISK         optional persistent disk name for create (read-only, all workers)
#   DATA_ROOT         where the data lives on each worker (default /mnt/data)
#   DATA_GCS          optional gs:// path of prepared data, copied to DATA_ROOT by setup
#   BOOT_DISK_SIZE    optional boot disk size for create, e.g. 500GB
#   PYTHON_VERSION    Python of the worker venv (default 3.11, installed by uv)
#   DIST              auto (default) or explicit (see above)
#   WORKER            worker index for `ssh` (default 0)
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
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
data_root=${DATA_ROOT:-/mnt/data}
python_version=${PYTHON_VERSION:-3.11}
remote_repo='$HOME/cacl_jax'
remote_venv='$HOME/cacl_venv'
remote_logs='$HOME/cacl_logs'

need_tpu() {
  [[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME (the TPU VM name)"
  [[ -n ${ZONE:-} ]] || die "set ZONE (e.g. us-central2-b)"
  where=(--zone "$ZONE")
  [[ -z ${PROJECT:-} ]] || where+=(--project "$PROJECT")
}

run() {  # prints under DRY_RUN=1, runs otherwise
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_workers() {  # $1 = worker selector (all | N), $2 = remote bash command
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "gcloud compute tpus tpu-vm ssh $TPU_NAME ${where[*]} --worker=$1 --command '$2'"
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command "$2"
  fi
}

quote_args() { printf '%q ' "$@"; }

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
  local cmd
  cmd="${dist}mkdir -p ${remote_logs} && cd ${remote_repo} || exit 1; "
  cmd+="PYTHONPATH=. nohup ${remote_venv}/bin/python -m ${module} $(quote_args --config "$config" --workdir "$workdir" "$@")"
  [[ -z $dist ]] || cmd+=' $dist_args'
  cmd+=" < /dev/null > ${remote_logs}/${run_name}.log 2>&1 & echo \$! > ${remote_logs}/current.pid; "
  cmd+="echo \"worker \$(hostname): pid \$(cat ${remote_logs}/current.pid)\""
  on_workers all "$cmd"
  echo "started on all workers of $TPU_NAME; follow with: launch/tpu_pod.sh logs $run_name" >&2
}

case $action in
  create)
    need_tpu
    args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}"
          --accelerator-type "$accelerator" --version "$runtime")
    [[ ${SPOT:-0} != 1 ]] || args+=(--spot)
    [[ -z ${BOOT_DISK_SIZE:-} ]] || args+=(--boot-disk-size "$BOOT_DISK_SIZE")
    if [[ -n ${DATA_DISK:-} ]]; then
      disk_project=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
      args+=(--data-disk "source=projects/$disk_project/zones/$ZONE/disks/$DATA_DISK,mode=read-only")
    fi
    run "${args[@]}"
    if [[ -n ${DATA_DISK:-} ]]; then
      # The attached disk is the second block device on every worker (/dev/sdb).
      on_workers all "sudo mkdir -p $data_root && sudo mount -o ro,noload /dev/sdb $data_root"
    fi
    ;;
  setup)
    need_tpu
    # This checkout as it is now (tracked and untracked files, not the ignored ones).
    archive=$(mktemp -t cacl_jax_src.XXXXXX.tgz)
    trap 'rm -f "$archive"' EXIT
    if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      (cd "$repo" && git ls-files -co --exclude-standard -z | tar czf "$archive" --null -T -)
    else
      tar czf "$archive" -C "$repo" --exclude=.git --exclude=__pycache__ .
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:cacl_jax_src.tgz" "${where[@]}" --worker=all
    jax_version=$(sed -n 's/^jax==\(.*\)$/\1/p' "$repo/requirements.txt")
    [[ -n $jax_version ]] || die "no 'jax==VERSION' line in requirements.txt"
    install="rm -rf ${remote_repo} && mkdir -p ${remote_repo} && tar xzf \$HOME/cacl_jax_src.tgz -C ${remote_repo}"
    # uv brings its own Python $python_version (TPU VM images ship an older system Python).
    install+=" && python3 -m pip install --user --quiet --upgrade uv"
    install+=" && \$HOME/.local/bin/uv venv --quiet --allow-existing --python $python_version ${remote_venv}"
    install+=" && \$HOME/.local/bin/uv pip install --quiet --python ${remote_venv}/bin/python"
    # requirements-gcs.txt: gcsfs, which gs:// workdirs need (cacl_jax/paths.py).
    install+=" -r ${remote_repo}/requirements.txt -r ${remote_repo}/requirements-gcs.txt 'jax[tpu]==$jax_version'"
    install+=" && ${remote_venv}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    on_workers all "$install"
    if [[ -n ${DATA_GCS:-} ]]; then
      on_workers all "sudo mkdir -p $data_root && sudo chown \$USER $data_root && gcloud storage rsync --recursive --quiet $(printf '%q' "$DATA_GCS") $data_root"
    fi
    ;;
  train)
    need_tpu
    start_module cacl_jax.main "$@"
    ;;
  eval)
    need_tpu
    start_module cacl_jax.linear_eval "$@"
    ;;
  logs)
    need_tpu
    log=${1:-'*'}
    on_workers 0 "tail -n 50 -F ${remote_logs}/${log}.log"
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
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    die "unknown action '$action' (create | setup | train | eval | logs | stop | ssh | delete)"
    ;;
esac
