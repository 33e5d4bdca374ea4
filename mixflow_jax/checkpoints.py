"""orbax checkpoints of the train state: save, resume, warm start, and shape checks.

A run's checkpoints live in ``<workdir>/checkpoints/<step>``; each holds the whole
``TrainState`` (step, params, EMA params, optimizer state) as its item ``default`` and,
for training runs, the input pipeline's state (``data.pipeline.state_json``) as ``data``.
What defines the run's model (architecture, path, ...) and the parameter layout of its
blocks ('unrolled' as the official state_dict, or 'scanned' with the layer axis first) are
in its record, ``<workdir>/model.json`` (``runs``). Loading params (a warm start,
sampling) converts between the layouts; resuming a run keeps its layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mixflow_jax import errors, storage
from mixflow_jax.tree_paths import path_str

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "default"  # the name orbax gives a single item: checkpoints before DATA_ITEM
DATA_ITEM = "data"


def checkpoint_dir(run_dir: str) -> epath.Path:
  """``run_dir/checkpoints``; ``run_dir`` may also be that folder itself."""
  run_dir = storage.path(run_dir, "run folder")
  if run_dir.name == CHECKPOINT_DIR:
    return run_dir
  return run_dir / CHECKPOINT_DIR


def run_root(run_dir: str) -> epath.Path:
  """The run folder of ``run_dir`` (which may be its ``checkpoints`` folder)."""
  return checkpoint_dir(run_dir).parent


def write_config(run_dir: str, filename: str, config: Any, **extra: Any) -> None:
  """Writes ``run_dir/filename``: the fields of the dataclass ``config`` plus ``extra``."""
  storage.write_json(run_root(run_dir) / filename, dataclasses.asdict(config) | extra)


def read_config(run_dir: str, filename: str, cls: type, optional: tuple[str, ...] = ()
                ) -> Any | None:
  """The dataclass ``cls`` in ``run_dir/filename`` (None if there is no such file); every
  field must be there but those in ``optional`` (added later: their defaults apply). JSON
  lists become tuples (e.g. DiT^DH's (body, head) pairs): the configs are hashable."""
  path = run_root(run_dir) / filename
  if not path.is_file():
    return None
  stored = storage.read_json(path)
  fields = [f.name for f in dataclasses.fields(cls)]
  missing = [name for name in fields if name not in stored and name not in optional]
  if missing:
    raise errors.InvalidInput(f"{path} lacks the field(s) {missing} of {cls.__name__}.")
  return cls(**{name: tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
                for name in fields if name in stored})


def make_manager(run_dir: str, save_every: int = 1, keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager saving every ``save_every`` steps, keeping the ``keep`` latest."""
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                           max_to_keep=None, create=False)
  else:
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep)
  return ocp.CheckpointManager(
      checkpoint_dir(run_dir), options=options,
      item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                     DATA_ITEM: ocp.JsonCheckpointHandler()})


def save_state(manager: ocp.CheckpointManager, step: int, state: Any,
               data_state: dict | None = None) -> None:
  """Saves ``state`` (and the input pipeline's ``data_state``) as checkpoint ``step``
  (asynchronously)."""
  items = {STATE_ITEM: ocp.args.PyTreeSave(state)}
  if data_state is not None:
    items[DATA_ITEM] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
  """Turns what orbax raises for files it cannot read (tensorstore's ValueError) into a user
  error naming the checkpoint: a truncated or damaged copy."""
  try:
    yield
  except ValueError as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.InvalidInput(
        f"Checkpoint {manager.directory}/{step} cannot be read ({str(e).splitlines()[0]}): "
        "it is truncated or damaged; delete that step to use the one before it.") from e


def _tree_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
  with _reading(manager, step):
    metadata = manager.item_metadata(step).get(STATE_ITEM)
  if metadata is None:
    raise errors.InvalidInput(
        f"Checkpoint {manager.directory}/{step} has no readable train state ('{STATE_ITEM}' "
        "metadata missing): it is truncated or was not written by mixflow; delete that step "
        "to use the one before it.")
  return metadata.tree


def _restore_tree(manager: ocp.CheckpointManager, step: int, args: Any) -> Any:
  with _reading(manager, step):
    return manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]


def read_data_state(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The input pipeline's state saved with checkpoint ``step`` (None if it has none)."""
  if DATA_ITEM not in manager.item_metadata(step):
    return None
  return manager.restore(step, args=ocp.args.Composite(
      **{DATA_ITEM: ocp.args.JsonRestore()}))[DATA_ITEM]


def save_converted(out: str, tree: Any) -> None:
  """Saves ``tree`` (a converter's weights: host NumPy arrays) as checkpoint 0 of ``out``,
  written from the arrays' own buffers; OutputExists if ``out`` already holds a checkpoint.

  Orbax's defaults hold more: the NumPy handler deep-copies each host array before its
  asynchronous write and OCDBT buffers the data once more (measured on 400 MiB of float32
  arrays: +1.9x the parameters for one field, +3.2x for params + ema_params; for SD3.5
  Large ~97 GiB). Here the handler copies nothing and each array is a plain zarr array
  (``load_params`` reads both formats): +0.3x, the write's own buffers. The arrays must not
  change until this returns (it waits for the write)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
  with ocp.CheckpointManager(checkpoint_dir(out),
                             options=ocp.CheckpointManagerOptions(max_to_keep=1),
                             item_handlers={STATE_ITEM: handler}) as manager:
    if manager.latest_step() is not None:
      raise errors.OutputExists(f"{checkpoint_dir(out)} already holds a checkpoint: "
                                "convert into another --out.")
    tree = jax.tree.map(np.asarray, tree)  # host arrays (a no-op for NumPy leaves)
    manager.save(0, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeSave(tree)}),
                 force=True)


def _restore_args(abstract: Any) -> Any:
  return ocp.checkpoint_utils.construct_restore_args(abstract)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, "shape")}


def check_shapes(stored: Any, expected: Any, source: str) -> None:
  """Raises ValueError naming the first parameter of ``expected`` whose shape differs from
  (or is missing in) ``stored``; both are trees with ``.shape`` leaves."""
  have = _shapes(stored)
  for name, shape in _shapes(expected).items():
    if name not in have:
      raise errors.InvalidInput(f"{source} has no parameter {name!r} (expected shape {shape}): "
                                "it was written by a different model config.")
    if have[name] != shape:
      raise errors.InvalidInput(f"{source} does not match the model config: parameter {name!r} has "
                                f"shape {have[name]} in the checkpoint but {shape} in this model.")


def restore_state(manager: ocp.CheckpointManager, abstract_state: Any,
                  step: int | None = None) -> Any:
  """Restores the train state at ``step`` (default: latest) onto ``abstract_state``'s
  shardings, after checking that every array has the expected shape."""
  step = manager.latest_step() if step is None else step
  source = f"Checkpoint {manager.directory}/{step}"
  check_shapes(_tree_metadata(manager, step), abstract_state, source)
  return _restore_tree(manager, step, ocp.args.PyTreeRestore(
      item=abstract_state, restore_args=_restore_args(abstract_state)))


def load_params(run_dir: str, abstract_params: Any, field: str = "ema_params",
                step: int | None = None,
                to_layout: Callable[[Any, str], Any] | None = None) -> tuple[Any, int]:
  """Loads ``field`` ('ema_params' or 'params') of another run's checkpoint (latest step by
  default), e.g. to warm-start post-training or to sample. Returns (params, step).

  A checkpoint in the other parameter layout ('scanned' / 'unrolled': a ``blocks`` tree or
  not) is converted by ``to_layout(params, layout)`` (the model family's)."""
  directory = checkpoint_dir(run_dir)
  if not directory.is_dir():
    raise errors.MissingInput(f"No checkpoints in {run_dir!r} (looked for {directory}).")
  with make_manager(run_dir, read_only=True) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise errors.MissingInput(f"{directory} holds no finished checkpoint.")
    source = f"Checkpoint {directory}/{step}"
    metadata = _tree_metadata(manager, step)
    if field not in metadata:
      raise errors.InvalidInput(f"{source} has no {field!r}; it holds {sorted(metadata)}.")
    stored_scanned, scanned = "blocks" in metadata[field], "blocks" in abstract_params
    if stored_scanned != scanned and to_layout is None:
      stored_layout = "scanned" if stored_scanned else "unrolled"
      raise errors.InvalidInput(f"{source} holds the {stored_layout!r} parameter layout, "
                                "the model the other one.")
    if stored_scanned == scanned:
      check_shapes(metadata[field], abstract_params, source)
      restored = _restore_tree(manager, step, ocp.args.PyTreeRestore(
          item={field: abstract_params},
          restore_args=_restore_args({field: abstract_params}),
          partial_restore=True))
      return restored[field], step
    # The other layout: read it to the host, convert, place it as ``abstract_params`` says.
    stored = jax.eval_shape(
        lambda p: to_layout(p, "scanned" if stored_scanned else "unrolled"), abstract_params)
    check_shapes(metadata[field], stored, source)
    host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    restored = _restore_tree(manager, step, ocp.args.PyTreeRestore(
        item={field: stored}, restore_args={field: host}, partial_restore=True))
  converted = to_layout(jax.tree.map(np.asarray, restored[field]),
                        "scanned" if scanned else "unrolled")
  return jax.tree.map(place, converted, abstract_params), step


def place(value: np.ndarray, abstract: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array (the same on every process) as a global array of ``abstract``'s sharding
  (replicated on the first device if it has none)."""
  value = np.asarray(value, abstract.dtype)
  sharding = getattr(abstract, "sharding", None)
  if sharding is None:
    return jax.device_put(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
