"""The package's import graph is layered: no cycles, and no module imports a higher layer.

Every module of ``mixflow_jax`` is parsed with ``ast`` (nothing is imported) and each of its
imports of the package, those inside functions included, is resolved to a module. A module
may import its own layer and the layers below it; the modules of an ``independent`` layer
(the jobs) may not import each other across top-level names (``convert/`` modules may
import each other, ``evaluate`` may not import ``generate``). A module also counts as
importing its package (whose ``__init__`` runs first). README.md's Layout section draws the
same table.
"""

from __future__ import annotations

import ast
import functools
import pathlib

PACKAGE = "mixflow_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# Bottom to top: (name, independent, patterns). A pattern is a module relative to the
# package ('' is the package itself) or 'pkg.*' for every module below pkg; the longest
# matching pattern decides a module's layer.
LAYERS = (
    ("base", False, (  # knows nothing of flows: errors, files, plots, small helpers
        "", "errors", "storage", "resume", "hardware", "report", "tree_paths",
        "convert", "convert.state_dicts", "convert.torch_checkpoint")),
    ("math", False, (  # pure functions of arrays: paths, time laws, objectives, samplers
        "interpolants", "timesteps", "time_shift", "time_conventions", "objectives",
        "sampling", "metrics", "pixels", "conditioning")),
    ("models", False, ("models", "models.*")),  # Flax networks
    ("io", False, (  # devices, checkpoints, data, converted networks
        "sharding", "checkpoints", "data", "data.*", "pretrained", "latent_encoder",
        "prompt_tokens", "text_encoder", "evaluation", "evaluation.*", "convert.inception")),
    ("config", False, ("configuration", "runs")),  # the config schema, the run record
    ("step", False, ("train_step",)),  # the train step and its factories, of a config
    ("jobs", True, (  # one command each, independent of each other
        "train", "generate", "evaluate", "encode", "slowflow", "convert.*")),
    ("workflows", False, (  # built from jobs
        "plan", "demo", "study", "study_report", "encode_captions")),
    ("cli", False, ("main", "__main__", "cli_help", "cli_errors")),
)


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
  """{dotted name: (file, is a package)} of every module of the package."""
  modules = {}
  for file in sorted(ROOT.rglob("*.py")):
    parts = (PACKAGE, *file.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    modules[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
  return modules


def _imports(name: str, file: pathlib.Path, is_package: bool, modules) -> dict[str, int]:
  """{imported module of the package: line} of every import in ``file``, at any depth."""
  def known(dotted: str) -> str:  # the module itself, else its closest package
    while dotted not in modules:
      dotted = dotted.rpartition(".")[0]
    return dotted

  package = name if is_package else name.rpartition(".")[0]
  found: dict[str, int] = {}
  for node in ast.walk(ast.parse(file.read_text(), str(file))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      # `from pkg import name`: the module pkg.name, else an attribute of pkg.
      targets = [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for target in targets:
      if target == PACKAGE or target.startswith(PACKAGE + "."):
        found.setdefault(known(target), node.lineno)
  found.pop(name, None)
  return found


def _layer_of(module: str, layers=LAYERS) -> tuple[int, str]:
  """(index, name) of the layer whose longest pattern matches ``module``."""
  relative = module.removeprefix(PACKAGE).removeprefix(".")
  best = None
  for index, (layer, _, patterns) in enumerate(layers):
    for pattern in patterns:
      exact = pattern == relative
      below = pattern.endswith(".*") and relative.startswith(pattern[:-1])
      if (exact or below) and (best is None or len(pattern) - below > best[0]):
        best = (len(pattern) - below, index, layer)
  assert best is not None, (f"{module} is in no layer: add it to LAYERS in "
                            f"tests/test_layers.py (and README.md's Layout)")
  return best[1], best[2]


@functools.lru_cache(maxsize=1)
def _parsed() -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
  modules = _modules()
  return tuple((name, tuple(_imports(name, file, is_package, modules).items()))
               for name, (file, is_package) in modules.items())


def _graph() -> dict[str, dict[str, int]]:
  """{module: {imported module: line}} of the whole package (a fresh copy)."""
  return {name: dict(imported) for name, imported in _parsed()}


def layer_violations(graph: dict[str, dict[str, int]], layers=LAYERS) -> list[str]:
  """A line per import that runs up a layer or across an independent layer."""
  problems = []
  for module, imported in sorted(graph.items()):
    index, layer = _layer_of(module, layers)
    edges = dict(imported)
    parent = module.rpartition(".")[0]
    if parent:  # importing a module runs its package's __init__ first
      edges.setdefault(parent, 0)
    for target, line in sorted(edges.items()):
      target_index, target_layer = _layer_of(target, layers)
      where = f"{module} (layer {layer!r}, line {line})" if line else (
          f"{module} (layer {layer!r}, inside the package)")
      if target_index > index:
        problems.append(f"{where} imports {target} of the higher layer {target_layer!r}")
      elif (target_index == index and layers[index][1]
            and _component(module) != _component(target)):
        problems.append(f"{where} imports {target}, another module of the independent "
                        f"layer {layer!r}")
  return problems


def _component(module: str) -> str:
  return module.removeprefix(PACKAGE + ".").partition(".")[0]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in graph.get(node, ()):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_the_import_graph_has_no_cycles():
  found = cycles(_graph())
  assert not found, "Import cycles between modules:\n" + "\n".join(
      " <-> ".join(component) for component in found)


def test_no_module_imports_a_higher_layer():
  problems = layer_violations(_graph())
  assert not problems, ("Imports against the layers of tests/test_layers.py (bottom to "
                        f"top: {', '.join(layer for layer, _, _ in LAYERS)}):\n"
                        + "\n".join(problems))


def test_the_check_sees_imports_up_across_jobs_and_inside_functions(tmp_path):
  graph = _graph()
  graph[f"{PACKAGE}.errors"][f"{PACKAGE}.train"] = 3               # base -> jobs
  graph[f"{PACKAGE}.evaluate"][f"{PACKAGE}.generate"] = 5          # across the jobs
  graph[f"{PACKAGE}.convert.rae"][f"{PACKAGE}.convert.sit"] = 7    # inside convert/: fine
  problems = layer_violations(graph)
  assert problems == [
      f"{PACKAGE}.errors (layer 'base', line 3) imports {PACKAGE}.train of the higher layer "
      "'jobs'",
      f"{PACKAGE}.evaluate (layer 'jobs', line 5) imports {PACKAGE}.generate, another "
      "module of the independent layer 'jobs'"]
  inner = tmp_path / "inner.py"
  inner.write_text("import os\n\n\ndef f():\n  from mixflow_jax.models import sit\n"
                   "  from mixflow_jax import errors, storage as s\n  return sit, s\n")
  assert _imports(f"{PACKAGE}.inner", inner, False, _modules()) == {
      f"{PACKAGE}.models.sit": 5, f"{PACKAGE}.errors": 6, f"{PACKAGE}.storage": 6}


def test_the_check_sees_a_cycle_and_a_module_below_its_package():
  a, b, c = (f"{PACKAGE}.{name}" for name in ("a", "b", "c"))
  assert cycles({a: {b: 1}, b: {c: 1}, c: {a: 1}, PACKAGE: {}}) == [[a, b, c]]
  assert cycles({a: {b: 1}, b: {}}) == []
  layers = (("low", False, ("", "a", "pkg.low")), ("high", False, ("pkg", "pkg.*")))
  assert layer_violations({f"{PACKAGE}.pkg.low": {a: 2}, a: {}}, layers) == [
      f"{PACKAGE}.pkg.low (layer 'low', inside the package) imports {PACKAGE}.pkg of the "
      "higher layer 'high'"]
