"""The Flax text encoders compute transformers' (4.56.2, the real library) to 1e-5 in fp32 for
tiny random configs: ``CLIPTextModelWithProjection`` in CLIP-L's flavour (quick_gelu, the
legacy ``eos_token_id`` 2, padded with the EOS id) and bigG's (gelu, padded with id 0; here
with an ``eos_token_id`` below other ids, so that HF's first-EOS rule and the argmax rule pick
different rows), on SD3's per-token ``hidden_states[-2]`` and pooled ``text_embeds``; and
``T5EncoderModel`` (T5 v1.1's gated GELU, relative buckets in all three regimes) with and
without a mask. The comparison sees a dropped causal mask, the pooled row picked otherwise,
the other GELU, scaled T5 attention, mirrored position buckets, a centred T5 norm, T5
without its relative position bias and uniform attention. The released configs have HF's
keys and shapes; the converters name a missing or unknown key."""

import dataclasses
import functools
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from mixflow_jax import errors
from mixflow_jax.convert import text_encoders as convert
from mixflow_jax.models import clip_text, t5_encoder

ATOL = 1e-5
BUG = 100 * ATOL  # a bug must move the output at least this far
LENGTH = 77  # CLIP's context, as SD3 pads to it
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=24,
                 num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=LENGTH)
# bos / eos / pad ids and the config's eos_token_id of each flavour. CLIP-L: the EOS is the
# largest id and pads (the legacy argmax rule finds its first occurrence). bigG: pad 0 ('!');
# eos_token_id 500 with larger ids in the prompts, so only the first-EOS rule finds it.
CLIP_FLAVOURS = {
    "clip_l": dict(hidden_act="quick_gelu", eos_token_id=2, bos=998, eos=999, pad=999),
    "bigg": dict(hidden_act="gelu", eos_token_id=500, bos=498, eos=500, pad=0),
}
# T5 v1.1's flags; max_distance 24 so that 48 tokens see exact, logarithmic and clipped
# buckets.
TINY_T5 = dict(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=24)
T5_LENGTH = 48


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every weight random and O(1) in effect: matrices 1 / sqrt(fan in), norm weights 1 +
  N(0, 0.25), biases N(0, 0.25), embeddings (and T5's bias table) N(0, 1). T5's q is
  scaled by 1 / sqrt(d_kv) more, as T5's initialisation folds in the scaling its attention
  lacks (HF's ``T5PreTrainedModel._init_weights``): without it the logits of these random
  weights are sqrt(d_kv) times larger and the outputs several times more sensitive to
  rounding."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(float("norm" in name and name.endswith("weight")) + 0.5 * torch.randn_like(p))
      elif any(s in name for s in ("embedding", "shared", "embed_tokens",
                                   "relative_attention_bias")):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
        if name.endswith("SelfAttention.q.weight"):
          p.mul_(TINY_T5["d_kv"] ** -0.5)
  return model


def _clip_ids(flavour: dict, seed: int) -> np.ndarray:
  """(3, 77) as SD3's tokenizers give them: BOS, prompt, EOS, padding; a short prompt, a
  longer one and one cut at 77 tokens (EOS last). Prompt ids anywhere but the special ids."""
  rng = np.random.default_rng(seed)
  special = {flavour["bos"], flavour["eos"], flavour["pad"]}
  words = np.array([i for i in range(1, TINY_CLIP["vocab_size"]) if i not in special])
  ids = np.full((3, LENGTH), flavour["pad"])
  for row, n in enumerate((6, 30, LENGTH - 2)):
    ids[row, 0] = flavour["bos"]
    ids[row, 1:n + 1] = rng.choice(words, n)
    ids[row, n + 1] = flavour["eos"]
  return ids


@functools.cache
def _clip_case(name: str):
  """(flavour, our config, params, ids, HF's output) of a random tiny CLIP."""
  flavour = CLIP_FLAVOURS[name]
  seed = list(CLIP_FLAVOURS).index(name)
  hf_config = transformers.CLIPTextConfig(
      **TINY_CLIP, hidden_act=flavour["hidden_act"], eos_token_id=flavour["eos_token_id"],
      bos_token_id=flavour["bos"], pad_token_id=flavour["pad"], attn_implementation="eager")
  model = _randomised(transformers.CLIPTextModelWithProjection(hf_config).eval(), seed)
  ids = _clip_ids(flavour, seed)
  with torch.no_grad():
    reference = model(torch.from_numpy(ids), output_hidden_states=True)
  config = clip_text.CLIPTextConfig.from_hf_json(hf_config.to_dict())
  params = convert.convert_clip_text(model.state_dict(), config)
  return name, config, params, ids, reference


@pytest.fixture(params=list(CLIP_FLAVOURS))
def clip_case(request):
  return _clip_case(request.param)


def _clip(config, params, ids) -> clip_text.CLIPTextOutput:
  """Unjitted: a fresh trace each call, so that a monkeypatched helper is seen."""
  return clip_text.CLIPTextModelWithProjection(config).apply({"params": params},
                                                              jnp.asarray(ids))


def _max_error(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


def test_clip_matches_transformers(clip_case):
  name, config, params, ids, reference = clip_case
  assert config.hidden_act == CLIP_FLAVOURS[name]["hidden_act"]
  out = _clip(config, params, ids)
  assert len(out.hidden_states) == config.num_layers + 1
  for got, want in zip(out.hidden_states, reference.hidden_states):
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(out.last_hidden_state, reference.last_hidden_state.numpy(),
                             rtol=0, atol=ATOL)
  np.testing.assert_allclose(out.text_embeds, reference.text_embeds.numpy(), rtol=0, atol=ATOL)
  # What SD3 takes: the penultimate layer's output (and with clip_skip 1 the one before).
  np.testing.assert_allclose(clip_text.sd3_token_embeddings(out),
                             reference.hidden_states[-2].numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(clip_text.sd3_token_embeddings(out, clip_skip=1),
                             reference.hidden_states[-3].numpy(), rtol=0, atol=ATOL)
  assert np.abs(reference.text_embeds.numpy()).max() > 1  # a real signal


def _last_eos(ids, eos_token_id):
  """The last position of the largest id (CLIP-L's padding repeats its EOS)."""
  return ids.shape[1] - 1 - jnp.argmax(ids[:, ::-1] == ids.max(1, keepdims=True), axis=1)


@pytest.mark.parametrize("bug", ["no_causal_mask", "pooled_elsewhere", "other_gelu"])
def test_the_clip_comparison_sees_each_bug(clip_case, bug, monkeypatch):
  """Each bug moves SD3's token embeddings or pooled embedding by >= 100x the tolerance.
  The pooled row elsewhere: CLIP-L's last EOS (the padding's) instead of the first; bigG's
  argmax of the ids (the legacy rule) instead of the first ``eos_token_id``."""
  name, config, params, ids, reference = clip_case
  if bug == "no_causal_mask":
    monkeypatch.setattr(clip_text, "causal_mask", lambda t: jnp.ones((t, t), bool))
    got = clip_text.sd3_token_embeddings(_clip(config, params, ids))
    assert _max_error(got, reference.hidden_states[-2]) >= BUG
    return
  if bug == "pooled_elsewhere":
    monkeypatch.setattr(clip_text, "pooled_index", _last_eos if name == "clip_l" else (
        lambda i, eos: jnp.argmax(i, axis=1)))
  else:
    other = {"quick_gelu": "gelu", "gelu": "quick_gelu"}[config.hidden_act]
    config = dataclasses.replace(config, hidden_act=other)
  assert _max_error(_clip(config, params, ids).text_embeds, reference.text_embeds) >= BUG


def _t5_ids(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """ids (2, 48) as SD3's T5 tokenizer pads them (EOS 1, then pad 0), and their mask."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, TINY_T5["vocab_size"], (2, T5_LENGTH))
  ids[0, 20], ids[0, 21:] = 1, 0
  ids[1, -1] = 1
  return ids, (ids != 0).astype(np.int64)


@pytest.fixture(scope="module")
def t5_case():
  """(config, params, ids, mask, HF's output without mask, with mask)."""
  hf_config = transformers.T5Config(**TINY_T5, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                    attn_implementation="eager")
  model = _randomised(transformers.T5EncoderModel(hf_config).eval(), 2)
  ids, mask = _t5_ids()
  with torch.no_grad():
    plain, masked = (model(torch.from_numpy(ids), attention_mask=m).last_hidden_state.numpy()
                     for m in (None, torch.from_numpy(mask)))
  config = t5_encoder.T5Config.from_hf_json(hf_config.to_dict())
  assert config == t5_encoder.T5Config(**TINY_T5)
  return config, convert.convert_t5_encoder(model.state_dict(), config), ids, mask, plain, masked


def _t5(config, params, ids, mask=None) -> np.ndarray:
  return np.asarray(t5_encoder.T5EncoderModel(config).apply(
      {"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def test_t5_matches_transformers_with_and_without_a_mask(t5_case):
  config, params, ids, mask, plain, masked = t5_case
  np.testing.assert_allclose(_t5(config, params, ids), plain, rtol=0, atol=ATOL)
  np.testing.assert_allclose(_t5(config, params, ids, mask), masked, rtol=0, atol=ATOL)
  assert np.abs(plain).max() > 1
  assert _max_error(plain[0], masked[0]) >= BUG  # the padded row: the mask matters
  np.testing.assert_allclose(plain[1], masked[1], rtol=0, atol=ATOL)  # no padding


class _CentredNorm(nn.Module):
  """A LayerNorm (mean subtracted) where T5 has its RMS norm."""

  epsilon: float = 1e-6
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x = x - x.mean(-1, keepdims=True)
    return scale * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.epsilon)


@pytest.mark.parametrize("bug", ["scaled_attention", "mirrored_buckets", "centred_norm",
                                 "erf_gelu", "no_position_bias", "uniform_attention"])
def test_the_t5_comparison_sees_each_bug(t5_case, bug, monkeypatch):
  """Each bug moves T5's output by >= 100x the tolerance; among them the relative position
  bias left out (attention without positions) and uniform attention (every logit 0: the
  mean of the values)."""
  config, params, ids, _, plain, _ = t5_case
  if bug in ("no_position_bias", "uniform_attention"):
    attend = t5_encoder.attend
    keep_q = bug == "no_position_bias"
    monkeypatch.setattr(t5_encoder, "attend", lambda q, k, v, bias, impl: attend(
        q if keep_q else 0 * q, k, v, 0 * bias, impl))
  elif bug == "scaled_attention":
    attend = t5_encoder.attend
    monkeypatch.setattr(t5_encoder, "attend", lambda q, k, v, bias, impl: attend(
        q * config.d_kv**-0.5, k, v, bias, impl))
  elif bug == "mirrored_buckets":  # i - j instead of j - i
    buckets = t5_encoder.position_buckets
    monkeypatch.setattr(t5_encoder, "position_buckets", lambda t, c: buckets(t, c).T)
  elif bug == "centred_norm":
    monkeypatch.setattr(t5_encoder, "T5LayerNorm", _CentredNorm)
  else:
    gelu = jax.nn.gelu
    monkeypatch.setattr(jax.nn, "gelu", lambda x, approximate=True: gelu(x, approximate=False))
  assert _max_error(_t5(config, params, ids), plain) >= BUG


def test_bfloat16_compute_with_remat_stays_close(t5_case):
  """dtype bfloat16 (float32 parameters), each layer rematerialised, jitted: bfloat16
  outputs within a few bfloat16 steps (2^-8 relative) of the float32 reference: measured
  0.023 on CLIP's text_embeds (|x| <= 4.1), 0.093 on T5's output (|x| <= 7.2)."""
  _, config, params, ids, reference = _clip_case("bigg")
  model = clip_text.CLIPTextModelWithProjection(config, dtype=jnp.bfloat16, remat=True)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
  assert out.text_embeds.dtype == out.hidden_states[-2].dtype == jnp.bfloat16
  assert _max_error(out.text_embeds, reference.text_embeds) < 0.1
  config, params, ids, mask, _, masked = t5_case
  model = t5_encoder.T5EncoderModel(config, dtype=jnp.bfloat16, remat=True)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16
  assert _max_error(out, masked) < 0.25


@pytest.mark.parametrize("max_distance", [128, 24])
def test_buckets_match_transformers_over_512_tokens(max_distance):
  """Every j - i of SD3's longest T5 prompt (512 tokens), XXL's settings and the tiny one."""
  relative = np.arange(-600, 601)
  want = T5Attention._relative_position_bucket(torch.from_numpy(relative), True, 32,
                                               max_distance).numpy()
  np.testing.assert_array_equal(t5_encoder.relative_position_bucket(relative, 32, max_distance),
                                want)


@pytest.mark.parametrize("name", ["clip_l14", "open_clip_bigg14", "t5_v1_1_xxl"])
def test_released_configs_have_transformers_keys_and_shapes(name):
  """HF's model built on the meta device (no memory) from each preset: the same keys (the
  Flax paths turned back into keys), the same shapes (kernels transposed)."""
  if name == "t5_v1_1_xxl":
    config = t5_encoder.T5Config.t5_v1_1_xxl()
    hf_config = transformers.T5Config(**dataclasses.asdict(config),
                                      feed_forward_proj="gated-gelu")
    build, abstract = transformers.T5EncoderModel, t5_encoder.abstract_params(config)
    indexed, skipped = convert._T5_INDEXED, {convert.T5_TIED}
  else:
    config = getattr(clip_text.CLIPTextConfig, name)()
    fields = {hf: getattr(config, ours) for hf, ours in clip_text.HF_FIELDS.items()}
    hf_config = transformers.CLIPTextConfig(**fields)
    assert clip_text.CLIPTextConfig.from_hf_json(hf_config.to_dict()) == config
    build, abstract = transformers.CLIPTextModelWithProjection, clip_text.abstract_params(config)
    indexed, skipped = convert._CLIP_INDEXED, set()
  with torch.device("meta"):
    reference = build(hf_config)
  want = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k not in skipped}
  got = {}
  for path, value in flax.traverse_util.flatten_dict(abstract).items():
    shape = tuple(value.shape)
    got[convert.hf_key(path, indexed)] = shape[::-1] if path[-1] == "kernel" else shape
  assert got == want


def test_the_converters_name_a_missing_or_unknown_key():
  hf_config = transformers.CLIPTextConfig(**TINY_CLIP)
  state_dict = dict(transformers.CLIPTextModelWithProjection(hf_config).state_dict())
  config = clip_text.CLIPTextConfig.from_hf_json(hf_config.to_dict())
  state_dict[convert.POSITION_IDS] = torch.arange(LENGTH)[None]  # older files: accepted
  convert.convert_clip_text(state_dict, config)
  for key in ("text_model.encoder.layers.1.mlp.fc2.bias", "text_projection.weight"):
    lacking = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(errors.InvalidInput, match=f"lacks 1 weight.*{re.escape(repr(key))}"):
      convert.convert_clip_text(lacking, config)
  with pytest.raises(errors.InvalidInput, match="'logit_scale'"):
    convert.convert_clip_text({**state_dict, "logit_scale": torch.zeros(())}, config)
  with pytest.raises(errors.InvalidInput, match=re.escape("'text_projection.weight' has shape")):
    convert.convert_clip_text(state_dict, dataclasses.replace(config, projection_dim=8))

  hf_config = transformers.T5Config(**TINY_T5, feed_forward_proj="gated-gelu")
  state_dict = dict(transformers.T5EncoderModel(hf_config).state_dict())
  config = t5_encoder.T5Config(**TINY_T5)
  shared = state_dict.pop(convert.T5_EMBEDDING)
  tied = convert.convert_t5_encoder(state_dict, config)  # the tied key alone gives it
  np.testing.assert_array_equal(tied["shared"]["embedding"], shared.numpy())
  with pytest.raises(errors.InvalidInput, match=re.escape("lacks 'shared.weight'")):
    convert.convert_t5_encoder({k: v for k, v in state_dict.items()
                                if k != convert.T5_TIED}, config)
  state_dict[convert.T5_EMBEDDING] = shared
  key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  with pytest.raises(errors.InvalidInput, match=re.escape(repr(key))):
    convert.convert_t5_encoder({k: v for k, v in state_dict.items() if k != key}, config)
  with pytest.raises(errors.InvalidInput, match=re.escape("'decoder.final_layer_norm.weight'")):
    convert.convert_t5_encoder({**state_dict, "decoder.final_layer_norm.weight": shared[0]},
                               config)
  with pytest.raises(errors.InvalidInput, match="differ"):
    convert.convert_t5_encoder({**state_dict, convert.T5_TIED: shared + 1}, config)


def test_configs_from_json_name_a_wrong_or_missing_field():
  fields = transformers.CLIPTextConfig(**TINY_CLIP).to_dict()
  with pytest.raises(errors.InvalidInput, match="num_hidden_layers"):
    clip_text.CLIPTextConfig.from_hf_json({k: v for k, v in fields.items()
                                           if k != "num_hidden_layers"})
  with pytest.raises(errors.InvalidInput, match="hidden_act"):
    clip_text.CLIPTextConfig.from_hf_json({**fields, "hidden_act": "relu"})
  with pytest.raises(errors.InvalidInput, match="'hidden_size' is '32'"):
    clip_text.CLIPTextConfig.from_hf_json({**fields, "hidden_size": "32"})
  # A whole CLIPConfig: its text_config.
  assert clip_text.CLIPTextConfig.from_hf_json({"text_config": fields}).hidden_size == 32
  fields = transformers.T5Config(**TINY_T5, feed_forward_proj="gated-gelu").to_dict()
  with pytest.raises(errors.InvalidInput, match="feed_forward_proj"):
    t5_encoder.T5Config.from_hf_json({**fields, "feed_forward_proj": "relu"})
  with pytest.raises(errors.InvalidInput, match="d_kv"):
    t5_encoder.T5Config.from_hf_json({k: v for k, v in fields.items() if k != "d_kv"})
