"""absl's flags set in this process for a command's function (``main._convert()`` ...),
without the subprocess a command line costs."""

import contextlib

from absl import flags
from absl.testing import flagsaver


@contextlib.contextmanager
def parsed(**values):
  """absl's flags parsed in this process with ``values`` set (restored after)."""
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  try:
    with flagsaver.flagsaver(**values):
      yield
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()
