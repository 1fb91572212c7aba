"""Coalitions of regions -> pixel masks -> composites of the image with a baseline.

A coalition ``bool[R]`` keeps the pixels of its regions from the image and takes every other pixel from the
baseline: ``composite = mask * image + (1 - mask) * baseline``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

BASELINES = ("blur", "mean", "zeros")
DEFAULT_BASELINE = "blur"
DEFAULT_BLUR_SIGMA = 4.0


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(round(3 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(image: ArrayLike, sigma: float) -> jax.Array:
  """Separable Gaussian blur with reflected borders.

  Args:
    image: ``f32[H, W, C]``.
    sigma: standard deviation in pixels (static).

  Returns:
    ``f32[H, W, C]``.
  """
  image = jnp.asarray(image, jnp.float32)
  if sigma <= 0:
    return image
  kernel = jnp.asarray(_gaussian_kernel(float(sigma)))
  radius = (kernel.shape[0] - 1) // 2
  height, width, _ = image.shape
  # Reflection needs the pad to be smaller than the side; 'symmetric' would too, 'edge' never fails.
  mode = "reflect" if radius < min(height, width) else "edge"
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode=mode)
  windows_h = jnp.stack([padded[i:i + height] for i in range(2 * radius + 1)])
  rows = jnp.tensordot(kernel, windows_h, axes=1)
  windows_w = jnp.stack([rows[:, i:i + width] for i in range(2 * radius + 1)])
  return jnp.tensordot(kernel, windows_w, axes=1)


def make_baseline(image: ArrayLike, baseline: str | float | ArrayLike = DEFAULT_BASELINE, *,
                  blur_sigma: float = DEFAULT_BLUR_SIGMA) -> jax.Array:
  """The image that absent regions are replaced with.

  Args:
    image: ``f32[H, W, C]``.
    baseline: ``"blur"`` (Gaussian-blurred copy of the image), ``"mean"`` (the image's mean colour),
      ``"zeros"``, a constant (float), or an array broadcastable to ``[H, W, C]`` such as the mean normal
      training image.
    blur_sigma: standard deviation of the ``"blur"`` baseline, in pixels.

  Returns:
    ``f32[H, W, C]``.
  """
  image = jnp.asarray(image, jnp.float32)
  if isinstance(baseline, str):
    if baseline == "blur":
      return gaussian_blur(image, blur_sigma)
    if baseline == "mean":
      return jnp.broadcast_to(image.mean(axis=(0, 1), keepdims=True), image.shape)
    if baseline == "zeros":
      return jnp.zeros_like(image)
    raise ValueError(f"baseline must be one of {BASELINES}, a float, or an array; got {baseline!r}")
  return jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), image.shape)


def pixel_masks(coalitions: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Paints coalitions onto pixels.

  Args:
    coalitions: ``bool[B, R]``.
    labels: ``i32[H, W]`` region ids in ``[0, R)``.

  Returns:
    ``f32[B, H, W, 1]``: 1 where the pixel's region is in the coalition.
  """
  coalitions = jnp.asarray(coalitions)
  return jnp.take(coalitions.astype(jnp.float32), jnp.asarray(labels), axis=1)[..., None]


def composites(coalitions: ArrayLike, image: ArrayLike, labels: ArrayLike, baseline: ArrayLike) -> jax.Array:
  """``mask * image + (1 - mask) * baseline`` for each coalition: ``f32[B, H, W, C]``."""
  masks = pixel_masks(coalitions, labels)
  image = jnp.asarray(image, jnp.float32)[None]
  baseline = jnp.asarray(baseline, jnp.float32)[None]
  return baseline + masks * (image - baseline)


def masked_value_fn(
    score_fn: Callable[[jax.Array], jax.Array],
    image: ArrayLike,
    labels: ArrayLike,
    *,
    baseline: str | float | ArrayLike = DEFAULT_BASELINE,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> Callable[[jax.Array], jax.Array]:
  """Turns a score of images into a value function of region coalitions.

  ``v(S) = score_fn(composite(S))`` where the composite keeps the regions in S from ``image`` and takes the
  rest from the baseline. Pass the result to :func:`shapjax.shapley_values` with ``n_players`` equal to the
  number of region ids (``max_regions``). Usable inside ``jit`` (image and labels may be traced).

  Args:
    score_fn: ``f32[B, H, W, C] -> f32[B]``, any JAX model or loss.
    image: ``f32[H, W, C]``.
    labels: ``i32[H, W]`` region ids.
    baseline: see :func:`make_baseline`.
    blur_sigma: for ``baseline="blur"``.

  Returns:
    ``value_fn(coalitions: bool[B, R]) -> f32[B]``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, shapjax
    >>> image = jnp.ones((8, 8, 1)); labels = jnp.asarray(np.repeat(np.arange(4), 16).reshape(8, 8))
    >>> value_fn = shapjax.masked_value_fn(lambda x: x.sum(axis=(1, 2, 3)), image, labels, baseline=0.0)
    >>> result = shapjax.shapley_values(value_fn, 4, 4, key=jax.random.key(0))
    >>> [float(v) for v in result.values]
    [16.0, 16.0, 16.0, 16.0]
  """
  image = jnp.asarray(image, jnp.float32)
  labels = jnp.asarray(labels)
  background = make_baseline(image, baseline, blur_sigma=blur_sigma)

  def value_fn(coalitions: jax.Array) -> jax.Array:
    return score_fn(composites(coalitions, image, labels, background))

  return value_fn


def heatmap(values: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Paints per-region values onto pixels.

  Args:
    values: ``f32[..., R]`` one value per region id.
    labels: ``i32[..., H, W]`` with the same leading batch shape as ``values``.

  Returns:
    ``f32[..., H, W]``.
  """
  values = jnp.asarray(values)
  labels = jnp.asarray(labels)
  if values.ndim == 1:
    return values[labels]
  flat_values = values.reshape(-1, values.shape[-1])
  flat_labels = labels.reshape(-1, *labels.shape[-2:])
  return jax.vmap(lambda v, l: v[l])(flat_values, flat_labels).reshape(*labels.shape)
