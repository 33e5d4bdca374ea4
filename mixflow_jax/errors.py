"""Errors that mean the user's input is wrong (a flag, a config field, a file).

The command line prints their message and exits with ``USER_ERROR_EXIT_CODE``, without a
traceback (``--verbosity=1`` shows it); any other exception is a bug and keeps its
traceback. Raise these wherever a message names what the user gave and how to fix it.
"""

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
  """A mistake in what the user gave; the message names the flag, field or file."""


class InvalidInput(UserError, ValueError):
  """A value or a file given by the user is not what it must be."""


class MissingInput(UserError, FileNotFoundError):
  """A file or folder the user named does not exist, or holds nothing usable."""


class OutputExists(UserError, FileExistsError):
  """An output the user named already holds what a job would write there."""


class ConfigError(InvalidInput):
  """An impossible config value; the message names the field (``configuration.validate``,
  and any layer that finds one, e.g. ``sharding``'s mesh and partition rules)."""
