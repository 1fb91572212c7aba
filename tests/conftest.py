"""Test set-up: four fake CPU devices, strict rank promotion, a key fixture, tiny shared fixtures."""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
  return jax.random.key(0)


def stripes_labels(height: int, width: int, n_regions: int) -> np.ndarray:
  """A label map of ``n_regions`` vertical stripes (consecutive ids)."""
  return np.minimum(np.arange(width) * n_regions // width, n_regions - 1)[None, :].repeat(height, 0).astype(
      np.int32)
