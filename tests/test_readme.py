"""README.md starts with the two set-up commands, and .ci/run lints, then runs the test one."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> list[str]:
  with open(os.path.join(REPO, "README.md")) as f:
    return [line.strip() for line in f if line.startswith("    ")][:2]


def test_readme_starts_with_demo_and_test_commands():
  demo, tests = _readme_commands()
  assert "mixflow demo" in demo and "pip install" in demo
  assert "pytest" in tests and "pip install" in tests


def test_ci_runs_exactly_the_readme_test_command():
  _, tests = _readme_commands()
  with open(os.path.join(REPO, ".ci", "run")) as f:
    commands = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert commands[-1] == tests
  assert "ruff check mixflow_jax tests" in commands[-2]  # lint runs before the tests
