"""Superpixels on the CPU: SLIC label maps padded to a fixed number of regions.

This module is numpy and scikit-image only (no JAX): segmentation runs on the host while the accelerator
attributes the previous batch.

Every label map returned here holds consecutive region ids ``0 .. n_regions - 1`` with
``n_regions <= max_regions``; ids ``n_regions .. max_regions - 1`` never occur and are the padding players
that the sampler treats as null players. One compiled attribution program therefore serves every image of a
shape.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
import skimage.segmentation

from shapjax import pixels

DEFAULT_MAX_REGIONS = 64
"""Default number of players: the SLIC target and the padded label count."""

# scikit-image's SLIC returns far fewer regions than asked on small images (its grid step is rounded and
# connectivity enforcement merges small fragments). We raise the request geometrically until the target is met.
_MAX_SLIC_TRIES = 6


def _as_float_image(image) -> np.ndarray:
  """Checks an image's shape for SLIC; values and dtype are checked by :func:`shapjax.pixels.as_float`."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"image must have shape [H, W] or [H, W, C], got shape {image.shape}")
  if image.shape[-1] not in (1, 3):
    raise ValueError(f"image must have 1 (grey) or 3 (RGB) channels, got {image.shape[-1]} (shape {image.shape})")
  if min(image.shape[:2]) < 2:
    raise ValueError(f"image is too small to segment: shape {image.shape}")
  return pixels.as_float(image).astype(np.float64)


def _relabel_consecutive(labels: np.ndarray) -> np.ndarray:
  _, inverse = np.unique(labels, return_inverse=True)
  return inverse.reshape(labels.shape).astype(np.int32)


def _merge_smallest(labels: np.ndarray, max_regions: int) -> np.ndarray:
  """Merges the smallest region into the neighbour it shares the longest border with, until few enough."""
  labels = _relabel_consecutive(labels)
  n = int(labels.max()) + 1
  while n > max_regions:
    sizes = np.bincount(labels.ravel(), minlength=n)
    small = int(np.argmin(sizes))
    inside = labels == small
    # Pixels adjacent (4-connectivity) to the region, and the labels they carry.
    border = np.zeros_like(inside)
    border[1:] |= inside[:-1]
    border[:-1] |= inside[1:]
    border[:, 1:] |= inside[:, :-1]
    border[:, :-1] |= inside[:, 1:]
    neighbours = labels[border & ~inside]
    if neighbours.size == 0:  # a region with no neighbour is the whole image
      break
    target = int(np.bincount(neighbours).argmax())
    labels[inside] = target
    labels = _relabel_consecutive(labels)
    n -= 1
  return labels


def segment(
    image: np.ndarray,
    *,
    max_regions: int = DEFAULT_MAX_REGIONS,
    n_segments: int | None = None,
    compactness: float = 10.0,
    sigma: float = 0.5,
) -> np.ndarray:
  """Splits an image into at most ``max_regions`` SLIC superpixels.

  SLIC is k-means clustering in colour (CIELAB for RGB, intensity scaled to 0..100 for grey) plus image
  position. Because scikit-image returns fewer regions than requested on small images, the request is raised
  until the count reaches ``n_segments``; if SLIC overshoots ``max_regions`` the smallest regions are merged
  into their neighbours.

  Args:
    image: ``[H, W]`` or ``[H, W, C]`` with C in {1, 3}; uint8 (0..255) or float (about 0..1).
    max_regions: the hard upper bound on the number of regions (the padded player count).
    n_segments: how many regions to aim at; defaults to ``max_regions``.
    compactness: SLIC's balance of colour against position; larger gives squarer regions.
    sigma: Gaussian pre-smoothing of SLIC, in pixels.

  Returns:
    ``i32[H, W]`` label map with consecutive ids ``0 .. n - 1``, ``n <= max_regions``.

  Raises:
    ValueError: for a wrong rank or channel count, NaN or inf, or a non-positive region count.
    TypeError: for a non-numeric image.

  Example:
    >>> import numpy as np, shapjax
    >>> image = np.random.default_rng(0).random((32, 48, 3))
    >>> labels = shapjax.segment(image, max_regions=16)
    >>> labels.shape, labels.dtype, int(labels.max()) < 16
    ((32, 48), dtype('int32'), True)
  """
  if int(max_regions) < 1:
    raise ValueError(f"max_regions must be >= 1, got {max_regions}")
  target = int(max_regions if n_segments is None else n_segments)
  if target < 1:
    raise ValueError(f"n_segments must be >= 1, got {n_segments}")
  target = min(target, int(max_regions))
  image = _as_float_image(image)
  height, width, channels = image.shape
  target = min(target, height * width)
  if channels == 3:
    kwargs = dict(channel_axis=-1, convert2lab=True)
  else:
    # Grey on the scale of CIELAB's L channel, so one compactness serves grey and RGB alike.
    image = image[..., 0] * 100.0
    kwargs = dict(channel_axis=None)

  request = target
  best = None
  for _ in range(_MAX_SLIC_TRIES):
    labels = skimage.segmentation.slic(
        image, n_segments=request, compactness=compactness, sigma=sigma, start_label=0, **kwargs)
    count = int(labels.max()) + 1
    if best is None or abs(count - target) < abs(best[1] - target) or (count >= target and best[1] < target):
      best = (labels, count)
    if count >= target:
      break
    request = int(np.ceil(request * max(1.15, min(2.0, target / max(count, 1)))))
  labels = _merge_smallest(best[0], int(max_regions))
  return labels


def segment_batch(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    max_regions: int = DEFAULT_MAX_REGIONS,
    n_workers: int | None = None,
    **options,
) -> np.ndarray:
  """Segments many images of one shape in parallel on the CPU cores.

  Args:
    images: ``[N, H, W]`` or ``[N, H, W, C]`` array, or a sequence of N images of one shape.
    max_regions: the hard upper bound on regions per image.
    n_workers: threads to use (scikit-image's SLIC releases the GIL); defaults to the CPU count.
    **options: passed to :func:`segment` (``n_segments``, ``compactness``, ``sigma``).

  Returns:
    ``i32[N, H, W]`` stacked label maps.
  """
  images = list(images)
  if not images:
    raise ValueError("segment_batch got no images")
  shapes = {np.shape(image)[:2] for image in images}
  if len(shapes) != 1:
    raise ValueError(f"segment_batch needs images of one height and width, got {sorted(shapes)}")
  n_workers = n_workers or os.cpu_count() or 1
  if n_workers == 1 or len(images) == 1:
    return np.stack([segment(image, max_regions=max_regions, **options) for image in images])
  with concurrent.futures.ThreadPoolExecutor(max_workers=n_workers) as pool:
    return np.stack(list(pool.map(lambda image: segment(image, max_regions=max_regions, **options), images)))
