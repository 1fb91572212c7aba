"""Pixel values: the one place that checks an image's dtype and values and scales it to float in [0, 1].

Every entry point that takes image arrays (segmentation, attribution, training) calls :func:`as_float`, so
the same input gets the same answer, and the same mistake the same message, everywhere. NumPy only.
"""

from __future__ import annotations

import numpy as np

# A float image may stray this far outside [0, 1] (rounding in a user's own conversions) before it is refused.
RANGE_TOLERANCE = 1e-3
_INTEGER_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _concrete(array):
  """The array's values on the host, or None when it is a JAX tracer (inside ``jit``: no values to check)."""
  if isinstance(array, np.ndarray):
    return array
  try:
    return np.asarray(array)
  except TypeError:  # jax.errors.TracerArrayConversionError is a TypeError
    return None


def as_float(images, *, what: str = "image") -> np.ndarray:
  """Checks an image array and returns it as float32 in ``[0, 1]`` (any shape; shapes are the caller's).

  ``uint8`` is scaled by 1/255 and ``uint16`` by 1/65535; a float array must be finite and lie in ``[0, 1]``
  (within :data:`RANGE_TOLERANCE`). A JAX tracer (a call inside ``jit``) gets the dtype check and scaling only.

  Args:
    images: an array of any shape: ``[H, W, C]``, ``[N, H, W, C]``, ...
    what: how to name the input in error messages.

  Returns:
    ``f32`` array of the same shape: numpy, or a tracer for traced input.

  Raises:
    TypeError: a dtype other than float, uint8 or uint16.
    ValueError: NaN or inf, or float values outside ``[0, 1]`` (with the fix: divide by 255).

  Example:
    >>> import numpy as np
    >>> from shapjax import pixels
    >>> pixels.as_float(np.full((2, 2), 255, np.uint8)).max()
    np.float32(1.0)
  """
  if not hasattr(images, "dtype"):
    images = np.asarray(images)
  dtype = np.dtype(images.dtype)
  scale = _INTEGER_SCALES.get(dtype)
  if scale is None and not np.issubdtype(dtype, np.floating):
    raise TypeError(f"{what} must be float in [0, 1], uint8 or uint16, got dtype {dtype}")
  host = _concrete(images)
  if host is None:
    return images.astype(np.float32) if scale is None else images.astype(np.float32) / scale
  if scale is not None:
    return host.astype(np.float32) / np.float32(scale)
  host = host.astype(np.float32, copy=False)
  if host.size:
    if not np.all(np.isfinite(host)):
      raise ValueError(f"{what} contains NaN or inf")
    low, high = float(host.min()), float(host.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
      hint = " (it looks scaled to 0-255: divide by 255, or pass uint8)" if high > 1.5 else ""
      raise ValueError(f"{what} must lie in [0, 1] as a float array, got values in [{low:.4g}, {high:.4g}]{hint}")
  return host
