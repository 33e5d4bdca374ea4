"""Prompts -> the token ids of SD3's three text encoders, as the diffusers SD3 pipeline makes
them (huggingface/diffusers ``src/diffusers/pipelines/stable_diffusion_3/
pipeline_stable_diffusion_3.py``: ``_get_clip_prompt_embeds``, ``_get_t5_prompt_embeds``).

A diffusers SD3 / SD3.5 download (or a converted text-encoder folder, ``text_encoder``)
holds three tokenizer folders, loaded with the classes the pipeline declares for them
(transformers' Python / Rust tokenizers; no PyTorch):

- ``tokenizer/`` (CLIP ViT-L/14) and ``tokenizer_2/`` (OpenCLIP bigG/14): ``CLIPTokenizer``
  (byte-level BPE, ``vocab.json`` + ``merges.txt``); both pad to ``max_length`` = the
  first tokenizer's ``model_max_length`` (77, the pipeline's ``tokenizer_max_length``)
  with truncation; BOS, the prompt, EOS, then each folder's own pad token (CLIP-L's
  ``<|endoftext|>``, bigG's ``!``);
- ``tokenizer_3/`` (T5 v1.1): ``T5TokenizerFast`` (SentencePiece unigram, its
  ``tokenizer.json``), padded to ``max_sequence_length`` (256 by default, at most 512)
  with truncation, special tokens added (the prompt, ``</s>``, ``<pad>``s). Optional: a
  folder without it has no T5 (the pipeline then encodes the T5 part as zeros).

Where a prompt is cut, the pipeline logs what was cut; so does this module (absl
``logging.warning``), with the pipeline's words. It names the tokens actually cut: the ids
from position ``max_length - 1`` to the last but one (the EOS) of the untruncated ids. (For
T5 the pipeline slices from CLIP's 77 - 1 instead of ``max_sequence_length`` - 1, so its
message shows the wrong part; the ids it encodes are the same.) Only rows that fill every
position are tokenized a second time, untruncated, to find out.

CLIPTokenizer cleans text with ``ftfy.fix_text`` where the ``ftfy`` package is installed
and with a BERT-style basic cleanup otherwise (transformers ``tokenization_clip.py``), so
the ids of unusual text (mojibake, odd Unicode) depend on that package: encode a data set
and sample in the same environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from mixflow_jax import errors, storage

TOKEN_FIELDS = ("clip_l_ids", "clip_g_ids", "t5_ids")
# {ids field: (tokenizer folder, what it tokenizes for)}.
TOKENIZER_FOLDERS = {
    "clip_l_ids": ("tokenizer", "CLIP ViT-L/14 (text_encoder)"),
    "clip_g_ids": ("tokenizer_2", "OpenCLIP bigG/14 (text_encoder_2)"),
    "t5_ids": ("tokenizer_3", "T5 v1.1 (text_encoder_3)"),
}
CLIP_LENGTH = 77  # CLIP's context: the pipeline's tokenizer_max_length
MAX_SEQUENCE_LENGTH = 512  # the pipeline refuses more T5 tokens
DEFAULT_SEQUENCE_LENGTH = 256  # the pipeline's default max_sequence_length
CLIP_FILES = ("vocab.json", "merges.txt")
T5_FILE = "tokenizer.json"
# Files a tokenizer folder may hold (copied from a URL; the rest is ignored).
_TOKENIZER_FILES = (*CLIP_FILES, T5_FILE, "spiece.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")


def check_sequence_length(max_sequence_length: int, what: str = "max_sequence_length") -> int:
  """``max_sequence_length`` (the T5 token count) if it is an int in 1..512, else
  InvalidInput naming ``what`` (the pipeline's own limit is 512)."""
  if (isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int)
      or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH):
    raise errors.InvalidInput(f"{what}={max_sequence_length!r}: SD3's T5 prompt takes 1 to "
                              f"{MAX_SEQUENCE_LENGTH} tokens (the pipeline's limit; 256 by "
                              "default).")
  return max_sequence_length


def _load(directory: str, field: str, shown: str) -> Any:
  """The tokenizer of ``field`` from the local ``directory`` (``shown`` in messages: the
  folder the user named), with the class the SD3 pipeline declares for it; MissingInput
  naming the folder or its missing file, InvalidInput naming the folder when transformers
  cannot read it."""
  from transformers import CLIPTokenizer, T5TokenizerFast  # tokenizer classes; no torch

  what = TOKENIZER_FOLDERS[field][1]
  if not os.path.isdir(directory):
    raise errors.MissingInput(f"No tokenizer folder {shown!r} (the tokenizer of {what}).")
  is_t5 = field == "t5_ids"
  needed = (T5_FILE,) if is_t5 else CLIP_FILES
  missing = [name for name in needed if not os.path.isfile(os.path.join(directory, name))]
  if missing:
    raise errors.MissingInput(
        f"{shown!r} lacks {missing} (the {'T5TokenizerFast' if is_t5 else 'CLIPTokenizer'} "
        f"of {what}); it holds {sorted(os.listdir(directory))[:8]}.")
  cls = T5TokenizerFast if is_t5 else CLIPTokenizer
  try:
    return cls.from_pretrained(directory, local_files_only=True)
  except Exception as e:  # transformers / tokenizers raise many types for a bad file
    raise errors.InvalidInput(f"{shown!r} cannot be read as a {cls.__name__} (the tokenizer "
                              f"of {what}): {type(e).__name__}: {e}") from e


def _local_copy(folder: str) -> str:
  """``folder`` itself when local, else a local temporary copy of its tokenizer folders
  (transformers reads local files only)."""
  if not storage.is_url(folder):
    return folder
  local = tempfile.mkdtemp(prefix="sd3_tokenizers_")
  for sub, _ in TOKENIZER_FOLDERS.values():
    source = storage.path(folder, "the tokenizers' folder") / sub
    if not source.is_dir():
      continue
    os.makedirs(os.path.join(local, sub))
    for name in _TOKENIZER_FILES:
      if (source / name).is_file():
        with open(os.path.join(local, sub, name), "wb") as f:
          f.write((source / name).read_bytes())
  return local


class SD3Tokenizers:
  """The three tokenizers of an SD3 folder: prompts -> {field: int32 ids} (``__call__``).

  Attributes: ``folder`` (as given), ``tokenizers`` {ids field: transformers tokenizer}
  (``t5_ids`` absent without ``tokenizer_3/``), ``clip_length`` (77),
  ``max_sequence_length`` (the T5 ids' length).
  """

  def __init__(self, folder: str, tokenizers: Mapping[str, Any], max_sequence_length: int):
    self.folder = folder
    self.tokenizers = dict(tokenizers)
    self.max_sequence_length = check_sequence_length(max_sequence_length)
    clip_length = self.tokenizers["clip_l_ids"].model_max_length
    if clip_length != CLIP_LENGTH:
      raise errors.InvalidInput(
          f"{os.path.join(folder, 'tokenizer', 'tokenizer_config.json')!r}: model_max_length "
          f"is {clip_length}; SD3's CLIP encoders take {CLIP_LENGTH} tokens (the pipeline pads "
          "both CLIP prompts to it).")
    self.clip_length = CLIP_LENGTH

  @classmethod
  def from_folder(cls, folder: str, max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH
                  ) -> SD3Tokenizers:
    """The tokenizers of ``folder`` (a diffusers SD3 / SD3.5 download or a converted
    text-encoder folder: ``tokenizer/``, ``tokenizer_2/`` and, optionally,
    ``tokenizer_3/``; local or a URL). InvalidInput for ``max_sequence_length`` outside
    1..512; MissingInput naming a missing folder or file; InvalidInput naming a folder
    transformers cannot read."""
    check_sequence_length(max_sequence_length)
    if not storage.path(folder, "the tokenizers' folder").is_dir():
      raise errors.MissingInput(f"No folder {folder!r} (SD3's tokenizer/, tokenizer_2/, "
                                "tokenizer_3/).")
    local = _local_copy(folder)
    try:
      tokenizers = {}
      for field, (sub, _) in TOKENIZER_FOLDERS.items():
        directory = os.path.join(local, sub)
        if field == "t5_ids" and not os.path.exists(directory):
          continue  # no T5
        tokenizers[field] = _load(directory, field, os.path.join(folder, sub))
    finally:
      if local != folder:
        shutil.rmtree(local, ignore_errors=True)
    return cls(folder, tokenizers, max_sequence_length)

  @property
  def fields(self) -> tuple[str, ...]:
    """The ids fields ``__call__`` returns, in ``TOKEN_FIELDS``' order."""
    return tuple(field for field in TOKEN_FIELDS if field in self.tokenizers)

  @property
  def has_t5(self) -> bool:
    return "t5_ids" in self.tokenizers

  def length(self, field: str) -> int:
    """The ids' length of ``field``: 77 for CLIP, ``max_sequence_length`` for T5."""
    return self.max_sequence_length if field == "t5_ids" else self.clip_length

  def vocab_sizes(self) -> dict[str, int]:
    """{ids field: the number of ids its tokenizer can give (``len(tokenizer)``)}."""
    return {field: len(tokenizer) for field, tokenizer in self.tokenizers.items()}

  def check_vocab(self, vocab_sizes: Mapping[str, int], sources: Mapping[str, str]) -> None:
    """InvalidInput naming the tokenizer folder and ``sources[field]`` (its encoder's
    config) where a tokenizer gives ids beyond its encoder's ``vocab_sizes[field]``
    (embedding rows). Fewer ids than rows is fine: T5's embedding has 32128 rows for the
    tokenizer's 32100 ids."""
    for field, size in self.vocab_sizes().items():
      if field in vocab_sizes and size > vocab_sizes[field]:
        sub, what = TOKENIZER_FOLDERS[field]
        raise errors.InvalidInput(
            f"{os.path.join(self.folder, sub)!r} (the tokenizer of {what}) gives {size} ids; "
            f"{sources[field]!r} has vocab_size {vocab_sizes[field]}: the tokenizer is not "
            "this encoder's.")

  def _tokenize(self, field: str, prompts: list[str]) -> np.ndarray:
    """(N, length) int32 ids of one tokenizer, as the pipeline calls it; logs the part of
    each cut prompt that was cut."""
    tokenizer, length = self.tokenizers[field], self.length(field)
    if not prompts:
      return np.zeros((0, length), np.int32)
    encoded = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                        add_special_tokens=True, return_tensors="np")
    ids = np.asarray(encoded["input_ids"], np.int32)
    full = np.flatnonzero(np.asarray(encoded["attention_mask"]).sum(axis=1) == length)
    if len(full):  # a row that fills every position may have been cut
      untruncated = tokenizer([prompts[i] for i in full], add_special_tokens=True)["input_ids"]
      removed = [tokenizer.decode(row[length - 1:-1]) for row in untruncated
                 if len(row) > length]
      if removed:
        sub, _ = TOKENIZER_FOLDERS[field]
        reason = (f"`max_sequence_length` is set to {length} tokens" if field == "t5_ids"
                  else f"CLIP can only handle sequences up to {length} tokens")
        logging.warning("%s: the following part of your input was truncated because %s: %s",
                        sub, reason, removed)
    return ids

  def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """{``clip_l_ids``: (N, 77), ``clip_g_ids``: (N, 77), ``t5_ids``: (N,
    max_sequence_length)} int32 for N prompts (one string is one prompt; ``t5_ids``
    absent without ``tokenizer_3/``). The same prompt goes to all three tokenizers, as the
    pipeline's ``encode_prompt`` with ``prompt_2`` and ``prompt_3`` unset."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
      raise errors.InvalidInput(f"Prompts must be strings; got {type(bad[0]).__name__} "
                                f"{bad[0]!r}.")
    return {field: self._tokenize(field, prompts) for field in self.fields}
