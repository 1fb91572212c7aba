"""The sampler: every estimator against exact values and closed-form games, calibration of its error bars,
stopping on tolerance, exact enumeration.

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
  ranks = np.stack([np.asarray(sampling.permutation_ranks(key, jnp.asarray(i), active, "stratified"))
                    for i in range(16, 32)])
  for permutation in ranks:
    assert sorted(permutation.tolist()) == list(range(8))
  for player in range(8):
    assert sorted(ranks[0::2, player].tolist()) == list(range(8))
  np.testing.assert_array_equal(ranks[0::2] + ranks[1::2], 7)


# 200 repeats on fixed keys, 6 players: 1200 intervals, binomial sd about 0.006 at 95% coverage. Each run has
# few independent samples on purpose (8 stratified groups): the Student-t correction must hold up there.
@pytest.mark.slow
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


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.slow
def test_same_key_same_result_whatever_the_batch_size(key, estimator):
  results = [shapjax.shapley_values(RANDOM[0], N, 32, key=key, batch_size=b, estimator=estimator)
             for b in (1, 256)]
  for other in results[1:]:
    np.testing.assert_allclose(other.values, results[0].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other.stderr, results[0].stderr, rtol=1e-4, atol=1e-5)
    assert int(other.n_evals) == int(results[0].n_evals)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["stratified", "kernel"])
def test_tolerance_is_met_when_reachable(key, estimator):
  tol, budget = 0.1, 100_000
  result = _run(RANDOM, estimator, 16, key, tol=tol, max_evals=budget)
  assert bool(result.converged)
  values, stderr = np.asarray(result.values), np.asarray(result.stderr)
  assert np.max(stderr) < tol * np.ptp(values)
  assert 2 + 32 * sampling.evals_per_unit(N, estimator) <= int(result.n_evals) <= budget


def test_the_block_compiles_once(key):
  traces = []

  def game(c):  # a fresh function: its own program; it runs in Python only while a program is traced
    traces.append(1)
    return _random_game(c) * 2.0

  budget = 2 + 5 * 16 * (N - 1)
  result = shapjax.shapley_values(game, N, 16, key=key, tol=1e-9, max_evals=budget, estimator="permutation")
  assert int(result.n_evals) == budget and not bool(result.converged)  # five blocks ...
  traced = len(traces)
  again = shapjax.shapley_values(game, N, 16, key=jax.random.fold_in(key, 1), tol=1e-9, max_evals=budget,
                                 estimator="permutation")
  assert not bool(again.converged)
  assert len(traces) == traced  # ... and five more blocks with another key: no new trace


def test_budget_smaller_than_a_block_is_refused(key):
  with pytest.raises(ValueError, match="max_evals"):
    _run(RANDOM, "permutation", 16, key, tol=0.1, max_evals=50)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_perm=0), "n_perm"),
    (dict(n_perm=3, estimator="antithetic"), "even"),
    (dict(n_perm=4, estimator="sobol-ish"), "estimator"),
    (dict(n_perm=4, batch_size=0), "batch_size"),
    (dict(n_perm=4, player_mask=np.ones(3, bool)), "player_mask"),
    (dict(n_perm=24, estimator="stratified"), "multiple of 16"),
    (dict(n_perm=16, max_evals=1000), "tol"),
    (dict(n_perm=16, tol=-1.0), "tol"),
    (dict(n_perm=16, tol=0.1, max_evals=0), "max_evals"),
])
def test_bad_arguments_are_named(key, kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapjax.shapley_values(RANDOM[0], N, key=key, **kwargs)


# --- Closed forms and properties of the public functions ---------------------------------------------------------


def test_exact_shapley_matches_closed_form_and_counts_every_coalition():
  for value_fn, expected in GAMES.values():
    result = shapjax.exact_shapley(value_fn, N)
    np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5)
    assert int(result.n_evals) == 2 ** N


def test_exact_shapley_rejects_too_many_players():
  with pytest.raises(ValueError, match="n_players"):
    shapjax.exact_shapley(ADDITIVE[0], 30)


def test_efficiency_is_exact_per_sample(key):
  result = shapjax.shapley_values(PAIRWISE[0], N, 6, key=key, estimator="permutation")
  total = PAIRWISE[0](ALL[-1:])[0] - PAIRWISE[0](ALL[:1])[0]
  np.testing.assert_allclose(result.values.sum(), total, rtol=1e-5)


def test_symmetric_players_and_null_players(key):
  weights = jnp.asarray([1.0, 2.0, 2.0, -1.0, 0.5, 0.0])

  def with_null(c):  # player 5 is null; players 1 and 2 are symmetric
    return c.astype(jnp.float32) @ weights + 3.0 * (c[:, 1] & c[:, 2])

  result = shapjax.shapley_values(with_null, N, 10, key=key)
  assert float(result.values[5]) == 0.0
  np.testing.assert_allclose(result.values[1], result.values[2], rtol=1e-6)


@pytest.mark.slow
def test_error_shrinks_with_more_permutations(key):
  value_fn, expected = THIRD_ORDER
  errors = []
  for n_perm in (8, 128, 2048):
    runs = [shapjax.shapley_values(value_fn, N, n_perm, key=jax.random.fold_in(key, r), estimator="permutation",
                                   batch_size=256).values for r in range(5)]
    errors.append(np.mean([np.linalg.norm(np.asarray(v) - expected) for v in runs]))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < errors[0] / 6  # about 1 / sqrt(256) = 1/16 in expectation


def test_different_keys_give_different_samples(key):
  a = shapjax.shapley_values(PAIRWISE[0], N, 10, key=key, estimator="permutation")
  b = shapjax.shapley_values(PAIRWISE[0], N, 10, key=jax.random.fold_in(key, 1), estimator="permutation")
  assert not np.allclose(a.values, b.values)


def test_antithetic_pairs_a_permutation_with_its_reverse(key):
  active = jnp.ones(6, bool)
  first = sampling.permutation_ranks(key, jnp.asarray(4), active, "antithetic")
  second = sampling.permutation_ranks(key, jnp.asarray(5), active, "antithetic")
  np.testing.assert_array_equal(np.asarray(first) + np.asarray(second), 5)
  assert sorted(np.asarray(first).tolist()) == list(range(6))


def test_single_player_and_stderr_with_one_sample(key):
  result = shapjax.shapley_values(additive_game([2.5])[0], 1, 3, key=key, estimator="permutation")
  np.testing.assert_allclose(result.values, [2.5])
  one = shapjax.shapley_values(ADDITIVE[0], N, 1, key=key, estimator="permutation")
  assert np.all(np.isnan(np.asarray(one.stderr)))
