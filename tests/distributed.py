"""Runs a `mixflow` command as a multi-process JAX job on this machine: several processes
with a few fake CPU devices each, joined by jax.distributed on localhost."""

import os
import socket
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(path: str, body: str) -> str:
  """Writes a config file at ``path`` whose ``get_config()`` runs ``body`` (which may use
  the tests' helpers, e.g. ``from tests.conftest import tiny_config``) and returns it."""
  with open(path, "w") as f:
    f.write(f"import sys\nsys.path.insert(0, {REPO!r})\n\n\ndef get_config():\n"
            + textwrap.indent(textwrap.dedent(body).strip(), "  ") + "\n")
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_mixflow(*args: str, num_processes: int = 2, devices_per_process: int = 4,
                  env: dict[str, str] | None = None) -> list[subprocess.Popen]:
  """Starts ``mixflow *args --distributed ...`` in ``num_processes`` processes of
  ``devices_per_process`` fake CPU devices each, joined on a free localhost port, with
  ``env`` added to the environment."""
  env = dict(os.environ, **(env or {}), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             f"--xla_force_host_platform_device_count={devices_per_process}")
  address = f"localhost:{_free_port()}"
  return [subprocess.Popen(
      [sys.executable, "-m", "mixflow_jax", *args, "--distributed",
       f"--coordinator_address={address}", f"--num_processes={num_processes}",
       f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]


def wait(processes: list[subprocess.Popen], timeout: int = 300, returncode: int = 0
         ) -> list[str]:
  """Waits for ``processes``; asserts that each exited with ``returncode`` and joined a job
  of all of them. Returns each process's stdout + stderr."""
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in processes:
      p.kill()
  for i, (p, out) in enumerate(zip(processes, outputs)):
    assert p.returncode == returncode, f"process {i}: exit {p.returncode}\n{out[-4000:]}"
    assert f"Process {i} of a job of {len(processes)} processes" in out, out[-4000:]
  return outputs


def run_mixflow(*args: str, num_processes: int = 2, devices_per_process: int = 4,
                timeout: int = 300, env: dict[str, str] | None = None) -> list[str]:
  """``mixflow *args --distributed ...`` in ``num_processes`` processes (``start_mixflow``);
  asserts that each succeeds and joined a job of ``num_processes * devices_per_process``
  devices. Returns each process's stdout + stderr."""
  outputs = wait(start_mixflow(*args, num_processes=num_processes,
                               devices_per_process=devices_per_process, env=env), timeout)
  devices = num_processes * devices_per_process
  for i, out in enumerate(outputs):
    assert f"Process {i} of a job of {num_processes} processes, {devices} devices" in out
  return outputs
