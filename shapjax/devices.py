"""Devices and meshes: one CPU device per core, a mesh over the devices, and placing arrays on it.

Everything multi-device in shapjax runs on JAX's own runtime through ``jax.sharding``: a
:class:`jax.sharding.Mesh`, inputs placed with :class:`jax.sharding.NamedSharding`, per-device programs written
with :func:`jax.shard_map`. This module holds the pieces that know nothing of the model or the sampler:

* process set-up: :func:`use_cpu_devices` splits a CPU host into one device per core;
* :func:`make_mesh`, a one-axis mesh over every device;
* placement: a batch split over the mesh (:func:`put_rows`), a whole copy on every device (:func:`replicate`),
  and the rows that live on this process (:func:`local_rows`);
* :func:`batch_mean`, the data-parallel pattern of training: each device's loss and gradients, averaged.

The attribution programs that split images or permutations across a mesh live in :mod:`shapjax.attribution`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_AXIS = "devices"


def use_cpu_devices(n_devices: int | None = None) -> int:
  """Splits the host CPU into ``n_devices`` JAX devices, one per core: the fast way to use a CPU.

  XLA's CPU convolutions hardly use a second core, so one CPU device leaves most of a multi-core machine idle.
  One device per core, and a mesh over them, keeps every core busy on its own share of the permutations
  (``shapjax.attribute(..., mesh=shapjax.make_mesh())``) or of the images (:func:`shapjax.attribute_dataset`,
  ``attribute_batch(..., mesh=...)``); ``docs/performance.md`` has the numbers. It sets ``jax_num_cpu_devices``
  and adds ``--xla_cpu_multi_thread_eigen=false`` to ``XLA_FLAGS``, so it must run before JAX starts its
  backends, i.e. before the first JAX computation of the process.

  Each device then runs its convolutions on one thread; XLA's matrix products and the program's steps still
  draw on the process's one pool of a thread per core, shared by the devices.

  Args:
    n_devices: number of CPU devices; defaults to the cores this process may run on.

  Returns:
    The number of CPU devices.

  Raises:
    RuntimeError: JAX's backends are already running (with a different device count).

  Example (in a fresh process, before any JAX computation):
    >>> import shapjax
    >>> shapjax.use_cpu_devices(2)  # doctest: +SKIP
    2
  """
  if n_devices is None:
    n_devices = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  if not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
    raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
  try:
    jax.config.update("jax_num_cpu_devices", int(n_devices))
  except RuntimeError as error:
    raise RuntimeError(
        f"shapjax.use_cpu_devices({n_devices}) must be called before JAX starts its backends (before the first JAX "
        f"computation of the process); this process already has {jax.local_device_count('cpu')} CPU "
        f"device(s)") from error
  flag = "--xla_cpu_multi_thread_eigen=false"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
  return int(n_devices)


def make_mesh(n_devices: int | None = None, *, devices: Sequence[jax.Device] | None = None,
              axis_name: str = DEFAULT_AXIS) -> Mesh:
  """A one-axis mesh over the devices (all of them, of every host, by default).

  Args:
    n_devices: use only the first ``n_devices`` devices.
    devices: the devices to use; defaults to ``jax.devices()`` (with several hosts: every host's devices).
    axis_name: the name of the mesh axis.

  Returns:
    ``Mesh`` of shape ``(n_devices,)``; pass it as ``mesh=`` to :func:`shapjax.attribute`,
    :func:`shapjax.attribute_batch`, :func:`shapjax.attribute_dataset` or :func:`shapjax.train`. Any mesh works
    there: the work is split over all of its axes.

  Example:
    >>> import shapjax
    >>> mesh = shapjax.make_mesh(1)
    >>> mesh.size
    1
  """
  devices = list(jax.devices() if devices is None else devices)
  if n_devices is not None:
    if not isinstance(n_devices, (int, np.integer)) or not 1 <= n_devices <= len(devices):
      raise ValueError(f"n_devices must be an int in [1, {len(devices)}] (the devices available), got {n_devices!r}")
    devices = devices[:n_devices]
  # Auto axes: results then index and slice like any array (an Explicit axis makes ``values[:k]`` of a
  # batch-sharded result a typing error that asks for an out_sharding).
  return jax.make_mesh((len(devices),), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def check_mesh(mesh) -> Mesh:
  """``mesh`` itself if it is a :class:`jax.sharding.Mesh`; a TypeError that says what to pass otherwise."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. shapjax.make_mesh()), got {type(mesh).__name__}")
  return mesh


def axes(mesh: Mesh) -> tuple[str, ...]:
  """Every axis name of ``mesh``: work is split over all of them."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over every axis of the mesh, the rest whole."""
  return NamedSharding(mesh, P(axes(mesh)))


def pad_rows(array: np.ndarray, n_rows: int) -> np.ndarray:
  """Pads the leading axis with zeros up to ``n_rows`` (a zero label map is one region: cheap to attribute)."""
  missing = n_rows - array.shape[0]
  if missing <= 0:
    return array
  return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])


def put_rows(array, mesh: Mesh) -> jax.Array:
  """Host rows -> a global array whose leading axis is split over ``mesh`` (each process passes its own rows)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(array, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(array))


def replicate(tree, mesh: Mesh):
  """Every device of the mesh gets a whole copy (params trained on one device would otherwise be pinned there)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def local_rows(array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded array that live on this process's devices, in order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def batch_mean(fn: Callable, mesh: Mesh) -> Callable:
  """Data parallel: ``fn(tree, batch)`` run on each device's share of the batch, averaged across devices.

  ``fn`` returns a pytree of means over its batch (a loss and its gradients); the batch is split evenly over
  every axis of the mesh, so the average of the per-device means is the mean over the whole batch. The
  per-device program is the one-device program on fewer images (``jax.shard_map``): left to XLA's partitioner,
  image-by-image kernel gradients (a ``lax.scan`` over the batch) were gathered and computed whole on every
  device, slower than one device.

  Args:
    fn: ``(tree, f32[B / devices, ...]) -> pytree`` of batch means.
    mesh: the devices.

  Returns:
    ``(tree, f32[B, ...]) -> pytree``, replicated on the mesh.
  """
  names = axes(mesh)

  def local(tree, batch):
    return jax.tree.map(lambda leaf: jax.lax.pmean(leaf, names), fn(tree, batch))

  # check_vma=False: each device's gradients are its own (summed explicitly by the pmean); with the check, a
  # custom VJP would have to mark its kernel gradients as device-varying.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(names)), out_specs=P(), check_vma=False)
