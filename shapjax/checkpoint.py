"""Checkpoints with orbax: the only module that imports it.

A checkpoint is a folder of orbax items:

    weights/       the linen params (orbax StandardSave)
    config/        JSON: {"format": "shapjax.autoencoder", "version": 1 or 2, "kind": "autoencoder" | "inpainting",
                   "model": the config's to_dict()}
    train_state/   (training checkpoints only) optax state and step
    train_meta/    (training checkpoints only) JSON: training config, PRNG key data, loss history

:func:`save` writes one such folder; the trainer keeps a series of them as numbered step folders
(``<dir>/<step>/``) through an orbax ``CheckpointManager``. :func:`load` accepts either: a step folder, a
:func:`save` folder, or a training folder (its latest step). Because the model configuration travels with the
weights, ``load`` rebuilds params from the path alone: the abstract target comes from ``jax.eval_shape`` of the
initialiser (no weights are allocated twice), then orbax restores into it.

Paths may be relative (to the working directory) or absolute: orbax wants absolute ones, so this module resolves
them before calling it, and its messages name the path as the caller gave it.

A checkpoint does not depend on the devices that wrote it: weights and optimizer state are saved as host (numpy)
copies and restored onto the default device, so a checkpoint of a run on a mesh of N devices loads in a process
with any number of devices (a run on a mesh replicates what it restores; :func:`shapjax.train`).

Every failure to read (a missing folder, a truncated or corrupt file, a checkpoint of something else) is a
``FileNotFoundError`` or ``ValueError`` that names the path, never an orbax traceback.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from shapjax import model

FORMAT = "shapjax.autoencoder"  # every shapjax checkpoint says so, whatever model it holds (see "kind")
FORMAT_VERSION = 2
# Version 2 added the model kind; records without one (version 1) are autoencoders. Autoencoder checkpoints are
# still written as version 1, which earlier shapjax reads; an inpainter's says 2, which earlier shapjax refuses
# as "written by a newer shapjax" instead of misreading it as an autoencoder.
_KIND_VERSIONS = {"autoencoder": 1, "inpainting": 2}

_WEIGHTS = "weights"
_CONFIG = "config"
_TRAIN_STATE = "train_state"
_TRAIN_META = "train_meta"

# orbax logs every save and restore at INFO/WARNING through absl; a CLI user wants none of it.
logging.getLogger("absl").setLevel(logging.ERROR)


def _config_record(config: model.ModelConfig) -> dict:
  kind = model.model_kind(config)
  return {"format": FORMAT, "version": _KIND_VERSIONS[kind], "kind": kind, "model": config.to_dict()}


def _config_from_record(record, path: Path) -> model.ModelConfig:
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(f"{path} is not a shapjax checkpoint (its config item has no format {FORMAT!r})")
  if int(record.get("version", -1)) > FORMAT_VERSION:
    raise ValueError(f"{path} was written by a newer shapjax (checkpoint format version {record['version']})")
  kind = record.get("kind", "autoencoder")
  if kind not in model.MODEL_KINDS:
    raise ValueError(f"{path} holds a model of unknown kind {kind!r} (this shapjax knows {model.MODEL_KINDS})")
  try:
    return model.config_from_dict(record["model"], kind=kind)
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(f"{path} has an invalid model config: {error}") from None


def abstract_weights(config: model.ModelConfig):
  """The shapes and dtypes of the weights of ``config`` (``jax.ShapeDtypeStruct`` leaves, nothing allocated)."""
  return jax.eval_shape(lambda: model.init_params(config, key=jax.random.key(0)).weights)


def _short(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _absolute(path: Path) -> Path:
  """``path`` as orbax wants it: absolute (it rejects relative paths), resolved against the working directory."""
  return Path(os.path.abspath(path))


def _on_default_device(target):
  """``target`` (``ShapeDtypeStruct`` leaves) placed on the default device.

  An explicit target sharding makes orbax restore onto this process's devices, whatever devices wrote the
  checkpoint; without one it reuses the stored sharding and fails on another device count ("topology mismatch").
  """
  # This process's own first device: with several processes, jax.devices()[0] belongs to process 0.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)


def _host_copy(tree):
  """Numpy copies of a pytree of arrays: what is saved does not depend on the devices (or mesh) they lived on."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _is_item_folder(path: Path) -> bool:
  return (path / _CONFIG).is_dir() and (path / _WEIGHTS).is_dir()


def _steps(path: Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and _is_item_folder(p))


def resolve(path: str | os.PathLike) -> Path:
  """The folder holding a checkpoint's items: ``path`` itself, or the latest step folder inside it.

  Args:
    path: a checkpoint folder, relative to the working directory or absolute.

  Returns:
    ``path`` or its latest step folder, spelled as given (relative stays relative).

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    ValueError: when it holds no checkpoint.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
  if not path.is_dir():
    raise ValueError(f"{path} is not a checkpoint folder (it is a file)")
  if _is_item_folder(path):
    return path
  steps = _steps(path)
  if not steps:
    raise ValueError(f"no shapjax checkpoint in {path} (expected {_WEIGHTS}/ and {_CONFIG}/ items, or numbered "
                     "step folders holding them)")
  return path / str(steps[-1])


def _unreadable(path: Path, error: BaseException) -> ValueError:
  # Only for orbax's own failures on an existing folder: paths are made absolute and checked before it runs.
  return ValueError(f"cannot read checkpoint {path} (truncated, corrupt or not written by shapjax): "
                    f"{_short(error)}")


def _restore(path: Path, **items):
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(_absolute(path), args=ocp.args.Composite(**items))
  except Exception as error:  # orbax/tensorstore raise many types; the user needs the path and the reason
    raise _unreadable(path, error) from None


def _stored_shapes(path: Path, item: str) -> list[tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of the arrays of a StandardSave item, from its metadata (no array is read)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    tree = handler.metadata(_absolute(path) / item).tree
  except Exception as error:
    raise _unreadable(path, error) from None
  finally:
    handler.close()
  return [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _shapes(tree) -> list[tuple[tuple[int, ...], np.dtype]]:
  return [(tuple(np.shape(x)), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def read_config(path: str | os.PathLike) -> model.ModelConfig:
  """The model configuration stored in a checkpoint (an AutoencoderConfig or an InpainterConfig, by the kind the
  checkpoint records), without reading the weights."""
  folder = resolve(path)
  record = _restore(folder, **{_CONFIG: ocp.args.JsonRestore()})[_CONFIG]
  return _config_from_record(record, folder)


def _restore_weights(folder: Path, config: model.ModelConfig):
  target = abstract_weights(config)
  # Compare shapes before reading: a failed read leaves orbax's pending reads behind (and a confusing error).
  if _stored_shapes(folder, _WEIGHTS) != _shapes(target):
    raise ValueError(f"checkpoint {folder}: the stored weights do not match the stored model config")
  weights = _restore(folder, **{_WEIGHTS: ocp.args.StandardRestore(_on_default_device(target))})[_WEIGHTS]
  _check_like(weights, target, folder, "weights")
  return weights


def _check_like(tree, target, path: Path, what: str) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(target) or _shapes(tree) != _shapes(target):
    raise ValueError(f"checkpoint {path}: the stored {what} do not match the stored model config")


def load(path: str | os.PathLike) -> model.ModelParams:
  """Loads model params written by :func:`save` or by :func:`shapjax.train`.

  The checkpoint records the kind of model: an autoencoder's comes back as :class:`shapjax.AutoencoderParams`,
  an inpainter's as :class:`shapjax.InpainterParams` (checkpoints written before inpainters existed hold
  autoencoders).

  The weights land on the default device, whatever devices (or mesh) the checkpoint was written from.

  Args:
    path: a :func:`save` folder, a training checkpoint folder (its latest step is loaded) or one step folder;
      relative to the working directory or absolute.

  Returns:
    :class:`shapjax.AutoencoderParams` (ready for :func:`shapjax.attribute`) or :class:`shapjax.InpainterParams`.

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    ValueError: naming the path, when it holds no readable shapjax checkpoint.

  Example:
    >>> import jax, tempfile, shapjax
    >>> params = shapjax.init_autoencoder((16, 16, 1), key=jax.random.key(0), features=(4,))
    >>> path = shapjax.save(params, tempfile.mkdtemp() + "/ae")
    >>> shapjax.load(path).config == params.config
    True
  """
  folder = resolve(path)
  config = read_config(folder)
  return model.make_params(config, _restore_weights(folder, config))


def _check_params(params) -> None:
  if not isinstance(params, model.ModelParams):
    raise TypeError(f"params must be AutoencoderParams or InpainterParams (from init_autoencoder, init_inpainter, "
                    f"train or load), got {type(params).__name__}")


def save(params: model.ModelParams, path: str | os.PathLike) -> Path:
  """Saves model params (weights and model configuration, with the kind of model) to a folder.

  The checkpoint is written to a temporary sibling folder and moved into place only once complete, so a
  failed save never destroys an existing checkpoint at ``path``. An existing folder is replaced only if it is
  a shapjax checkpoint.

  Args:
    params: :class:`shapjax.AutoencoderParams` or :class:`shapjax.InpainterParams` (on any devices: host copies
      of the weights are saved).
    path: folder to write, relative to the working directory or absolute.

  Returns:
    ``path`` as an absolute :class:`pathlib.Path`.

  Raises:
    ValueError: when ``path`` exists and is not a shapjax checkpoint.
  """
  _check_params(params)
  given = Path(path)
  path = _absolute(given)
  if path.exists() and not (path.is_dir() and _is_item_folder(path)):
    if not (path.is_dir() and not any(path.iterdir())):
      raise ValueError(f"refusing to overwrite {given}: it exists and is not a shapjax checkpoint")
  for leaf in jax.tree.leaves(params.weights):
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) or not np.issubdtype(np.dtype(leaf.dtype), np.number):
      raise ValueError(f"cannot save to {given}: the weights hold {getattr(leaf, 'dtype', type(leaf).__name__)!s} "
                       "leaves, not numeric arrays")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Several processes (a shared folder): all of them take part in orbax's save, process 0 alone moves folders.
  primary = jax.process_index() == 0
  tag = _same_on_every_process(uuid.uuid4().int % 2 ** 31)
  # orbax writes into a private folder of ours, so whatever it leaves on failure goes with that folder.
  staging = path.parent / f".{path.name}.saving-{tag:08x}"
  try:
    if primary:
      staging.mkdir()
    _wait_for_every_process(f"shapjax.save.{tag}.staging")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(staging / "checkpoint", args=ocp.args.Composite(**{
          _WEIGHTS: ocp.args.StandardSave(_host_copy(params.weights)),
          _CONFIG: ocp.args.JsonSave(_config_record(params.config)),
      }))
    if primary:
      old = path.parent / f".{path.name}.old-{tag:08x}"
      if path.exists():
        os.replace(path, old)
      os.replace(staging / "checkpoint", path)
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if primary:
      _remove(staging)
  _wait_for_every_process(f"shapjax.save.{tag}.done")
  return path


def _same_on_every_process(value: int) -> int:
  """Process 0's ``value`` on every process (``value`` itself with one process)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _wait_for_every_process(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _remove(folder: Path) -> None:
  # After a failed save, orbax's writer threads may still be finishing a file or two: retry briefly.
  for delay in (0.0, 0.05, 0.2, 0.5, 1.0):
    time.sleep(delay)
    shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
      return


class TrainingCheckpoints:
  """A series of training checkpoints (weights, optimizer state, step) in numbered step folders.

  The trainer's interface to orbax's ``CheckpointManager``: saves are synchronous (a resumed run must find
  what the previous one wrote), the last ``keep`` steps are kept, and every step folder is also a checkpoint
  that :func:`load` reads.

  Args:
    directory: the training folder (created).
    keep: how many of the latest steps to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int):
    self.directory = Path(directory)  # as the caller spelled it, for messages; orbax gets it absolute
    if self.directory.exists() and not self.directory.is_dir():
      raise ValueError(f"checkpoint folder {self.directory} is a file")
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False)
    try:
      self._manager = ocp.CheckpointManager(_absolute(self.directory), options=options)
    except Exception as error:
      raise ValueError(f"cannot use {self.directory} as a checkpoint folder: {_short(error)}") from None

  def latest_step(self) -> int | None:
    """The last completed step saved here, or None."""
    steps = _steps(self.directory) if self.directory.is_dir() else []
    return steps[-1] if steps else None

  def save(self, step: int, params: model.ModelParams, opt_state, meta: dict) -> None:
    """Saves the state after ``step`` optimizer steps (replacing a checkpoint of the same step).

    Weights and optimizer state may live on any devices (replicated on a mesh, say): host copies are saved.
    """
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(int(step), args=ocp.args.Composite(**{
        _WEIGHTS: ocp.args.StandardSave(_host_copy(params.weights)),
        _CONFIG: ocp.args.JsonSave(_config_record(params.config)),
        _TRAIN_STATE: ocp.args.StandardSave({"opt_state": _host_copy(opt_state), "step": np.int32(step)}),
        _TRAIN_META: ocp.args.JsonSave(meta),
    }), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, config: model.ModelConfig, abstract_opt_state):
    """Restores ``(params, opt_state, meta)`` of ``step``; the stored model config must equal ``config``.

    Everything lands on the default device; a run on a mesh replicates it there.
    """
    folder = self.directory / str(step)
    stored = read_config(folder)
    if stored != config:
      raise ValueError(f"cannot resume from {folder}: it holds a model {stored} but the run asks for {config}")
    weights = _restore_weights(folder, config)
    target = {"opt_state": abstract_opt_state, "step": jax.ShapeDtypeStruct((), np.int32)}
    if _stored_shapes(folder, _TRAIN_STATE) != _shapes(target):
      raise ValueError(f"cannot resume from {folder}: its optimizer state does not match this run's optimizer")
    restored = _restore(folder, **{_TRAIN_STATE: ocp.args.StandardRestore(_on_default_device(target)),
                                   _TRAIN_META: ocp.args.JsonRestore()})
    state = restored[_TRAIN_STATE]
    leaves = jax.tree.leaves(state["opt_state"])
    if _shapes(leaves) != _shapes(abstract_opt_state):
      raise ValueError(f"cannot resume from {folder}: its optimizer state does not match this run's optimizer")
    # orbax gives back plain tuples for optax's named tuples: rebuild the optimizer's own tree structure.
    opt_state = jax.tree.unflatten(jax.tree.structure(abstract_opt_state), leaves)
    if int(state["step"]) != int(step):
      raise ValueError(f"checkpoint {folder} says step {int(state['step'])}, its folder says {step}")
    return model.make_params(config, weights), opt_state, restored[_TRAIN_META]

  def close(self) -> None:
    """Waits for orbax's background work and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
