"""attribute(): Shapley values of superpixels for the autoencoder's reconstruction loss, on one device or many.

The characteristic function of an image ``x`` with label map ``labels`` and baseline ``b`` is

    v(S) = mean over pixels and channels of (AE(x_S) - x_S) ** 2,   x_S = m_S * x + (1 - m_S) * b,

where ``m_S`` is 1 on the pixels of the regions in S. A region whose presence raises the reconstruction loss
(the autoencoder, trained on normal images only, cannot reproduce it) gets a large positive value. That game is
additive (``docs/localization.md``); with an inpainter (``game="inpainting"``, the default for
:class:`shapjax.InpainterParams`) the regions outside S are hidden and inpainted from those in S, and
``v(S) = -sum over hidden pixels of mean over channels of (inpaint(x, m_S) - x) ** 2 / (H * W)``
(:func:`shapjax.inpainted_value_fn`): a region's absence changes what its neighbours' holes are filled with.

Every entry point (:func:`attribute`, :func:`attribute_batch`, and :func:`shapjax.attribute_dataset` through
:func:`prepare`) goes through one front door, :func:`prepare`, which checks and normalises the images, labels
and options and returns the options as one hashable :class:`AttributionOptions`: the static argument of every
compiled program here. The programs:

* one image (:func:`attribute`), or blocks of units until a tolerance is met (``tol=``);
* permutations across devices (``attribute(..., mesh=)``): every device holds the image and the model and draws
  its own contiguous range of units; the running statistics are merged with ``psum``
  (:func:`shapjax.sampling.estimate_block` with ``axis_name``);
* images across devices (``attribute_batch(..., mesh=)``, :func:`run_images`): the batch axis is split over the
  mesh and each device attributes its own images with no communication.

Unit ``i`` comes from ``fold_in(key, i)`` and image ``i`` of a batch from ``fold_in(key, i)``, so the results
equal the one-device results to float tolerance whatever the number of devices or the chunk size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from shapjax import devices, inpainting, masking, model, pixels, sampling, segmentation, speedups

DEFAULT_N_PERM = 32
DEFAULT_KEY_SEED = 0
# The games attribute() can play; a model kind's default game is the one it was trained for.
GAMES = ("reconstruction", "inpainting")
_GAME_OF_KIND = {"autoencoder": "reconstruction", "inpainting": "inpainting"}


@dataclasses.dataclass(frozen=True)
class AttributionOptions:
  """The static settings of an attribution program (frozen and hashable: one compiled program per value).

  Built and checked by :func:`prepare`; every default is the one of :func:`attribute`.

  Attributes:
    n_perm: units (permutations, or kernel units) per image, or per block with ``tol``.
    max_regions: number of players (padded region count).
    batch_size: composites per autoencoder call.
    estimator: one of the index's estimators (:data:`shapjax.sampling.INDEX_ESTIMATORS`), resolved (not None).
    index: ``"shapley"``, ``"banzhaf"``, ``"loo"`` or ``("beta", alpha, beta)`` in normal form
      (:func:`shapjax.sampling.check_index`).
    baseline: a named baseline (``"blur"``, ``"mean"``, ``"zeros"``), or None when the baseline is an array
      (passed to the program as data).
    blur_sigma: Gaussian sigma in pixels for ``baseline="blur"``.
    game: ``"reconstruction"`` (an autoencoder's loss on baseline composites) or ``"inpainting"`` (an
      inpainter's error on the hidden regions, :func:`shapjax.inpainted_value_fn`; no baseline: ``baseline``
      is then None).
  """

  n_perm: int = DEFAULT_N_PERM
  max_regions: int = segmentation.DEFAULT_MAX_REGIONS
  batch_size: int = sampling.DEFAULT_BATCH_SIZE
  estimator: str = sampling.DEFAULT_ESTIMATOR
  baseline: str | None = masking.DEFAULT_BASELINE
  blur_sigma: float = masking.DEFAULT_BLUR_SIGMA
  index: str | tuple = sampling.DEFAULT_INDEX
  game: str = "reconstruction"


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What :func:`prepare` returns: checked inputs as device arrays, and the options.

  Attributes:
    images: ``f32[H, W, C]`` (or ``[N, H, W, C]``) in ``[0, 1]``.
    labels: ``i32[H, W]`` (or ``[N, H, W]``).
    baseline: ``f32`` array of the image's (or the batch's) shape, or None for a named baseline.
    options: the :class:`AttributionOptions`.
  """

  images: jax.Array
  labels: jax.Array
  baseline: jax.Array | None
  options: AttributionOptions


def _check_images(array, config: model.ModelConfig, *, batched: bool) -> jax.Array:
  what = "images" if batched else "image"
  expected = "[N, H, W, C]" if batched else "[H, W, C]"
  rank = 4 if batched else 3
  if not hasattr(array, "shape") or not hasattr(array, "dtype"):
    array = np.asarray(array)
  if array.ndim == rank - 1 and config.image_shape[-1] == 1:
    array = array[..., None]
  if array.ndim != rank:
    raise ValueError(f"{what} must have shape {expected}, got shape {tuple(array.shape)}")
  height, width, channels = config.image_shape
  name = "inpainter" if isinstance(config, inpainting.InpainterConfig) else "autoencoder"
  if array.shape[-1] != channels:
    raise ValueError(f"{what} has {array.shape[-1]} channels but the {name} expects {channels} "
                     f"({what} shape {tuple(array.shape)})")
  if tuple(array.shape[-3:-1]) != (height, width):
    raise ValueError(f"{what} is {array.shape[-3]}x{array.shape[-2]} pixels but the {name} was built for "
                     f"{height}x{width}: resize it first (e.g. shapjax.read_image(path, image_size=({height}, "
                     f"{width}))) or use a model trained at this size")
  if batched and array.shape[0] < 1:
    raise ValueError("images is empty: got shape " + str(tuple(array.shape)))
  return jnp.asarray(pixels.as_float(array, what=what))


def _check_labels(labels, image_hw: tuple[int, ...], max_regions: int, *, batched: bool) -> jax.Array:
  if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
    labels = np.asarray(labels)
  expected = tuple(image_hw)
  if tuple(labels.shape) != expected:
    raise ValueError(f"labels must have the image's {'batch, ' if batched else ''}height and width "
                     f"{expected}, got shape {tuple(labels.shape)}")
  if not np.issubdtype(np.dtype(labels.dtype), np.integer):
    raise TypeError(f"labels must be an integer array of region ids, got dtype {labels.dtype}")
  if not speedups.is_traced(labels):
    host = np.asarray(labels)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= max_regions:
      raise ValueError(f"labels must lie in [0, max_regions) = [0, {max_regions}), got values in [{lo}, {hi}]; "
                       "segment with the same max_regions or raise max_regions")
  return jnp.asarray(labels, jnp.int32)


def _split_baseline(baseline, image_shape, *, batch_shape=None) -> tuple[str | None, jax.Array | None]:
  """A string baseline is static (it selects code); anything else is data: an array of the image's shape.

  With ``batch_shape``, an array of that shape (one baseline per image) is kept as it is.
  """
  if isinstance(baseline, str):
    if baseline not in masking.BASELINES:
      raise ValueError(f"baseline must be one of {masking.BASELINES}, a float, or an array; got {baseline!r}")
    return baseline, None
  array = np.asarray(baseline) if not hasattr(baseline, "shape") else baseline
  if batch_shape is not None and tuple(array.shape) == tuple(batch_shape):
    target = tuple(batch_shape)
  else:
    try:
      target = np.broadcast_shapes(tuple(array.shape), tuple(image_shape))
    except ValueError:
      target = None
    if target != tuple(image_shape):
      raise ValueError(f"baseline array of shape {tuple(array.shape)} does not broadcast to the image shape "
                       f"{tuple(image_shape)}")
  if not speedups.is_traced(array) and not bool(np.all(np.isfinite(np.asarray(array, np.float64)))):
    raise ValueError("baseline contains NaN or inf")
  return None, jnp.broadcast_to(jnp.asarray(array, jnp.float32), target)


def check_game(params, game: str | None = None) -> str:
  """The game ``params`` play: ``game`` itself, or by default the one the model kind was trained for.

  Raises a TypeError unless ``params`` are :class:`shapjax.AutoencoderParams` (default game
  ``"reconstruction"``) or :class:`shapjax.InpainterParams` (default ``"inpainting"``), and a ValueError for an
  unknown game or one the model cannot play.
  """
  if not isinstance(params, (model.AutoencoderParams, inpainting.InpainterParams)):
    raise TypeError(f"params must be AutoencoderParams or InpainterParams (from init_autoencoder, init_inpainter, "
                    f"train or load), got {type(params).__name__}")
  kind = model.model_kind(params)
  if game is None:
    return _GAME_OF_KIND[kind]
  if game not in GAMES:
    raise ValueError(f"game must be one of {GAMES} or None (the model's own), got {game!r}")
  if game != _GAME_OF_KIND[kind]:
    needs = "an autoencoder (AutoencoderParams)" if game == "reconstruction" else "an inpainter (InpainterParams)"
    raise ValueError(f"the {game!r} game needs {needs}, got {type(params).__name__}")
  return game


def prepare(params: model.ModelParams, image: ArrayLike, labels: ArrayLike, n_perm: int, *,
            batched: bool = False, baseline=masking.DEFAULT_BASELINE, blur_sigma: float = masking.DEFAULT_BLUR_SIGMA,
            max_regions: int = segmentation.DEFAULT_MAX_REGIONS, batch_size: int | None = None,
            estimator: str | None = None, index=sampling.DEFAULT_INDEX, game: str | None = None) -> Prepared:
  """The front door of every attribution entry point: checks and normalises inputs and options.

  Everything is checked before anything is compiled, with errors that name the problem: params of the wrong
  type; an image of the wrong rank, channel count or height and width (it must match the model's
  ``image_shape``); a dtype other than float, uint8 or uint16; a float image outside ``[0, 1]``; NaN or inf;
  labels of the wrong shape or dtype, or ids outside ``[0, max_regions)``; sizes and an estimator the sampler
  cannot take; a baseline that does not fit the image. Inside a user's ``jit`` the value checks are skipped.

  Args:
    params: autoencoder or inpainter params.
    image: ``[H, W, C]`` (``[N, H, W, C]`` with ``batched``), float in ``[0, 1]``, uint8 or uint16.
    labels: ``i32[H, W]`` (``[N, H, W]``).
    n_perm: units per image (per block with ``tol``).
    batched: whether ``image`` and ``labels`` carry a leading batch axis.
    baseline: as in :func:`attribute`; with ``batched`` an array may also be ``f32[N, H, W, C]``.
    blur_sigma: as in :func:`attribute`.
    max_regions: as in :func:`attribute`.
    batch_size: as in :func:`attribute`; None picks the backend's default.
    estimator: as in :func:`attribute`; None picks the index's default.
    index: as in :func:`attribute`.
    game: as in :func:`attribute` (:func:`check_game`).

  Returns:
    :class:`Prepared`.
  """
  game = check_game(params, game)
  if not isinstance(max_regions, (int, np.integer)) or max_regions < 1:
    raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
  batch_size = sampling.default_batch_size(batch_size)
  index = sampling.check_index(index)
  sampling.check_counts(int(max_regions), n_perm, batch_size, estimator, index=index)
  estimator = sampling.resolve_estimator(index, estimator)
  if not isinstance(blur_sigma, (int, float, np.integer, np.floating)) or not blur_sigma >= 0:
    raise ValueError(f"blur_sigma must be a non-negative number, got {blur_sigma!r}")
  image = _check_images(image, params.config, batched=batched)
  labels = _check_labels(labels, image.shape[:-1], int(max_regions), batched=batched)
  if game == "inpainting":  # hidden regions are inpainted: no baseline, and one program whatever was passed
    kind, array = None, None
  else:
    kind, array = _split_baseline(baseline, image.shape[-3:], batch_shape=image.shape if batched else None)
  options = AttributionOptions(n_perm=int(n_perm), max_regions=int(max_regions), batch_size=int(batch_size),
                               estimator=estimator, baseline=kind, blur_sigma=float(blur_sigma), index=index,
                               game=game)
  return Prepared(images=image, labels=labels, baseline=array, options=options)


def value_function(params: model.ModelParams, image: jax.Array, labels: jax.Array, baseline_array,
                   options: AttributionOptions):
  """The game of one image: ``bool[B, max_regions] -> f32[B]``.

  ``options.game == "reconstruction"``: the autoencoder's reconstruction losses of the baseline composites;
  ``"inpainting"``: minus the inpainter's error on the hidden regions (:func:`shapjax.inpainted_value_fn`).
  """
  if options.game == "inpainting":
    return masking.inpainted_value_fn(lambda images, visible: inpainting.inpaint(params, images, visible), image,
                                      labels)
  baseline = options.baseline if options.baseline is not None else baseline_array
  return masking.masked_value_fn(lambda x: model.reconstruction_loss(params, x), image, labels, baseline=baseline,
                                 blur_sigma=options.blur_sigma)


def _active(labels: jax.Array, max_regions: int) -> jax.Array:
  return jnp.arange(max_regions) < jnp.max(labels) + 1


def _attribute_one(params, image, labels, key, baseline_array, options: AttributionOptions, *, start=0,
                   axis_name=None) -> sampling.ShapleyResult:
  """Units ``start .. start + n_perm - 1`` of one image (each device's own with ``axis_name``)."""
  value_fn = value_function(params, image, labels, baseline_array, options)
  active = _active(labels, options.max_regions)
  _, result = sampling.estimate_block(
      value_fn, options.max_regions, options.n_perm, key=key, start=start,
      state=sampling.init_state(options.max_regions, options.estimator), active=active,
      v_empty_full=sampling.endpoint_values(value_fn, active), batch_size=options.batch_size,
      estimator=options.estimator, index=options.index, axis_name=axis_name)
  return result


@functools.partial(speedups.jit_forward, static_argnames=("options",))
def _attribute_jit(params, image, labels, key, baseline_array, *, options):
  return _attribute_one(params, image, labels, key, baseline_array, options)


@functools.partial(speedups.jit_forward, static_argnames=("options",))
def _endpoints_jit(params, image, labels, baseline_array, active, *, options):
  return sampling.endpoint_values(value_function(params, image, labels, baseline_array, options), active)


@functools.partial(speedups.jit_forward, static_argnames=("options",))
def _block_jit(params, image, labels, key, baseline_array, state, start, v_empty_full, *, options):
  value_fn = value_function(params, image, labels, baseline_array, options)
  return sampling.estimate_block(
      value_fn, options.max_regions, options.n_perm, key=key, start=start, state=state,
      active=_active(labels, options.max_regions), v_empty_full=v_empty_full, batch_size=options.batch_size,
      estimator=options.estimator, index=options.index)


def _attribute_until(params, image, labels, key, baseline_array, options, *, tol, max_evals):
  """Blocks of ``n_perm`` units until the tolerance is met or ``max_evals`` would be exceeded."""
  if speedups.is_traced(labels):
    raise ValueError("tol needs concrete labels (the budget depends on the number of regions): call attribute "
                     "outside jit, or pass tol=None")
  n_regions = int(np.max(np.asarray(labels))) + 1
  active = jnp.arange(options.max_regions) < n_regions
  v_empty_full = _endpoints_jit(params, image, labels, baseline_array, active, options=options)

  def block_fn(state, start):
    return _block_jit(params, image, labels, key, baseline_array, state, start, v_empty_full, options=options)

  return sampling.run_blocks(block_fn, sampling.init_state(options.max_regions, options.estimator),
                             n_perm=options.n_perm,
                             block_cost=sampling.block_evals(n_regions, options.n_perm, options.estimator),
                             tol=tol, max_evals=max_evals, active=active)


@functools.partial(speedups.jit_forward, static_argnames=("options", "mesh"))
def _permutations_program(params, image, labels, key, baseline_array, *, options, mesh):
  """One image, each device drawing ``n_perm / devices`` units; the statistics merged with ``psum``."""
  names = devices.axes(mesh)
  per_device = dataclasses.replace(options, n_perm=options.n_perm // mesh.size)

  def local(params, image, labels, key, baseline_array):
    start = jax.lax.axis_index(names) * per_device.n_perm
    return _attribute_one(params, image, labels, key, baseline_array, per_device, start=start, axis_name=names)

  # check_vma=False: the sampler's lax.cond returns zeros (device-invariant) on one branch and model outputs
  # (device-varying) on the other; the result is built from psums, hence the same on every device.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(),) * 5, out_specs=P(), check_vma=False)(
      params, image, labels, key, baseline_array)


def _attribute_on_mesh(params, prepared: Prepared, key, mesh) -> sampling.ShapleyResult:
  mesh = devices.check_mesh(mesh)
  options = prepared.options
  unit = mesh.size * sampling.sample_group(options.estimator)
  if options.n_perm % unit:
    raise ValueError(f"attribute(..., mesh=) gives every one of the {mesh.size} devices the same number of whole "
                     f"{options.estimator!r} samples: n_perm must be a multiple of {unit}, got {options.n_perm} "
                     f"(try {-(-options.n_perm // unit) * unit})")
  args = devices.replicate((params, prepared.images, prepared.labels, key, prepared.baseline), mesh)
  result = _permutations_program(*args, options=options, mesh=mesh)
  # Several processes: the result is one global array copied on every device; each host gets its own copy.
  return result if jax.process_count() == 1 else devices.local_copy(result)


@functools.partial(speedups.jit_forward, static_argnames=("options", "mesh"))
def _images_program(params, images, labels, key, indices, baseline_array, *, options, mesh):
  """Attributes ``images[j]`` with key ``fold_in(key, indices[j])``; with a mesh, one image shard per device.

  ``indices`` (``i32[N]``, split over the mesh like the images) lets each of several hosts number its own rows.
  """
  per_image_baseline = baseline_array is not None and baseline_array.ndim == 4

  def local(params, images, labels, key, indices, baseline_array):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    if per_image_baseline:
      xs = (images, labels, keys, baseline_array)
      one = lambda args: _attribute_one(params, *args, options)
    else:
      xs = (images, labels, keys)
      one = lambda args: _attribute_one(params, *args, baseline_array, options)
    # lax.map, not vmap: each image's padding-skipping lax.cond stays a real branch, and memory stays bounded.
    return jax.lax.map(one, xs)

  if mesh is None:
    return local(params, images, labels, key, indices, baseline_array)
  rows, whole = P(devices.axes(mesh)), P()
  in_specs = (whole, rows, rows, whole, rows, rows if per_image_baseline else whole)
  # check_vma=False as in _permutations_program: the per-device program is the one-device program.
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(
      params, images, labels, key, indices, baseline_array)


def run_images(params: model.AutoencoderParams, images, labels, key: jax.Array, *, offset: int, baseline_array,
               options: AttributionOptions, mesh=None) -> sampling.ShapleyResult:
  """Dispatches one compiled batch program on prepared inputs (asynchronously: JAX returns before it finishes).

  Image ``j`` uses ``fold_in(key, offset + j)``. With a mesh, ``images`` and ``labels`` must hold a multiple
  of this process's device count of rows (they are split over the mesh) and ``params``, ``key`` and a shared
  baseline must be replicated (:func:`shapjax.devices.replicate`). Several processes each pass their own rows
  (the same number on every process) and their own ``offset``: the index of their ``images[0]``.

  Args:
    params: autoencoder params.
    images: ``f32[N, H, W, C]`` checked by :func:`prepare`.
    labels: ``i32[N, H, W]``.
    key: PRNG key.
    offset: index of ``images[0]`` in the whole run (of this process's ``images[0]``, with several).
    baseline_array: None, ``f32[H, W, C]`` or ``f32[N, H, W, C]``.
    options: from :func:`prepare`.
    mesh: split the images over this mesh, or None for the default device.

  Returns:
    :class:`shapjax.ShapleyResult` with a leading axis of size N (global, batch-sharded with a mesh: with
    several processes, N is every process's rows; :func:`shapjax.devices.local_rows` gives this one's).
  """
  # Each row carries its own key index: hosts number their rows themselves, whatever their place in the mesh.
  indices = np.int32(offset) + np.arange(images.shape[0], dtype=np.int32)
  if mesh is None:
    return _images_program(params, images, labels, key, jnp.asarray(indices), baseline_array, options=options,
                           mesh=None)
  indices = devices.put_rows(indices, mesh)
  images, labels = devices.put_rows(images, mesh), devices.put_rows(labels, mesh)
  if baseline_array is not None and baseline_array.ndim == 4:
    baseline_array = devices.put_rows(baseline_array, mesh)
  return _images_program(params, images, labels, key, indices, baseline_array, options=options, mesh=mesh)


def default_key(key: jax.Array | None) -> jax.Array:
  """``key`` itself, or ``jax.random.key(0)`` when None."""
  return jax.random.key(DEFAULT_KEY_SEED) if key is None else key


def attribute(
    params: model.AutoencoderParams,
    image: ArrayLike,
    labels: ArrayLike,
    n_perm: int = DEFAULT_N_PERM,
    *,
    key: jax.Array | None = None,
    baseline: str | float | ArrayLike = masking.DEFAULT_BASELINE,
    blur_sigma: float = masking.DEFAULT_BLUR_SIGMA,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    batch_size: int | None = None,
    estimator: str | None = None,
    index=sampling.DEFAULT_INDEX,
    game: str | None = None,
    tol: float | None = None,
    max_evals: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> sampling.ShapleyResult:
  """Shapley value (or another semivalue) of each superpixel for the autoencoder's reconstruction loss.

  (Or for an inpainter's error on hidden regions: ``game="inpainting"``, the default for
  :class:`shapjax.InpainterParams`.) ``v(S)`` is the mean over all pixels and channels of the squared error between the autoencoder's
  reconstruction of the composite ``x_S`` and ``x_S`` itself, where ``x_S`` keeps the regions in S and takes
  the others from the baseline. The region with the largest value is the likeliest anomaly.

  Inputs are checked before anything is compiled (:func:`prepare`). Label ids ``>= max(labels) + 1`` are
  padding: null players that get exactly 0 and cost no evaluation, so one compiled program serves every image
  of a shape. The function also works inside a user's ``jit`` (value checks are then skipped).

  Args:
    params: autoencoder params (:func:`shapjax.init_autoencoder`, :func:`shapjax.train`,
      :func:`shapjax.load`).
    image: ``f32[H, W, C]`` in ``[0, 1]``, or ``uint8[H, W, C]`` (``[H, W]`` for a grey model); H and W must
      be the model's (``params.config.image_shape``).
    labels: ``i32[H, W]`` region ids in ``[0, max_regions)``, e.g. from :func:`shapjax.segment`.
    n_perm: permutations (or kernel units) to sample: even for ``"antithetic"``, a multiple of 16 for
      ``"stratified"``; the block size with ``tol``.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    baseline: what absent regions become: ``"blur"``, ``"mean"``, ``"zeros"``, a float, or an
      ``f32[H, W, C]`` array such as the mean normal image.
    blur_sigma: Gaussian sigma in pixels for ``baseline="blur"``.
    max_regions: number of players (padded region count); the same default as :func:`shapjax.segment`.
    batch_size: composites per autoencoder call (bounds memory; does not change the sample). Default: 16 on
      CPU, 64 on other backends (:func:`shapjax.sampling.default_batch_size`).
    estimator: for Shapley ``"antithetic"`` (default), ``"permutation"``, ``"stratified"`` or ``"kernel"``;
      for other indices see :func:`shapjax.shapley_values`. None picks the index's default.
    index: ``"shapley"`` (default), ``"banzhaf"``, ``"loo"`` (leave-one-out: ``n_regions + 2`` evaluations,
      no sampling) or ``("beta", alpha, beta)`` (Beta Shapley; ``alpha > beta`` weights small coalitions).
    game: ``"reconstruction"`` (the loss above; needs an autoencoder) or ``"inpainting"`` (needs an
      inpainter, :func:`shapjax.init_inpainter`: the coalition's regions stay visible, the others are hidden
      and inpainted, ``v(S)`` is minus the error on the hidden pixels summed and divided by ``H * W``, as in
      :func:`shapjax.inpainted_value_fn`; ``baseline`` and ``blur_sigma`` are ignored). None: the game of the
      model's kind.
    tol: stop when ``max(stderr) < tol * (max(values) - min(values))`` over the image's regions, running
      blocks of ``n_perm`` units (one compiled program); None runs ``n_perm`` units once. Needs concrete labels.
    max_evals: evaluation budget with ``tol`` (default: 64 blocks); ``converged`` is False when it ran out.
    mesh: split the permutations across the devices of this mesh (:func:`shapjax.make_mesh`): ``n_perm`` must
      be a multiple of the device count times the estimator's group (2 for ``"antithetic"``, 16 for
      ``"stratified"``); the same values to float tolerance. On a CPU, one XLA device per core
      (:func:`shapjax.use_cpu_devices`) is faster than one multi-threaded device. Not combined with ``tol``.

  Returns:
    :class:`shapjax.ShapleyResult` with ``values`` and ``stderr`` of shape ``[max_regions]``, and
    ``additivity``: how close this image's game is to additive (1: every region acts alone).

  Example:
    >>> import jax, numpy as np, shapjax
    >>> params = shapjax.init_autoencoder((32, 32, 3), key=jax.random.key(0), features=(8, 16))
    >>> image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    >>> labels = shapjax.segment(image, max_regions=8)
    >>> result = shapjax.attribute(params, image, labels, 4, max_regions=8)
    >>> result.values.shape
    (8,)
  """
  prepared = prepare(params, image, labels, n_perm, baseline=baseline, blur_sigma=blur_sigma,
                     max_regions=max_regions, batch_size=batch_size, estimator=estimator, index=index, game=game)
  sampling.check_stopping(tol, max_evals)
  key = default_key(key)
  if mesh is not None:
    if tol is not None:
      raise ValueError("attribute: give either mesh or tol, not both")
    return _attribute_on_mesh(params, prepared, key, mesh)
  if tol is not None:
    return _attribute_until(params, prepared.images, prepared.labels, key, prepared.baseline, prepared.options,
                            tol=tol, max_evals=max_evals)
  return _attribute_jit(params, prepared.images, prepared.labels, key, prepared.baseline, options=prepared.options)


def attribute_batch(
    params: model.AutoencoderParams,
    images: ArrayLike,
    labels: ArrayLike,
    n_perm: int = DEFAULT_N_PERM,
    *,
    key: jax.Array | None = None,
    baseline: str | float | ArrayLike = masking.DEFAULT_BASELINE,
    blur_sigma: float = masking.DEFAULT_BLUR_SIGMA,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    batch_size: int | None = None,
    estimator: str | None = None,
    index=sampling.DEFAULT_INDEX,
    game: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> sampling.ShapleyResult:
  """:func:`attribute` for N images of one shape, as one compiled program.

  Image ``i`` uses the key ``fold_in(key, i)``, so ``attribute_batch(...)[i]`` equals
  ``attribute(params, images[i], labels[i], key=fold_in(key, i))``, with or without ``mesh``.

  Args:
    params: autoencoder params.
    images: ``f32[N, H, W, C]`` in ``[0, 1]`` or ``uint8[N, H, W, C]``.
    labels: ``i32[N, H, W]``.
    n_perm: permutations per image.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    baseline: as in :func:`attribute`; an array may also be ``f32[N, H, W, C]`` (one baseline per image).
    blur_sigma: Gaussian sigma for ``baseline="blur"``.
    max_regions: number of players.
    batch_size: composites per autoencoder call (default: 16 on CPU, 64 elsewhere).
    estimator: as in :func:`attribute` (None: the index's default).
    index: ``"shapley"`` (default), ``"banzhaf"``, ``"loo"`` or ``("beta", alpha, beta)``, as in
      :func:`attribute`.
    game: ``"reconstruction"``, ``"inpainting"`` or None (the model's own), as in :func:`attribute`.
    mesh: a ``jax.sharding.Mesh`` (e.g. :func:`shapjax.make_mesh`) to split the images across its devices,
      one shard per device with no communication; N is padded to a multiple of the device count. Several
      processes (after ``jax.distributed.initialize()``, a mesh over every process's devices) each pass their
      own images (any number each; the same params, key and shared baseline) and get back their own
      images' values; process ``p``'s image ``i`` uses ``fold_in(key, n_0 + ... + n_(p-1) + i)``, as in one
      process given every process's images in process order.

  Returns:
    :class:`shapjax.ShapleyResult` whose fields have a leading axis of size N.
  """
  prepared = prepare(params, images, labels, n_perm, batched=True, baseline=baseline, blur_sigma=blur_sigma,
                     max_regions=max_regions, batch_size=batch_size, estimator=estimator, index=index, game=game)
  key = default_key(key)
  if mesh is None:
    return run_images(params, prepared.images, prepared.labels, key, offset=0, baseline_array=prepared.baseline,
                      options=prepared.options)
  mesh = devices.check_mesh(mesh)
  n_images = prepared.images.shape[0]
  counts = devices.process_counts(n_images)  # several processes: every one pads to the largest count
  n_local = devices.local_size(mesh)
  n_rows = -(-int(counts.max()) // n_local) * n_local
  baseline_array = prepared.baseline
  if baseline_array is not None:
    baseline_array = (devices.pad_rows(np.asarray(baseline_array), n_rows) if baseline_array.ndim == 4
                      else devices.replicate(baseline_array, mesh))
  params, key = devices.replicate((params, key), mesh)
  result = run_images(params, devices.pad_rows(np.asarray(prepared.images), n_rows),
                      devices.pad_rows(np.asarray(prepared.labels), n_rows), key,
                      offset=int(counts[:jax.process_index()].sum()), baseline_array=baseline_array,
                      options=prepared.options, mesh=mesh)
  if jax.process_count() > 1:  # this process's rows, on its first device
    return jax.tree.map(lambda x: jnp.asarray(devices.local_rows(x)[:n_images], device=jax.local_devices()[0]),
                        result)
  if n_rows != n_images:  # drop the padding rows; gathered first, which any mesh's axis types allow
    result = jax.tree.map(lambda x: devices.replicate(x, mesh)[:n_images], result)
  return result
