"""A Google Cloud Storage emulator on loopback, for tests that use ``gs://`` paths.

``start()`` runs gcp-storage-emulator (PyPI) in a subprocess on a free 127.0.0.1 port,
in memory, with one bucket, and returns the environment that points every client of this
project at it and nowhere else:

- orbax's TensorStore: ``TENSORSTORE_GCS_HTTP_URL``, and a fixed token
  (``GOOGLE_AUTH_TOKEN_FOR_TESTING``) so that it looks for no credentials;
- etils.epath: ``EPATH_USE_TF=false`` selects fsspec's gcsfs, which reads
  ``STORAGE_EMULATOR_HOST``, with anonymous credentials (``FSSPEC_GCS_TOKEN=anon``) and
  without its bucket-type probe (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``);
- TensorFlow's own GCS client (TensorBoard events) cannot be pointed at an emulator: tests
  on ``gs://`` turn ``train.tensorboard`` off, and every HTTP(S) client that honours the
  proxy variables (libcurl: TensorFlow, TensorStore; requests: google-auth) is sent to a
  dead loopback port for any host but loopback, as is the GCE metadata server
  (``GCE_METADATA_*``), so a client that slips through fails loudly on loopback instead of
  reaching the network.

The emulator's media downloads lack the ``x-goog-generation`` header that TensorStore's
conditional reads need (its OCDBT manifest); run as ``python -m tests.gcs_emulator PORT
BUCKET``, this module adds it.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

DEAD = "127.0.0.1:9"  # the discard port: nothing listens


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  proxy = f"http://{DEAD}"
  return {
      "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
      "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
      "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
      "GCE_METADATA_HOST": DEAD, "GCE_METADATA_IP": DEAD, "GCE_METADATA_ROOT": DEAD,
      "NO_GCE_CHECK": "true"}


def start(bucket: str = "bucket") -> tuple[subprocess.Popen, dict[str, str]]:
  """Starts the emulator; returns (its process, the clients' environment). Stop it with
  ``process.kill()``."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file: the server is single-threaded, and a full pipe nobody reads
  # would stall it (it logs a traceback for every client that drops a connection).
  log = tempfile.TemporaryFile()
  process = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), bucket],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).close()
      return process, environment(url)
    except OSError as e:
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        log.seek(0)
        raise RuntimeError(f"The GCS emulator did not start: {log.read().decode()}") from e
      time.sleep(0.2)


def list_objects(env: dict[str, str], bucket: str = "bucket") -> list[str]:
  """The names of the objects in ``bucket`` of the emulator that ``env`` points at."""
  import json

  with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o",
                              timeout=10) as response:
    return [item["name"] for item in json.load(response).get("items", [])]


def _serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the handler set the status
      return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

  objects.download = download_with_generation
  from gcp_storage_emulator.server import create_server  # captures the handler above

  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  _serve(int(sys.argv[1]), sys.argv[2])
