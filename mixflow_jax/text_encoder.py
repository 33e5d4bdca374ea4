"""SD3's frozen text encoders as a function of token ids, run inside the train step
(``config.data.text_encoder``) or over a captioned data set once.

The folder is the one ``mixflow convert --diffusers=DIR --out=OUT`` writes beside the run
(``OUT/text_encoder``; ``convert.text_encoders.write_sd3_text_encoder``):

- ``text_encoder.json`` (``TEXT_ENCODER_JSON``): ``config``, the ``SD3TextConfig`` fields
  (CLIP-L's, bigG's and T5's architectures or null, ``max_sequence_length``,
  ``joint_attention_dim``, ``clip_skip``), and notes (``source``, the released
  ``config.json`` of each encoder);
- ``checkpoints/0``: the fields ``clip_l``, ``clip_g`` and (with T5) ``t5``, each the
  float32 parameter tree of its encoder (``models.clip_text``, ``models.t5_encoder``);
- ``tokenizer/``, ``tokenizer_2/`` and (with T5) ``tokenizer_3/``, copied from the download
  (``prompt_tokens.SD3Tokenizers``).

As RAE's encoder (``latent_encoder``), the parameters are an argument of the jitted step,
never compile-time constants (T5-XXL has 4.7B), sharded by the step's partition rules, and
they get no gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixflow_jax import checkpoints, errors, prompt_tokens, storage
from mixflow_jax.models import sd3_text

TEXT_ENCODER_JSON = "text_encoder.json"


def write_record(directory: str, config: sd3_text.SD3TextConfig, **notes: Any) -> None:
  """Writes ``directory/text_encoder.json``: ``config``'s fields and ``notes``."""
  storage.write_json(checkpoints.run_root(directory) / TEXT_ENCODER_JSON,
                     {"config": dataclasses.asdict(config), **notes})


def read_config(directory: str, field: str = "config.data.text_encoder"
                ) -> sd3_text.SD3TextConfig:
  """The ``SD3TextConfig`` of a converted text-encoder folder. MissingInput naming ``field``
  for no such folder; InvalidInput naming it for a folder that is not one (a diffusers
  download or a run folder get a hint) or a record that cannot be read."""
  root = checkpoints.run_root(storage.path(directory, field))
  if not root.is_dir():
    raise errors.MissingInput(f"{field}={directory!r}: no such folder.")
  record = root / TEXT_ENCODER_JSON
  if not record.is_file():
    hint = ""
    if (root / "text_encoder" / TEXT_ENCODER_JSON).is_file():
      hint = f" It holds text_encoder/ with one: pass {str(root / 'text_encoder')!r}."
    elif (root / "text_encoder" / "config.json").is_file():
      hint = (" It looks like a diffusers download: convert it with `mixflow convert "
              "--diffusers=DIR --out=OUT` and pass OUT/text_encoder.")
    raise errors.InvalidInput(f"{field}={directory!r} is not a converted SD3 text-encoder "
                              f"folder (no {TEXT_ENCODER_JSON}).{hint}")
  try:
    return sd3_text.SD3TextConfig.from_dict(storage.read_json(record)["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise errors.InvalidInput(f"{record} is not an SD3 text-encoder record "
                              f"({type(e).__name__}: {e}).") from e


@dataclasses.dataclass(frozen=True)
class SD3TextEncoder:
  """The text encoders of the converted folder ``directory``: token ids (``tokenizers()``'
  output) -> SD3's condition {'context': (B, 77 + L, joint_attention_dim), 'pooled': (B,
  P)} float32 (``models.sd3_text.encode``).

  ``dtype``: the compute dtype (parameters stay float32); ``remat``: rematerialise each
  layer (only matters if something differentiates through it, which the stop_gradient
  prevents: keep it False)."""

  directory: str
  config: sd3_text.SD3TextConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @classmethod
  def from_folder(cls, directory: str, field: str = "config.data.text_encoder",
                  max_sequence_length: int | None = None, dtype: Any = jnp.float32
                  ) -> SD3TextEncoder:
    """The encoder of a converted folder (its ``text_encoder.json`` only: nothing is loaded
    yet); ``max_sequence_length`` replaces the recorded T5 length (1..512). Errors: see
    ``read_config``."""
    config = read_config(directory, field)
    if max_sequence_length is not None:
      prompt_tokens.check_sequence_length(max_sequence_length, f"{field} max_sequence_length")
      config = dataclasses.replace(config, max_sequence_length=max_sequence_length)
    return cls(directory, config, dtype)

  @property
  def tokens(self) -> int:
    """The context's token count (77 + max_sequence_length)."""
    return self.config.tokens

  @property
  def width(self) -> int:
    """The context's width (joint_attention_dim)."""
    return self.config.joint_attention_dim

  @property
  def pooled_width(self) -> int:
    return self.config.pooled_width

  def abstract_params(self) -> dict:
    """{'clip_l', 'clip_g'[, 't5']} as ShapeDtypeStructs (for sharding rules and plans)."""
    return sd3_text.abstract_params(self.config)

  def load_params(self, abstract: Mapping[str, Any]) -> dict:
    """The folder's parameters, placed as ``abstract``'s shardings say (one restore per
    encoder, each straight onto its devices)."""
    return {name: checkpoints.load_params(self.directory, tree, field=name)[0]
            for name, tree in abstract.items()}

  def tokenizers(self) -> prompt_tokens.SD3Tokenizers:
    """The folder's tokenizers, padding T5's ids to this encoder's ``max_sequence_length``;
    InvalidInput naming a tokenizer whose ids exceed its encoder's vocabulary,
    MissingInput for a folder with T5 but no ``tokenizer_3/``."""
    root = checkpoints.run_root(self.directory)
    tokenizers = prompt_tokens.SD3Tokenizers.from_folder(str(root),
                                                        self.config.max_sequence_length)
    if self.config.t5 is not None and not tokenizers.has_t5:
      raise errors.MissingInput(f"{self.directory!r} has T5's weights but no tokenizer_3/.")
    sizes = self.vocab_sizes()
    where = str(root / TEXT_ENCODER_JSON)
    tokenizers.check_vocab(sizes, dict.fromkeys(sizes, where))
    return tokenizers

  def vocab_sizes(self) -> dict[str, int]:
    """{ids field: the vocabulary size of the encoder that reads it}."""
    sizes = {"clip_l_ids": self.config.clip_l.vocab_size,
             "clip_g_ids": self.config.clip_g.vocab_size}
    if self.config.t5 is not None:
      sizes["t5_ids"] = self.config.t5.vocab_size
    return sizes

  def check_ids(self, tokens: Mapping[str, Any], source: str) -> None:
    """InvalidInput naming ``source`` and the field when ids fall outside an encoder's
    vocabulary (an embedding lookup would clamp them silently): captions tokenized with
    other tokenizers than this folder's."""
    for field, size in self.vocab_sizes().items():
      if field not in tokens:  # a missing field is the condition check's to name
        continue
      ids = np.asarray(tokens[field])
      if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise errors.InvalidInput(
            f"{source}: {field} holds ids up to {int(ids.max())} (from {int(ids.min())}), "
            f"outside the {size} of {self.directory or 'the text encoder'}'s vocabulary: "
            "were the captions tokenized with its tokenizers (`mixflow encode --tokenizers=`"
            "the converted folder)?")

  def __call__(self, params: Mapping[str, Any], tokens: Mapping[str, jax.Array]
               ) -> dict[str, jax.Array]:
    """The condition of ``tokens`` (``config.token_fields``), with no gradient to
    ``params``."""
    return sd3_text.encode(self.config, jax.lax.stop_gradient(params), tokens,
                           dtype=self.dtype, remat=self.remat)
