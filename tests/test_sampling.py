"""The sampler against closed-form games and exact enumeration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from games import additive_game, glove_like_game, pairwise_game

RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=7)
INTERACTIONS = RNG.normal(size=(7, 7))
ADDITIVE = additive_game(WEIGHTS)
PAIRWISE = pairwise_game(WEIGHTS, INTERACTIONS)
GLOVE = glove_like_game(6)


def _third_order(c):
  s = c.astype(jnp.float32)
  return s @ jnp.asarray(WEIGHTS, jnp.float32) + 4.0 * s[:, 0] * s[:, 1] * s[:, 2] - 2.0 * s[:, 3] * s[:, 4] * s[:, 6]


# Each triple's term is shared equally by its three players.
THIRD_ORDER = (_third_order, WEIGHTS + np.array([4, 4, 4, -2, -2, 0, -2]) / 3)


@pytest.mark.parametrize("game", [ADDITIVE, PAIRWISE, GLOVE, THIRD_ORDER],
                         ids=["additive", "pairwise", "symmetric", "third-order"])
def test_exact_shapley_matches_closed_form(game):
  value_fn, expected = game
  result = shapjax.exact_shapley(value_fn, len(expected))
  np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5)
  assert int(result.n_evals) == 2 ** len(expected)


@pytest.mark.parametrize("estimator", ["permutation", "antithetic"])
def test_additive_game_is_exact_for_any_sample(key, estimator):
  value_fn, expected = ADDITIVE
  result = shapjax.shapley_values(value_fn, 7, 4, key=key, estimator=estimator)
  np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["permutation", "antithetic"])
def test_pairwise_game_converges(key, estimator):
  value_fn, expected = THIRD_ORDER
  result = shapjax.shapley_values(value_fn, 7, 2000, key=key, estimator=estimator, batch_size=512)
  error = np.abs(np.asarray(result.values) - expected)
  assert np.all(error < 4 * np.asarray(result.stderr) + 1e-4), (error, result.stderr)
  assert np.linalg.norm(error) / np.linalg.norm(expected) < 0.05


def test_efficiency_is_exact_per_sample(key):
  value_fn, _ = PAIRWISE
  result = shapjax.shapley_values(value_fn, 7, 6, key=key)
  everyone = jnp.ones((1, 7), bool)
  total = value_fn(everyone)[0] - value_fn(jnp.zeros((1, 7), bool))[0]
  np.testing.assert_allclose(result.values.sum(), total, rtol=1e-5)


def test_symmetric_players_and_null_players(key):
  value_fn, expected = GLOVE
  exact = shapjax.exact_shapley(value_fn, 6)
  np.testing.assert_allclose(exact.values, expected, rtol=1e-6)
  # Player 5 is null in this game: it only ever multiplies by zero.
  weights = jnp.asarray([1.0, 2.0, 2.0, -1.0, 0.5, 0.0])

  def with_null(c):
    return c.astype(jnp.float32) @ weights + 3.0 * (c[:, 1] & c[:, 2])

  result = shapjax.shapley_values(with_null, 6, 10, key=key)
  assert float(result.values[5]) == 0.0
  np.testing.assert_allclose(result.values[1], result.values[2], rtol=1e-6)


def test_padding_players_are_exactly_zero_and_cost_nothing(key):
  value_fn, _ = PAIRWISE
  mask = np.array([True] * 5 + [False] * 2)
  result = shapjax.shapley_values(value_fn, 7, 8, key=key, player_mask=mask)
  assert np.all(np.asarray(result.values[5:]) == 0.0)
  assert np.all(np.asarray(result.stderr[5:]) == 0.0)
  assert int(result.n_evals) == 8 * 4 + 2

  # The five active players share v(active) - v(empty) exactly, as in the game restricted to them.
  restricted = shapjax.exact_shapley(lambda c: value_fn(jnp.pad(c, ((0, 0), (0, 2)))), 5)
  sampled = shapjax.shapley_values(value_fn, 7, 4000, key=key, player_mask=mask, batch_size=1024)
  np.testing.assert_allclose(sampled.values[:5], restricted.values, atol=0.15)


def test_error_shrinks_with_more_permutations(key):
  value_fn, expected = THIRD_ORDER
  errors = []
  for n_perm in (8, 128, 2048):
    runs = [shapjax.shapley_values(value_fn, 7, n_perm, key=jax.random.fold_in(key, r), estimator="permutation",
                                   batch_size=256).values for r in range(5)]
    errors.append(np.mean([np.linalg.norm(np.asarray(v) - expected) for v in runs]))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < errors[0] / 6  # about 1 / sqrt(256) = 1/16 in expectation


@pytest.mark.parametrize("estimator", ["permutation", "antithetic"])
def test_same_key_same_result_whatever_the_batch_size(key, estimator):
  value_fn, _ = PAIRWISE
  results = [shapjax.shapley_values(value_fn, 7, 10, key=key, batch_size=b, estimator=estimator)
             for b in (1, 7, 16, 1000)]
  for other in results[1:]:
    np.testing.assert_allclose(other.values, results[0].values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(other.stderr, results[0].stderr, rtol=1e-5, atol=1e-6)


def test_different_keys_give_different_samples(key):
  value_fn, _ = PAIRWISE
  # Plain sampling: antithetic pairs are exact on pairwise games, whatever the key.
  a = shapjax.shapley_values(value_fn, 7, 10, key=key, estimator="permutation")
  b = shapjax.shapley_values(value_fn, 7, 10, key=jax.random.fold_in(key, 1), estimator="permutation")
  assert not np.allclose(a.values, b.values)


def test_antithetic_is_exact_on_pairwise_games(key):
  # Each interaction c_ij is split i-before-j in one permutation of a pair and j-before-i in the other.
  value_fn, expected = PAIRWISE
  result = shapjax.shapley_values(value_fn, 7, 2, key=key, estimator="antithetic")
  np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5)


def test_antithetic_pairs_a_permutation_with_its_reverse(key):
  from shapjax import sampling
  active = jnp.ones(6, bool)
  first = sampling._permutation_ranks(key, jnp.asarray(4), active, "antithetic")
  second = sampling._permutation_ranks(key, jnp.asarray(5), active, "antithetic")
  np.testing.assert_array_equal(np.asarray(first) + np.asarray(second), 5)
  assert sorted(np.asarray(first).tolist()) == list(range(6))


def test_standard_errors_are_calibrated_on_a_closed_form_game(key):
  value_fn, expected = THIRD_ORDER
  inside = []
  for r in range(40):
    result = shapjax.shapley_values(value_fn, 7, 64, key=jax.random.fold_in(key, r), estimator="permutation",
                                    batch_size=512)
    # Player 5 is purely additive: its value is exact and its stderr 0, up to float rounding.
    inside.append(np.abs(np.asarray(result.values) - expected) <= 1.96 * np.asarray(result.stderr) + 1e-5)
  coverage = np.mean(inside)
  assert 0.88 <= coverage <= 0.995, coverage


def test_single_player_and_stderr_with_one_sample(key):
  value_fn, _ = additive_game([2.5])
  result = shapjax.shapley_values(value_fn, 1, 3, key=key, estimator="permutation")
  np.testing.assert_allclose(result.values, [2.5])
  one = shapjax.shapley_values(ADDITIVE[0], 7, 1, key=key, estimator="permutation")
  assert np.all(np.isnan(np.asarray(one.stderr)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_perm=0), "n_perm"),
    (dict(n_perm=3, estimator="antithetic"), "even"),
    (dict(n_perm=4, estimator="sobol-ish"), "estimator"),
    (dict(n_perm=4, batch_size=0), "batch_size"),
    (dict(n_perm=4, player_mask=np.ones(3, bool)), "player_mask"),
])
def test_bad_arguments_are_named(key, kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapjax.shapley_values(ADDITIVE[0], 7, key=key, **kwargs)


def test_exact_shapley_rejects_too_many_players():
  with pytest.raises(ValueError, match="n_players"):
    shapjax.exact_shapley(ADDITIVE[0], 30)
