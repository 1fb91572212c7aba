"""Devices and meshes: one CPU device per core, a mesh over the devices, and placing arrays on it.

Everything multi-device in shapjax runs on JAX's own runtime through ``jax.sharding``: a
:class:`jax.sharding.Mesh`, inputs placed with :class:`jax.sharding.NamedSharding`, per-device programs written
with :func:`jax.shard_map`. This module holds the pieces that know nothing of the model or the sampler:

* process set-up: :func:`use_cpu_devices` splits a CPU host into one device per core;
* :func:`make_mesh`, a one-axis mesh over every device;
* placement: a batch split over the mesh (:func:`put_rows`), a whole copy on every device (:func:`replicate`),
  and the rows that live on this process (:func:`local_rows`);
* several processes (hosts, after ``jax.distributed.initialize()``): each passes its own rows to
  :func:`put_rows` and the same replicated inputs to :func:`replicate` (checked by
  :func:`check_same_on_every_process`), and gets its own rows back (:func:`local_rows`, :func:`local_copy`);
* :func:`batch_mean`, the data-parallel pattern of training: each device's loss and gradients, averaged.

The attribution programs that split images or permutations across a mesh live in :mod:`shapjax.attribution`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
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


DEFAULT_HEARTBEAT_TIMEOUT = 100
"""Seconds without a heartbeat after which a process counts as dead and every other one stops (JAX's default)."""


def initialize_processes(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, *, heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
                         initialization_timeout: int = 300, cpu_devices: int | None = None) -> int:
  """Joins this process to a multi-process (multi-host) JAX run: ``jax.distributed.initialize`` plus CPU set-up.

  Call it first in every process, before any JAX computation; then a mesh over ``jax.devices()`` (every
  process's devices, :func:`make_mesh`) runs shapjax's mesh paths across the processes. With no
  ``coordinator``, ``num_processes`` and ``process_id``, JAX detects them (Cloud TPU pod slices, Slurm, Open MPI).

  Failure: JAX's coordination service ends every process (with an error naming the lost one) once a process
  has sent no heartbeat for ``heartbeat_timeout`` seconds; a process that exits cleanly waits up to the same
  time for the others at shutdown. A lost process thus ends the run on every process within about
  ``heartbeat_timeout`` seconds (measured with 2 local processes: 5-6 s after the loss at ``heartbeat_timeout=5``,
  about 10.5 s at 10, for a killed process and for one that raised).

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordination service (every process passes the same one).
    num_processes: the number of processes.
    process_id: this process's id in ``[0, num_processes)``.
    heartbeat_timeout: seconds without a heartbeat before a process is declared dead.
    initialization_timeout: seconds to wait for every process to join.
    cpu_devices: split each process's CPU into this many devices first (:func:`use_cpu_devices`).

  Returns:
    The number of processes.
  """
  if cpu_devices is not None:
    use_cpu_devices(cpu_devices)
  # Collectives between the CPU devices of different processes go through gloo (JAX's default on CPU today).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  options = dict(initialization_timeout=int(initialization_timeout),
                 heartbeat_timeout_seconds=int(heartbeat_timeout), shutdown_timeout_seconds=int(heartbeat_timeout))
  if coordinator is None and num_processes is None and process_id is None:
    jax.distributed.initialize(**options)
  else:
    if None in (coordinator, num_processes, process_id):
      raise ValueError("give coordinator, num_processes and process_id together (or none of them, to let JAX "
                       f"detect them), got {coordinator!r}, {num_processes!r}, {process_id!r}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id), **options)
  return jax.process_count()


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


def local_size(mesh: Mesh) -> int:
  """How many of the mesh's devices belong to this process (all of them, with one process)."""
  return sum(device.process_index == jax.process_index() for device in mesh.devices.flat)


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
  """Every device of the mesh gets a whole copy (params trained on one device would otherwise be pinned there).

  With several processes (after ``jax.distributed.initialize()``) every process passes the same ``tree`` and
  the copies of its own devices are made from it (``jax.device_put`` only places on this process's devices);
  a digest of the tree is compared across processes first, so hosts that hold different params, images or
  keys fail with a ValueError instead of computing with a silent mix of them.
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  check_same_on_every_process(tree, "replicate")
  return jax.tree.map(lambda leaf: _replicate_leaf(leaf, sharding), tree)


def _replicate_leaf(leaf, sharding: NamedSharding):
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # a global array already: reshard it
    return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
  if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
    data = _replicate_leaf(jax.random.key_data(leaf), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  host = np.asarray(leaf)
  return jax.make_array_from_process_local_data(sharding, host, host.shape)


def _digest(tree) -> np.ndarray:
  """``u8[32]`` SHA-256 of a pytree's structure, shapes, dtypes and bytes."""
  digest = hashlib.sha256(str(jax.tree.structure(tree)).encode())
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      continue  # a global array is one array by construction
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    host = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{host.shape}{host.dtype}".encode())
    digest.update(host.tobytes())
  return np.frombuffer(digest.digest(), np.uint8)


def check_same_on_every_process(tree, what: str) -> None:
  """Raises ValueError unless every process holds the same ``tree`` (compares 32-byte digests, not the data)."""
  if jax.process_count() == 1:
    return
  digests = np.asarray(multihost_utils.process_allgather(_digest(tree)))
  differ = [p for p in range(digests.shape[0]) if not np.array_equal(digests[p], digests[0])]
  if differ:
    raise ValueError(f"{what}: every process must pass the same params, key and replicated inputs, but process(es) "
                     f"{differ} hold different ones from process 0")


def process_counts(n_local: int) -> np.ndarray:
  """``i64[process_count]``: every process's ``n_local`` (e.g. its number of images), in process order."""
  if jax.process_count() == 1:
    return np.asarray([n_local], np.int64)
  return np.asarray(multihost_utils.process_allgather(np.int64(n_local))).reshape(-1).astype(np.int64)


def local_copy(tree):
  """A fully replicated (global) pytree -> the same values on this process's first device."""
  device = jax.local_devices()[0]

  def one(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_shards[0].data
    return jax.device_put(leaf, device)

  return jax.tree.map(one, tree)


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
