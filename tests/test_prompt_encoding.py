"""Prompts -> SD3's condition as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (0.39,
the real pipeline, loaded from a tiny download by its own ``from_pretrained``) computes it:
the token ids of ``prompt_tokens.SD3Tokenizers`` equal the pipeline tokenizers' ids exactly,
and ``models.sd3_text.encode`` on the converted weights gives its ``prompt_embeds`` and
``pooled_prompt_embeds`` (and the negative ``""`` ones) to 1e-5 in fp32: several prompts, the
empty one, one cut at 77 CLIP / 40 T5 tokens (the cut part logged), with T5 and without
(zeros). The download is written here: CLIP's ``vocab.json`` / ``merges.txt`` (byte-level BPE
with a few merges) and a T5 ``tokenizer.json`` (a unigram model built with the ``tokenizers``
library), tiny random encoders, a tiny transformer. ``mixflow convert --diffusers`` of it
gives a text-encoder folder whose ``SD3TextEncoder`` computes the same condition; bad
downloads are refused naming the folder, file or field."""

import dataclasses
import functools
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
  FlowMatchEulerDiscreteScheduler,
  SD3Transformer2DModel,
  StableDiffusion3Pipeline,
)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from mixflow_jax import errors, prompt_tokens, text_encoder
from mixflow_jax.convert import diffusers_folder
from mixflow_jax.convert import text_encoders as convert
from mixflow_jax.models import clip_text, mmdit, sd3_text, t5_encoder
from tests import test_mmdit_parity as parity
from tests.test_text_encoders import TINY_T5, _randomised

ATOL = 1e-5
T5_LENGTH = 40  # max_sequence_length: a long prompt is cut by T5 as well
JOINT = TINY_T5["d_model"]  # 32: T5's width, the transformer's joint_attention_dim
# CLIP-L (quick_gelu, the legacy eos_token_id 2: argmax pooling) and bigG (gelu, first-EOS
# pooling), 8 + 16 wide: their concatenation is padded from 24 to 32.
CLIPS = {"text_encoder": dict(hidden_size=8, projection_dim=8, num_attention_heads=2,
                              hidden_act="quick_gelu", eos_token_id=2),
         "text_encoder_2": dict(hidden_size=16, projection_dim=16, num_attention_heads=2,
                                hidden_act="gelu", eos_token_id=None)}
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"),
          ("d", "o"), ("do", "g</w>"), ("o", "n</w>"), ("i", "n"), ("in", "g</w>"), ("r", "e"),
          ("e", "d</w>")]
T5_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁the", "▁a", "▁cat", "▁dog", "▁and", "s",
             "ing", "ed", "▁on", "▁in", ".", ","]
LONG = " ".join(["a red cat sitting on the mat and a dog running in the park."] * 8)
PROMPTS = ["a cat on a mat", "", "The DOG and the cat, running in rain!", LONG]


def write_tokenizers(folder: str) -> None:
  """``tokenizer/`` (CLIP-L: padded with its EOS), ``tokenizer_2/`` (bigG: padded with
  '!'), ``tokenizer_3/`` (T5: pad 0, EOS 1, unk 2, and T5TokenizerFast's 100 extra ids)."""
  scratch = os.path.join(folder, "scratch")
  os.makedirs(scratch)
  chars = list(bytes_to_unicode().values())
  vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in MERGES),
           "<|startoftext|>", "<|endoftext|>"]  # the EOS last: the largest id, as CLIP's
  with open(os.path.join(scratch, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(scratch, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
  for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
    transformers.CLIPTokenizer(os.path.join(scratch, "vocab.json"),
                               os.path.join(scratch, "merges.txt"), pad_token=pad,
                               model_max_length=77).save_pretrained(os.path.join(folder, sub))
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
  pieces += [(p, -1.0 - 0.1 * i) for i, p in enumerate(T5_PIECES)]
  t5 = Tokenizer(models.Unigram(pieces, unk_id=2))
  t5.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
  t5.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  t5.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  t5.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                    special_tokens=[("</s>", 1)])
  t5.save(os.path.join(scratch, "tokenizer.json"))
  transformers.T5TokenizerFast(tokenizer_file=os.path.join(scratch, "tokenizer.json"),
                               model_max_length=512).save_pretrained(
                                   os.path.join(folder, "tokenizer_3"))
  shutil.rmtree(scratch)


def write_download(folder: str) -> str:
  """A diffusers SD3 download written by the pipeline's own ``save_pretrained``: random tiny
  encoders (T5 in shards), the tokenizers above, a tiny transformer of joint_attention_dim
  32 and pooled_projection_dim 8 + 16, a scheduler, no VAE."""
  write_tokenizers(folder)
  tokenizers = {sub: transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, sub))
                for sub in ("tokenizer", "tokenizer_2")}
  encoders = {}
  for seed, (sub, flavour) in enumerate(CLIPS.items()):
    tokenizer = tokenizers["tokenizer" if sub == "text_encoder" else "tokenizer_2"]
    eos = flavour["eos_token_id"] or tokenizer.eos_token_id
    config = transformers.CLIPTextConfig(
        **{**flavour, "eos_token_id": eos}, vocab_size=len(tokenizer), intermediate_size=32,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    encoders[sub] = _randomised(transformers.CLIPTextModelWithProjection(config).eval(), seed)
  t5_config = transformers.T5Config(**{**TINY_T5, "num_layers": 2},
                                    feed_forward_proj="gated-gelu", dropout_rate=0.0)
  encoders["text_encoder_3"] = _randomised(transformers.T5EncoderModel(t5_config).eval(), 2)
  transformer = SD3Transformer2DModel(**{
      **parity.TINY, "joint_attention_dim": JOINT, "pooled_projection_dim": 24}, num_layers=1)
  pipe = StableDiffusion3Pipeline(
      transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
      tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"],
      tokenizer_3=transformers.T5TokenizerFast.from_pretrained(
          os.path.join(folder, "tokenizer_3")), **encoders)
  pipe.save_pretrained(folder)
  # T5 in shards with their index, as the released text_encoder_3/.
  shutil.rmtree(os.path.join(folder, "text_encoder_3"))
  encoders["text_encoder_3"].save_pretrained(os.path.join(folder, "text_encoder_3"),
                                             max_shard_size="20KB")
  assert os.path.isfile(os.path.join(folder, "text_encoder_3", convert.HF_INDEX))
  return folder


@pytest.fixture(scope="module", autouse=True)
def _abstract_params_once_per_config():
  """Each tiny model's abstract params traced once (a pure function of the frozen config),
  not once per conversion or load."""
  with pytest.MonkeyPatch.context() as patch:
    for module in (mmdit, clip_text, t5_encoder):
      patch.setattr(module, "abstract_params", functools.cache(module.abstract_params))
    yield


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> str:
  return write_download(str(tmp_path_factory.mktemp("sd3") / "download"))


@functools.cache
def _pipeline(folder: str, t5: bool = True) -> StableDiffusion3Pipeline:
  """The pipeline as a user loads it (fp32, on the CPU); without T5: no text_encoder_3 /
  tokenizer_3."""
  none = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
  return StableDiffusion3Pipeline.from_pretrained(folder, vae=None, **none)


def _reference(pipe, prompts: list[str]) -> dict[str, np.ndarray]:
  with torch.no_grad():
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
        max_sequence_length=T5_LENGTH)
  return {"context": embeds.numpy(), "pooled": pooled.numpy(),
          "null_context": negative.numpy(), "null_pooled": negative_pooled.numpy()}


def _params_of_pipeline(pipe) -> dict:
  """The converters run on the pipeline's own modules' state_dicts."""
  params = {}
  for name, module in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2),
                       ("t5", pipe.text_encoder_3)):
    if module is None:
      continue
    config = (t5_encoder.T5Config.from_hf_json(module.config.to_dict()) if name == "t5"
              else clip_text.CLIPTextConfig.from_hf_json(module.config.to_dict()))
    state_dict = module.state_dict()
    params[name] = (convert.convert_t5_encoder(state_dict, config) if name == "t5"
                    else convert.convert_clip_text(state_dict, config)), config
  return params


_encode = jax.jit(sd3_text.encode, static_argnums=0)


def _ours(encode, prompts: list[str], tokenizers) -> dict[str, np.ndarray]:
  """``encode(tokens)`` of the prompts and of as many empty (negative) prompts, in one
  batch."""
  n = len(prompts)
  out = {k: np.asarray(v) for k, v in encode(tokenizers(prompts + [""] * n)).items()}
  return {"context": out["context"][:n], "pooled": out["pooled"][:n],
          "null_context": out["context"][n:], "null_pooled": out["pooled"][n:]}


def _max_errors(got: dict, want: dict) -> dict[str, float]:
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].shape == want[key].shape, key
  return {k: float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want}


@pytest.mark.parametrize("t5", [True, False])
def test_ids_and_condition_equal_the_pipelines(download, t5, caplog):
  pipe = _pipeline(download, t5)
  tokenizers = prompt_tokens.SD3Tokenizers.from_folder(download, T5_LENGTH)
  if not t5:  # a folder without tokenizer_3/: no T5 ids
    folder = os.path.join(os.path.dirname(download), "no_t5_tokenizer")
    if not os.path.isdir(folder):
      os.makedirs(folder)
      for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(download, sub), os.path.join(folder, sub))
    tokenizers = prompt_tokens.SD3Tokenizers.from_folder(folder, T5_LENGTH)
  with caplog.at_level(logging.WARNING):
    tokens = tokenizers(PROMPTS)
  assert tuple(tokens) == (prompt_tokens.TOKEN_FIELDS if t5 else ("clip_l_ids", "clip_g_ids"))
  # The ids: exactly the pipeline tokenizers' (as _get_*_prompt_embeds call them).
  pipe_tokenizers = {"clip_l_ids": (pipe.tokenizer, 77), "clip_g_ids": (pipe.tokenizer_2, 77),
                     "t5_ids": (pipe.tokenizer_3, T5_LENGTH)}
  for field, ids in tokens.items():
    tokenizer, length = pipe_tokenizers[field]
    want = tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True,
                     add_special_tokens=True, return_tensors="np").input_ids
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), length)
    np.testing.assert_array_equal(ids, want, err_msg=field)
  # bigG pads with '!' (0), CLIP-L with its EOS; the long prompt is cut, EOS last.
  assert tokens["clip_g_ids"][0, -1] == 0 and tokens["clip_l_ids"][0, -1] == 526
  assert tokens["clip_l_ids"][3, -1] == 526 and tokens["clip_l_ids"][3, -2] != 526
  # The cut parts, logged as the pipeline words it.
  messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert len(messages) == (3 if t5 else 2)
  for field, message in zip(tokenizers.fields, messages):
    tokenizer, length = pipe_tokenizers[field]
    full = tokenizer(LONG).input_ids
    assert len(full) > length
    cut = tokenizer.decode(full[length - 1:-1])
    assert repr([cut]) in message and len(cut) > 20
    reason = ("`max_sequence_length` is set to 40 tokens" if field == "t5_ids"
              else "CLIP can only handle sequences up to 77 tokens")
    assert reason in message and prompt_tokens.TOKENIZER_FOLDERS[field][0] in message

  converted = _params_of_pipeline(pipe)
  config = sd3_text.SD3TextConfig(converted["clip_l"][1], converted["clip_g"][1],
                                  converted["t5"][1] if t5 else None, T5_LENGTH, JOINT)
  params = {name: p for name, (p, _) in converted.items()}
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape,
                                                          sd3_text.abstract_params(config))
  want = _reference(pipe, PROMPTS)
  got = _ours(functools.partial(_encode, config, params), PROMPTS, tokenizers)
  errors_ = _max_errors(got, want)
  assert max(errors_.values()) <= ATOL, errors_
  assert got["context"].shape == (len(PROMPTS), 77 + T5_LENGTH, JOINT)
  assert got["pooled"].shape == (len(PROMPTS), 24)
  assert np.abs(want["context"]).max() > 1 and np.abs(want["pooled"]).max() > 1
  np.testing.assert_array_equal(got["context"][:, :77, 24:], 0)  # CLIP padded to 32 wide
  t5_part = got["context"][:, 77:]
  assert (np.abs(t5_part).min(axis=(1, 2)) > 0).all() if t5 else not t5_part.any()
  # The empty prompt is the negative prompt.
  np.testing.assert_allclose(got["context"][1], got["null_context"][0], rtol=0, atol=ATOL)


def test_a_sequence_length_over_512_or_a_missing_tokenizer_is_named(download, tmp_path):
  with pytest.raises(errors.InvalidInput, match="max_sequence_length=513"):
    prompt_tokens.SD3Tokenizers.from_folder(download, 513)
  folder = tmp_path / "partial"
  shutil.copytree(os.path.join(download, "tokenizer"), folder / "tokenizer")
  with pytest.raises(errors.MissingInput, match=re.escape(str(folder / "tokenizer_2"))):
    prompt_tokens.SD3Tokenizers.from_folder(str(folder))
  shutil.copytree(os.path.join(download, "tokenizer"), folder / "tokenizer_2")
  os.remove(folder / "tokenizer_2" / "merges.txt")
  with pytest.raises(errors.MissingInput, match=r"tokenizer_2.*lacks \['merges.txt'\]"):
    prompt_tokens.SD3Tokenizers.from_folder(str(folder))
  shutil.copy(folder / "tokenizer" / "merges.txt", folder / "tokenizer_2" / "merges.txt")
  (folder / "tokenizer_3").mkdir()
  (folder / "tokenizer_3" / "tokenizer.json").write_text("{not json")
  with pytest.raises(errors.InvalidInput, match=r"tokenizer_3.*cannot be read as a "
                     r"T5TokenizerFast"):
    prompt_tokens.SD3Tokenizers.from_folder(str(folder))


def test_the_converted_folder_encodes_as_the_pipeline(download, tmp_path, caplog):
  """``convert_diffusers_folder`` -> ``OUT/text_encoder`` -> ``SD3TextEncoder``: the
  pipeline's condition; the run records the folder. Without text_encoder_3/: no T5."""
  out = str(tmp_path / "run")
  diffusers_folder.convert_diffusers_folder(download, out)
  encoder = text_encoder.SD3TextEncoder.from_folder(os.path.join(out, "text_encoder"),
                                                    max_sequence_length=T5_LENGTH)
  assert (encoder.tokens, encoder.width, encoder.pooled_width) == (77 + T5_LENGTH, JOINT, 24)
  with open(os.path.join(out, "model.json")) as f:
    assert json.load(f)["text_encoder"] == os.path.join(out, "text_encoder")
  params = encoder.load_params(encoder.abstract_params())
  tokenizers = encoder.tokenizers()
  want = _reference(_pipeline(download), PROMPTS)
  got = _ours(functools.partial(_encode, encoder.config, params), PROMPTS, tokenizers)
  errors_ = _max_errors(got, want)
  assert max(errors_.values()) <= ATOL, errors_

  no_t5 = tmp_path / "no_t5"
  shutil.copytree(download, no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
  text = convert.read_sd3_text_folder(str(no_t5), JOINT, 24)
  convert.write_sd3_text_encoder(text, str(tmp_path / "text"))
  encoder = text_encoder.SD3TextEncoder.from_folder(str(tmp_path / "text"))
  assert encoder.config.t5 is None and encoder.config.max_sequence_length == 256
  assert sorted(os.listdir(tmp_path / "text")) == ["checkpoints", "text_encoder.json",
                                                   "tokenizer", "tokenizer_2"]
  tokens = encoder.tokenizers()(["a cat"])
  assert sorted(tokens) == ["clip_g_ids", "clip_l_ids"]
  params = encoder.load_params(encoder.abstract_params())
  # The frozen encoders get no gradient.
  pooled_sum = lambda p: (lambda c: (c["pooled"].sum(), c))(encoder(p, tokens))
  (_, condition), grads = jax.jit(jax.value_and_grad(pooled_sum, has_aux=True))(params)
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(grads))
  assert condition["context"].shape == (1, 77 + 256, JOINT)
  assert np.asarray(condition["context"][:, :77]).any()
  assert not np.asarray(condition["context"][:, 77:]).any()

  no_text = tmp_path / "no_text"
  shutil.copytree(download, no_text, ignore=shutil.ignore_patterns("text_encoder*"))
  with caplog.at_level(logging.WARNING):
    assert convert.read_sd3_text_folder(str(no_text), JOINT) is None
  assert any("converting the transformer only" in r.getMessage() for r in caplog.records)
  with pytest.raises(errors.MissingInput, match="no text encoders to convert"):
    diffusers_folder.convert_diffusers_folder(str(no_text), str(tmp_path / "run_no_text"),
                                              text_encoder_out=str(tmp_path / "text2"))


def _edit_json(path, **changes) -> None:
  with open(path) as f:
    fields = json.load(f)
  with open(path, "w") as f:
    json.dump(fields | changes, f)


@pytest.mark.parametrize("bad", ["no_tokenizer_2", "vocab", "class", "model_index", "width",
                                 "no_tokenizer_3"])
def test_a_bad_download_is_refused_naming_the_file_or_field(download, tmp_path, bad):
  folder = tmp_path / "bad"
  shutil.copytree(download, folder, ignore=shutil.ignore_patterns("transformer"))
  os.symlink(os.path.join(download, "transformer"), folder / "transformer")
  if bad in ("no_tokenizer_2", "no_tokenizer_3"):
    sub = bad[3:]
    shutil.rmtree(folder / sub)
    error, match = errors.MissingInput, re.escape(str(folder / sub))
  elif bad == "vocab":  # the tokenizer gives ids 0..526
    _edit_json(folder / "text_encoder_2" / "config.json", vocab_size=500)
    error, match = errors.InvalidInput, (r"tokenizer_2.* gives 527 ids; .*text_encoder_2/"
                                         r"config.json' has vocab_size 500")
  elif bad == "class":
    _edit_json(folder / "text_encoder" / "config.json", architectures=["CLIPTextModel"])
    error, match = errors.InvalidInput, r"text_encoder/config.json': 'architectures'"
  elif bad == "model_index":
    _edit_json(folder / "model_index.json", text_encoder_3=["transformers", "UMT5EncoderModel"])
    error, match = errors.InvalidInput, r"model_index.json': 'text_encoder_3'"
  else:
    _edit_json(folder / "text_encoder_2" / "config.json", projection_dim=12)
    error, match = errors.InvalidInput, "pooled_projection_dim=24"
  with pytest.raises(error, match=match):
    diffusers_folder.convert_diffusers_folder(str(folder), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_folder_that_is_not_a_text_encoder_is_named(download, tmp_path):
  with pytest.raises(errors.InvalidInput, match="looks like a diffusers download"):
    text_encoder.SD3TextEncoder.from_folder(download, "config.data.text_encoder")
  with pytest.raises(errors.MissingInput, match=r"config\.data\.text_encoder="):
    text_encoder.SD3TextEncoder.from_folder(str(tmp_path / "none"))
  (tmp_path / "text_encoder.json").write_text(json.dumps({"config": {"clip_l": {}}}))
  with pytest.raises(errors.InvalidInput, match="not an SD3 text-encoder record"):
    text_encoder.SD3TextEncoder.from_folder(str(tmp_path))
  config = sd3_text.SD3TextConfig.sd3()
  assert sd3_text.SD3TextConfig.from_dict(dataclasses.asdict(config)) == config
  assert (config.tokens, config.pooled_width) == (333, 2048)
