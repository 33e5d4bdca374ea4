"""The launch scripts' dry runs print the commands a pod or SLURM job would run."""

import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train", "--config=configs/imagenet_sit.py:sit_xl2", "--workdir=gs://b/run dir"]


def _dry_run(script, *args, env=None, returncode=0):
  result = subprocess.run([os.path.join(REPO, "launch", script), *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **(env or {})))
  assert result.returncode == returncode, result.stderr
  if returncode:
    return result.stderr
  lines = result.stdout.splitlines()
  assert all(line.startswith("+ ") for line in lines), lines
  return [shlex.split(line[2:]) for line in lines]


def _remote(command):
  """The shell words of an ``ssh --command=...`` argument."""
  return shlex.split(next(a for a in command if a.startswith("--command="))[10:])


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  commands = _dry_run("tpu_pod.sh", "--name=mf", "--zone=us-west4-a", "--type=v5litepod-16",
                      "--spot", "--dry-run", "--", *TRAIN)
  steps = [c[4] for c in commands]
  assert steps == ["create", "ssh", "scp", "ssh", "ssh", "delete"], commands
  create, _, scp, install, train, delete = commands
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"mf", "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--spot"} <= set(create)
  for command in (scp, install, train):
    assert "--worker=all" in command
  assert "jax[tpu]==0.10.2" in _remote(install)
  remote = _remote(train)
  assert remote[remote.index("python3"):] == ["python3", "-m", "mixflow_jax", *TRAIN,
                                              "--distributed"]
  assert delete[-1] == "--quiet"
  keep = _dry_run("tpu_pod.sh", "--name=mf", "--zone=z", "--type=v4-32", "--keep",
                  "--dry-run", "--", *TRAIN)
  assert [c[4] for c in keep][-1] == "ssh"  # no delete
  assert "--name is required" in _dry_run("tpu_pod.sh", "--zone=z", "--", "train",
                                          returncode=2)


def test_slurm_dry_run_starts_one_process_per_gpu_or_per_node():
  env = {"SLURM_JOB_NODELIST": "gpu07,gpu08", "SLURM_NTASKS": "16",
         "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_GPUS_PER_NODE": "a100:8",
         "SLURM_JOB_ID": "4321"}
  (srun,) = _dry_run("slurm_gpu.sbatch", "--dry-run", *TRAIN, env=env)
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "bash"] and srun[3] == "-c"
  task = shlex.split(srun[4])
  assert task[:3] == ["CUDA_VISIBLE_DEVICES=$SLURM_LOCALID", "exec", "python3"]
  assert task[5:] == [*TRAIN, "--distributed", "--coordinator_address=gpu07:24321",
                      "--num_processes=16", "--process_id=$SLURM_PROCID"]
  (srun,) = _dry_run("slurm_gpu.sbatch", "--dry-run", *TRAIN,
                     env=dict(env, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1"))
  task = shlex.split(srun[4])
  assert task[0] == "exec" and "--num_processes=2" in task  # all GPUs of each node
  message = _dry_run("slurm_gpu.sbatch", "--dry-run", *TRAIN, returncode=2,
                     env=dict(env, SLURM_NTASKS_PER_NODE="4(x2)"))
  assert "--ntasks-per-node=4: expected 1" in message
  no_slurm = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
  result = subprocess.run([os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "train"],
                          capture_output=True, text=True, env=no_slurm, timeout=60)
  assert result.returncode == 2 and "submit with sbatch" in result.stderr
