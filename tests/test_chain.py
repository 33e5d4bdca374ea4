"""The whole chain a pod user runs, on one machine: a TFDS ImageNet (tests/fake_tfds.py,
prepared from its manual download) encoded by two processes, copied to a bucket (a GCS
emulator on loopback), post-trained by two processes from the bucket on a gs:// workdir,
preempted by SIGTERM mid-run
and relaunched, then sampled and evaluated (ADM metrics) from the bucket. The relaunched
run ends with the params of an uninterrupted one, and its checkpoint (written by both
processes) resumes on one process at the pipeline's saved position, as the uninterrupted
run resumes."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import safetensors.torch
import torch
from PIL import Image

from mixflow_jax import runs, train
from mixflow_jax.convert.vae import convert_vae_checkpoint
from mixflow_jax.data import image_sources, load_dataset
from mixflow_jax.models.sit import abstract_params
from tests import distributed, fake_tfds, gcs_emulator, torch_inception, torch_vae

SIZE = 16  # crop side; the test VAE halves it: 8 x 8 x 4 latents
_CONFIG = """
    from tests.conftest import tiny_config
    config = tiny_config()
    config.data.name, config.data.path, config.data.flip = "arrays", {data!r}, True
    config.data.heldout_fraction = 0.25
    config.train.steps, config.train.checkpoint_every = 8, 100
    config.train.tensorboard = False  # TensorFlow's GCS client: see tests/gcs_emulator.py
    config.sample.num_samples = config.sample.batch_size = 8
    config.sample.vae = {vae!r}
    config.eval.reference, config.eval.inception = {reference!r}, {inception!r}
    return config
"""
_PREEMPTED = """
    import os, signal, time
    from mixflow_jax import train
    stream = train.pipeline.train_batches

    def sigterm_at_batch_3(*args, **kwargs):  # as a scheduler signals every task
      for i, batch in enumerate(stream(*args, **kwargs)):
        if i == 3:
          os.kill(os.getpid(), signal.SIGTERM)
        if i >= 3:
          time.sleep(0.2)  # slow from here: the notice is agreed on mid-run
        yield batch

    train.pipeline.train_batches = sigterm_at_batch_3
"""

_COPY = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from mixflow_jax import storage
    for name in os.listdir({data!r}):
      storage.write_bytes(f"gs://bucket/latents/{{name}}",
                          open(os.path.join({data!r}, name), "rb").read())
""")
_SAMPLE_EVALUATE = textwrap.dedent("""
    import importlib.util, sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from mixflow_jax import checkpoints, evaluate, generate, runs, train
    from mixflow_jax.models.sit import abstract_params

    spec = importlib.util.spec_from_file_location("config", {config!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, run = module.get_config(), "gs://bucket/run"
    print("SAMPLES", generate.sample_job(config, run))
    print("METRICS", evaluate.evaluate_job(config, run))
    params, step = checkpoints.load_params(
        run, abstract_params(runs.read_record(run).model))
    np.savez({params!r}, *jax.tree.leaves(params), step=step)
    config.train.steps = 10  # the two processes' checkpoint, resumed on one process
    np.savez({resumed!r}, *jax.tree.leaves(train.train(config, run)))
""")


def _manual_download(root, rng):
  for name in fake_tfds.FakeImagenet.CLASSES:
    (root / name).mkdir(parents=True)
    for i in range(8):
      pixels = rng.integers(0, 256, (24 + 3 * i, 32, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=95)


def test_tfds_encode_preempted_train_sample_evaluate_on_gcs(tmp_path):
  rng = np.random.default_rng(0)
  _manual_download(tmp_path / "manual", rng)
  tfds_dir = str(tmp_path / "tfds")
  source = image_sources.tfds_source("fake_imagenet", data_dir=tfds_dir,
                                     manual_dir=str(tmp_path / "manual"))  # prepared here
  safetensors.torch.save_file(torch_vae.random_vae(0, (32, 64), 1, 8).state_dict(),
                              tmp_path / "vae.safetensors")
  vae = str(tmp_path / "vae")
  convert_vae_checkpoint(str(tmp_path / "vae.safetensors"), vae)
  inception = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  torch.save(torch_inception.random_fid_inception(seed=0).state_dict(), inception)
  reference = str(tmp_path / "reference.npz")
  # 8 images, as many as the samples: one shape through the Inception (one compile), and
  # few images at 299 x 299 (each costs ~0.3 s at XLA:CPU's optimisation level 0).
  np.savez(reference, arr_0=np.stack([source.load(i, SIZE)[0] for i in range(8)]))

  data = str(tmp_path / "latents")
  distributed.run_mixflow("encode", "--tfds=fake_imagenet", f"--tfds_data_dir={tfds_dir}",
                          f"--vae={vae}", f"--out={data}", f"--image_size={SIZE}", "--flip",
                          num_processes=2, devices_per_process=2)
  settings = _CONFIG.format(data="gs://bucket/latents", vae=vae, reference=reference,
                            inception=inception)
  plain = distributed.config_file(str(tmp_path / "config.py"), settings)
  preempted = distributed.config_file(str(tmp_path / "preempted.py"), _PREEMPTED + settings)

  emulator, env = gcs_emulator.start("bucket")
  try:
    run = ("train", "--workdir=gs://bucket/run")
    # The latents, written locally by encode (memory maps), copied into the bucket.
    copy = subprocess.run([sys.executable, "-c", _COPY.format(repo=distributed.REPO,
                                                              data=data)],
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300)
    assert copy.returncode == 0, copy.stderr[-3000:]
    outputs = distributed.wait(distributed.start_mixflow(
        *run, f"--config={preempted}", env=env, devices_per_process=2), returncode=143)
    saved = {int(re.search(r"saved step (\d+)", out).group(1)) for out in outputs}
    assert len(saved) == 1 and 1 <= min(saved) < 8, outputs[0][-3000:]
    distributed.run_mixflow(*run, f"--config={plain}", env=env,  # the relaunch
                            devices_per_process=2)
    job = subprocess.run([sys.executable, "-c", _SAMPLE_EVALUATE.format(
        repo=distributed.REPO, config=plain, params=str(tmp_path / "params.npz"),
        resumed=str(tmp_path / "resumed.npz"))],
        cwd=tmp_path, env=dict(os.environ, **env), capture_output=True, text=True,
        timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-5000:]
    objects = gcs_emulator.list_objects(env, "bucket")
  finally:
    emulator.kill()
  assert "SAMPLES gs://bucket/run/samples/ema_euler10_cfg1_n8.npz" in job.stdout
  assert re.search(r"METRICS \{'inception_score': [0-9.]+, 'fid': [0-9.]+", job.stdout)
  for expected in ("run/model.json", "run/checkpoints/8/data/metadata",
                   "run/checkpoints/10/data/metadata",
                   "run/samples/ema_euler10_cfg1_n8.npz",
                   "run/metrics_ema_euler10_cfg1_n8.json"):
    assert expected in objects, (expected, sorted(objects))
  for root in (tmp_path, distributed.REPO):  # nothing under a local folder named 'gs:'
    assert not any(name.startswith("gs:") for name in os.listdir(root))

  # The preempted and relaunched run ends where an uninterrupted one on one device ends.
  config = _load_config(plain)
  config.data.path = data  # the same files, on local disk
  uninterrupted = train.train(config, str(tmp_path / "uninterrupted"),
                              dataset=load_dataset(config.data))
  stored = np.load(tmp_path / "params.npz")
  assert int(stored["step"]) == 8
  ema = jax.tree.leaves(uninterrupted.ema_params)
  for i, leaf in enumerate(ema):
    np.testing.assert_allclose(stored[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
  model_config = runs.read_record(str(tmp_path / "uninterrupted")).model
  assert jax.tree.structure(abstract_params(model_config)) == jax.tree.structure(
      uninterrupted.ema_params)
  # Both resumed on one process to step 10: the whole state (params, EMA, optimizer).
  config.train.steps = 10
  continued = jax.tree.leaves(train.train(config, str(tmp_path / "uninterrupted"),
                                          dataset=load_dataset(config.data)))
  resumed = np.load(tmp_path / "resumed.npz")
  assert len(resumed.files) == len(continued)
  for i, leaf in enumerate(continued):
    np.testing.assert_allclose(resumed[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)


def _load_config(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("chain_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
