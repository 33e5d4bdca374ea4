"""What ``mixflow --help`` and ``mixflow COMMAND --help`` print, built from the table of
commands (``main.COMMANDS``).

The overview lists the commands with their one-line summaries. A command's help shows its
usage, each flag it reads with absl's help text and default, and the config sections it
reads with their values in the config given (its --config.<field> overrides applied; the
fields of a nested section dotted, as --config.<section>.<field>=<value> names them).
"""

import textwrap
from collections.abc import Iterator, Mapping
from typing import Protocol

import ml_collections
from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpshort", "-?")
WIDTH = 100


class Described(Protocol):
  """What the help reads of a command (``main.Command``)."""

  @property
  def summary(self) -> str: ...  # one line for `mixflow --help`

  @property
  def usage(self) -> str: ...  # its arguments

  @property
  def flags(self) -> tuple[str, ...]: ...  # the flags it reads

  @property
  def sections(self) -> tuple[str, ...]: ...  # the config sections it reads


def wrap(text: str, indent: int = 0) -> list[str]:
  return textwrap.wrap(text, WIDTH, subsequent_indent=" " * indent)


def overview(commands: Mapping[str, Described]) -> str:
  """``mixflow --help``: the commands, a line each."""
  lines = ["mixflow: MixFlow post-training of flow-matching transformers, in JAX.", "",
           *wrap("Usage: mixflow COMMAND [--flag=value ...]; `mixflow COMMAND --help` lists "
                 "the command's flags and the config fields it reads."), "", "Commands:"]
  for name, command in commands.items():
    lines += textwrap.wrap(command.summary, WIDTH, initial_indent=f"  {name:<10}",
                           subsequent_indent=" " * 12)
  lines += ["", *wrap("Start with `mixflow demo --workdir=/tmp/demo`: it trains, samples, "
                      "evaluates and plots the embedded default in minutes on one CPU "
                      "(README.md).")]
  return "\n".join(lines)


def command_help(name: str, command: Described,
                 config: ml_collections.ConfigDict | None) -> str:
  """``mixflow NAME --help``: the command's usage, its flags, and the config fields it reads
  with their values in ``config`` (none where it is None: a config that does not load)."""
  lines = [*wrap(f"mixflow {name}: {command.summary}"), "",
           *wrap(f"Usage: mixflow {name} {command.usage}", 4), "", "Flags:"]
  for flag in command.flags:
    f = flags.FLAGS[flag]
    default = "" if f.default is None or flag == "config" else f" (default: {f.default})"
    lines.append(f"  --{flag}{default}")
    lines += textwrap.wrap(f.help, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
  if command.sections and config is not None:
    lines += ["", *wrap("Config fields it reads, as the config sets them (override any with "
                        "--config.<section>.<field>=<value>; documented in "
                        "mixflow_jax/configuration.py):")]
    for section in (s for s in command.sections if s in config):  # demo: digits.py only
      value = config[section]
      if isinstance(value, ml_collections.ConfigDict):
        lines += textwrap.wrap("  ".join(_fields(value)), WIDTH,
                               initial_indent=f"  {section}: ",
                               subsequent_indent=" " * (4 + len(section)))
      else:
        lines.append(f"  {section}={value!r}")
  lines += ["", *wrap("Every command also takes absl's flags (--helpfull); --verbosity=1 "
                      "shows the traceback of an error.")]
  return "\n".join(lines)


def _fields(section: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """'field=value' for each field of ``section``; a nested section's as 'inner.field=...'."""
  for key, value in section.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}={value!r}"
