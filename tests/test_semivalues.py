"""Semivalues beside Shapley (Banzhaf, Beta Shapley, leave-one-out) and the additivity measure.

As in test_sampling.py, most tests run the traceable core on a game given as a table of its 2 ** 6 coalition
values, so one compiled program per (index, estimator) serves every game, and ``vmap`` runs the repeats of the
calibration test at once. ``attribute`` is tested on a tiny autoencoder at the end.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from conftest import stripes_labels
from games import additive_game, inclusion, majority_game, pairwise_game, triple_game
from shapjax import attribution, sampling

N = 6
RNG = np.random.default_rng(3)
WEIGHTS = RNG.normal(size=N)
INTERACTIONS = RNG.normal(size=(N, N))
TRIPLES = [(0, 1, 2, 4.0), (3, 4, 5, -2.0)]
TABLE = jnp.asarray(RNG.normal(size=2 ** N), jnp.float32)  # interactions of every order
BITS = 2 ** jnp.arange(N)
ALL = jnp.asarray((np.arange(2 ** N)[:, None] >> np.arange(N)[None, :]) & 1 == 1)
EVERYONE = jnp.ones(N, bool)
INDICES = ["shapley", "banzhaf", ("beta", 16.0, 1.0), ("beta", 4.0, 1.0), ("beta", 1.0, 4.0), "loo"]
# Every (index, estimator) beyond the Shapley value's own (test_sampling.py covers those).
COMBOS = [("banzhaf", "paired"), ("banzhaf", "msr"), (("beta", 4.0, 1.0), "paired"),
          (("beta", 4.0, 1.0), "antithetic"), (("beta", 4.0, 1.0), "permutation"),
          (("beta", 4.0, 1.0), "stratified"), (("beta", 16.0, 1.0), "paired"), ("loo", "exact")]
N_PERM = {"stratified": 256}  # else 256 too; one block size keeps one program per combination


def _random_game(coalitions):
  return TABLE[coalitions.astype(jnp.int32) @ BITS]


def _table(value_fn):
  return value_fn(ALL).astype(jnp.float32)


def _estimate_one(table, key, active, *, n_perm, estimator, index):
  def value_fn(coalitions):
    return table[coalitions.astype(jnp.int32) @ BITS]

  v_empty_full = sampling.endpoint_values(value_fn, active)
  _, result = sampling.estimate_block(value_fn, N, n_perm, key=key, start=0, state=sampling.init_state(N, estimator),
                                      active=active, v_empty_full=v_empty_full, batch_size=512, estimator=estimator,
                                      index=index)
  return result


_estimate = jax.jit(_estimate_one, static_argnames=("n_perm", "estimator", "index"))


@functools.partial(jax.jit, static_argnames=("n_perm", "estimator", "index"))
def _estimate_repeats(table, keys, active, *, n_perm, estimator, index):
  return jax.vmap(lambda k: _estimate_one(table, k, active, n_perm=n_perm, estimator=estimator, index=index))(keys)


def _games(index):
  """Closed-form games: (value_fn, exact values of ``index``)."""
  return {
      "additive": additive_game(WEIGHTS),
      "pairwise": pairwise_game(WEIGHTS, INTERACTIONS, index),
      "third-order": triple_game(WEIGHTS, TRIPLES, index),
  }


def _label(index):
  return index if isinstance(index, str) else f"beta{index[1]:g}-{index[2]:g}"


# --- Exact enumeration against closed forms ---------------------------------------------------------------------


@pytest.mark.parametrize("index", INDICES, ids=_label)
def test_exact_semivalue_matches_closed_forms(index):
  for name, (value_fn, expected) in _games(index).items():
    result = shapjax.exact_semivalue(value_fn, N, index=index)
    np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5, err_msg=name)
    assert int(result.n_evals) == 2 ** N
    assert np.all(np.asarray(result.stderr) == 0.0)


def test_closed_forms_of_the_best_known_indices():
  first, second = inclusion("banzhaf")
  assert (first, second) == (0.5, 0.25)  # pairwise terms halve and third-order terms quarter, as for Shapley's 1/3
  assert inclusion("shapley") == (0.5, pytest.approx(1 / 3))
  assert inclusion(("beta", 1.0, 1.0)) == inclusion("shapley")
  assert inclusion("loo") == (1.0, 1.0)


def test_exact_shapley_is_the_shapley_case_and_beta_one_one_is_shapley():
  value_fn = _random_game
  shapley = shapjax.exact_shapley(value_fn, N)
  np.testing.assert_allclose(shapley.values, shapjax.exact_semivalue(value_fn, N).values, rtol=1e-6)
  np.testing.assert_allclose(shapjax.exact_semivalue(value_fn, N, index=("beta", 1, 1)).values, shapley.values,
                             rtol=1e-5, atol=1e-6)


def test_beta_weights_follow_kwon_and_zou():
  # alpha > beta weights small coalitions: Beta(16, 1) puts most of its weight on the smallest sizes.
  small = sampling.size_weights(N, ("beta", 16, 1)) * np.array([1, 5, 10, 10, 5, 1])  # C(5, s) p(s)
  large = sampling.size_weights(N, ("beta", 1, 16)) * np.array([1, 5, 10, 10, 5, 1])
  np.testing.assert_allclose(small.sum(), 1.0)
  np.testing.assert_allclose(small, large[::-1])
  assert small[0] > 0.5 and np.all(np.diff(small) < 0)


def test_majority_game_with_dummies():
  value_fn, banzhaf = majority_game(4, 3, n_dummies=2)
  for index in INDICES:
    result = np.asarray(shapjax.exact_semivalue(value_fn, N, index=index).values)
    np.testing.assert_allclose(result[4:], 0.0, atol=1e-7)  # dummies: nothing, under every index
    np.testing.assert_allclose(result[:4], result[0])  # symmetric voters
  np.testing.assert_allclose(shapjax.exact_semivalue(value_fn, N, index="banzhaf").values, banzhaf, rtol=1e-6)
  np.testing.assert_allclose(shapjax.exact_semivalue(value_fn, N, index="loo").values[:4], 0.0)  # 4 >= quota 3 + 1


# --- Estimators against exact values ----------------------------------------------------------------------------


@pytest.mark.parametrize("index, estimator", COMBOS, ids=str)
@pytest.mark.parametrize("name", ["pairwise", "third-order", "majority", "random"])
def test_estimators_converge_to_the_exact_semivalues(key, index, estimator, name):
  value_fn = {"majority": majority_game(4, 3, 2)[0], "random": _random_game}.get(name) or _games(index)[name][0]
  expected = np.asarray(shapjax.exact_semivalue(value_fn, N, index=index).values, np.float64)
  n_perm = N_PERM.get(estimator, 256)
  if index == ("beta", 16.0, 1.0) and name == "third-order":
    n_perm = 1024  # its triple term is a rare event (see the calibration test): hundreds of units see it rarely
  result = _estimate(_table(value_fn), key, EVERYONE, n_perm=n_perm, estimator=estimator, index=index)
  values, stderr = np.asarray(result.values, np.float64), np.asarray(result.stderr, np.float64)
  error = np.abs(values - expected)
  assert np.all(error <= 4.5 * stderr + 1e-4), (error, stderr)
  # Some of these values are tiny (Beta(16, 1) on a majority game): the bar is the game's own range.
  assert np.linalg.norm(error) <= 0.1 * float(np.ptp(np.asarray(_table(value_fn))))
  assert int(result.n_evals) == sampling.block_evals(N, n_perm, estimator) + 2


@pytest.mark.parametrize("index, estimator", [("banzhaf", "paired"), (("beta", 16.0, 1.0), "paired"),
                                              (("beta", 1.0, 4.0), "paired"), (("beta", 16.0, 1.0), "antithetic"),
                                              (("beta", 4.0, 1.0), "permutation"),
                                              (("beta", 4.0, 1.0), "stratified")], ids=str)
def test_weighted_estimates_are_exact_on_additive_games(key, index, estimator):
  # Self-normalized: every marginal contribution of a player is its weight, whatever the importance weights.
  n_perm = 32 if estimator == "stratified" else 8
  result = _estimate(_table(additive_game(WEIGHTS)[0]), key, EVERYONE, n_perm=n_perm, estimator=estimator,
                     index=index)
  np.testing.assert_allclose(result.values, WEIGHTS, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result.stderr, 0.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("index", [("beta", 16.0, 1.0), ("beta", 4.0, 1.0)], ids=_label)
def test_paired_beta_estimates_reach_the_closed_forms(key, index):
  # The importance weights undo the mixture: with many units the estimate is the index's, not the mixture's.
  for name in ("pairwise", "third-order"):
    value_fn, expected = _games(index)[name]
    result = _estimate(_table(value_fn), key, EVERYONE, n_perm=16384, estimator="paired", index=index)
    values, stderr = np.asarray(result.values, np.float64), np.asarray(result.stderr, np.float64)
    assert np.all(np.abs(values - expected) <= 4.5 * stderr + 1e-4), (name, values - expected, stderr)
    assert np.max(np.abs(values - expected)) < 0.02, (name, values - expected)
    assert np.max(stderr) < 0.02


def test_paired_beta_units_mix_the_index_with_uniform_sizes(key):
  # Half the units draw t from Beta(beta, alpha), half from U(0, 1); the weight of a size is BB(s) / q(s).
  index = ("beta", 16.0, 1.0)
  t = jax.vmap(lambda u: sampling._inclusion_probability(jax.random.fold_in(key, u), index))(jnp.arange(4000))
  # P(t > 1/4) is 0.75 ** 16 under Beta(1, 16) and 0.75 under U(0, 1).
  assert abs(np.mean(np.asarray(t) > 0.25) - 0.5 * (0.75 ** 16 + 0.75)) < 0.03
  bases = jnp.asarray([[True] * 3 + [False] * 3, [False] * 6])
  weights = np.asarray(sampling._paired_weights(index, bases, EVERYONE))
  target = sampling.size_weights(N, index) * np.array([1, 5, 10, 10, 5, 1])
  proposal = sampling.BETA_MIXTURE * target + (1 - sampling.BETA_MIXTURE) / N
  np.testing.assert_allclose(weights[0], np.where(np.arange(N) < 3, (target / proposal)[2], (target / proposal)[3]),
                             rtol=1e-4)
  np.testing.assert_allclose(weights[1], (target / proposal)[0], rtol=1e-4)
  assert np.all(weights <= 1 / sampling.BETA_MIXTURE)


def test_ratio_statistics_merge_exactly_and_without_cancellation():
  # Contributions with a large common part: float32 sums of squares would cancel (sum y^2 is about 4e8, the
  # residuals' about 1e-2); sums of residuals about the running mean do not, and merging blocks is exact.
  rng = np.random.default_rng(0)
  weights = rng.uniform(0.05, 2.0, size=(96, 3))
  weighted = weights * (1000.0 + rng.normal(size=(96, 3)) * 1e-2)
  stats = sampling._ratio_moments(jnp.asarray(weighted, jnp.float32), jnp.asarray(weights, jnp.float32))
  merged = sampling._empty_ratio(3)
  for block in np.split(np.arange(96), [5, 40, 41]):
    merged = sampling._merge_ratio(merged, sampling._ratio_moments(jnp.asarray(weighted[block], jnp.float32),
                                                                   jnp.asarray(weights[block], jnp.float32)))
  ratio = weighted.sum(0) / weights.sum(0)
  m2 = np.sum((weighted - ratio * weights) ** 2, axis=0)
  for result in (stats, merged):
    np.testing.assert_allclose(result["mean"], ratio, rtol=1e-6)
    np.testing.assert_allclose(result["m2"], m2, rtol=0.05)
    np.testing.assert_allclose(result["weight"], weights.sum(0), rtol=1e-5)
    np.testing.assert_allclose(result["weight_sq"], np.sum(weights ** 2, 0), rtol=1e-5)
    assert float(result["count"]) == 96


def test_leave_one_out_is_exact_and_costs_one_sweep(key):
  value_fn, expected = pairwise_game(WEIGHTS, INTERACTIONS, "loo")
  full = float(value_fn(ALL[-1:])[0])
  without = np.asarray(value_fn(~jnp.eye(N, dtype=bool)))
  np.testing.assert_allclose(expected, full - without, rtol=1e-5, atol=1e-5)
  result = shapjax.shapley_values(value_fn, N, 4, key=key, index="loo")
  np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(result.stderr) == 0.0) and int(result.n_evals) == N + 2
  stopped = shapjax.shapley_values(value_fn, N, 4, key=key, index="loo", tol=0.01)
  assert bool(stopped.converged) and int(stopped.n_evals) == N + 2


@pytest.mark.parametrize("index, estimator", COMBOS, ids=str)
def test_padding_players_are_exactly_zero_and_cost_nothing(key, index, estimator):
  mask = jnp.asarray([True] * 4 + [False] * 2)
  value_fn = pairwise_game(WEIGHTS, INTERACTIONS)[0]
  result = _estimate(_table(value_fn), key, mask, n_perm=N_PERM.get(estimator, 256), estimator=estimator,
                     index=index)
  assert np.all(np.asarray(result.values[4:]) == 0.0)
  assert np.all(np.asarray(result.stderr[4:]) == 0.0)
  assert int(result.n_evals) == sampling.block_evals(4, N_PERM.get(estimator, 256), estimator) + 2
  # The active players get the semivalue of the game restricted to them.
  restricted = shapjax.exact_semivalue(lambda c: value_fn(jnp.pad(c, ((0, 0), (0, 2)))), 4, index=index)
  error = np.abs(np.asarray(result.values[:4]) - np.asarray(restricted.values))
  assert np.all(error <= 4.5 * np.asarray(result.stderr[:4]) + 1e-4), error
  assert np.isfinite(float(result.additivity))


@pytest.mark.parametrize("index, estimator", [("banzhaf", "paired"), ("banzhaf", "msr"),
                                              (("beta", 4.0, 1.0), "paired")], ids=str)
def test_same_key_same_result_whatever_the_batch_size(key, index, estimator):
  results = [shapjax.shapley_values(_random_game, N, 16, key=key, batch_size=b, estimator=estimator, index=index)
             for b in (3, 256)]
  np.testing.assert_allclose(results[1].values, results[0].values, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(results[1].stderr, results[0].stderr, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(results[1].additivity, results[0].additivity, rtol=1e-4)


# 200 repeats on fixed keys, 6 players: 1200 intervals per game. Few independent samples on purpose: 64 weighted
# permutations or pairs, 128 stratified or paired units. Beta(16, 1) on the third-order game gets 512 paired
# units: its triple term is worth 0.65% of a draw from the index's sizes, so even the defensive mixture, which
# sees it in about 1% of units at the weight that matters, needs that many before the interval holds it.
CALIBRATION_CASES = [(index, estimator, name) for index, estimator in COMBOS if estimator != "exact"
                     for name in ("third-order", "random")]


def _calibration_units(index, estimator, name):
  if index == ("beta", 16.0, 1.0) and name == "third-order":
    return 512
  return 128 if estimator in ("stratified", "paired") else 64


@pytest.mark.slow
@pytest.mark.parametrize("index, estimator, name", CALIBRATION_CASES, ids=str)
def test_standard_errors_are_calibrated(index, estimator, name):
  value_fn = _random_game if name == "random" else _games(index)[name][0]
  expected = np.asarray(shapjax.exact_semivalue(value_fn, N, index=index).values, np.float64)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(2000), r))(jnp.arange(200))
  n_perm = _calibration_units(index, estimator, name)
  results = _estimate_repeats(_table(value_fn), keys, EVERYONE, n_perm=n_perm, estimator=estimator, index=index)
  error = np.abs(np.asarray(results.values, np.float64) - expected[None, :])
  inside = error <= 1.96 * np.asarray(results.stderr, np.float64) + 1e-5
  coverage = float(np.mean(inside))
  assert 0.9 <= coverage <= 0.99, coverage


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["paired", "msr"])
def test_tolerance_blocks_equal_one_fixed_run(key, estimator):
  block = 8
  budget = 2 + 3 * block * sampling.evals_per_unit(N, estimator)
  stopped = shapjax.shapley_values(_random_game, N, block, key=key, index="banzhaf", estimator=estimator, tol=1e-9,
                                   max_evals=budget + 3)
  assert not bool(stopped.converged) and int(stopped.n_evals) == budget
  fixed = shapjax.shapley_values(_random_game, N, 3 * block, key=key, index="banzhaf", estimator=estimator)
  np.testing.assert_allclose(stopped.values, fixed.values, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stopped.stderr, fixed.stderr, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(stopped.additivity, fixed.additivity, rtol=1e-4)


def test_one_compiled_block_per_index(key):
  traces = []

  def game(c):  # a fresh function: its own programs; it runs in Python only while a program is traced
    traces.append(1)
    return _random_game(c) * 3.0

  budget = 2 + 4 * 4 * sampling.evals_per_unit(N, "paired")
  options = dict(key=key, tol=1e-9, max_evals=budget, index="banzhaf")
  assert not bool(shapjax.shapley_values(game, N, 4, **options).converged)  # four blocks ...
  traced = len(traces)
  options["key"] = jax.random.fold_in(key, 1)
  assert not bool(shapjax.shapley_values(game, N, 4, **options).converged)
  assert len(traces) == traced  # ... and four more with another key: no new trace


@pytest.mark.parametrize("index, estimator", [("banzhaf", "paired"), ("banzhaf", "msr"),
                                              (("beta", 4.0, 1.0), "antithetic"), ("loo", "exact")], ids=str)
def test_devices_merge_to_the_one_device_estimate(key, index, estimator):
  mesh = shapjax.make_mesh(2)
  table = _table(_random_game)
  n_perm = 8

  def value_fn(coalitions):
    return table[coalitions.astype(jnp.int32) @ BITS]

  def local(key):
    v_empty_full = sampling.endpoint_values(value_fn, EVERYONE)
    start = jax.lax.axis_index(mesh.axis_names) * (n_perm // 2)
    _, result = sampling.estimate_block(value_fn, N, n_perm // 2, key=key, start=start,
                                        state=sampling.init_state(N, estimator), active=EVERYONE,
                                        v_empty_full=v_empty_full, batch_size=16, estimator=estimator, index=index,
                                        axis_name=mesh.axis_names)
    return result

  merged = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=jax.sharding.PartitionSpec(),
                                 out_specs=jax.sharding.PartitionSpec(), check_vma=False))(key)
  single = _estimate(table, key, EVERYONE, n_perm=n_perm, estimator=estimator, index=index)
  np.testing.assert_allclose(merged.values, single.values, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(merged.stderr, single.stderr, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(merged.additivity, single.additivity, rtol=1e-4)
  assert int(merged.n_evals) == int(single.n_evals)


@pytest.mark.parametrize("kwargs, match", [
    (dict(index="banzhaf", estimator="kernel"), "does not estimate index='banzhaf'.*paired"),
    (dict(index="shapley", estimator="msr"), "antithetic"),
    (dict(index="loo", estimator="antithetic"), "exact"),
    (dict(index=("beta", 16, 0)), "positive"),
    (dict(index="owen"), "index must be"),
    (dict(index=("beta", 1)), "index must be"),
])
def test_an_estimator_or_index_that_does_not_apply_is_named(key, kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapjax.shapley_values(_random_game, N, 4, key=key, **kwargs)


def test_index_is_hashable_in_normal_form():
  assert sampling.check_index(["beta", 16, 1]) == ("beta", 16.0, 1.0)
  assert hash(sampling.check_index(("beta", 4, 1))) == hash(("beta", 4.0, 1.0))
  assert sampling.resolve_estimator("banzhaf", None) == "paired"
  assert sampling.resolve_estimator(("beta", 4, 1), None) == "paired"
  assert sampling.resolve_estimator("shapley", None) == sampling.DEFAULT_ESTIMATOR


# --- Additivity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index, estimator", [("shapley", "antithetic"), ("shapley", "kernel"),
                                              ("shapley", "stratified")] + COMBOS, ids=str)
def test_additivity_is_one_on_additive_games(key, index, estimator):
  result = _estimate(_table(additive_game(WEIGHTS)[0]), key, EVERYONE, n_perm=N_PERM.get(estimator, 256),
                     estimator=estimator, index=index)
  np.testing.assert_allclose(float(result.additivity), 1.0, atol=1e-4)
  assert float(shapjax.exact_semivalue(additive_game(WEIGHTS)[0], N).additivity) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("index, estimator", [("shapley", "antithetic"), ("shapley", "kernel"),
                                              ("banzhaf", "msr"), (("beta", 4.0, 1.0), "paired"),
                                              ("banzhaf", "paired")], ids=str)
def test_additivity_falls_as_interactions_grow(key, index, estimator):
  interactions = np.triu(RNG.normal(size=(N, N)), 1)
  measured, exact = [], []
  for strength in (0.0, 0.1, 0.3, 1.0, 3.0):
    value_fn = pairwise_game(WEIGHTS, strength * interactions)[0]
    result = _estimate(_table(value_fn), key, EVERYONE, n_perm=N_PERM.get(estimator, 256), estimator=estimator,
                       index=index)
    measured.append(float(result.additivity))
    exact.append(float(shapjax.exact_semivalue(value_fn, N).additivity))
  assert measured[0] == pytest.approx(1.0, abs=1e-4)
  assert np.all(np.diff(measured) < 0), measured
  assert np.all(np.diff(exact) < 0), exact
  assert measured[-1] < 0.9  # clearly lower once the interactions matter
  if index == "banzhaf":  # uniform coalitions, as the enumeration weighs them: the same measure, sampled
    np.testing.assert_allclose(measured, exact, atol=0.05)


def test_additivity_is_nan_when_undefined(key):
  constant = _estimate(jnp.full((2 ** N,), 2.0), key, EVERYONE, n_perm=8, estimator="paired", index="banzhaf")
  assert np.isnan(float(constant.additivity))  # v constant: nothing to explain
  one = _estimate(TABLE, key, EVERYONE, n_perm=1, estimator="permutation", index="shapley")
  assert np.isnan(float(one.additivity))  # one chain of 7 coalitions, 6 players: a perfect fit says nothing


# --- attribute() with every index on a tiny autoencoder ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  params = shapjax.init_autoencoder((16, 16, 1), key=jax.random.key(0),
                                    config=shapjax.AutoencoderConfig.tiny((16, 16, 1)))
  images = np.asarray(jax.random.uniform(jax.random.key(3), (2, 16, 16, 1)))
  labels = np.stack([stripes_labels(16, 16, 5), stripes_labels(16, 16, 4)])
  return params, images, labels


ATTRIBUTE_INDICES = [("banzhaf", None, 4), ("banzhaf", "msr", 4), (("beta", 4, 1), None, 4), ("loo", None, 1)]


@pytest.mark.parametrize("index, estimator, n_perm", ATTRIBUTE_INDICES, ids=str)
@pytest.mark.slow
def test_attribute_takes_every_index(tiny, key, index, estimator, n_perm):
  params, images, labels = tiny
  options = dict(key=key, max_regions=6, baseline="zeros", batch_size=8, index=index, estimator=estimator)
  result = shapjax.attribute(params, images[0], labels[0], n_perm, **options)
  assert float(result.values[5]) == 0.0 and float(result.stderr[5]) == 0.0  # padding
  assert np.all(np.isfinite(np.asarray(result.values))) and np.isfinite(float(result.additivity))
  size = attribution._attribute_jit.cache_size()
  other = shapjax.attribute(params, images[1], labels[1], n_perm, **options)  # 4 regions: same program
  assert attribution._attribute_jit.cache_size() == size
  assert np.all(np.asarray(other.values[4:]) == 0.0)
  batch = shapjax.attribute_batch(params, images, labels, n_perm, **options)
  for i, single in enumerate((result, other)):
    again = shapjax.attribute(params, images[i], labels[i], n_perm, **{**options, "key": jax.random.fold_in(key, i)})
    np.testing.assert_allclose(batch.values[i], again.values, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(batch.additivity[i], again.additivity, rtol=1e-4)
  if index == "loo":  # exact: v(all) - v(all but i), whatever the key
    value_fn = attribution.value_function(params, jnp.asarray(images[0]), jnp.asarray(labels[0]), None,
                                          attribution.prepare(params, images[0], labels[0], 1, max_regions=6,
                                                              baseline="zeros", index="loo").options)
    everyone = jnp.arange(6) < 5
    without = everyone[None, :] & ~jnp.eye(6, dtype=bool)[:5]
    expected = value_fn(everyone[None, :])[0] - value_fn(without)
    np.testing.assert_allclose(result.values[:5], expected, rtol=1e-4, atol=1e-7)
    assert int(result.n_evals) == 5 + 2


def test_attribute_on_a_mesh_equals_one_device(tiny, key):
  params, images, labels = tiny
  options = dict(key=key, max_regions=6, baseline="zeros", batch_size=8, index="banzhaf")
  single = shapjax.attribute(params, images[0], labels[0], 4, **options)
  on_mesh = shapjax.attribute(params, images[0], labels[0], 4, mesh=shapjax.make_mesh(2), **options)
  np.testing.assert_allclose(on_mesh.values, single.values, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(on_mesh.stderr, single.stderr, rtol=1e-3, atol=1e-9)
  np.testing.assert_allclose(on_mesh.additivity, single.additivity, rtol=1e-4)
  assert int(on_mesh.n_evals) == int(single.n_evals)


def test_attribute_names_an_estimator_that_does_not_apply(tiny):
  params, images, labels = tiny
  with pytest.raises(ValueError, match="does not estimate"):
    shapjax.attribute(params, images[0], labels[0], 4, max_regions=6, index="banzhaf", estimator="kernel")
