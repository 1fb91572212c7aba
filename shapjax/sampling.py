"""Shapley values of any value function: permutation estimators and exact enumeration.

A *value function* maps a batch of coalitions ``bool[B, n_players]`` to ``f32[B]``. Everything here is a pure
function of it: the estimators draw permutations, build the cumulative coalitions, evaluate them in chunks of
``batch_size`` (so the memory for model inputs does not grow with ``n_perm``) and average the marginal
contributions, all inside one jitted XLA program.

Permutation ``i`` is drawn from ``fold_in(key, i)`` (for ``"antithetic"``, pair ``i // 2``), so neither the
chunk size nor the block structure can change the sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ValueFn = Callable[[jax.Array], jax.Array]

ESTIMATORS = ("permutation", "antithetic")
DEFAULT_BATCH_SIZE = 64


@flax.struct.dataclass
class ShapleyResult:
  """Estimated Shapley values (a pytree; stack results with ``jax.tree.map``).

  Attributes:
    values: ``f32[..., n_players]`` estimated Shapley value of each player.
    stderr: ``f32[..., n_players]`` standard error of each value (0 for exact values; NaN when fewer than two
      independent samples were drawn).
    n_evals: ``i32[...]`` value-function evaluations that the estimate rests on (evaluations that padding
      players would have cost are not counted: they are skipped).
    converged: ``bool[...]`` whether the stopping tolerance was met (always True without ``tol``).
  """

  values: jax.Array
  stderr: jax.Array
  n_evals: jax.Array
  converged: jax.Array


def _check_counts(n_players: int, n_perm: int, batch_size: int, estimator: str) -> None:
  if not isinstance(n_players, (int, np.integer)) or n_players < 1:
    raise ValueError(f"n_players must be a positive int, got {n_players!r}")
  if not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
    raise ValueError(f"n_perm must be a positive int, got {n_perm!r}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if estimator == "antithetic" and n_perm % 2:
    raise ValueError(f"estimator='antithetic' pairs each permutation with its reverse: n_perm must be even, "
                     f"got {n_perm}")


def _player_mask(player_mask, n_players: int) -> jax.Array:
  if player_mask is None:
    return jnp.ones((n_players,), bool)
  player_mask = jnp.asarray(player_mask)
  if player_mask.shape != (n_players,):
    raise ValueError(f"player_mask must have shape ({n_players},), got {player_mask.shape}")
  return player_mask.astype(bool)


def _permutation_ranks(key: jax.Array, index: jax.Array, active: jax.Array, estimator: str) -> jax.Array:
  """Position of each player in permutation ``index``; active players come first, in random order.

  Returns:
    ``i32[n_players]``: ``ranks[j]`` is where player ``j`` stands. Inactive (null) players take the last
    positions in their own index order, so every coalition that reaches them is already the full set.
  """
  n_players = active.shape[0]
  if estimator == "antithetic":
    draw = jax.random.uniform(jax.random.fold_in(key, index // 2), (n_players,))
    draw = jnp.where(index % 2 == 1, -draw, draw)  # the reverse of the pair's first permutation
  else:
    draw = jax.random.uniform(jax.random.fold_in(key, index), (n_players,), minval=-1.0, maxval=1.0)
  sort_key = jnp.where(active, draw, 2.0 + jnp.arange(n_players, dtype=draw.dtype))
  order = jnp.argsort(sort_key)
  return jnp.zeros((n_players,), jnp.int32).at[order].set(jnp.arange(n_players, dtype=jnp.int32))


def _evaluate_chunked(value_fn: ValueFn, coalitions_of: Callable, n_items: int, batch_size: int,
                      n_needed: jax.Array) -> jax.Array:
  """Evaluates ``value_fn`` on ``n_items`` coalitions built chunk by chunk; skips chunks past ``n_needed``."""
  n_chunks = -(-n_items // batch_size)

  def one_chunk(chunk):
    flat = chunk * batch_size + jnp.arange(batch_size)
    return jax.lax.cond(
        chunk * batch_size < n_needed,
        lambda: value_fn(coalitions_of(jnp.minimum(flat, n_items - 1))).astype(jnp.float32),
        lambda: jnp.zeros((batch_size,), jnp.float32))

  values = jax.lax.map(one_chunk, jnp.arange(n_chunks))
  return values.reshape(-1)[:n_items]


def permutation_contributions(value_fn: ValueFn, n_players: int, n_perm: int, *, key: jax.Array,
                              start: int | jax.Array = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                              estimator: str = "antithetic", player_mask=None,
                              v_empty_full: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Marginal contributions of every player in permutations ``start .. start + n_perm - 1``.

  Traceable (call it inside ``jit``); :func:`shapley_values` is the user-facing estimator.

  Coalitions are laid out size-major (all permutations' coalitions of size 1, then of size 2, ...), so the
  coalitions that contain every active player, which equal the full set and need no evaluation, form a
  contiguous tail whose chunks ``lax.cond`` skips.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``.
    n_players: number of players (static).
    n_perm: number of permutations (static).
    key: PRNG key.
    start: index of the first permutation.
    batch_size: coalitions per value-function call (static).
    estimator: ``"permutation"`` or ``"antithetic"`` (static).
    player_mask: ``bool[n_players]``; False marks null players (e.g. padding regions) that get exactly 0.
    v_empty_full: ``f32[2]`` precomputed v(empty) and v(all active); evaluated here when None.

  Returns:
    ``(contributions f32[n_perm, n_players], v_empty_full f32[2])``.
  """
  active = _player_mask(player_mask, n_players)
  n_active = jnp.sum(active, dtype=jnp.int32)
  indices = start + jnp.arange(n_perm)
  ranks = jax.vmap(lambda i: _permutation_ranks(key, i, active, estimator))(indices)  # [P, n]
  if v_empty_full is None:
    v_empty_full = value_fn(jnp.stack([jnp.zeros_like(active), active])).astype(jnp.float32)
  v_empty, v_full = v_empty_full[0], v_empty_full[1]

  # Coalition sizes 1 .. n-1, size-major: item f has size f // P + 1 and permutation f % P.
  n_items = (n_players - 1) * n_perm

  def coalitions_of(flat):
    size = flat // n_perm + 1
    return ranks[flat % n_perm] < size[:, None]

  n_needed = jnp.maximum(n_active - 1, 0) * n_perm
  if n_items:
    inner = _evaluate_chunked(value_fn, coalitions_of, n_items, batch_size, n_needed)
    inner = inner.reshape(n_players - 1, n_perm)
    sizes = jnp.arange(1, n_players)[:, None]
    inner = jnp.where(sizes >= n_active, v_full, inner)
  else:
    inner = jnp.zeros((0, n_perm), jnp.float32)
  table = jnp.concatenate([jnp.full((1, n_perm), v_empty), inner, jnp.full((1, n_perm), v_full)])
  by_position = (table[1:] - table[:-1]).T  # [P, n]: contribution of the player at each position
  contributions = jnp.take_along_axis(by_position, ranks, axis=1)
  return jnp.where(active[None, :], contributions, 0.0), v_empty_full


def summarize_contributions(contributions: jax.Array, *, estimator: str) -> tuple[jax.Array, jax.Array]:
  """Mean and standard error of per-permutation contributions ``f32[P, n]``.

  Antithetic pairs are averaged first: the pair, not the permutation, is the independent sample.
  """
  samples = contributions
  if estimator == "antithetic":
    samples = contributions.reshape(-1, 2, contributions.shape[-1]).mean(axis=1)
  n_samples = samples.shape[0]
  values = contributions.mean(axis=0)
  if n_samples < 2:
    return values, jnp.full_like(values, jnp.nan)
  stderr = samples.std(axis=0, ddof=1) / math.sqrt(n_samples)
  return values, stderr


@functools.partial(jax.jit, static_argnames=("value_fn", "n_players", "n_perm", "batch_size", "estimator"))
def _shapley_values_jit(value_fn, n_players, n_perm, key, player_mask, batch_size, estimator):
  contributions, _ = permutation_contributions(
      value_fn, n_players, n_perm, key=key, batch_size=batch_size, estimator=estimator,
      player_mask=player_mask)
  values, stderr = summarize_contributions(contributions, estimator=estimator)
  n_active = jnp.sum(_player_mask(player_mask, n_players), dtype=jnp.int32)
  n_evals = n_perm * jnp.maximum(n_active - 1, 0) + 2
  return ShapleyResult(values=values, stderr=stderr, n_evals=n_evals, converged=jnp.asarray(True))


def shapley_values(
    value_fn: ValueFn,
    n_players: int,
    n_perm: int,
    *,
    key: jax.Array,
    batch_size: int = DEFAULT_BATCH_SIZE,
    estimator: str = "antithetic",
    player_mask=None,
) -> ShapleyResult:
  """Monte Carlo permutation estimate of the Shapley values of ``value_fn``.

  Each permutation costs ``n_active - 1`` evaluations; v(empty) and v(all) are evaluated once. The values of
  every permutation sum to ``v(all) - v(empty)`` exactly (telescoping), so the estimate is efficient by
  construction, and players outside ``player_mask`` get exactly 0 without costing any evaluation.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``, a JAX-traceable function (hashable: pass the same function
      object to reuse the compiled program).
    n_players: number of players.
    n_perm: permutations to draw; with ``"antithetic"`` it counts reverses too and must be even.
    key: PRNG key; permutation ``i`` comes from ``fold_in(key, i)`` (pair ``i // 2`` for antithetic).
    batch_size: coalitions per ``value_fn`` call: bounds peak memory, does not change the sample.
    estimator: ``"permutation"`` (plain Monte Carlo) or ``"antithetic"`` (each permutation and its reverse).
    player_mask: optional ``bool[n_players]``; False marks null players (padding) that get exactly 0.

  Returns:
    :class:`ShapleyResult` with ``values`` and ``stderr`` of shape ``[n_players]``.

  Example:
    >>> import jax, jax.numpy as jnp, shapjax
    >>> weights = jnp.arange(4.0)
    >>> additive = lambda coalitions: coalitions.astype(jnp.float32) @ weights
    >>> result = shapjax.shapley_values(additive, 4, 8, key=jax.random.key(0))
    >>> [round(float(v), 4) for v in result.values]
    [0.0, 1.0, 2.0, 3.0]
  """
  _check_counts(n_players, n_perm, batch_size, estimator)
  player_mask = _player_mask(player_mask, int(n_players))
  return _shapley_values_jit(value_fn, int(n_players), int(n_perm), key, player_mask, int(batch_size), estimator)


@functools.partial(jax.jit, static_argnames=("value_fn", "n_players", "batch_size"))
def _all_coalition_values(value_fn, n_players, batch_size):
  n_items = 2 ** n_players
  bits = jnp.arange(n_players, dtype=jnp.int32)

  def coalitions_of(flat):
    return (flat[:, None] >> bits[None, :]) & 1 == 1

  return _evaluate_chunked(value_fn, coalitions_of, n_items, min(batch_size, n_items), jnp.asarray(n_items))


def exact_shapley(value_fn: ValueFn, n_players: int, *, batch_size: int = 1024) -> ShapleyResult:
  """Exact Shapley values by evaluating all ``2 ** n_players`` coalitions (the reference for estimators).

  The coalition values come from one jitted, chunked program; the weighted sums are done on the host in
  float64 so the reference is accurate to the value function's own precision.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``.
    n_players: number of players, at most 24 (``2 ** n`` evaluations).
    batch_size: coalitions per ``value_fn`` call.

  Returns:
    :class:`ShapleyResult` with ``stderr`` all zero.
  """
  if not isinstance(n_players, (int, np.integer)) or not 1 <= n_players <= 24:
    raise ValueError(f"exact_shapley needs 1 <= n_players <= 24, got {n_players!r}")
  values = np.asarray(_all_coalition_values(value_fn, int(n_players), int(batch_size)), np.float64)
  n = int(n_players)
  coalitions = np.arange(2 ** n)
  sizes = np.zeros(2 ** n, np.int64)
  for bit in range(n):
    sizes += (coalitions >> bit) & 1
  log_fact = np.array([math.lgamma(k + 1) for k in range(n + 1)])
  phi = np.zeros(n)
  for player in range(n):
    without = coalitions[(coalitions >> player) & 1 == 0]
    s = sizes[without]
    weights = np.exp(log_fact[s] + log_fact[n - s - 1] - log_fact[n])
    phi[player] = np.sum(weights * (values[without | (1 << player)] - values[without]))
  return ShapleyResult(values=jnp.asarray(phi, jnp.float32), stderr=jnp.zeros(n, jnp.float32),
                       n_evals=jnp.asarray(2 ** n, jnp.int32), converged=jnp.asarray(True))
