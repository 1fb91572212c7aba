"""Every estimator against exact values, calibration of its error bars, stopping on tolerance.

Most tests run the traceable core on a game given as a table of its 2 ** 6 coalition values, so that one
compiled program per estimator serves every game (and ``vmap`` runs hundreds of repeats at once); the public
``shapley_values`` and ``attribute`` are tested where they add something: batch sizes, blocks, compilation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from games import additive_game, glove_like_game, pairwise_game
from shapjax import sampling

ESTIMATORS = sampling.ESTIMATORS
RNG = np.random.default_rng(1)
N = 6
WEIGHTS = RNG.normal(size=N)
ADDITIVE = additive_game(WEIGHTS)
PAIRWISE = pairwise_game(WEIGHTS, RNG.normal(size=(N, N)))
GLOVE = glove_like_game(N)
TABLE = jnp.asarray(RNG.normal(size=2 ** N), jnp.float32)  # a game with interactions of every order
BITS = 2 ** jnp.arange(N)


def _random_game(coalitions):
  return TABLE[coalitions.astype(jnp.int32) @ BITS]


def _third_order(c):
  s = c.astype(jnp.float32)
  return s @ jnp.asarray(WEIGHTS, jnp.float32) + 4.0 * s[:, 0] * s[:, 1] * s[:, 2] - 2.0 * s[:, 3] * s[:, 4] * s[:, 5]


THIRD_ORDER = (_third_order, WEIGHTS + np.array([4, 4, 4, -2, -2, -2]) / 3)
RANDOM = (_random_game, np.asarray(shapjax.exact_shapley(_random_game, N).values, np.float64))
GAMES = {"additive": ADDITIVE, "pairwise": PAIRWISE, "symmetric": GLOVE, "third-order": THIRD_ORDER,
         "random": RANDOM}


ALL = jnp.asarray((np.arange(2 ** N)[:, None] >> np.arange(N)[None, :]) & 1 == 1)


def _table(value_fn):
  return value_fn(ALL).astype(jnp.float32)


def _estimate_one(table, key, active, *, n_perm, estimator):
  def value_fn(coalitions):
    return table[coalitions.astype(jnp.int32) @ BITS]

  v_empty_full = sampling.endpoint_values(value_fn, active)
  _, result = sampling.estimate_block(value_fn, N, n_perm, key=key, start=0, state=sampling.init_state(N, estimator),
                                      active=active, v_empty_full=v_empty_full, batch_size=512, estimator=estimator)
  return result


_estimate = jax.jit(_estimate_one, static_argnames=("n_perm", "estimator"))


@functools.partial(jax.jit, static_argnames=("n_perm", "estimator"))
def _estimate_repeats(table, keys, active, *, n_perm, estimator):
  return jax.vmap(lambda k: _estimate_one(table, k, active, n_perm=n_perm, estimator=estimator))(keys)


EVERYONE = jnp.ones(N, bool)


def _run(game, estimator, n_perm, key, **kwargs):
  return shapjax.shapley_values(game[0], N, n_perm, key=key, estimator=estimator, batch_size=256, **kwargs)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name", GAMES)
def test_estimators_converge_to_the_exact_values(key, estimator, name):
  value_fn, expected = GAMES[name]
  np.testing.assert_allclose(shapjax.exact_shapley(value_fn, N).values, expected, rtol=1e-5, atol=1e-5)
  result = _estimate(_table(value_fn), key, EVERYONE, n_perm=1024, estimator=estimator)
  values, stderr = np.asarray(result.values, np.float64), np.asarray(result.stderr, np.float64)
  error = np.abs(values - expected)
  assert np.all(error <= 4.5 * stderr + 1e-4), (error, stderr)
  # The random game's marginal contributions vary far more than its values: a looser bar there.
  assert np.linalg.norm(error) / np.linalg.norm(expected) < (0.25 if name == "random" else 0.1)
  total = float(value_fn(ALL[-1:])[0] - value_fn(ALL[:1])[0])
  np.testing.assert_allclose(values.sum(), total, rtol=1e-4, atol=1e-4)  # efficiency, for every estimator
  assert int(result.n_evals) == 1024 * sampling.evals_per_unit(N, estimator) + 2


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_additive_games_are_exact(key, estimator):
  result = _estimate(_table(ADDITIVE[0]), key, EVERYONE, n_perm=64, estimator=estimator)
  np.testing.assert_allclose(result.values, ADDITIVE[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(result.stderr, 0.0, atol=1e-4)


@pytest.mark.parametrize("estimator", ["antithetic", "stratified"])
def test_reversed_permutations_make_pairwise_games_exact(key, estimator):
  result = _estimate(_table(PAIRWISE[0]), key, EVERYONE, n_perm=64, estimator=estimator)
  np.testing.assert_allclose(result.values, PAIRWISE[1], rtol=1e-4, atol=1e-4)


def test_stratified_groups_put_every_player_in_every_position(key):
  # 8 shifts of 8 active players: each player stands once at each position among the unreversed ones.
  active = jnp.ones(8, bool)
  ranks = np.stack([np.asarray(sampling._permutation_ranks(key, jnp.asarray(i), active, "stratified"))
                    for i in range(16, 32)])
  for permutation in ranks:
    assert sorted(permutation.tolist()) == list(range(8))
  for player in range(8):
    assert sorted(ranks[0::2, player].tolist()) == list(range(8))
  np.testing.assert_array_equal(ranks[0::2] + ranks[1::2], 7)


# 200 repeats on fixed keys, 6 players: 1200 intervals, binomial sd about 0.006 at 95% coverage. Each run has
# few independent samples on purpose (8 stratified groups): the Student-t correction must hold up there.
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name", ["third-order", "random"])
def test_standard_errors_are_calibrated(estimator, name):
  value_fn, expected = GAMES[name]
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(1000), r))(jnp.arange(200))
  n_perm = 128 if estimator == "stratified" else 64
  results = _estimate_repeats(_table(value_fn), keys, EVERYONE, n_perm=n_perm, estimator=estimator)
  error = np.abs(np.asarray(results.values, np.float64) - expected[None, :])
  inside = error <= 1.96 * np.asarray(results.stderr, np.float64) + 1e-5
  coverage = float(np.mean(inside))
  assert 0.9 <= coverage <= 0.99, coverage


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_padding_players_are_exactly_zero_and_cost_nothing(key, estimator):
  mask = jnp.asarray([True] * 4 + [False] * 2)
  result = _estimate(_table(PAIRWISE[0]), key, mask, n_perm=64, estimator=estimator)
  assert np.all(np.asarray(result.values[4:]) == 0.0)
  assert np.all(np.asarray(result.stderr[4:]) == 0.0)
  assert int(result.n_evals) == 64 * sampling.evals_per_unit(4, estimator) + 2
  # The active players share v(active) - v(empty), as in the game restricted to them.
  total = PAIRWISE[0](mask[None, :])[0] - PAIRWISE[0](ALL[:1])[0]
  np.testing.assert_allclose(result.values.sum(), total, rtol=1e-4, atol=1e-4)
  restricted = shapjax.exact_shapley(lambda c: PAIRWISE[0](jnp.pad(c, ((0, 0), (0, 2)))), 4)
  error = np.abs(np.asarray(result.values[:4]) - np.asarray(restricted.values))
  assert np.all(error <= 4.5 * np.asarray(result.stderr[:4]) + 1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_active_player_is_exact(key, estimator):
  mask = jnp.asarray([False, False, True, False, False, False])
  result = _estimate(TABLE, key, mask, n_perm=64, estimator=estimator)
  total = _random_game(mask[None, :])[0] - _random_game(ALL[:1])[0]
  np.testing.assert_allclose(result.values, np.where(mask, float(total), 0.0), atol=1e-5)
  np.testing.assert_allclose(result.stderr, 0.0, atol=1e-6)


@pytest.mark.parametrize("estimator", ["stratified", "kernel"])
def test_same_key_same_result_whatever_the_batch_size(key, estimator):
  results = [shapjax.shapley_values(RANDOM[0], N, 32, key=key, batch_size=b, estimator=estimator) for b in (7, 256)]
  np.testing.assert_allclose(results[1].values, results[0].values, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(results[1].stderr, results[0].stderr, rtol=1e-4, atol=1e-5)
  assert int(results[1].n_evals) == int(results[0].n_evals)


@pytest.mark.parametrize("estimator", ["stratified", "kernel"])
def test_tolerance_blocks_equal_one_fixed_run(key, estimator):
  block = 16
  budget = 2 + 3 * block * sampling.evals_per_unit(N, estimator)
  stopped = _run(RANDOM, estimator, block, key, tol=1e-9, max_evals=budget + 10)
  assert not bool(stopped.converged)  # an unreachable tolerance spends the budget: three blocks
  assert int(stopped.n_evals) == budget
  fixed = _run(RANDOM, estimator, 3 * block, key)
  np.testing.assert_allclose(stopped.values, fixed.values, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stopped.stderr, fixed.stderr, rtol=1e-3, atol=1e-5)
  assert bool(fixed.converged)


@pytest.mark.parametrize("estimator", ["stratified", "kernel"])
def test_tolerance_is_met_when_reachable(key, estimator):
  tol, budget = 0.1, 100_000
  result = _run(RANDOM, estimator, 16, key, tol=tol, max_evals=budget)
  assert bool(result.converged)
  values, stderr = np.asarray(result.values), np.asarray(result.stderr)
  assert np.max(stderr) < tol * np.ptp(values)
  assert 2 + 32 * sampling.evals_per_unit(N, estimator) <= int(result.n_evals) <= budget


def test_the_block_compiles_once(key):
  def game(c):  # a fresh function: its own cache entries
    return _random_game(c) * 2.0

  before = sampling._block_jit._cache_size()
  budget = 2 + 5 * 16 * (N - 1)
  result = shapjax.shapley_values(game, N, 16, key=key, tol=1e-9, max_evals=budget, estimator="permutation")
  assert int(result.n_evals) == budget and not bool(result.converged)  # five blocks ...
  assert sampling._block_jit._cache_size() == before + 1  # ... one compilation


def test_budget_smaller_than_a_block_is_refused(key):
  with pytest.raises(ValueError, match="max_evals"):
    _run(RANDOM, "permutation", 16, key, tol=0.1, max_evals=50)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_perm=24, estimator="stratified"), "multiple of 16"),
    (dict(n_perm=16, max_evals=1000), "tol"),
    (dict(n_perm=16, tol=-1.0), "tol"),
    (dict(n_perm=16, tol=0.1, max_evals=0), "max_evals"),
])
def test_bad_arguments_are_named(key, kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapjax.shapley_values(RANDOM[0], N, key=key, **kwargs)


def test_attribute_stops_on_tolerance(key):
  from conftest import stripes_labels
  params = shapjax.init_autoencoder((16, 16, 1), key=key, config=shapjax.AutoencoderConfig.tiny((16, 16, 1)))
  image = np.asarray(jax.random.uniform(jax.random.key(3), (16, 16, 1)))
  labels = stripes_labels(16, 16, 5)
  options = dict(key=key, max_regions=6, baseline="zeros", estimator="kernel", batch_size=32)
  stopped = shapjax.attribute(params, image, labels, 8, tol=1e-9, max_evals=2 + 2 * 8 * 4, **options)
  assert not bool(stopped.converged)
  assert int(stopped.n_evals) == 2 + 2 * 8 * 4
  fixed = shapjax.attribute(params, image, labels, 16, **options)
  np.testing.assert_allclose(stopped.values, fixed.values, rtol=1e-4, atol=1e-7)
  assert float(stopped.values[5]) == 0.0
  reached = shapjax.attribute(params, image, labels, 8, tol=0.2, max_evals=10_000, **options)
  assert bool(reached.converged)
  assert float(np.max(reached.stderr)) < 0.2 * float(np.ptp(np.asarray(reached.values)[:5]))
