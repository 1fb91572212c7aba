"""Coalitions of regions -> pixel masks -> composites of the image with a baseline, or inpainted images.

A coalition ``bool[R]`` keeps the pixels of its regions from the image and takes every other pixel from the
baseline: ``composite = mask * image + (1 - mask) * baseline`` (:func:`masked_value_fn`), or from an inpainting
model that sees the kept pixels only (:func:`inpainted_value_fn`).
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


def inpainted_value_fn(
    inpaint_fn: Callable[[jax.Array, jax.Array], jax.Array],
    image: ArrayLike,
    labels: ArrayLike,
) -> Callable[[jax.Array], jax.Array]:
  """The inpainting game: a coalition's regions stay visible, the others are hidden and inpainted.

  ``v(S) = -(1 / (H * W)) * sum over the pixels hidden by S of the mean over channels of
  (inpaint_fn(image, visible_S) - image) ** 2``. So ``v(all regions) = 0``, a region's marginal contribution is
  the error that revealing it removes, the values add up to ``v(N) - v(empty)``: the error of inpainting the
  whole image from nothing, and a region that a model trained on normal images cannot inpaint from its
  surroundings (an anomaly) gets the largest value. Unlike a baseline composite, a hidden region's error depends
  on which neighbours are visible: the game has interactions. The leave-one-out value ``v(N) - v(N \\ {i})`` is
  the error of hiding region ``i`` alone. Pass the result to :func:`shapjax.shapley_values` with ``n_players``
  equal to the number of region ids; ids with no pixel are null players. Usable inside ``jit``.

  The image passed to ``inpaint_fn`` is the whole image, hidden pixels included: a model must ignore them
  (:func:`shapjax.inpaint` zeroes them unless its config asks for a low-resolution context).

  Args:
    inpaint_fn: ``(images: f32[B, H, W, C], visible: f32[B, H, W]) -> f32[B, H, W, C]``, any JAX function
      that fills the hidden pixels (``visible == 0``), e.g. ``functools.partial(shapjax.inpaint, params)``.
      Only its output on hidden pixels counts.
    image: ``f32[H, W, C]``.
    labels: ``i32[H, W]`` region ids.

  Returns:
    ``value_fn(coalitions: bool[B, R]) -> f32[B]``, ``coalitions[b, i]`` True when region ``i`` is visible.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, shapjax
    >>> image = jnp.ones((8, 8, 1)); labels = jnp.asarray(np.repeat(np.arange(4), 16).reshape(8, 8))
    >>> fill_zeros = lambda images, visible: images * visible[..., None]   # an inpainter that paints 0
    >>> value_fn = shapjax.inpainted_value_fn(fill_zeros, image, labels)
    >>> [float(v) for v in shapjax.exact_shapley(value_fn, 4).values]   # each: 16 pixels of error 1, / 64
    [0.25, 0.25, 0.25, 0.25]
  """
  image = jnp.asarray(image, jnp.float32)
  labels = jnp.asarray(labels)
  height, width = labels.shape

  def value_fn(coalitions: jax.Array) -> jax.Array:
    visible = pixel_masks(coalitions, labels)[..., 0]
    images = jnp.broadcast_to(image, (visible.shape[0], *image.shape))
    filled = jnp.asarray(inpaint_fn(images, visible), jnp.float32)
    error = jnp.mean(jnp.square(filled - images), axis=-1)
    # Only hidden pixels count: v(all) is exactly 0 whatever the function does to visible ones.
    return -jnp.sum(jnp.where(visible > 0, 0.0, error), axis=(1, 2)) / (height * width)

  return value_fn


def grid_visible_masks(height: int, width: int, cell_sizes: tuple[int, ...] = (8, 16)) -> np.ndarray:
  """Square-cell hiding passes that hide every pixel exactly once per cell size: ``bool[4 * len(sizes), H, W]``.

  For each size, cells of ``size x size`` pixels are split by the parity of their row and column into four
  phases; pass ``(size, phase)`` hides the cells of that phase, so every hidden cell is surrounded by visible
  ones. True where a pixel stays visible.
  """
  rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
  masks = [~(((rows // size) % 2 == dy) & ((cols // size) % 2 == dx))
           for size in cell_sizes for dy in (0, 1) for dx in (0, 1)]
  return np.stack(masks)


def grid_inpainting_error(
    inpaint_fn: Callable[[jax.Array, jax.Array], jax.Array],
    image: ArrayLike,
    *,
    cell_sizes: tuple[int, ...] = (8, 16),
) -> jax.Array:
  """The inpainter's own anomaly map, no game: each pixel's error when its grid cell is hidden (as RIAD does).

  Each pixel's squared error (mean over channels) is taken from the one pass of :func:`grid_visible_masks` that
  hid it, then averaged over the cell sizes. All passes run as one batch of ``4 * len(cell_sizes)`` images.

  Args:
    inpaint_fn: ``(images: f32[B, H, W, C], visible: f32[B, H, W]) -> f32[B, H, W, C]``, as in
      :func:`inpainted_value_fn`.
    image: ``f32[H, W, C]``.
    cell_sizes: side lengths of the hidden cells in pixels (static).

  Returns:
    ``f32[H, W]``.
  """
  image = jnp.asarray(image, jnp.float32)
  height, width, _ = image.shape
  visible = jnp.asarray(grid_visible_masks(height, width, tuple(cell_sizes)), jnp.float32)
  images = jnp.broadcast_to(image, (visible.shape[0], *image.shape))
  error = jnp.mean(jnp.square(jnp.asarray(inpaint_fn(images, visible), jnp.float32) - images), axis=-1)
  hidden_error = jnp.where(visible > 0, 0.0, error)  # each pixel is hidden in exactly one pass per size
  return jnp.sum(hidden_error, axis=0) / len(cell_sizes)


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
