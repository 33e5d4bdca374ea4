"""How training computes, never what: remat, scan, bf16 and the learning-rate schedule;
every option is shown to change the compiled program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_jax import checkpoints, configuration, runs, sharding, train, train_step
from mixflow_jax.data import pipeline
from mixflow_jax.models.sit import SiT, SiTConfig, abstract_params, to_layout

_CONFIG = SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                    num_heads=2, num_classes=4, learn_sigma=False)


def _random(tree, seed=0):
  """Random values in every leaf (numpy: no compile per leaf shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), tree)


def _loss_and_grads(model, params):
  x = np.random.default_rng(1).standard_normal((4, 8, 8, 1)).astype(np.float32)
  t, y = jnp.linspace(0.1, 0.9, 4), jnp.arange(4)
  loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, y)))
  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_and_scan_leave_loss_and_gradients_unchanged():
  params = _random(abstract_params(_CONFIG))
  loss0, grads0 = _loss_and_grads(SiT(_CONFIG), params)
  for remat, scan in (("full", False), ("dots_no_batch", True)):
    model = SiT(_CONFIG, remat=remat, scan_blocks=scan)
    loss, grads = _loss_and_grads(model, to_layout(params, "scanned" if scan else "unrolled"))
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(to_layout(grads, "unrolled")), jax.tree.leaves(grads0),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"{remat} {scan}")


def test_layouts_convert_both_ways():
  params = _random(abstract_params(_CONFIG))
  scanned = to_layout(params, "scanned")
  assert sorted(scanned) == ["blocks", "final_layer", "t_embedder", "x_embedder", "y_embedder"]
  assert scanned["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
  np.testing.assert_array_equal(scanned["blocks"]["mlp"]["fc1"]["kernel"][1],
                                params["blocks_1"]["mlp"]["fc1"]["kernel"])
  for a, b in zip(jax.tree.leaves(to_layout(scanned, "unrolled")), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def _setup(config, dataset):
  return train_step.setup_step(config, dataset.image_shape, dataset.num_classes,
                          sharding.make_mesh(1))


def _lowered(config, dataset):
  s = _setup(config, dataset)
  return s.step_fn.lower(s.abstract_state, train_step.abstract_batch(s, config.data.batch_size),
                         jax.random.key(0), s.abstract_frozen)


def test_bf16_step_has_bf16_dots_and_float32_state_and_loss(config, synthetic_dataset):
  """Every dot of the bf16 step multiplies in bf16 in the program handed to XLA (bf16
  operands, or an explicit bf16 x bf16 -> f32 algorithm in attention's backward; the CPU
  compiler then upcasts them: it has no bf16 GEMM); parameters, optimizer state and the
  loss stay float32, and the loss is the float32 step's within bf16 rounding."""
  config.model.dtype = "bfloat16"
  lowered = _lowered(config, synthetic_dataset)
  dots = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) > 20
  for line in dots:
    assert re.search(r": \(tensor<[^>]*xbf16>|lhs_precision_type = bf16", line), line

  losses = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    s = _setup(config, synthetic_dataset)
    state = train_step.create_train_state(_random(s.abstract_state.params), s.tx)
    batch = next(pipeline.train_batches(synthetic_dataset, 16, 0))
    step = lowered.compile() if dtype == "bfloat16" else s.step_fn
    state, metrics = step(state, batch, jax.random.key(0), train_step.frozen())
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state[0].mu))} == {
        jnp.dtype("float32")}
    losses[dtype] = metrics.compute()["loss"]
    assert losses[dtype].dtype == jnp.float32
  # bf16 keeps 8 bits of mantissa: relative rounding 2^-8 per matmul, a few % on the loss.
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=3e-2)
  assert losses["bfloat16"] != losses["float32"]


def test_scan_program_size_does_not_grow_with_depth(config, synthetic_dataset):
  """A scanned step is the same program at any depth (so is its compile time); an
  unrolled one grows with it."""
  sizes = {}
  for scan in (False, True):
    for depth in (2, 6):
      config.model.depth, config.model.scan_blocks = depth, scan
      sizes[scan, depth] = len(_lowered(config, synthetic_dataset).as_text())
  assert sizes[True, 6] < 1.02 * sizes[True, 2]
  assert sizes[False, 6] > 2 * sizes[False, 2]


def test_scanned_run_warm_starts_converted_and_refuses_resume_in_other_layout(
    config, synthetic_dataset, tmp_path):
  config.train.steps, config.model.depth, config.model.scan_blocks = 2, 2, True
  # A learning rate that leaves the weights where the warm start put them (checked at the
  # end); the first and last scanned runs then share one compiled step.
  config.optim.lr = 1e-30
  state = train.train(config, str(tmp_path / "scanned"), dataset=synthetic_dataset)
  assert runs.read_record(str(tmp_path / "scanned")).param_layout == "scanned"
  # Sampling and warm starts read the unrolled layout from it.
  model_config = runs.read_record(str(tmp_path / "scanned")).model
  params, step = checkpoints.load_params(str(tmp_path / "scanned"),
                                         abstract_params(model_config), to_layout=to_layout)
  assert step == 2
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(to_layout(state.ema_params,
                                                                     "unrolled")), strict=True):
    np.testing.assert_array_equal(a, b)
  config.model.scan_blocks = False
  config.train.steps = 3
  with pytest.raises(configuration.ConfigError, match=r"'scanned' parameter layout.*"
                     r"config\.model\.scan_blocks=True to resume"):
    train.train(config, str(tmp_path / "scanned"), dataset=synthetic_dataset)
  config.train.init_from = str(tmp_path / "scanned")
  unrolled = train.train(config, str(tmp_path / "unrolled"), dataset=synthetic_dataset)
  assert runs.read_record(str(tmp_path / "unrolled")).param_layout == "unrolled"
  # And back, as a converted official (unrolled) checkpoint warm-starts a scanned run.
  config.model.scan_blocks, config.train.steps = True, 1
  config.train.init_from = str(tmp_path / "unrolled")
  post = train.train(config, str(tmp_path / "post"), dataset=synthetic_dataset)
  for a, b in zip(jax.tree.leaves(post.params),
                  jax.tree.leaves(to_layout(unrolled.ema_params, "scanned")), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-20)


def test_learning_rate_warmup_and_decay(config):
  o = config.optim
  o.lr, o.warmup_steps, o.end_lr = 1e-3, 10, 1e-4
  assert float(train_step.learning_rate(o, 110)(5)) == pytest.approx(5e-4)
  assert float(train_step.learning_rate(o, 110)(10)) == pytest.approx(1e-3)
  o.schedule = "constant"
  assert float(train_step.learning_rate(o, 110)(100)) == pytest.approx(1e-3)
  o.schedule = "cosine"
  assert float(train_step.learning_rate(o, 110)(60)) == pytest.approx(5.5e-4)  # halfway
  assert float(train_step.learning_rate(o, 110)(110)) == pytest.approx(1e-4)
  o.schedule = "linear"
  assert float(train_step.learning_rate(o, 110)(60)) == pytest.approx(5.5e-4)


@pytest.mark.parametrize("field, value, message", [
    ("model.remat", "everything", "config.model.remat='everything'"),
    ("model.attention", "sdpa", "config.model.attention='sdpa'"),
    ("train.num_fsdp", 0, "config.train.num_fsdp=0"),
    ("train.partition_rules", (("[", "auto"),), "'[' is not a regular expression"),
    ("train.partition_rules", (("x",),), "config.train.partition_rules=('x',)"),
    ("optim.schedule", "step", "config.optim.schedule='step'"),
    ("train.profile_steps", (5, 2), "config.train.profile_steps=(5, 2)"),
])
def test_bad_compute_options_name_the_field(config, field, value, message):
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(configuration.ConfigError, match=re.escape(message)):
    configuration.validate(config)


def test_mesh_and_platform_errors_name_the_field(config, synthetic_dataset):
  config.train.num_fsdp = 3
  with pytest.raises(configuration.ConfigError, match=r"config\.train\.num_fsdp=3 .* "
                     r"divisor of the device count 8"):
    configuration.validate(config, 8)
  with pytest.raises(configuration.ConfigError, match=r"config\.train\.num_fsdp=3 .*"):
    sharding.make_mesh(3)
  config.model.attention = "cudnn"
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.model\.attention='cudnn' is not available on cpu"):
    train_step.make_model(config, synthetic_dataset.image_shape, synthetic_dataset.num_classes)
  with pytest.raises(configuration.ConfigError, match=r"partition_rules: rule .* names the "
                     r"axis 'model'"):
    sharding.state_sharding(abstract_params(_CONFIG), sharding.make_mesh(1),
                            (("qkv/kernel", "None,model"),))


def test_posterior_moments_are_sampled_in_the_step(config, synthetic_dataset):
  """A batch of VAE posterior moments trains on mean + std * eps, eps drawn in the step
  from its own key (std = 0: exactly the step on the mean)."""
  s = _setup(config, synthetic_dataset)
  params = _random(s.abstract_state.params)
  batch = next(pipeline.train_batches(synthetic_dataset, 16, 0))
  rng = jax.random.key(3)

  def loss(batch):
    state = train_step.create_train_state(jax.tree.map(jnp.copy, params), s.tx)
    return float(s.step_fn(state, batch, rng, train_step.frozen())[1].compute()["loss"])

  std = np.full_like(batch["image"], 0.3)
  eps = jax.random.normal(jax.random.split(jax.random.fold_in(rng, 0))[1], std.shape)
  assert loss(dict(batch, image_std=np.zeros_like(std))) == loss(batch)
  sampled = dict(batch, image=batch["image"] + std * np.asarray(eps))
  np.testing.assert_allclose(loss(dict(batch, image_std=std)), loss(sampled), rtol=1e-6)
  assert abs(loss(dict(batch, image_std=std)) - loss(batch)) > 1e-3
