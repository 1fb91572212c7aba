"""Shapley values of any value function: sampling estimators, error bars, stopping on tolerance, exact values.

A *value function* maps a batch of coalitions ``bool[B, n_players]`` to ``f32[B]``. Everything here is a pure
function of it: the estimators draw their samples, evaluate the coalitions in chunks of ``batch_size`` (so the
memory for model inputs does not grow with the sample) and reduce them, all inside one jitted XLA program.

Estimators (``estimator=``); a *unit* is what ``n_perm`` counts and costs about ``n_active - 1`` evaluations:

* ``"permutation"``: plain Monte Carlo over random permutations (Castro et al. 2009), what captum does.
* ``"antithetic"``: each permutation and its reverse (shap's PermutationExplainer); exact on games with at
  most pairwise interactions.
* ``"stratified"``: permutations stratified by position. A group of :data:`STRATIFIED_GROUP` permutations is
  a random base permutation of the active players, cyclically shifted by 8 evenly spaced offsets, each with
  its reverse; every shifted permutation is uniform, so the estimate is unbiased, and within a group each
  player visits the positions evenly (exactly when ``n_active`` divides 8), removing most of the variance that
  comes from coalition size. Groups are independent replicates and give the error bars (randomized QMC).
* ``"kernel"``: paired KernelSHAP with the efficiency constraint (Lundberg & Lee 2017; Covert & Lee 2021):
  coalitions drawn from the Shapley kernel, each with its complement, and a constrained least-squares fit.
  Error bars by the delete-a-group jackknife over :data:`KERNEL_GROUPS` interleaved groups of units.

Determinism: unit ``i`` is drawn from ``fold_in(key, i)`` (antithetic: pair ``i // 2``; stratified: group
``i // 16``), so neither ``batch_size`` nor the split into blocks when stopping on tolerance changes the sample:
``tol`` with block size ``n_perm`` after ``b`` blocks gives the fixed-size result for ``b * n_perm`` units.

References:
  Castro, Gomez, Tejada (2009), Polynomial calculation of the Shapley value based on sampling.
  Mitchell, Cooper, Frank, Holmes (2022), Sampling permutations for Shapley value estimation, JMLR.
  Lundberg & Lee (2017), A unified approach to interpreting model predictions, NeurIPS.
  Covert & Lee (2021), Improving KernelSHAP: practical Shapley value estimation via linear regression, AISTATS.
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

ESTIMATORS = ("permutation", "antithetic", "stratified", "kernel")
DEFAULT_ESTIMATOR = "antithetic"
DEFAULT_BATCH_SIZE = 64  # coalitions per value-function call on GPU/TPU (and inside the traceable internals)
CPU_BATCH_SIZE = 16  # on CPU: the autoencoder's activations stay in cache (benchmarks/README.md, log)
STRATIFIED_SHIFTS = 8
STRATIFIED_GROUP = 2 * STRATIFIED_SHIFTS  # permutations per stratified replicate: shifts and their reverses
KERNEL_GROUPS = 32  # jackknife groups of the kernel estimator: unit i falls in group i % KERNEL_GROUPS
DEFAULT_MAX_BLOCKS = 64  # with tol and no max_evals: the budget is this many blocks
_RIDGE = 1e-6


@functools.cache
def _t_inflation_table() -> np.ndarray:
  """Student-t 97.5% quantiles over 1.96, for 1..1024 degrees of freedom (beyond: 1).

  Built on first use from scipy.special (0.3 s to import; scipy.stats would add over a second to every cold
  start).
  """
  import scipy.special  # pylint: disable=g-import-not-at-top
  return np.concatenate([scipy.special.stdtrit(np.arange(1, 1025), 0.975) / scipy.special.ndtri(0.975),
                         [1.0]]).astype(np.float32)


@flax.struct.dataclass
class ShapleyResult:
  """Estimated Shapley values (a pytree; stack results with ``jax.tree.map``).

  Attributes:
    values: ``f32[..., n_players]`` estimated Shapley value of each player.
    stderr: ``f32[..., n_players]`` standard error of each value (0 for exact values and padding players;
      NaN when fewer than two independent samples were drawn), scaled by ``t(0.975, dof) / 1.96`` so that
      ``values +- 1.96 * stderr`` is a 95% interval even with few independent samples.
    n_evals: ``i32[...]`` value-function evaluations that the estimate rests on (evaluations that padding
      players would have cost are not counted: they are skipped).
    converged: ``bool[...]`` whether the stopping tolerance was met (always True without ``tol``).
  """

  values: jax.Array
  stderr: jax.Array
  n_evals: jax.Array
  converged: jax.Array


def default_batch_size(batch_size: int | None = None):
  """``batch_size`` itself, or when None the default for JAX's default backend: 16 on CPU, 64 elsewhere."""
  if batch_size is not None:
    return batch_size
  return CPU_BATCH_SIZE if jax.default_backend() == "cpu" else DEFAULT_BATCH_SIZE


def check_counts(n_players: int, n_perm: int, batch_size: int, estimator: str) -> None:
  """ValueErrors that name the problem for sizes and an estimator the sampler cannot take."""
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
  if estimator == "stratified" and n_perm % STRATIFIED_GROUP:
    raise ValueError(f"estimator='stratified' draws groups of {STRATIFIED_GROUP} permutations: n_perm must be a "
                     f"multiple of {STRATIFIED_GROUP}, got {n_perm}")


def check_stopping(tol, max_evals) -> None:
  """ValueErrors for a tolerance or evaluation budget the stopping rule cannot take."""
  if tol is None:
    if max_evals is not None:
      raise ValueError("max_evals is the budget of stopping on tolerance: pass tol too")
    return
  if not isinstance(tol, (int, float, np.floating, np.integer)) or not tol >= 0:
    raise ValueError(f"tol must be a non-negative float, got {tol!r}")
  if max_evals is not None and (not isinstance(max_evals, (int, np.integer)) or max_evals < 1):
    raise ValueError(f"max_evals must be a positive int, got {max_evals!r}")


def _player_mask(player_mask, n_players: int) -> jax.Array:
  if player_mask is None:
    return jnp.ones((n_players,), bool)
  player_mask = jnp.asarray(player_mask)
  if player_mask.shape != (n_players,):
    raise ValueError(f"player_mask must have shape ({n_players},), got {player_mask.shape}")
  return player_mask.astype(bool)


def evals_per_unit(n_active, estimator: str):
  """Evaluations one unit of ``n_perm`` costs with ``n_active`` active players (ints or traced arrays).

  A permutation costs ``n_active - 1`` (the empty and the full coalition are evaluated once per call); a
  kernel unit is ``n_active // 2`` coalitions and their complements.
  """
  if estimator == "kernel":
    return 2 * (n_active // 2)
  return n_active - 1 if isinstance(n_active, (int, np.integer)) else jnp.maximum(n_active - 1, 0)


def _random_ranks(key: jax.Array, active: jax.Array) -> jax.Array:
  """Ranks of a uniform random order of the active players; inactive players stand last, in index order."""
  n_players = active.shape[0]
  draw = jax.random.uniform(key, (n_players,))
  sort_key = jnp.where(active, draw, 2.0 + jnp.arange(n_players, dtype=draw.dtype))
  order = jnp.argsort(sort_key)
  return jnp.zeros((n_players,), jnp.int32).at[order].set(jnp.arange(n_players, dtype=jnp.int32))


def permutation_ranks(key: jax.Array, index: jax.Array, active: jax.Array, estimator: str) -> jax.Array:
  """Position of each player in permutation ``index``; active players come first.

  Returns:
    ``i32[n_players]``: ``ranks[j]`` is where player ``j`` stands. Inactive (null) players take the last
    positions in their own index order, so every coalition that reaches them is already the full set.
  """
  n_players = active.shape[0]
  if estimator == "antithetic":
    draw = jax.random.uniform(jax.random.fold_in(key, index // 2), (n_players,))
    draw = jnp.where(index % 2 == 1, -draw, draw)  # the reverse of the pair's first permutation
    sort_key = jnp.where(active, draw, 2.0 + jnp.arange(n_players, dtype=draw.dtype))
    order = jnp.argsort(sort_key)
    return jnp.zeros((n_players,), jnp.int32).at[order].set(jnp.arange(n_players, dtype=jnp.int32))
  if estimator == "stratified":
    n_active = jnp.sum(active, dtype=jnp.int32)
    base = _random_ranks(jax.random.fold_in(key, index // STRATIFIED_GROUP), active)
    within = index % STRATIFIED_GROUP
    shift = (within // 2) * n_active // STRATIFIED_SHIFTS
    shifted = (base + shift) % jnp.maximum(n_active, 1)
    shifted = jnp.where(within % 2 == 1, n_active - 1 - shifted, shifted)
    return jnp.where(active, shifted, base).astype(jnp.int32)
  return _random_ranks(jax.random.fold_in(key, index), active)


def _evaluate_chunked(value_fn: ValueFn, coalitions_of: Callable, n_items: int, batch_size: int,
                      n_needed: jax.Array) -> jax.Array:
  """Evaluates ``value_fn`` on ``n_items`` coalitions built chunk by chunk; skips chunks past ``n_needed``."""
  batch_size = min(batch_size, n_items)  # a chunk larger than the work would evaluate clamped duplicates
  n_chunks = -(-n_items // batch_size)

  def one_chunk(chunk):
    flat = chunk * batch_size + jnp.arange(batch_size)
    return jax.lax.cond(
        chunk * batch_size < n_needed,
        lambda: value_fn(coalitions_of(jnp.minimum(flat, n_items - 1))).astype(jnp.float32),
        lambda: jnp.zeros((batch_size,), jnp.float32))

  values = jax.lax.map(one_chunk, jnp.arange(n_chunks))
  return values.reshape(-1)[:n_items]


def endpoint_values(value_fn: ValueFn, active: jax.Array) -> jax.Array:
  """``f32[2]``: v(empty) and v(all active players), the two evaluations every estimate starts from."""
  return value_fn(jnp.stack([jnp.zeros_like(active), active])).astype(jnp.float32)


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
    estimator: ``"permutation"``, ``"antithetic"`` or ``"stratified"`` (static).
    player_mask: ``bool[n_players]``; False marks null players (e.g. padding regions) that get exactly 0.
    v_empty_full: ``f32[2]`` precomputed v(empty) and v(all active); evaluated here when None.

  Returns:
    ``(contributions f32[n_perm, n_players], v_empty_full f32[2])``.
  """
  active = _player_mask(player_mask, n_players)
  n_active = jnp.sum(active, dtype=jnp.int32)
  indices = start + jnp.arange(n_perm)
  ranks = jax.vmap(lambda i: permutation_ranks(key, i, active, estimator))(indices)  # [P, n]
  if v_empty_full is None:
    v_empty_full = endpoint_values(value_fn, active)
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


def sample_group(estimator: str) -> int:
  """Units that form one independent sample: 2 for an antithetic pair, 16 for a stratified group, else 1.

  Work split across devices must give each device whole groups.
  """
  return {"antithetic": 2, "stratified": STRATIFIED_GROUP}.get(estimator, 1)


def _independent_samples(contributions: jax.Array, estimator: str) -> jax.Array:
  """Rows that are iid: permutations, antithetic pairs, or stratified groups (their means)."""
  group = sample_group(estimator)
  if group == 1:
    return contributions
  return contributions.reshape(-1, group, contributions.shape[-1]).mean(axis=1)


# ---------------------------------------------------------------------------------------------------------
# Running statistics. A block's statistics merge into the state, so blocks of any size give one estimate.


def init_state(n_players: int, estimator: str) -> dict[str, jax.Array]:
  """Empty running statistics of ``estimator`` for ``n_players`` players (a pytree of fixed shapes).

  Permutation estimators keep the count, mean and sum of squared deviations of their independent samples
  (merged with Chan's parallel formula); the kernel estimator keeps per-group normal equations.
  """
  state = {"units": jnp.zeros((), jnp.int32)}
  if estimator == "kernel":
    state["gram"] = jnp.zeros((KERNEL_GROUPS, n_players, n_players), jnp.float32)
    state["moment"] = jnp.zeros((KERNEL_GROUPS, n_players), jnp.float32)
    state["count"] = jnp.zeros((KERNEL_GROUPS,), jnp.float32)
  else:
    state["count"] = jnp.zeros((), jnp.float32)
    state["mean"] = jnp.zeros((n_players,), jnp.float32)
    state["m2"] = jnp.zeros((n_players,), jnp.float32)
  return state


def _moments(samples: jax.Array) -> dict[str, jax.Array]:
  """Count, mean and sum of squared deviations of iid samples ``f32[S, n_players]``."""
  mean = samples.mean(axis=0)
  return {"count": jnp.asarray(samples.shape[0], jnp.float32), "mean": mean,
          "m2": jnp.sum((samples - mean[None, :]) ** 2, axis=0)}


def _combine(state: dict, block: dict, estimator: str) -> dict:
  """The statistics of ``state``'s samples and ``block``'s together (Chan's parallel formula; kernel: sums)."""
  if estimator == "kernel":
    return {**state, **{name: state[name] + block[name] for name in ("gram", "moment", "count")}}
  count = state["count"] + block["count"]
  delta = block["mean"] - state["mean"]
  weight = block["count"] / jnp.maximum(count, 1.0)
  return {**state, "count": count, "mean": state["mean"] + delta * weight,
          "m2": state["m2"] + block["m2"] + delta ** 2 * state["count"] * weight}


def _combine_across(block: dict, axis_name, estimator: str) -> dict:
  """Every device's block statistics merged into those of all devices' samples (the same on every device).

  As accurate as one pass: the global mean from the weighted sum of means, each device's deviations moved to it.
  """
  if estimator == "kernel":
    return jax.tree.map(lambda x: jax.lax.psum(x, axis_name), block)
  count = jax.lax.psum(block["count"], axis_name)
  mean = jax.lax.psum(block["count"] * block["mean"], axis_name) / jnp.maximum(count, 1.0)
  m2 = jax.lax.psum(block["m2"] + block["count"] * jnp.square(block["mean"] - mean), axis_name)
  return {"count": count, "mean": mean, "m2": m2}


def _kernel_coalitions(key: jax.Array, unit: jax.Array, active: jax.Array) -> jax.Array:
  """``bool[n_players // 2, 2, n_players]``: the unit's coalitions, each next to its complement.

  Sizes follow the Shapley kernel, p(s) proportional to 1 / (s (n_active - s)) for 0 < s < n_active, and the
  coalition is uniform among those of its size, so each is drawn with probability proportional to its kernel
  weight and the least-squares fit needs no weights.
  """
  n_players = active.shape[0]
  n_active = jnp.sum(active, dtype=jnp.int32)
  sizes = jnp.arange(1, n_players + 1)
  weights = jnp.where(sizes < n_active, 1.0 / (sizes * jnp.maximum(n_active - sizes, 1)), 0.0)
  cdf = jnp.cumsum(weights) / jnp.maximum(jnp.sum(weights), 1e-30)

  def one_pair(pair):
    size_key, order_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, unit), pair))
    size = 1 + jnp.sum(cdf < jax.random.uniform(size_key)[None], dtype=jnp.int32)
    size = jnp.clip(size, 1, jnp.maximum(n_active - 1, 1))
    coalition = (_random_ranks(order_key, active) < size) & active
    return jnp.stack([coalition, active & ~coalition])

  return jax.vmap(one_pair)(jnp.arange(n_players // 2))


def _kernel_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full):
  """The block's own normal equations, per jackknife group."""
  n_pairs = n_players // 2
  n_active = jnp.sum(active, dtype=jnp.int32)
  units = start + jnp.arange(n_perm)
  coalitions = jax.vmap(lambda u: _kernel_coalitions(key, u, active))(units)  # [P, Q, 2, n]
  # Pair-major layout, as the permutations' size-major one: the pairs a unit does not need form a tail.
  flat_coalitions = jnp.transpose(coalitions, (1, 0, 2, 3)).reshape(-1, n_players)
  n_items = flat_coalitions.shape[0]
  if n_items:
    needed = (n_active // 2) * n_perm * 2
    values = _evaluate_chunked(value_fn, lambda flat: flat_coalitions[flat], n_items, batch_size, needed)
    values = jnp.transpose(values.reshape(n_pairs, n_perm, 2), (1, 0, 2))  # [P, Q, 2]
  else:
    values = jnp.zeros((n_perm, 0, 2), jnp.float32)
  used = (jnp.arange(n_pairs) < n_active // 2)[None, :, None]
  targets = jnp.where(used, values - v_empty_full[0], 0.0)
  z = (coalitions.astype(jnp.float32) * used[..., None].astype(jnp.float32)).reshape(n_perm, -1, n_players)
  group = jax.nn.one_hot(units % KERNEL_GROUPS, KERNEL_GROUPS, dtype=jnp.float32)  # [P, J]
  gram = jnp.einsum("pg,pij->gij", group, jnp.einsum("pki,pkj->pij", z, z))
  moment = jnp.einsum("pg,pi->gi", group, jnp.einsum("pki,pk->pi", z, targets.reshape(n_perm, -1)))
  count = group.sum(axis=0) * (2 * (n_active // 2)).astype(jnp.float32)
  return {"gram": gram, "moment": moment, "count": count}


def _constrained_fit(gram, moment, count, active, total):
  """Least squares of ``v(z) - v(empty)`` on ``z`` with ``sum(phi) = total``; padding players get 0."""
  n_players = active.shape[0]
  eye = jnp.eye(n_players, dtype=jnp.float32)
  both = active[:, None] & active[None, :]
  a = jnp.where(both, gram / jnp.maximum(count, 1.0), eye) + _RIDGE * eye
  b = jnp.where(active, moment / jnp.maximum(count, 1.0), 0.0)
  c = active.astype(jnp.float32)
  solved = jnp.linalg.solve(a, jnp.stack([b, c], axis=1))
  a_inv_b, a_inv_c = solved[:, 0], solved[:, 1]
  multiplier = (c @ a_inv_b - total) / (c @ a_inv_c)
  return jnp.where(active, a_inv_b - multiplier * a_inv_c, 0.0)


def _t_inflation(n_samples: jax.Array) -> jax.Array:
  """``t(0.975, n_samples - 1) / 1.96``: a 1.96-stderr interval is then a 95% interval."""
  table = _t_inflation_table()
  dof = jnp.clip(n_samples.astype(jnp.int32) - 1, 1, table.shape[0])
  return jnp.asarray(table)[dof - 1]


def _finish(state, active, v_empty_full, estimator):
  """Values and standard errors from running statistics."""
  if estimator != "kernel":
    count = state["count"]
    stderr = jnp.sqrt(state["m2"] / jnp.maximum(count - 1.0, 1.0) / jnp.maximum(count, 1.0))
    stderr = jnp.where(count >= 2, stderr * _t_inflation(count), jnp.nan)
    return state["mean"], jnp.where(active, stderr, 0.0)
  total = v_empty_full[1] - v_empty_full[0]
  gram, moment, count = state["gram"], state["moment"], state["count"]
  # The full fit and the delete-a-group fits, as one batch of J + 1 solves.
  fits = jax.vmap(lambda g, m, k: _constrained_fit(g, m, k, active, total))(
      jnp.concatenate([gram.sum(0)[None], gram.sum(0)[None] - gram]),
      jnp.concatenate([moment.sum(0)[None], moment.sum(0)[None] - moment]),
      jnp.concatenate([count.sum()[None], count.sum() - count]))
  values, left_out = fits[0], fits[1:]  # [n], [J, n]
  filled = count > 0
  n_groups = jnp.sum(filled, dtype=jnp.float32)
  centre = jnp.sum(jnp.where(filled[:, None], left_out, 0.0), axis=0) / jnp.maximum(n_groups, 1.0)
  spread = jnp.sum(jnp.where(filled[:, None], (left_out - centre[None, :]) ** 2, 0.0), axis=0)
  stderr = jnp.sqrt(spread * (n_groups - 1.0) / jnp.maximum(n_groups, 1.0))
  stderr = jnp.where(n_groups >= 2, stderr * _t_inflation(n_groups), jnp.nan)
  # With fewer than two active players there is nothing to estimate: the constraint alone is exact.
  stderr = jnp.where(jnp.sum(active) <= 1, 0.0, stderr)
  return values, jnp.where(active, stderr, 0.0)


def estimate_block(value_fn: ValueFn, n_players: int, n_perm: int, *, key: jax.Array, start: int | jax.Array,
                   state: dict[str, jax.Array], active: jax.Array, v_empty_full: jax.Array,
                   batch_size: int = DEFAULT_BATCH_SIZE, estimator: str = DEFAULT_ESTIMATOR,
                   axis_name=None) -> tuple[dict[str, jax.Array], ShapleyResult]:
  """Draws units ``start .. start + n_perm - 1``, merges them into ``state`` and returns the estimate so far.

  Traceable (call it inside ``jit``); ``start`` may be traced, so one compiled block serves every block of a
  run. :func:`shapley_values` and :func:`shapjax.attribute` are built on it.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``.
    n_players: number of players (static).
    n_perm: units in this block (static; per device with ``axis_name``).
    key: PRNG key of the whole run.
    start: index of the block's first unit (this device's first unit with ``axis_name``).
    state: running statistics from :func:`init_state` or a previous block.
    active: ``bool[n_players]``; False marks padding players, which get exactly 0 and cost nothing.
    v_empty_full: ``f32[2]`` from :func:`endpoint_values`.
    batch_size: coalitions per value-function call (static).
    estimator: one of :data:`ESTIMATORS` (static).
    axis_name: inside ``shard_map``, the mesh axes whose devices each drew their own units: their statistics
      are merged (``psum``) before they join ``state``, so every device returns the estimate of all units.

  Returns:
    ``(state, result)``; ``result.converged`` is True (the caller decides about stopping).
  """
  if estimator == "kernel":
    block = _kernel_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full)
  else:
    contributions, _ = permutation_contributions(
        value_fn, n_players, n_perm, key=key, start=start, batch_size=batch_size, estimator=estimator,
        player_mask=active, v_empty_full=v_empty_full)
    block = _moments(_independent_samples(contributions, estimator))
  units = jnp.asarray(n_perm, jnp.int32)
  if axis_name is not None:
    block = _combine_across(block, axis_name, estimator)
    units = jax.lax.psum(units, axis_name)
  state = _combine(state, block, estimator)
  state = {**state, "units": state["units"] + units}
  values, stderr = _finish(state, active, v_empty_full, estimator)
  n_active = jnp.sum(active, dtype=jnp.int32)
  n_evals = state["units"] * evals_per_unit(n_active, estimator) + 2
  return state, ShapleyResult(values=values, stderr=stderr, n_evals=n_evals.astype(jnp.int32),
                              converged=jnp.asarray(True))


def tolerance_met(result: ShapleyResult, active, tol: float) -> bool:
  """The stopping rule: ``max(stderr) < tol * (max(values) - min(values))`` over the active players.

  NaN error bars (fewer than two independent samples) never meet it; neither does a spread of 0 unless every
  standard error is 0 too (then the values are exact, e.g. an additive game with antithetic sampling).
  """
  active = np.asarray(active, bool)
  values = np.asarray(result.values, np.float64)[active]
  stderr = np.asarray(result.stderr, np.float64)[active]
  if values.size == 0:
    return True
  if np.any(np.isnan(stderr)):
    return False
  largest = float(np.max(stderr))
  return largest < tol * float(np.ptp(values)) or largest == 0.0


def run_blocks(block_fn: Callable, state, *, n_perm: int, units_cost: int, tol: float | None,
               max_evals: int | None, active) -> ShapleyResult:
  """Host loop over jitted blocks: ``block_fn(state, start) -> (state, result)``.

  Without ``tol`` runs one block. With it, runs blocks of ``n_perm`` units until :func:`tolerance_met` or the
  next block would spend more than ``max_evals`` evaluations in total (``units_cost`` per unit, 2 more for
  the empty and full coalitions).
  """
  block_evals = n_perm * units_cost
  if tol is not None:
    if max_evals is None:
      max_evals = 2 + DEFAULT_MAX_BLOCKS * block_evals
    if 2 + block_evals > max_evals:
      raise ValueError(f"max_evals={max_evals} is less than one block of n_perm={n_perm} units "
                       f"({2 + block_evals} evaluations); lower n_perm or raise max_evals")
  start = 0
  while True:
    state, result = block_fn(state, jnp.asarray(start, jnp.int32))
    start += n_perm
    if tol is None:
      return result
    if tolerance_met(result, active, tol):
      return result.replace(converged=jnp.asarray(True))
    if 2 + (start // n_perm + 1) * block_evals > max_evals:
      return result.replace(converged=jnp.asarray(False))


@functools.partial(jax.jit, static_argnames=("value_fn",))
def _endpoints_jit(value_fn, active):
  return endpoint_values(value_fn, active)


@functools.partial(jax.jit, static_argnames=("value_fn", "n_players", "n_perm", "batch_size", "estimator"))
def _block_jit(value_fn, n_players, n_perm, key, start, state, active, v_empty_full, batch_size, estimator):
  return estimate_block(value_fn, n_players, n_perm, key=key, start=start, state=state, active=active,
                        v_empty_full=v_empty_full, batch_size=batch_size, estimator=estimator)


def shapley_values(
    value_fn: ValueFn,
    n_players: int,
    n_perm: int,
    *,
    key: jax.Array,
    batch_size: int | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    player_mask=None,
    tol: float | None = None,
    max_evals: int | None = None,
) -> ShapleyResult:
  """Sampling estimate of the Shapley values of ``value_fn``, with standard errors.

  A unit of ``n_perm`` costs ``n_active - 1`` evaluations (a permutation) or ``2 * (n_active // 2)`` (a kernel
  unit); v(empty) and v(all) are evaluated once. Players outside ``player_mask`` get exactly 0 and cost no
  evaluation. Efficiency, ``sum(values) = v(all) - v(empty)``, holds for every estimator: exactly per
  permutation for the permutation estimators (telescoping), and through the constraint of the kernel fit.

  Error bars: permutations, antithetic pairs and stratified groups are iid, so ``stderr`` is their standard
  deviation over ``sqrt(count)``; the kernel estimator's comes from a delete-a-group jackknife. Both are
  scaled by the Student-t factor ``t(0.975, dof) / 1.96`` (1.02 at 50 samples, 1.62 at 4), so that
  ``values +- 1.96 * stderr`` covers the true values 95% of the time even with few samples.

  Stopping on tolerance: with ``tol``, ``n_perm`` is the block size. Blocks of ``n_perm`` units run (one
  compiled program, reused) until ``max(stderr) < tol * (max(values) - min(values))`` over the active players,
  or until one more block would take the evaluations past ``max_evals`` (default: the cost of
  :data:`DEFAULT_MAX_BLOCKS` blocks); ``converged`` says which. Block ``b`` holds units
  ``b * n_perm .. (b + 1) * n_perm - 1``, so the result equals the fixed-size result for the same total.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``, a JAX-traceable function (hashable: pass the same function
      object to reuse the compiled program).
    n_players: number of players.
    n_perm: units to draw (permutations, or kernel units); the block size with ``tol``. Even for
      ``"antithetic"``, a multiple of 16 for ``"stratified"``.
    key: PRNG key; unit ``i`` comes from ``fold_in(key, i)`` (pair ``i // 2`` for antithetic, group ``i // 16``
      for stratified).
    batch_size: coalitions per ``value_fn`` call: bounds peak memory, does not change the sample (default:
      :func:`default_batch_size`).
    estimator: ``"permutation"``, ``"antithetic"``, ``"stratified"`` or ``"kernel"`` (module docstring).
    player_mask: optional ``bool[n_players]``; False marks null players (padding) that get exactly 0.
    tol: relative tolerance on the largest standard error; None runs ``n_perm`` units once.
    max_evals: evaluation budget when stopping on tolerance.

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
  batch_size = default_batch_size(batch_size)
  check_counts(n_players, n_perm, batch_size, estimator)
  check_stopping(tol, max_evals)
  n_players, n_perm, batch_size = int(n_players), int(n_perm), int(batch_size)
  active = _player_mask(player_mask, n_players)
  v_empty_full = _endpoints_jit(value_fn, active)

  def block_fn(state, start):
    return _block_jit(value_fn, n_players, n_perm, key, start, state, active, v_empty_full, batch_size, estimator)

  units_cost = 0 if tol is None else evals_per_unit(int(np.sum(np.asarray(active))), estimator)
  return run_blocks(block_fn, init_state(n_players, estimator), n_perm=n_perm, units_cost=units_cost, tol=tol,
                    max_evals=max_evals, active=active)


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
  return _exact_from_table(values, int(n_players))


def _exact_from_table(values: np.ndarray, n: int) -> ShapleyResult:
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
