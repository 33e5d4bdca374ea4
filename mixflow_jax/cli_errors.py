"""A user's mistake on the command line: printed without a traceback, exit 2.

``fail`` prints the message and points to the command's help; ``guard_flag_errors`` turns
absl's and ml_collections' errors while parsing the flags (an unknown flag or config field,
a bad value, an unreadable config file) into such a message. ``--verbosity=1`` (read from
argv, so that it holds when the flags themselves fail to parse) keeps the traceback.
"""

import difflib
import importlib.util
import sys
from collections.abc import Callable, Collection
from typing import Any, NoReturn

import ml_collections
from absl import flags

from mixflow_jax import errors


def verbose(argv: list[str]) -> bool:
  """Whether --verbosity (-v) >= 1 is asked for, read from ``argv`` so that it also holds
  when the flags themselves failed to parse."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("-v", "--v", "--verbosity", "-verbosity"):
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def fail(message: str, command: str | None) -> NoReturn:
  """Prints a user's mistake (no traceback) and exits with USER_ERROR_EXIT_CODE; ``command``
  is the command's name, None where the command line names none."""
  see = f"mixflow {command} --help" if command else "mixflow --help"
  print(f"mixflow{' ' + command if command else ''}: error: {message}\n"
        f"(`{see}` shows the flags; --verbosity=1 shows the traceback.)", file=sys.stderr)
  sys.exit(errors.USER_ERROR_EXIT_CODE)


def guard_flag_errors(argv: list[str], parse: Callable[[], Any], commands: Collection[str],
                      default_config: str) -> Any:
  """``parse()``, with a user's mistake in ``argv`` (an unknown flag or config field, a bad
  value, an unreadable config file) reported by ``fail``; ``commands`` are the names of the
  commands, ``default_config`` the config file --config defaults to."""
  command = next((a for a in argv[1:] if not a.startswith("-")), None)
  command = command if command in commands else None
  try:
    return parse()
  except Exception as e:
    if verbose(argv):
      raise
    if isinstance(e, flags.Error):  # a config file's error arrives with its traceback's text
      message = str(e)
      if "Traceback (most recent call last)" in message:
        message = f"{message.splitlines()[0]} {last_line(message)}"
      fail(message, command)
    if isinstance(e, (AttributeError, KeyError)):  # --config.<field> names no field
      fail(unknown_field(argv, e, default_config), command)
    raise


def unknown_field(argv: list[str], error: Exception, default_config: str) -> str:
  """The message for a --config.<field>=<value> that names no config field: which flag,
  which part of it, and the closest fields (ml_collections' own error is a KeyError's repr
  inside an AttributeError)."""
  try:
    config = load_config_file(argv, default_config)
  except Exception:  # the config file's own error is reported where it is read
    return str(error)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      if isinstance(node, ml_collections.ConfigDict) and key in node:
        node = node[key]
        continue
      where = "config" + "".join("." + k for k in path[:depth])
      fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(key, fields, n=3)
      hint = (f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else
              f" It has: {', '.join(fields)}." if fields else "")
      return f"{arg.split('=', 1)[0]}: {where} has no field {key!r}.{hint}"
  return str(error)


def load_config_file(argv: list[str], default_config: str) -> ml_collections.ConfigDict:
  """The config that --config in ``argv`` (else ``default_config``) names, without
  overrides."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default_config)
  file, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_mixflow_config", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def last_line(text: str) -> str:
  return [line.strip() for line in text.splitlines() if line.strip()][-1]
