"""Many images, many devices: meshes, sharded attribution, and dataset attribution as a CPU/device pipeline.

Everything here runs on JAX's own distributed runtime through ``jax.sharding``: a :class:`jax.sharding.Mesh`
of devices, inputs placed with :class:`jax.sharding.NamedSharding`, and per-device programs written with
:func:`jax.shard_map`. There is no scheduler of our own. Two ways to split an attribution's work (and a third
for training: ``shapjax.train(..., mesh=)`` averages the gradients of each device's share of a batch, see
:func:`_batch_mean`):

* **Images across devices** (``attribute_batch(..., mesh=mesh)``, :func:`attribute_dataset`): the batch axis is
  sharded over every axis of the mesh; each device attributes its own images with no communication at all.
  Image ``i`` uses ``fold_in(key, i)`` exactly as on one device.
* **Permutations across devices** (:func:`attribute_sharded`, one large image): every device holds the image
  and the model, and draws its own contiguous range of permutation indices (``start`` of
  :func:`shapjax.sampling.estimate_block`). Each device's running statistics (count, mean and squared
  deviations per region) are merged with ``psum`` (Chan's parallel formula, as accurate as one pass).

Because permutation ``i`` always comes from ``fold_in(key, i)`` and image ``i`` from ``fold_in(key, i)``, the
results equal the one-device results to float tolerance whatever the number of devices.

Several hosts: call ``jax.distributed.initialize()`` first on every host, build the mesh from ``jax.devices()``
(all devices of all hosts), and run the same script on every host with that host's own images (the
process-local data): batches are assembled with :func:`jax.make_array_from_process_local_data` and each host
gets back the rows of its own devices.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
from collections.abc import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from shapjax import attribution, compilation, masking, model, sampling, segmentation

DEFAULT_AXIS = "devices"
DEFAULT_DATASET_BATCH = 16


def use_cpu_devices(n_devices: int | None = None) -> int:
  """Splits the host CPU into ``n_devices`` JAX devices, one per core: the fast way to use a CPU.

  XLA's CPU convolutions hardly use a second core, so one CPU device leaves most of a multi-core machine idle.
  One device per core, and a mesh over them, keeps every core busy on its own share of the permutations
  (``shapjax.attribute(..., mesh=shapjax.make_mesh())``) or of the images (:func:`attribute_dataset`,
  ``attribute_batch(..., mesh=...)``); ``benchmarks/README.md`` has the numbers. It sets ``jax_num_cpu_devices``
  and adds ``--xla_cpu_multi_thread_eigen=false`` to ``XLA_FLAGS``, so it must run before JAX starts its
  backends, i.e. before the first JAX computation of the process.

  Each device then runs its convolutions on one thread; XLA's matrix products (``dot``) and the program's
  thunks still draw on the process's one pool of a thread per core, shared by the devices. ``PJRT_NPROC=1`` makes
  that pool one thread; it gave no gain for attribution or training on 2 cores (``benchmarks/README.md``).

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
  import os  # pylint: disable=g-import-not-at-top

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
    ``Mesh`` of shape ``(n_devices,)``; pass it as ``mesh=`` to :func:`shapjax.attribute_batch`,
    :func:`attribute_dataset` or :func:`attribute_sharded`. Any mesh works there: the work is split over all
    of its axes.

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


def _check_mesh(mesh) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. shapjax.make_mesh()), got {type(mesh).__name__}")
  return mesh


def _axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(mesh.axis_names)


def _batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over every axis of the mesh, the rest whole."""
  return NamedSharding(mesh, P(_axes(mesh)))


def _pad_rows(array: np.ndarray, n_rows: int) -> np.ndarray:
  """Pads the leading axis with zeros up to ``n_rows``.

  A zero label map is one region: a padded image costs two model evaluations, never a permutation.
  """
  missing = n_rows - array.shape[0]
  if missing <= 0:
    return array
  return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])


def _put(array, sharding: NamedSharding) -> jax.Array:
  """Host rows -> a global array split by ``sharding`` (each process passes only its own rows)."""
  if jax.process_count() == 1:
    return jax.device_put(array, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(array))


def _replicate(tree, mesh: Mesh):
  """Every device of the mesh gets a whole copy (params trained on one device would otherwise be pinned there)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def _local_rows(array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded array that live on this process's devices, in order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def _batch_mean(fn, mesh: Mesh):
  """Data parallel: ``fn(tree, batch)`` run on each device's share of the batch, averaged across devices.

  ``fn`` returns a pytree of means over its batch (a loss and its gradients); the batch is split evenly over
  every axis of the mesh, so the average of the per-device means is the mean over the whole batch. The
  per-device program is the one-device program on fewer images (``jax.shard_map``): left to XLA's partitioner,
  the image-by-image kernel gradients of :mod:`shapjax.model` (a ``lax.scan`` over the batch) were gathered
  and computed whole on every device, slower than one device.

  Args:
    fn: ``(tree, f32[B / devices, ...]) -> pytree`` of batch means.
    mesh: the devices.

  Returns:
    ``(tree, f32[B, ...]) -> pytree``, replicated on the mesh.
  """
  axes = _axes(mesh)

  def local(tree, batch):
    return jax.tree.map(lambda leaf: jax.lax.pmean(leaf, axes), fn(tree, batch))

  # check_vma=False: each device's gradients are its own (summed explicitly by the pmean); with the check, the
  # custom VJP of model._conv would have to mark its kernel gradients as device-varying.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes)), out_specs=P(), check_vma=False)


# --------------------------------------------------------------------------------------------------------------
# Images across devices.

_STATIC = attribution._STATIC


@functools.partial(compilation.jit_forward, static_argnames=("mesh",) + _STATIC)
def _images_program(params, images, labels, key, offset, baseline_array, *, mesh, **static):
  """Attributes ``images[j]`` with key ``fold_in(key, offset + j)``; with a mesh, one image shard per device."""
  per_image_baseline = baseline_array is not None and baseline_array.ndim == 4

  def local(params, images, labels, key, offset, baseline_array):
    n_local = images.shape[0]
    first = offset
    if mesh is not None:
      first = first + jax.lax.axis_index(_axes(mesh)) * n_local
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n_local))
    if per_image_baseline:
      xs = (images, labels, keys, baseline_array)
      one = lambda args: attribution._attribute_one(params, *args, **static)
    else:
      xs = (images, labels, keys)
      one = lambda args: attribution._attribute_one(params, *args, baseline_array, **static)
    # lax.map, not vmap: the padding-skipping lax.cond of each image stays a real branch.
    return jax.lax.map(one, xs)

  if mesh is None:
    return local(params, images, labels, key, offset, baseline_array)
  rows, whole = P(_axes(mesh)), P()
  in_specs = (whole, rows, rows, whole, whole, rows if per_image_baseline else whole)
  # check_vma=False: the sampler's lax.cond returns zeros (device-invariant) on one branch and model outputs
  # (device-varying) on the other; the per-device program is the one-device program, nothing to check.
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(
      params, images, labels, key, offset, baseline_array)


def _attribute_batch_on_mesh(params, images, labels, key, baseline_array, *, mesh, **static):
  """``attribute_batch`` with the images split over ``mesh`` (inputs already checked by the caller)."""
  mesh = _check_mesh(mesh)
  n_images = images.shape[0]
  n_rows = -(-n_images // mesh.size) * mesh.size
  sharding = _batch_sharding(mesh)
  images = _put(_pad_rows(np.asarray(images), n_rows), sharding)
  labels = _put(_pad_rows(np.asarray(labels), n_rows), sharding)
  if baseline_array is not None:
    if baseline_array.ndim == 4:
      baseline_array = _put(_pad_rows(np.asarray(baseline_array), n_rows), sharding)
    else:
      baseline_array = _replicate(baseline_array, mesh)
  params, key = _replicate((params, key), mesh)
  result = _images_program(params, images, labels, key, jnp.int32(0), baseline_array, mesh=mesh, **static)
  if n_rows != n_images:  # drop the padding rows; gathered first, which any mesh's axis types allow
    result = jax.tree.map(lambda x: _replicate(x, mesh)[:n_images], result)
  return result


# --------------------------------------------------------------------------------------------------------------
# Permutations across devices.


def _unit_group(estimator: str) -> int:
  """Units that form one independent sample; a group never straddles two devices."""
  return {"antithetic": 2, "stratified": sampling.STRATIFIED_GROUP}.get(estimator, 1)


def _merge_across(state: dict, axes: tuple[str, ...]) -> dict:
  """Merges every device's running statistics into the statistics of all units (identical on every device).

  The kernel estimator's normal equations are sums. Permutation estimators keep count, mean and the sum of
  squared deviations: the global mean comes from the weighted sum of means and each device's deviations are
  moved to it (Chan's parallel formula), as accurate as one pass over all samples.
  """
  if "gram" in state:
    return jax.tree.map(lambda x: jax.lax.psum(x, axes), state)
  count = jax.lax.psum(state["count"], axes)
  mean = jax.lax.psum(state["count"] * state["mean"], axes) / jnp.maximum(count, 1.0)
  m2 = jax.lax.psum(state["m2"] + state["count"] * jnp.square(state["mean"] - mean), axes)
  return {**state, "units": jax.lax.psum(state["units"], axes), "count": count, "mean": mean, "m2": m2}


@functools.partial(compilation.jit_forward, static_argnames=("mesh",) + _STATIC)
def _permutations_program(params, image, labels, key, baseline_array, *, mesh, n_perm, max_regions, batch_size,
                          estimator, baseline_kind, blur_sigma):
  """Returns ``(ShapleyResult, each device's own running statistics, stacked along a mesh-split axis)``."""
  axes = _axes(mesh)
  per_device = n_perm // mesh.size

  def local(params, image, labels, key, baseline_array):
    baseline = baseline_kind if baseline_kind is not None else baseline_array
    value_fn = masking.masked_value_fn(lambda x: model.reconstruction_loss(params, x), image, labels,
                                       baseline=baseline, blur_sigma=blur_sigma)
    active = jnp.arange(max_regions) < jnp.max(labels) + 1
    v_empty_full = sampling.endpoint_values(value_fn, active)
    own, _ = sampling.estimate_block(
        value_fn, max_regions, per_device, key=key, start=jax.lax.axis_index(axes) * per_device,
        state=sampling.init_state(max_regions, estimator), active=active, v_empty_full=v_empty_full,
        batch_size=batch_size, estimator=estimator)
    state = _merge_across(own, axes)
    values, stderr = sampling._finish(state, active, v_empty_full, estimator)
    n_evals = state["units"] * sampling.evals_per_unit(jnp.sum(active, dtype=jnp.int32), estimator) + 2
    result = sampling.ShapleyResult(values=values, stderr=stderr, n_evals=n_evals.astype(jnp.int32),
                                    converged=jnp.asarray(True))
    return result, jax.tree.map(lambda x: x[None], own)

  whole = P()
  # check_vma=False as in _images_program; the result is built from psums, hence the same on every device.
  return jax.shard_map(local, mesh=mesh, in_specs=(whole,) * 5, out_specs=(whole, P(axes)), check_vma=False)(
      params, image, labels, key, baseline_array)


def attribute_sharded(
    params: model.AutoencoderParams,
    image: ArrayLike,
    labels: ArrayLike,
    n_perm: int = attribution.DEFAULT_N_PERM,
    *,
    mesh: Mesh,
    key: jax.Array | None = None,
    baseline: str | float | ArrayLike = masking.DEFAULT_BASELINE,
    blur_sigma: float = masking.DEFAULT_BLUR_SIGMA,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    batch_size: int | None = None,
    estimator: str = sampling.DEFAULT_ESTIMATOR,
) -> sampling.ShapleyResult:
  """:func:`shapjax.attribute` for one large image, with the permutations split across the devices of ``mesh``.

  With ``D`` devices and ``k = n_perm / D``, device ``d`` draws units (permutations; kernel samples)
  ``d * k .. (d + 1) * k - 1``, each from ``fold_in(key, i)`` exactly as on one device, and keeps running
  statistics (count, mean, squared deviations; the kernel estimator's normal equations). These few numbers per
  region are merged across devices with ``psum`` and the estimate is finished as on one device, so the result
  equals ``shapjax.attribute(...)`` with the same key to float tolerance.

  Args:
    params: autoencoder params (replicated on every device).
    image: ``f32[H, W, C]`` in ``[0, 1]`` or ``uint8[H, W, C]``.
    labels: ``i32[H, W]`` region ids in ``[0, max_regions)``.
    n_perm: units to sample in total; a multiple of the device count times the estimator's group (2 for
      ``"antithetic"``, 16 for ``"stratified"``), so that every device gets the same whole samples.
    mesh: the devices (:func:`make_mesh`); the permutations are split over all of its axes.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    baseline: as in :func:`shapjax.attribute`.
    blur_sigma: Gaussian sigma for ``baseline="blur"``.
    max_regions: number of players.
    batch_size: composites per autoencoder call on each device (default: 16 on CPU, 64 elsewhere).
    estimator: ``"antithetic"``, ``"permutation"``, ``"stratified"`` or ``"kernel"``.

  Returns:
    :class:`shapjax.ShapleyResult` with ``values`` and ``stderr`` of shape ``[max_regions]``, replicated.

  Example:
    >>> import jax, numpy as np, shapjax
    >>> params = shapjax.init_autoencoder((32, 32, 1), key=jax.random.key(0), features=(8, 16), latent_features=8)
    >>> image = np.random.default_rng(0).random((32, 32, 1), dtype=np.float32)
    >>> labels = shapjax.segment(image, max_regions=8)
    >>> mesh = shapjax.make_mesh()
    >>> result = shapjax.attribute_sharded(params, image, labels, 2 * mesh.size, mesh=mesh, max_regions=8,
    ...                                    batch_size=8)
    >>> result.values.shape
    (8,)
  """
  mesh = _check_mesh(mesh)
  model._check_params(params)
  batch_size = sampling.default_batch_size(batch_size)
  attribution._check_options(n_perm, max_regions, batch_size, estimator)
  image = attribution._as_image(image, params.config, batched=False)
  labels = attribution._as_labels(labels, image.shape[:2], int(max_regions), batched=False)
  unit = mesh.size * _unit_group(estimator)
  if n_perm % unit:
    raise ValueError(f"attribute_sharded gives every one of the {mesh.size} devices the same number of whole "
                     f"{estimator!r} samples: n_perm must be a multiple of {unit}, got {n_perm} "
                     f"(try {-(-n_perm // unit) * unit})")
  kind, array = attribution._split_baseline(baseline, image.shape)
  params, image, labels, key, array = _replicate((params, image, labels, attribution._default_key(key), array), mesh)
  result, _ = _permutations_program(
      params, image, labels, key, array, mesh=mesh, n_perm=int(n_perm),
      max_regions=int(max_regions), batch_size=int(batch_size), estimator=estimator, baseline_kind=kind,
      blur_sigma=float(blur_sigma))
  return result


# --------------------------------------------------------------------------------------------------------------
# Datasets: CPU segmentation of batch k + 1 while the devices attribute batch k.


@flax.struct.dataclass
class DatasetAttribution:
  """Attributions of a whole dataset, on the host.

  Attributes:
    result: :class:`shapjax.ShapleyResult` whose fields have a leading axis of size N (numpy arrays).
    labels: ``i32[N, H, W]`` the label maps the values refer to (paint them with :func:`shapjax.heatmap`).
  """

  result: sampling.ShapleyResult
  labels: np.ndarray

  @property
  def values(self) -> np.ndarray:
    """``f32[N, max_regions]`` Shapley value of each region of each image."""
    return self.result.values

  @property
  def stderr(self) -> np.ndarray:
    """``f32[N, max_regions]`` standard error of each value."""
    return self.result.stderr


def _host_images(images, config: model.AutoencoderConfig) -> np.ndarray:
  """A host batch as float32 ``[N, H, W, C]`` in ``[0, 1]``, checked against the model."""
  images = np.asarray(images)
  if images.ndim == 3 and config.image_shape[-1] == 1:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"images must have shape [N, H, W, C] (or [N, H, W] for a grey model), "
                     f"got shape {images.shape}")
  if images.shape[-1] != config.image_shape[-1]:
    raise ValueError(f"images have {images.shape[-1]} channels but the autoencoder expects "
                     f"{config.image_shape[-1]} (shape {images.shape})")
  return model.host_float_images(images)


def _chunks(images, size: int):
  """Yields lists of at most ``size`` images from an array or any iterable."""
  iterator = iter(images)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def attribute_dataset(
    params: model.AutoencoderParams,
    images: ArrayLike | Iterable[ArrayLike],
    n_perm: int = attribution.DEFAULT_N_PERM,
    *,
    key: jax.Array | None = None,
    batch: int = DEFAULT_DATASET_BATCH,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    mesh: Mesh | None = None,
    progress: bool = True,
    baseline: str | float | ArrayLike = masking.DEFAULT_BASELINE,
    blur_sigma: float = masking.DEFAULT_BLUR_SIGMA,
    batch_size: int | None = None,
    estimator: str = sampling.DEFAULT_ESTIMATOR,
    n_workers: int | None = None,
    segment_options: dict | None = None,
) -> DatasetAttribution:
  """Segments and attributes every image of a dataset, one compiled program per batch of ``batch`` images.

  The pipeline: SLIC runs on the host CPU cores (:func:`shapjax.segment_batch`), label maps are padded to
  ``max_regions`` players and images stacked to ``[batch, H, W, C]`` (the last batch is padded with blank
  images, so every batch runs the same compiled program), the batch is dispatched to the devices, and, since
  JAX dispatch is asynchronous, the next batch is read and segmented while the devices work. With ``mesh`` the
  images of a batch are split across its devices (``batch`` is rounded up to a multiple of the device count).

  Image ``i`` of the dataset uses ``fold_in(key, i)``, so the values equal ``shapjax.attribute_batch`` over the
  whole dataset, on one device or many.

  Several hosts: after ``jax.distributed.initialize()``, call this on every host with that host's own images and
  a mesh over all devices; ``batch`` is then per host and each host gets back its own images' values. (Image
  ``i`` of host ``p`` in batch ``k`` uses index ``k * batch * n_hosts + p * batch + i``.)

  Args:
    params: autoencoder params.
    images: ``[N, H, W, C]`` (or ``[N, H, W]`` grey) array, or any iterable of ``[H, W(, C)]`` images of one
      shape (a generator reading files is fine: it is consumed one batch ahead).
    n_perm: permutations per image.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    batch: images per compiled program (per host).
    max_regions: SLIC's bound on regions per image, and the number of players.
    mesh: devices to split each batch across; None runs on the default device.
    progress: show a tqdm progress bar.
    baseline: as in :func:`shapjax.attribute` (``"blur"``, ``"mean"``, ``"zeros"``, a float, or one
      ``f32[H, W, C]`` array for all images).
    blur_sigma: Gaussian sigma for ``baseline="blur"``.
    batch_size: composites per autoencoder call (default: 16 on CPU, 64 elsewhere).
    estimator: ``"permutation"``, ``"antithetic"``, ``"stratified"`` or ``"kernel"`` (see
      :func:`shapjax.shapley_values`).
    n_workers: segmentation threads (default: the CPU count).
    segment_options: more arguments for :func:`shapjax.segment` (``n_segments``, ``compactness``, ``sigma``).

  Returns:
    :class:`DatasetAttribution` with ``result`` (values and stderr ``[N, max_regions]``) and ``labels``
    ``i32[N, H, W]``, all numpy.

  Example:
    >>> import jax, numpy as np, shapjax
    >>> params = shapjax.init_autoencoder((32, 32, 1), key=jax.random.key(0), features=(8, 16), latent_features=8)
    >>> images = np.random.default_rng(0).random((5, 32, 32), dtype=np.float32)
    >>> out = shapjax.attribute_dataset(params, images, 4, batch=4, max_regions=8, batch_size=8, progress=False)
    >>> out.values.shape, out.labels.shape
    ((5, 8), (5, 32, 32))
  """
  from tqdm.auto import tqdm  # only here: importing the library should not import tqdm

  model._check_params(params)
  batch_size = sampling.default_batch_size(batch_size)
  attribution._check_options(n_perm, max_regions, batch_size, estimator)
  if not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f"batch must be a positive int, got {batch!r}")
  if mesh is not None:
    mesh = _check_mesh(mesh)
    batch = -(-int(batch) // mesh.size) * mesh.size
  key = attribution._default_key(key)
  static = dict(n_perm=int(n_perm), max_regions=int(max_regions), batch_size=int(batch_size), estimator=estimator,
                blur_sigma=float(blur_sigma))
  segment_options = dict(segment_options or {})
  try:
    total = len(images)
  except TypeError:
    total = None

  shape = None
  baseline_kind = baseline_array = None

  def prepare(chunk):
    """Host work for one batch: convert, check, segment, pad."""
    nonlocal shape
    host = _host_images(np.stack([np.asarray(image) for image in chunk]), params.config)
    if shape is None:
      shape = host.shape[1:]
    elif host.shape[1:] != shape:
      raise ValueError(f"attribute_dataset needs images of one shape: got {host.shape[1:]} after {shape}; "
                       "resize or crop them first")
    labels = segmentation.segment_batch(host, max_regions=int(max_regions), n_workers=n_workers,
                                        **segment_options)
    return _pad_rows(host, batch), _pad_rows(labels, batch), len(chunk)

  def dispatch(host, labels, offset):
    if mesh is None:
      return _images_program(params, jnp.asarray(host), jnp.asarray(labels), key, jnp.int32(offset),
                             baseline_array, mesh=None, baseline_kind=baseline_kind, **static)
    sharding = _batch_sharding(mesh)
    # Several hosts: this host's rows start after those of the hosts before it.
    offset = offset * jax.process_count() + jax.process_index() * batch
    return _images_program(params, _put(host, sharding), _put(labels, sharding), key, jnp.int32(offset),
                           baseline_array, mesh=mesh, baseline_kind=baseline_kind, **static)

  if mesh is not None:
    params, key = _replicate((params, key), mesh)
  chunks = _chunks(images, int(batch))
  collected, all_labels = [], []
  bar = tqdm(total=total, unit="img", desc="attribute", disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    nxt = pool.submit(lambda: next((prepare(chunk) for chunk in chunks), None))
    offset = 0
    while (prepared := nxt.result()) is not None:
      host, labels, n_real = prepared
      if offset == 0:
        baseline_kind, baseline_array = attribution._split_baseline(baseline, host.shape[1:])
        if mesh is not None and baseline_array is not None:
          baseline_array = _replicate(baseline_array, mesh)
      result = dispatch(host, labels, offset)  # asynchronous: returns before the devices finish
      nxt = pool.submit(lambda: next((prepare(chunk) for chunk in chunks), None))  # overlaps the device work
      result = jax.tree.map(lambda x: _local_rows(x)[:n_real], result)  # blocks on batch k
      collected.append(result)
      all_labels.append(labels[:n_real])
      bar.update(n_real)
      offset += batch
  bar.close()
  if not collected:
    raise ValueError("attribute_dataset got no images")
  result = jax.tree.map(lambda *xs: np.concatenate(xs), *collected)
  return DatasetAttribution(result=result, labels=np.concatenate(all_labels))
