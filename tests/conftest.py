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


# Parametrized tests whose cases repeat one piece of logic over many estimators, indices or games: the quick tier
# (-m "not slow") runs the first case of each, the full run every case.
FIRST_CASE_QUICK = {
    "test_estimators_converge_to_the_exact_values", "test_additive_games_are_exact", "test_one_active_player_is_exact",
    "test_estimators_converge_to_the_exact_semivalues", "test_additivity_is_one_on_additive_games",
    "test_padding_players_are_exactly_zero_and_cost_nothing", "test_additivity_falls_as_interactions_grow",
    "test_devices_merge_to_the_one_device_estimate", "test_same_key_same_result_whatever_the_batch_size",
}


def pytest_collection_modifyitems(items):
  seen = set()
  for item in items:
    name = getattr(item, "originalname", item.name)
    if name in FIRST_CASE_QUICK and getattr(item, "callspec", None) is not None:
      key = (item.module.__name__, name)
      if key in seen:
        item.add_marker(pytest.mark.slow)
      seen.add(key)
