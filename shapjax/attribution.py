"""attribute(): Shapley values of superpixels for the autoencoder's reconstruction loss.

The characteristic function of an image ``x`` with label map ``labels`` and baseline ``b`` is

    v(S) = mean over pixels and channels of (AE(x_S) - x_S) ** 2,   x_S = m_S * x + (1 - m_S) * b,

where ``m_S`` is 1 on the pixels of the regions in S. A region whose presence raises the reconstruction loss
(the autoencoder, trained on normal images only, cannot reproduce it) gets a large positive value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from shapjax import compilation, masking, model, sampling, segmentation

DEFAULT_N_PERM = 32
DEFAULT_KEY_SEED = 0


def _as_image(image, config: model.AutoencoderConfig, *, batched: bool) -> jax.Array:
  """Checks an image (or a batch) against the model and returns it as float32 in [0, 1]."""
  rank = 4 if batched else 3
  what = "images" if batched else "image"
  expected = "[N, H, W, C]" if batched else "[H, W, C]"
  if not hasattr(image, "shape") or not hasattr(image, "dtype"):
    image = np.asarray(image)
  if image.ndim == rank - 1 and config.image_shape[-1] == 1:
    image = image[..., None]
  if image.ndim != rank:
    raise ValueError(f"{what} must have shape {expected}, got shape {tuple(image.shape)}")
  if image.shape[-1] != config.image_shape[-1]:
    raise ValueError(f"{what} has {image.shape[-1]} channels but the autoencoder expects "
                     f"{config.image_shape[-1]} (image shape {tuple(image.shape)})")
  dtype = np.dtype(image.dtype)
  if dtype == np.uint8:
    return jnp.asarray(image, jnp.float32) / 255.0
  if not np.issubdtype(dtype, np.floating):
    raise TypeError(f"{what} must be float in [0, 1] or uint8, got dtype {dtype}")
  if not compilation.is_traced(image) and not bool(np.all(np.isfinite(np.asarray(image)))):
    raise ValueError(f"{what} contains NaN or inf")
  return jnp.asarray(image, jnp.float32)


def _as_labels(labels, image_hw: tuple[int, ...], max_regions: int, *, batched: bool) -> jax.Array:
  if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
    labels = np.asarray(labels)
  expected = tuple(image_hw)
  if tuple(labels.shape) != expected:
    raise ValueError(f"labels must have the image's {'batch, ' if batched else ''}height and width "
                     f"{expected}, got shape {tuple(labels.shape)}")
  if not np.issubdtype(np.dtype(labels.dtype), np.integer):
    raise TypeError(f"labels must be an integer array of region ids, got dtype {labels.dtype}")
  if not compilation.is_traced(labels):
    host = np.asarray(labels)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= max_regions:
      raise ValueError(f"labels must lie in [0, max_regions) = [0, {max_regions}), got values in [{lo}, {hi}]; "
                       "segment with the same max_regions or raise max_regions")
  return jnp.asarray(labels, jnp.int32)


def _check_options(n_perm, max_regions, batch_size, estimator):
  if not isinstance(max_regions, (int, np.integer)) or max_regions < 1:
    raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
  sampling._check_counts(int(max_regions), n_perm, batch_size, estimator)


def _split_baseline(baseline, image_shape, *, batch_shape=None):
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
  if not compilation.is_traced(array) and not bool(np.all(np.isfinite(np.asarray(array, np.float64)))):
    raise ValueError("baseline contains NaN or inf")
  return None, jnp.broadcast_to(jnp.asarray(array, jnp.float32), target)


def _value_fn(params, image, labels, baseline_array, *, baseline_kind, blur_sigma):
  baseline = baseline_kind if baseline_kind is not None else baseline_array

  def score_fn(images):
    return model.reconstruction_loss(params, images)

  return masking.masked_value_fn(score_fn, image, labels, baseline=baseline, blur_sigma=blur_sigma)


def _attribute_block(params, image, labels, key, baseline_array, state, start, v_empty_full, *, n_perm,
                     max_regions, batch_size, estimator, baseline_kind, blur_sigma):
  """Units ``start .. start + n_perm - 1`` merged into ``state``: ``(state, result so far)``."""
  value_fn = _value_fn(params, image, labels, baseline_array, baseline_kind=baseline_kind, blur_sigma=blur_sigma)
  player_mask = jnp.arange(max_regions) < jnp.max(labels) + 1
  if v_empty_full is None:
    v_empty_full = sampling.endpoint_values(value_fn, player_mask)
  return sampling.estimate_block(
      value_fn, max_regions, n_perm, key=key, start=start, state=state, active=player_mask,
      v_empty_full=v_empty_full, batch_size=batch_size, estimator=estimator)


def _attribute_one(params, image, labels, key, baseline_array, **static):
  state = sampling.init_state(static["max_regions"], static["estimator"])
  _, result = _attribute_block(params, image, labels, key, baseline_array, state, 0, None, **static)
  return result


_STATIC = ("n_perm", "max_regions", "batch_size", "estimator", "baseline_kind", "blur_sigma")


@functools.partial(compilation.jit_forward, static_argnames=_STATIC)
def _attribute_jit(params, image, labels, key, baseline_array, **static):
  return _attribute_one(params, image, labels, key, baseline_array, **static)


def _attribute_exportable(weights, image, labels, key_data, baseline_array, *, config, key_impl, **static):
  """:func:`_attribute_one` over built-in containers only, for :func:`shapjax.compilation.call`."""
  params = model.AutoencoderParams(weights=weights, config=config)
  result = _attribute_one(params, image, labels, compilation.wrap_key(key_data, key_impl), baseline_array, **static)
  return (result.values, result.stderr, result.n_evals, result.converged)


@functools.partial(compilation.jit_forward, static_argnames=("baseline_kind", "blur_sigma"))
def _attribute_endpoints_jit(params, image, labels, baseline_array, player_mask, *, baseline_kind, blur_sigma):
  value_fn = _value_fn(params, image, labels, baseline_array, baseline_kind=baseline_kind, blur_sigma=blur_sigma)
  return sampling.endpoint_values(value_fn, player_mask)


@functools.partial(compilation.jit_forward, static_argnames=_STATIC)
def _attribute_block_jit(params, image, labels, key, baseline_array, state, start, v_empty_full, **static):
  return _attribute_block(params, image, labels, key, baseline_array, state, start, v_empty_full, **static)


@functools.partial(compilation.jit_forward, static_argnames=_STATIC)
def _attribute_batch_jit(params, images, labels, key, baseline_array, **static):
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
  if baseline_array is not None and baseline_array.ndim == 4:
    xs = (images, labels, keys, baseline_array)
    one = lambda args: _attribute_one(params, *args, **static)
  else:
    xs = (images, labels, keys)
    one = lambda args: _attribute_one(params, *args, baseline_array, **static)
  # lax.map, not vmap: each image's padding-skipping lax.cond stays a real branch, and memory stays bounded.
  return jax.lax.map(one, xs)


def _attribute_until(params, image, labels, key, baseline_array, *, tol, max_evals, **static):
  """Blocks of ``n_perm`` units until the tolerance is met or ``max_evals`` would be exceeded."""
  if compilation.is_traced(labels):
    raise ValueError("tol needs concrete labels (the budget depends on the number of regions): call attribute "
                     "outside jit, or pass tol=None")
  n_regions = int(np.max(np.asarray(labels))) + 1
  player_mask = jnp.arange(static["max_regions"]) < n_regions
  v_empty_full = _attribute_endpoints_jit(params, image, labels, baseline_array, player_mask,
                                          baseline_kind=static["baseline_kind"], blur_sigma=static["blur_sigma"])

  def block_fn(state, start):
    return _attribute_block_jit(params, image, labels, key, baseline_array, state, start, v_empty_full, **static)

  estimator = static["estimator"]
  return sampling.run_blocks(block_fn, sampling.init_state(static["max_regions"], estimator),
                             n_perm=static["n_perm"], units_cost=sampling.evals_per_unit(n_regions, estimator),
                             tol=tol, max_evals=max_evals, active=player_mask)


def _default_key(key):
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
    estimator: str = sampling.DEFAULT_ESTIMATOR,
    tol: float | None = None,
    max_evals: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> sampling.ShapleyResult:
  """Shapley value of each superpixel for the autoencoder's reconstruction loss.

  ``v(S)`` is the mean over all pixels and channels of the squared error between the autoencoder's
  reconstruction of the composite ``x_S`` and ``x_S`` itself, where ``x_S`` keeps the regions in S and takes
  the others from the baseline. The region with the largest value is the likeliest anomaly.

  Inputs are checked before anything is compiled. Label ids ``>= max(labels) + 1`` are padding: null players
  that get exactly 0 and cost no evaluation, so one compiled program serves every image of a shape. The
  function also works inside a user's ``jit`` (value checks are then skipped).

  Args:
    params: autoencoder params (:func:`shapjax.init_autoencoder`, :func:`shapjax.train`,
      :func:`shapjax.load`).
    image: ``f32[H, W, C]`` in ``[0, 1]`` or ``uint8[H, W, C]`` (``[H, W]`` for a grey model).
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
    estimator: ``"permutation"``, ``"antithetic"``, ``"stratified"`` or ``"kernel"`` (see
      :func:`shapjax.shapley_values`).
    tol: stop when ``max(stderr) < tol * (max(values) - min(values))`` over the image's regions, running
      blocks of ``n_perm`` units (one compiled program); None runs ``n_perm`` units once. Needs concrete labels.
    max_evals: evaluation budget with ``tol`` (default: 64 blocks); ``converged`` is False when it ran out.
    mesh: split the permutations across the devices of this mesh (:func:`shapjax.attribute_sharded`; the
      same values to float tolerance). On a CPU, one XLA device per core (:func:`shapjax.use_cpu_devices`)
      is faster than one multi-threaded device. Not combined with ``tol``.

  Returns:
    :class:`shapjax.ShapleyResult` with ``values`` and ``stderr`` of shape ``[max_regions]``.

  Example:
    >>> import jax, numpy as np, shapjax
    >>> params = shapjax.init_autoencoder((32, 32, 3), key=jax.random.key(0), features=(8, 16))
    >>> image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    >>> labels = shapjax.segment(image, max_regions=8)
    >>> result = shapjax.attribute(params, image, labels, 4, max_regions=8)
    >>> result.values.shape
    (8,)
  """
  if mesh is not None:  # attribute_sharded checks the inputs as below
    if tol is not None:
      raise ValueError("attribute: give either mesh or tol, not both")
    from shapjax import distributed  # pylint: disable=g-import-not-at-top
    return distributed.attribute_sharded(params, image, labels, n_perm, mesh=mesh, key=key, baseline=baseline,
                                         blur_sigma=blur_sigma, max_regions=max_regions, batch_size=batch_size,
                                         estimator=estimator)
  model._check_params(params)
  batch_size = sampling.default_batch_size(batch_size)
  _check_options(n_perm, max_regions, batch_size, estimator)
  image = _as_image(image, params.config, batched=False)
  labels = _as_labels(labels, image.shape[:2], int(max_regions), batched=False)
  kind, array = _split_baseline(baseline, image.shape)
  sampling._check_stopping(tol, max_evals)
  if tol is not None:
    return _attribute_until(params, image, labels, _default_key(key), array, tol=tol, max_evals=max_evals,
                            n_perm=int(n_perm), max_regions=int(max_regions), batch_size=int(batch_size),
                            estimator=estimator, baseline_kind=kind, blur_sigma=float(blur_sigma))
  static = dict(n_perm=int(n_perm), max_regions=int(max_regions), batch_size=int(batch_size), estimator=estimator,
                baseline_kind=kind, blur_sigma=float(blur_sigma))
  key = _default_key(key)
  if compilation.exported_programs_enabled((params.weights, image, labels, key, array)):
    key_data, key_impl = compilation.key_parts(key)
    args = (params.weights, image, labels, key_data, array)
    fields = compilation.call("attribute", _attribute_exportable, args, dict(config=params.config, key_impl=key_impl,
                                                                             **static),
                              compiler_options=compilation.forward_options(args))
    return sampling.ShapleyResult(*fields)
  return _attribute_jit(params, image, labels, key, array, **static)


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
    estimator: str = sampling.DEFAULT_ESTIMATOR,
    mesh: jax.sharding.Mesh | None = None,
) -> sampling.ShapleyResult:
  """:func:`attribute` for N images of one shape, as one compiled program.

  Image ``i`` uses the key ``fold_in(key, i)``, so ``attribute_batch(...)[i]`` equals
  ``attribute(params, images[i], labels[i], key=fold_in(key, i))``, with or without ``mesh``.

  Args:
    params: autoencoder params.
    images: ``f32[N, H, W, C]`` or ``uint8[N, H, W, C]``.
    labels: ``i32[N, H, W]``.
    n_perm: permutations per image.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    baseline: as in :func:`attribute`; an array may also be ``f32[N, H, W, C]`` (one baseline per image).
    blur_sigma: Gaussian sigma for ``baseline="blur"``.
    max_regions: number of players.
    batch_size: composites per autoencoder call (default: 16 on CPU, 64 elsewhere).
    estimator: ``"permutation"``, ``"antithetic"``, ``"stratified"`` or ``"kernel"`` (see
      :func:`shapjax.shapley_values`).
    mesh: a ``jax.sharding.Mesh`` (e.g. :func:`shapjax.make_mesh`) to split the images across its devices,
      one shard per device with no communication; N is padded to a multiple of the device count.

  Returns:
    :class:`shapjax.ShapleyResult` whose fields have a leading axis of size N.
  """
  model._check_params(params)
  batch_size = sampling.default_batch_size(batch_size)
  _check_options(n_perm, max_regions, batch_size, estimator)
  images = _as_image(images, params.config, batched=True)
  labels = _as_labels(labels, images.shape[:3], int(max_regions), batched=True)
  kind, array = _split_baseline(baseline, images.shape[1:], batch_shape=images.shape)
  if mesh is not None:
    from shapjax import distributed  # the sharded program builds on this module's per-image core

    return distributed._attribute_batch_on_mesh(
        params, images, labels, _default_key(key), array, mesh=mesh, n_perm=int(n_perm),
        max_regions=int(max_regions), batch_size=int(batch_size), estimator=estimator, baseline_kind=kind,
        blur_sigma=float(blur_sigma))
  return _attribute_batch_jit(params, images, labels, _default_key(key), array, n_perm=int(n_perm),
                              max_regions=int(max_regions), batch_size=int(batch_size), estimator=estimator,
                              baseline_kind=kind, blur_sigma=float(blur_sigma))
