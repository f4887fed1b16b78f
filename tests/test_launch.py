"""The launchers' commands (launch/*, under DRY_RUN=1: gcloud, srun and ssh are not run) and
which environments `main` and `linear_eval` take for a cluster to join.

The TPU launcher is checked for each generation it supports (v4, v5e, v5p, v6e): the software
version its queued resource asks for, Spot, the data disk attached read-only and mounted by its
stable /dev/disk/by-id name, and `resume`, which recreates a preempted slice and starts the same
run again. That two SLURM tasks without flags do join one run is tested end to end in
test_multiprocess.py.
"""
import os
import socket
import subprocess
import sys

import pytest

from cacl_jax.runtime import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = {"TPU_NAME": "cacl", "ZONE": "us-east5-b", "DRY_RUN": "1"}


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "DATA_"))}
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                        env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_create_queues_each_generation_with_its_runtime(accelerator, runtime):
  out = launch("tpu_pod.sh", "create", **TPU, ACCELERATOR_TYPE=accelerator, SPOT="1",
               DATA_DISK="k400")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].split() == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "cacl", "--zone", "us-east5-b",
      "--node-id", "cacl", "--accelerator-type", accelerator, "--runtime-version", runtime,
      "--spot"]
  assert "queued-resources describe cacl" in lines[2]   # waits until ACTIVE
  assert lines[3].split() == ["gcloud", "alpha", "compute", "tpus", "tpu-vm", "attach-disk", "cacl",
                              "--zone", "us-east5-b", "--disk", "k400", "--mode", "read-only"]
  assert "--worker=all" in lines[4]
  assert "sudo mount -o ro,noload /dev/disk/by-id/google-persistent-disk-1 /mnt/data" in lines[4]


def test_tpu_create_on_demand_and_an_unknown_generation():
  out = launch("tpu_pod.sh", "create", **TPU, ACCELERATOR_TYPE="v5p-8", RUNTIME_VERSION="mine")
  assert "--runtime-version mine" in out.stdout and "--spot" not in out.stdout
  assert "attach-disk" not in out.stdout   # no DATA_DISK
  bad = launch("tpu_pod.sh", "create", **TPU, ACCELERATOR_TYPE="v9-8")
  assert bad.returncode == 2 and bad.stdout == ""
  assert "ACCELERATOR_TYPE 'v9-8' is not v4-N, v5litepod-N, v5p-N or v6e-N" in bad.stderr


def test_tpu_resume_recreates_the_slice_then_starts_the_same_run():
  out = launch("tpu_pod.sh", "resume", "train", "configs/cacl_r18_kinetics.py", "gs://b/runs/r18",
               "--config.data.root=/mnt/data/k400", **TPU, ACCELERATOR_TYPE="v6e-16", SPOT="1")
  assert out.returncode == 0, out.stderr
  steps = [" ".join(line.split()[3:5]) for line in out.stdout.splitlines()
           if line.startswith("gcloud")]
  assert steps == ["queued-resources delete", "queued-resources create",
                   "queued-resources describe",   # until ACTIVE
                   "tpu-vm scp", "tpu-vm ssh",    # setup: this checkout, its packages
                   "tpu-vm ssh"]                  # the run, on every worker
  start = out.stdout.splitlines()[-1]
  assert ("python -m cacl_jax.main --config configs/cacl_r18_kinetics.py --workdir gs://b/runs/r18 "
          "--config.data.root=/mnt/data/k400") in start
  assert ">> $HOME/cacl_logs/r18.log" in start   # the resumed run's log follows the first one's
  assert "--coordinator_address" not in start   # the TPU VM's workers find each other


def test_tpu_logs_come_from_every_worker():
  out = launch("tpu_pod.sh", "logs", "r18", **TPU)
  assert "--worker=all" in out.stdout and "$HOME/cacl_logs/r18.log" in out.stdout
  assert '"s/^/[$(hostname)] /"' in out.stdout


def test_gpu_hosts_over_ssh_log_on_each_host_when_the_workdir_is_a_url():
  out = launch("multihost_gpu.sh", "configs/demo.py", "gs://b/run", DRY_RUN="1", HOSTS="h0 h1",
               PYTHON="/opt/venv/bin/python")
  lines = out.stdout.splitlines()
  assert len(lines) == 2 and lines[1].startswith("ssh -o BatchMode=yes h1 ")
  assert "mkdir -p $HOME/cacl_logs" in lines[1] and "./gs:" not in out.stdout
  assert ("/opt/venv/bin/python -m cacl_jax.main --config configs/demo.py --workdir gs://b/run "
          "--coordinator_address h0:12355 --num_processes 2 --process_id 1") in lines[1]
  shared = launch("multihost_gpu.sh", "configs/demo.py", "/shared/run", DRY_RUN="1", HOSTS="h0")
  assert ">> /shared/run/logs/process_0.log" in shared.stdout
  interpreter = shared.stdout.split("nohup ")[1].split()[0]
  assert os.path.isabs(interpreter)   # this shell's python3 by default, not a bare `python`


def test_the_sbatch_template_runs_one_srun_without_coordinator_flags():
  out = launch("slurm.sbatch", "configs/cacl_r18_kinetics.py", "/shared/runs/r18",
               "--config.data.root=/data/k400", DRY_RUN="1")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [
      "srun", "--kill-on-bad-exit=1", "python3", "-m", "cacl_jax.main",
      "--config", "configs/cacl_r18_kinetics.py", "--workdir", "/shared/runs/r18",
      "--config.data.root=/data/k400"]
  with open(os.path.join(ROOT, "launch", "slurm.sbatch")) as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert "--gpus-per-node=8" in directives and "--ntasks-per-node=8" in directives
  assert not any(d.startswith(("--gpus-per-task", "--gpu-bind")) for d in directives)


SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
              "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("environ, cluster", [
    (SLURM_TASK, "SLURM"),
    ({**SLURM_TASK, "SLURM_NTASKS": "1"}, None),   # one task: alone, with every GPU
    ({k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_NODELIST"}, None),   # salloc shell
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4"},
     "Open MPI"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, "Kubernetes"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),   # a pod outside an Indexed Job
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, "Cloud TPU"),
    ({}, None)])
def test_which_environments_are_clusters_to_join(environ, cluster):
  assert parallel.cluster_environment(environ) == cluster


def test_coordinator_flags_go_together():
  with pytest.raises(ValueError, match="--coordinator_address, --num_processes and --process_id go together"):
    parallel.initialize_distributed(num_processes=2)


FLAGS_UNDER_SRUN = """
import jax
from cacl_jax.runtime import parallel
print(parallel.initialize_distributed("127.0.0.1:{port}", 1, 0), jax.process_count(),
      jax.config.values["jax_cuda_visible_devices"])
"""


def test_explicit_flags_win_over_slurm_and_keep_every_gpu():
  """One process per node under srun (multihost_gpu.sh): the flags' layout, and no GPU
  restriction, where JAX's SLURM detection would pin the process to GPU SLURM_LOCALID."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, **SLURM_TASK, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", FLAGS_UNDER_SRUN.format(port=port)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["flags", "1", "all"], out.stderr[-2000:]
