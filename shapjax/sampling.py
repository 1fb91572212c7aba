"""Semivalues of any value function: sampling estimators, error bars, stopping on tolerance, exact values.

A *value function* maps a batch of coalitions ``bool[B, n_players]`` to ``f32[B]``. Everything here is a pure
function of it: the estimators draw their samples, evaluate the coalitions in chunks of ``batch_size`` (so the
memory for model inputs does not grow with the sample) and reduce them, all inside one jitted XLA program.

Indices (``index=``, static and hashable). A semivalue gives player ``i``

    phi_i = sum over T subset of N \\ {i} of p(|T|) * (v(T + i) - v(T)),   sum_s C(n - 1, s) p(s) = 1,

and differs from the others only by the weight ``p`` it puts on each coalition size:

* ``"shapley"``: ``p(s) = s! (n - 1 - s)! / n!``, the only efficient one (values sum to v(N) - v(empty)).
* ``"banzhaf"``: ``p(s) = 2 ** -(n - 1)``: every coalition alike (Wang & Jia 2023, "Data Banzhaf").
* ``("beta", alpha, beta)``: Beta Shapley (Kwon & Zou 2022), ``p(s) = B(s + beta, n - 1 - s + alpha) /
  B(alpha, beta)``: the size of T is that of a coalition in which every other player takes part with a
  probability ``t ~ Beta(beta, alpha)``. ``alpha > beta`` weights *small* coalitions (the paper's Beta(16, 1) and
  Beta(4, 1)), ``alpha < beta`` large ones, and Beta(1, 1) is the Shapley value.
* ``"loo"``: leave-one-out, ``phi_i = v(N) - v(N \\ {i})`` (all weight on ``s = n - 1``): exact, no sampling.

Estimators (``estimator=``; None picks the index's first); a *unit* is what ``n_perm`` counts, and
:func:`evals_per_unit` is its cost with ``n_active`` active players:

* ``"permutation"``: plain Monte Carlo over random permutations (Castro et al. 2009), what captum does.
  ``n_active - 1`` evaluations. For a Beta index, the marginal contribution of the player at position ``k`` is
  weighted by ``n_active * C(n_active - 1, k) p(k)`` (importance weights against the uniform position), and the
  estimate is self-normalized, ``sum w m / sum w`` per player (also for antithetic and stratified): exact on
  additive games, and free of the weights' own noise.
* ``"antithetic"``: each permutation and its reverse (shap's PermutationExplainer); exact on games with at
  most pairwise interactions (Shapley). Pairs are the independent samples.
* ``"stratified"``: permutations stratified by position. A group of :data:`STRATIFIED_GROUP` permutations is
  a random base permutation of the active players, cyclically shifted by 8 evenly spaced offsets, each with
  its reverse; every shifted permutation is uniform, so the estimate is unbiased, and within a group each
  player visits the positions evenly (exactly when ``n_active`` divides 8), removing most of the variance that
  comes from coalition size. Groups are independent replicates and give the error bars (randomized QMC).
* ``"kernel"``: paired KernelSHAP with the efficiency constraint (Lundberg & Lee 2017; Covert & Lee 2021):
  coalitions drawn from the Shapley kernel, each with its complement, and a constrained least-squares fit.
  Error bars by the delete-a-group jackknife over :data:`KERNEL_GROUPS` interleaved groups of units. Shapley
  only.
* ``"paired"``: Banzhaf and Beta indices, sampled by coalition size. A unit draws ``t``, a coalition S with
  each active player in it with probability ``t``, and S with each active player flipped: ``n_active + 1``
  evaluations give every player one marginal contribution ``v(S + i) - v(S - i)``. Banzhaf: ``t = 1/2``, the
  index's own sizes. Beta: defensive importance sampling, ``t ~ Beta(beta, alpha)`` with probability
  :data:`BETA_MIXTURE`, else ``U(0, 1)``, so that the larger coalitions which reveal interactions are drawn
  often; player ``i``'s contribution to a coalition of ``s`` others is weighted by ``BB(s) / q(s)`` (target over
  proposal size pmf, at most ``1 / BETA_MIXTURE``) and the estimate is self-normalized. Exact on additive
  games; units are independent samples.
* ``"msr"``: maximum sample reuse for Banzhaf (Wang & Jia 2023): uniform coalitions, ``n_active`` per unit, and
  ``phi_i = mean v over those with i - mean v over those without``; every evaluation serves every player.
  Error bars from the two means' variances (Welch).
* ``"exact"``: leave-one-out, ``n_active`` evaluations of ``v(N \\ {i})`` whatever ``n_perm``.

Determinism: unit ``i`` is drawn from ``fold_in(key, i)`` (antithetic: pair ``i // 2``; stratified: group
``i // 16``), so neither ``batch_size`` nor the split into blocks when stopping on tolerance changes the sample:
``tol`` with block size ``n_perm`` after ``b`` blocks gives the fixed-size result for ``b * n_perm`` units.

Error bars: permutations, antithetic pairs, stratified groups and paired units are independent samples of a
ratio estimator, ``phi_i = sum y / sum x`` (``x`` the sample's weight, 1 for the Shapley value and Banzhaf);
``stderr`` is the delta-method ``sqrt(sum (y - phi x)^2 * S / (S - 1)) / sum x`` with ``S`` the effective
sample size ``(sum x)^2 / sum x^2``, times ``t(0.975, S - 1) / 1.96``. With equal weights it is the sample
standard deviation over ``sqrt(count)``. The running state keeps residual sums about the current estimate, so
blocks and devices merge exactly and float32 does not cancel.

Additivity: every result carries ``additivity``, the adjusted R^2 of the best additive game
``v(S) ~ v(empty) + sum_{i in S} beta_i`` fitted by least squares to every coalition value the estimate
evaluated (:class:`ShapleyResult`); its sufficient statistics ride in the running state, so it merges across
blocks and devices and costs no evaluation.

References:
  Castro, Gomez, Tejada (2009), Polynomial calculation of the Shapley value based on sampling.
  Mitchell, Cooper, Frank, Holmes (2022), Sampling permutations for Shapley value estimation, JMLR.
  Lundberg & Lee (2017), A unified approach to interpreting model predictions, NeurIPS.
  Covert & Lee (2021), Improving KernelSHAP: practical Shapley value estimation via linear regression, AISTATS.
  Kwon & Zou (2022), Beta Shapley: a unified and noise-reduced data valuation framework for machine learning,
    AISTATS.
  Wang & Jia (2023), Data Banzhaf: a robust data valuation framework for machine learning, AISTATS.
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

ESTIMATORS = ("permutation", "antithetic", "stratified", "kernel")  # the Shapley value's (all efficient)
INDICES = ("shapley", "banzhaf", "loo")  # and ("beta", alpha, beta)
# The estimators of each kind of index; the first is the default.
INDEX_ESTIMATORS = {
    "shapley": ("antithetic", "permutation", "stratified", "kernel"),
    "banzhaf": ("paired", "msr"),
    "beta": ("paired", "antithetic", "permutation", "stratified"),
    "loo": ("exact",),
}
ALL_ESTIMATORS = ("permutation", "antithetic", "stratified", "kernel", "paired", "msr", "exact")
DEFAULT_INDEX = "shapley"
DEFAULT_ESTIMATOR = "antithetic"
DEFAULT_BATCH_SIZE = 64  # coalitions per value-function call on GPU/TPU (and inside the traceable internals)
CPU_BATCH_SIZE = 16  # on CPU: the autoencoder's activations stay in cache (benchmarks/README.md, log)
STRATIFIED_SHIFTS = 8
STRATIFIED_GROUP = 2 * STRATIFIED_SHIFTS  # permutations per stratified replicate: shifts and their reverses
KERNEL_GROUPS = 32  # jackknife groups of the kernel estimator: unit i falls in group i % KERNEL_GROUPS
DEFAULT_MAX_BLOCKS = 64  # with tol and no max_evals: the budget is this many blocks
# A Beta index's paired units draw t from Beta(beta, alpha) with this probability, else from U(0, 1): defensive
# importance sampling, so that the larger coalitions that reveal interactions are drawn often enough to be seen.
BETA_MIXTURE = 0.5
_RIDGE = 1e-6
_PERMUTATION_ESTIMATORS = ("permutation", "antithetic", "stratified")
_FIT_FIELDS = ("fit_count", "fit_sum", "fit_sq", "fit_zy", "fit_zz")


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
  """Estimated semivalues (Shapley, Banzhaf, Beta Shapley, leave-one-out): a pytree; stack with ``jax.tree.map``.

  Attributes:
    values: ``f32[..., n_players]`` estimated value of each player under the index asked for.
    stderr: ``f32[..., n_players]`` standard error of each value (0 for exact values and padding players;
      NaN when fewer than two independent samples were drawn), scaled by ``t(0.975, dof) / 1.96`` so that
      ``values +- 1.96 * stderr`` is a 95% interval even with few independent samples.
    n_evals: ``i32[...]`` value-function evaluations that the estimate rests on (evaluations that padding
      players would have cost are not counted: they are skipped).
    converged: ``bool[...]`` whether the stopping tolerance was met (always True without ``tol``).
    additivity: ``f32[...]`` how close the game is to additive, from the evaluations already made: the adjusted
      R^2, ``1 - (SSE / (m - p)) / (SST / (m - 1))``, of the least-squares additive game
      ``v(S) ~ v(empty) + sum_{i in S} beta_i`` over the ``m`` coalitions evaluated (with their multiplicity,
      v(empty) and v(all) included), ``p`` the number of active players. 1 exactly (to float precision) when
      the game is additive on those coalitions, whatever the index or estimator: then every semivalue is the
      same, ``beta_i``. 0.9 means a tenth of the variance of ``v`` over the sampled coalitions is interaction.
      It is an in-sample fit on the sampler's coalitions (permutation prefixes, the index's sizes, ...), so
      it can differ between estimators on one game; it is NaN when undefined: no more coalitions than
      players, or ``v`` constant over them.
  """

  values: jax.Array
  stderr: jax.Array
  n_evals: jax.Array
  converged: jax.Array
  additivity: jax.Array


def default_batch_size(batch_size: int | None = None):
  """``batch_size`` itself, or when None the default for JAX's default backend: 16 on CPU, 64 elsewhere."""
  if batch_size is not None:
    return batch_size
  return CPU_BATCH_SIZE if jax.default_backend() == "cpu" else DEFAULT_BATCH_SIZE


def check_index(index):
  """The index in its normal, hashable form, or a ValueError naming the forms it may take.

  ``"shapley"``, ``"banzhaf"``, ``"loo"``, or ``("beta", alpha, beta)`` with positive finite floats (a list is
  accepted and returned as a tuple of ``("beta", float, float)``).
  """
  if isinstance(index, str) and index in INDICES:
    return index
  if isinstance(index, (tuple, list)) and len(index) == 3 and index[0] == "beta":
    alpha, beta = index[1], index[2]
    if all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
           and math.isfinite(x) and x > 0 for x in (alpha, beta)):
      return ("beta", float(alpha), float(beta))
  raise ValueError(f"index must be 'shapley', 'banzhaf', 'loo' or ('beta', alpha, beta) with positive alpha and "
                   f"beta (e.g. ('beta', 16, 1)), got {index!r}")


def index_kind(index) -> str:
  """``"shapley"``, ``"banzhaf"``, ``"loo"`` or ``"beta"`` for a normal-form index."""
  return index if isinstance(index, str) else "beta"


def resolve_estimator(index, estimator: str | None) -> str:
  """The estimator to use for ``index``: ``estimator`` itself once checked, or the index's default when None."""
  kind = index_kind(check_index(index))
  choices = INDEX_ESTIMATORS[kind]
  if estimator is None:
    return choices[0]
  if estimator not in ALL_ESTIMATORS:
    raise ValueError(f"estimator must be one of {ALL_ESTIMATORS}, got {estimator!r}")
  if estimator not in choices:
    raise ValueError(f"estimator={estimator!r} does not estimate index={index!r}: use one of {choices} "
                     f"(or estimator=None for {choices[0]!r})")
  return estimator


def check_counts(n_players: int, n_perm: int, batch_size: int, estimator: str | None, *,
                 index=DEFAULT_INDEX) -> None:
  """ValueErrors that name the problem for sizes, an index and an estimator the sampler cannot take."""
  if not isinstance(n_players, (int, np.integer)) or n_players < 1:
    raise ValueError(f"n_players must be a positive int, got {n_players!r}")
  if not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
    raise ValueError(f"n_perm must be a positive int, got {n_perm!r}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  estimator = resolve_estimator(index, estimator)
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
  kernel unit is ``n_active // 2`` coalitions and their complements; a paired unit a coalition and its
  ``n_active`` one-player flips (``n_active + 1``); an MSR unit ``n_active`` uniform coalitions; leave-one-out
  (``"exact"``) ``n_active`` evaluations of ``v(N \\ {i})``, counted as one unit whatever ``n_perm``.
  """
  concrete = isinstance(n_active, (int, np.integer))
  if estimator == "kernel":
    return 2 * (n_active // 2)
  if estimator in ("msr", "exact"):
    return n_active
  if estimator == "paired":
    return (n_active + 1 if n_active > 0 else 0) if concrete else jnp.where(n_active > 0, n_active + 1, 0)
  return n_active - 1 if concrete else jnp.maximum(n_active - 1, 0)


def block_evals(n_active: int, n_perm: int, estimator: str) -> int:
  """Evaluations one block of ``n_perm`` units costs (leave-one-out: one sweep whatever ``n_perm``)."""
  return evals_per_unit(n_active, estimator) * (1 if estimator == "exact" else n_perm)


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


def _size_pmf(index, n_players: int, n_active: jax.Array) -> jax.Array:
  """``f32[n_players]``: the index's probability ``C(n_active - 1, k) p(k)`` of a coalition of ``k`` others.

  For a Beta index, the beta-binomial pmf ``BB(k; n_active - 1, beta, alpha)``; sizes ``k >= n_active`` get 0.
  """
  _, alpha, beta = index
  k = jnp.arange(n_players, dtype=jnp.float32)
  n = n_active.astype(jnp.float32)
  rest = jnp.maximum(n - 1.0 - k, 0.0)
  log_size = (jax.scipy.special.gammaln(jnp.maximum(n, 1.0)) - jax.scipy.special.gammaln(k + 1.0)
              - jax.scipy.special.gammaln(rest + 1.0)
              + jax.scipy.special.betaln(k + beta, rest + alpha) - jax.scipy.special.betaln(alpha, beta))
  return jnp.where(k < n, jnp.exp(log_size), 0.0)


def _position_weights(index, n_players: int, n_active: jax.Array) -> jax.Array:
  """``f32[n_players]``: weight of a marginal contribution to a coalition of ``k`` predecessors, ``k = 0 ..``.

  A uniform permutation puts player ``i`` after ``k`` others with probability ``1 / n_active``; the index
  wants size ``k`` with probability ``C(n_active - 1, k) p(k)``, so the importance weight is their ratio (1 for
  Shapley). Positions ``>= n_active`` (padding) get 0.
  """
  if index == "shapley":
    return jnp.ones((n_players,), jnp.float32)
  return n_active.astype(jnp.float32) * _size_pmf(index, n_players, n_active)


def _fit_block(coalitions: jax.Array, targets: jax.Array, used: jax.Array) -> dict[str, jax.Array]:
  """Sufficient statistics of the additive fit over evaluated coalitions.

  Args:
    coalitions: ``f32[m, n_players]`` 0/1.
    targets: ``f32[m]`` ``v(S) - v(empty)``.
    used: ``f32[m]`` 1 for a coalition that was evaluated, 0 for a skipped slot.
  """
  weighted = coalitions * used[:, None]
  return {"fit_count": jnp.sum(used), "fit_sum": jnp.sum(used * targets),
          "fit_sq": jnp.sum(used * targets * targets), "fit_zy": weighted.T @ targets,
          "fit_zz": weighted.T @ coalitions}


def _permutation_table(value_fn, n_players, n_perm, key, start, batch_size, estimator, active, v_empty_full):
  """Ranks ``i32[P, n]`` and coalition values ``f32[n + 1, P]`` by size along permutations ``start ..``."""
  n_active = jnp.sum(active, dtype=jnp.int32)
  indices = start + jnp.arange(n_perm)
  ranks = jax.vmap(lambda i: permutation_ranks(key, i, active, estimator))(indices)  # [P, n]
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
  return ranks, table


def _permutation_fit(ranks, table, active, v_empty_full):
  """Additive-fit statistics of the inner coalitions a block of permutations evaluated."""
  n_perm, n_players = ranks.shape
  n_active = jnp.sum(active, dtype=jnp.int32)
  sizes = jnp.arange(1, n_players)
  coalitions = (ranks[None, :, :] < sizes[:, None, None]).astype(jnp.float32)  # [n - 1, P, n]
  used = jnp.broadcast_to((sizes < n_active)[:, None], (n_players - 1, n_perm)).astype(jnp.float32)
  return _fit_block(coalitions.reshape(-1, n_players), (table[1:-1] - v_empty_full[0]).reshape(-1),
                    used.reshape(-1))


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
  if v_empty_full is None:
    v_empty_full = endpoint_values(value_fn, active)
  ranks, table = _permutation_table(value_fn, n_players, n_perm, key, start, batch_size, estimator, active,
                                    v_empty_full)
  by_position = (table[1:] - table[:-1]).T  # [P, n]: contribution of the player at each position
  contributions = jnp.take_along_axis(by_position, ranks, axis=1)
  return jnp.where(active[None, :], contributions, 0.0), v_empty_full


def _active_first(active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(order, position)``: the players with the active ones first, and each player's place in that order.

  Slot ``j`` of a paired, MSR or leave-one-out unit belongs to player ``order[j]``, so the slots that padding
  players would need form a tail that :func:`_evaluate_chunked` skips.
  """
  n_players = active.shape[0]
  order = jnp.argsort(jnp.where(active, 0, n_players) + jnp.arange(n_players))
  position = jnp.zeros((n_players,), jnp.int32).at[order].set(jnp.arange(n_players, dtype=jnp.int32))
  return order, position


def _inclusion_probability(key: jax.Array, index) -> jax.Array:
  """The probability ``t`` with which every active player joins a paired unit's coalition.

  Banzhaf: 1/2. A Beta index: the defensive mixture, ``Beta(beta, alpha)`` with probability
  :data:`BETA_MIXTURE`, else ``U(0, 1)``; :func:`_paired_weights` weighs the sizes back to the index's.
  """
  kind = index_kind(index)
  if kind == "banzhaf":
    return jnp.asarray(0.5, jnp.float32)
  if kind == "shapley":
    return jax.random.uniform(key)
  _, alpha, beta = index
  choice_key, beta_key, uniform_key = jax.random.split(key, 3)
  from_index = jax.random.beta(beta_key, beta, alpha)  # density t^(beta-1) (1-t)^(alpha-1): alpha > beta -> small
  return jnp.where(jax.random.uniform(choice_key) < BETA_MIXTURE, from_index, jax.random.uniform(uniform_key))


def _paired_weights(index, bases: jax.Array, active: jax.Array) -> jax.Array:
  """``f32[P, n]``: importance weight of each player's marginal contribution in each paired unit.

  Player ``i``'s contribution is to ``T = S \\ {i}``, of size ``s`` among the ``n_active - 1`` other active
  players. The index wants ``s ~ BB(n_active - 1, beta, alpha)`` (beta-binomial); the mixture draws it from
  ``q(s) = lambda BB(s) + (1 - lambda) / n_active`` (a uniform ``t`` makes every size equally likely), and given
  its size T is uniform under both. The weight ``BB(s) / q(s)`` is at most ``1 / lambda``. Banzhaf: 1.
  Padding players: 0.
  """
  if index_kind(index) != "beta":
    return jnp.broadcast_to(active.astype(jnp.float32), bases.shape)
  n_players = active.shape[0]
  n_active = jnp.sum(active, dtype=jnp.int32)
  target = _size_pmf(index, n_players, n_active)
  proposal = BETA_MIXTURE * target + (1.0 - BETA_MIXTURE) / jnp.maximum(n_active, 1).astype(jnp.float32)
  ratio = target / proposal  # [n]: by size
  others = jnp.sum(bases, axis=1, dtype=jnp.int32)[:, None] - bases.astype(jnp.int32)  # [P, n]
  return jnp.where(active[None, :], ratio[jnp.clip(others, 0, n_players - 1)], 0.0)


def _paired_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full, index):
  """Ratio statistics of units ``start ..``, each a coalition and its one-player flips, and their fit."""
  n_active = jnp.sum(active, dtype=jnp.int32)
  order, position = _active_first(active)
  units = start + jnp.arange(n_perm)

  def base(unit):
    t_key, in_key = jax.random.split(jax.random.fold_in(key, unit))
    return (jax.random.uniform(in_key, (n_players,)) < _inclusion_probability(t_key, index)) & active

  bases = jax.vmap(base)(units)  # [P, n]
  flips = jax.nn.one_hot(order, n_players, dtype=jnp.bool_)  # slot j + 1 flips player order[j]
  # Slot-major: slot 0 (the coalition itself) of every unit, then slot 1, ...; the padding slots are a tail.
  slots = jnp.concatenate([jnp.zeros((1, n_players), bool), flips])  # [n + 1, n]

  def coalitions_of(flat):
    return bases[flat % n_perm] ^ slots[flat // n_perm]

  n_items = (n_players + 1) * n_perm
  n_needed = evals_per_unit(n_active, "paired") * n_perm
  values = _evaluate_chunked(value_fn, coalitions_of, n_items, batch_size, n_needed).reshape(n_players + 1, n_perm)
  v_base, v_flipped = values[0], values[1:].T  # [P], [P, n] by slot
  v_flipped = jnp.take_along_axis(v_flipped, jnp.broadcast_to(position[None, :], (n_perm, n_players)), axis=1)
  contributions = jnp.where(bases, v_base[:, None] - v_flipped, v_flipped - v_base[:, None])
  contributions = jnp.where(active[None, :], contributions, 0.0)
  coalitions = (bases[None, :, :] ^ slots[:, None, :]).astype(jnp.float32)  # [n + 1, P, n]
  used = (jnp.arange(n_players + 1) <= n_active) & (n_active > 0)
  used = jnp.broadcast_to(used[:, None], (n_players + 1, n_perm)).astype(jnp.float32)
  fit = _fit_block(coalitions.reshape(-1, n_players), (values - v_empty_full[0]).reshape(-1), used.reshape(-1))
  weights = _paired_weights(index, bases, active)
  return _ratio_moments(weights * contributions, weights), fit


def _masked_moments(targets: jax.Array, membership: jax.Array) -> dict[str, jax.Array]:
  """Per player: count, mean and sum of squared deviations of ``targets f32[m]`` where ``membership f32[m, n]``."""
  count = jnp.sum(membership, axis=0)
  mean = (membership.T @ targets) / jnp.maximum(count, 1.0)
  m2 = jnp.sum(membership * jnp.square(targets[:, None] - mean[None, :]), axis=0)
  return {"count": count, "mean": mean, "m2": m2}


def _msr_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full):
  """Units ``start ..`` of ``n_active`` uniform coalitions each: per player, moments of v with and without it."""
  n_active = jnp.sum(active, dtype=jnp.int32)
  units = start + jnp.arange(n_perm)

  def one(slot, unit):
    draw = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, unit), slot), (n_players,))
    return (draw < 0.5) & active

  coalitions = jax.vmap(lambda slot: jax.vmap(lambda unit: one(slot, unit))(units))(jnp.arange(n_players))
  flat = coalitions.reshape(-1, n_players)  # slot-major: the slots beyond n_active are a tail
  values = _evaluate_chunked(value_fn, lambda f: flat[f], n_players * n_perm, batch_size, n_active * n_perm)
  targets = values - v_empty_full[0]
  used = jnp.broadcast_to((jnp.arange(n_players) < n_active)[:, None], (n_players, n_perm))
  used = used.reshape(-1).astype(jnp.float32)
  z = flat.astype(jnp.float32)
  inside = z * used[:, None]
  outside = (1.0 - z) * used[:, None] * active[None, :].astype(jnp.float32)
  block = {"inside": _masked_moments(targets, inside), "outside": _masked_moments(targets, outside)}
  return block, _fit_block(z, targets, used)


def _loo_block(value_fn, n_players, batch_size, active, v_empty_full):
  """Leave-one-out values ``f32[n]`` from ``v(N \\ {i})`` for every active player."""
  n_active = jnp.sum(active, dtype=jnp.int32)
  order, position = _active_first(active)
  coalitions = active[None, :] & ~jax.nn.one_hot(order, n_players, dtype=jnp.bool_)  # slot j: without order[j]
  values = _evaluate_chunked(value_fn, lambda f: coalitions[f], n_players, batch_size, n_active)
  used = (jnp.arange(n_players) < n_active).astype(jnp.float32)
  fit = _fit_block(coalitions.astype(jnp.float32), values - v_empty_full[0], used)
  loo = jnp.where(active, v_empty_full[1] - values[position], 0.0)
  return {"values": loo}, fit


def sample_group(estimator: str) -> int:
  """Units that form one independent sample: 2 for an antithetic pair, 16 for a stratified group, else 1.

  Work split across devices must give each device whole groups.
  """
  return {"antithetic": 2, "stratified": STRATIFIED_GROUP}.get(estimator, 1)


def _independent_samples(weighted: jax.Array, weights: jax.Array, estimator: str) -> tuple[jax.Array, jax.Array]:
  """Rows that are iid: permutations, antithetic pairs, or stratified groups (their means), of both arrays."""
  group = sample_group(estimator)
  if group == 1:
    return weighted, weights
  return tuple(a.reshape(-1, group, a.shape[-1]).mean(axis=1) for a in (weighted, weights))


# ---------------------------------------------------------------------------------------------------------
# Running statistics. A block's statistics merge into the state, so blocks of any size give one estimate.
#
# Permutation and paired estimators are ratio estimators: independent sample g gives every player a weight
# x_g (its importance weight; 1 for the Shapley value and Banzhaf) and a weighted contribution y_g, and
# phi = sum y / sum x. Its delta-method variance is sum r_g^2 / (sum x)^2 with residuals r_g = y_g - phi x_g.
# The state keeps, per player, sum x, sum x^2, phi and the residuals' sums sum x r and sum r^2 about phi: moving
# the centre by d adds d sum x^2 to the first and 2 d sum x r + d^2 sum x^2 to the second, so states merge
# exactly (Chan's formula when every x is 1), and nothing subtracts two large sums (no float32 cancellation).


def _empty_moments(n_players: int, *, per_player: bool = False) -> dict[str, jax.Array]:
  count = jnp.zeros((n_players,) if per_player else (), jnp.float32)
  return {"count": count, "mean": jnp.zeros((n_players,), jnp.float32), "m2": jnp.zeros((n_players,), jnp.float32)}


def _empty_ratio(n_players: int) -> dict[str, jax.Array]:
  zeros = jnp.zeros((n_players,), jnp.float32)
  return {"count": jnp.zeros((), jnp.float32), "weight": zeros, "weight_sq": zeros, "mean": zeros, "cross": zeros,
          "m2": zeros}


def init_state(n_players: int, estimator: str) -> dict[str, jax.Array]:
  """Empty running statistics of ``estimator`` for ``n_players`` players (a pytree of fixed shapes).

  Permutation and paired estimators keep the ratio statistics of their independent samples (the number of
  samples and, per player, the sums of weights and squared weights, the weighted mean and the residuals' sums
  about it; merged exactly); MSR keeps the count, mean and sum of squared deviations of v over the coalitions
  with and without each player (Chan's parallel formula); the kernel estimator keeps per-group normal
  equations; leave-one-out its values. Every state also keeps the sufficient statistics of the additive fit
  behind ``additivity`` (sums, merged by adding).
  """
  state = {"units": jnp.zeros((), jnp.int32)}
  if estimator == "kernel":
    state["gram"] = jnp.zeros((KERNEL_GROUPS, n_players, n_players), jnp.float32)
    state["moment"] = jnp.zeros((KERNEL_GROUPS, n_players), jnp.float32)
    state["count"] = jnp.zeros((KERNEL_GROUPS,), jnp.float32)
  elif estimator == "msr":
    state["inside"] = _empty_moments(n_players, per_player=True)
    state["outside"] = _empty_moments(n_players, per_player=True)
  elif estimator == "exact":
    state["values"] = jnp.zeros((n_players,), jnp.float32)
  else:
    state.update(_empty_ratio(n_players))
  state.update({"fit_count": jnp.zeros((), jnp.float32), "fit_sum": jnp.zeros((), jnp.float32),
                "fit_sq": jnp.zeros((), jnp.float32), "fit_zy": jnp.zeros((n_players,), jnp.float32),
                "fit_zz": jnp.zeros((n_players, n_players), jnp.float32)})
  return state


def _merge_moments(state: dict, block: dict) -> dict:
  """Chan's parallel formula (counts may be per player)."""
  count = state["count"] + block["count"]
  delta = block["mean"] - state["mean"]
  weight = block["count"] / jnp.maximum(count, 1.0)
  return {"count": count, "mean": state["mean"] + delta * weight,
          "m2": state["m2"] + block["m2"] + delta ** 2 * state["count"] * weight}


def _merge_moments_across(block: dict, axis_name) -> dict:
  """Every device's moments merged into those of all devices' samples (the same on every device).

  As accurate as one pass: the global mean from the weighted sum of means, each device's deviations moved to it.
  """
  count = jax.lax.psum(block["count"], axis_name)
  mean = jax.lax.psum(block["count"] * block["mean"], axis_name) / jnp.maximum(count, 1.0)
  m2 = jax.lax.psum(block["m2"] + block["count"] * jnp.square(block["mean"] - mean), axis_name)
  return {"count": count, "mean": mean, "m2": m2}


def _ratio_moments(weighted: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Ratio statistics of iid samples: weighted contributions ``y f32[S, n]`` and their weights ``x f32[S, n]``."""
  weight = jnp.sum(weights, axis=0)
  mean = jnp.where(weight > 0, jnp.sum(weighted, axis=0) / jnp.where(weight > 0, weight, 1.0), 0.0)
  residual = weighted - mean[None, :] * weights
  return {"count": jnp.asarray(weighted.shape[0], jnp.float32), "weight": weight,
          "weight_sq": jnp.sum(weights * weights, axis=0), "mean": mean,
          "cross": jnp.sum(weights * residual, axis=0), "m2": jnp.sum(residual * residual, axis=0)}


def _recentre(stats: dict, mean: jax.Array) -> dict:
  """``stats``' residual sums about ``mean`` instead of their own weighted mean."""
  shift = stats["mean"] - mean
  return {"cross": stats["cross"] + shift * stats["weight_sq"],
          "m2": stats["m2"] + shift * (2.0 * stats["cross"] + shift * stats["weight_sq"])}


def _merge_ratio(state: dict, block: dict) -> dict:
  """The ratio statistics of two sets of samples together."""
  weight = state["weight"] + block["weight"]
  share = jnp.where(weight > 0, block["weight"] / jnp.where(weight > 0, weight, 1.0), 0.0)
  mean = state["mean"] + (block["mean"] - state["mean"]) * share
  old, new = _recentre(state, mean), _recentre(block, mean)
  return {"count": state["count"] + block["count"], "weight": weight,
          "weight_sq": state["weight_sq"] + block["weight_sq"], "mean": mean,
          "cross": old["cross"] + new["cross"], "m2": old["m2"] + new["m2"]}


def _merge_ratio_across(block: dict, axis_name) -> dict:
  """Every device's ratio statistics merged into those of all devices' samples (the same on every device)."""
  weight = jax.lax.psum(block["weight"], axis_name)
  total = jax.lax.psum(block["weight"] * block["mean"], axis_name)
  mean = jnp.where(weight > 0, total / jnp.where(weight > 0, weight, 1.0), 0.0)
  moved = _recentre(block, mean)
  return {"count": jax.lax.psum(block["count"], axis_name), "weight": weight,
          "weight_sq": jax.lax.psum(block["weight_sq"], axis_name), "mean": mean,
          "cross": jax.lax.psum(moved["cross"], axis_name), "m2": jax.lax.psum(moved["m2"], axis_name)}


def _combine(state: dict, block: dict, estimator: str) -> dict:
  """The statistics of ``state``'s samples and ``block``'s together."""
  if estimator == "exact":  # deterministic: a second sweep is the same sweep
    return {**state, **block}
  fit = {name: state[name] + block[name] for name in _FIT_FIELDS}
  if estimator == "kernel":
    return {**state, **fit, **{name: state[name] + block[name] for name in ("gram", "moment", "count")}}
  if estimator == "msr":
    return {**state, **fit, "inside": _merge_moments(state["inside"], block["inside"]),
            "outside": _merge_moments(state["outside"], block["outside"])}
  return {**state, **fit, **_merge_ratio(state, block)}


def _combine_across(block: dict, axis_name, estimator: str) -> dict:
  """Every device's block statistics merged into those of all devices' samples (the same on every device)."""
  fit = {name: jax.lax.psum(block[name], axis_name) for name in _FIT_FIELDS}
  if estimator == "kernel":
    return {**fit, **{name: jax.lax.psum(block[name], axis_name) for name in ("gram", "moment", "count")}}
  if estimator == "msr":
    return {**fit, "inside": _merge_moments_across(block["inside"], axis_name),
            "outside": _merge_moments_across(block["outside"], axis_name)}
  return {**fit, **_merge_ratio_across(block, axis_name)}


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
  """The block's own normal equations, per jackknife group, and its additive-fit statistics."""
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
  used_flat = jnp.broadcast_to(used, (n_perm, n_pairs, 2)).reshape(-1).astype(jnp.float32)
  fit = _fit_block(z.reshape(-1, n_players), targets.reshape(-1), used_flat)
  return {"gram": gram, "moment": moment, "count": count}, fit


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


def _ratio_stderr(state) -> jax.Array:
  """Standard error of a ratio estimate (delta method), Student-t inflated; NaN below two samples.

  ``sqrt(sum r^2 * S / (S - 1)) / sum x`` over ``S`` samples: with every weight 1 it is the sample standard
  deviation over ``sqrt(S)``. The t quantile takes the effective sample size ``(sum x)^2 / sum x^2`` (``S`` when
  the weights are equal), which is smaller when a few samples carry most of the weight.
  """
  count, weight = state["count"], state["weight"]
  effective = jnp.square(weight) / jnp.where(state["weight_sq"] > 0, state["weight_sq"], 1.0)
  # Rounding may put the effective size of equal weights a hair under S; it is never above S.
  effective = jnp.minimum(effective * (1.0 + 1e-5), count)
  spread = state["m2"] * effective / jnp.maximum(effective - 1.0, 1.0)
  stderr = jnp.sqrt(jnp.maximum(spread, 0.0)) / jnp.where(weight > 0, weight, 1.0)
  return jnp.where(count >= 2, stderr * _t_inflation(effective), jnp.nan)


def _finish(state, active, v_empty_full, estimator):
  """Values and standard errors from running statistics."""
  if estimator == "exact":
    return state["values"], jnp.zeros_like(state["values"])
  if estimator == "msr":
    inside, outside = state["inside"], state["outside"]
    se2_in = inside["m2"] / jnp.maximum(inside["count"] - 1.0, 1.0) / jnp.maximum(inside["count"], 1.0)
    se2_out = outside["m2"] / jnp.maximum(outside["count"] - 1.0, 1.0) / jnp.maximum(outside["count"], 1.0)
    se2 = se2_in + se2_out
    # Welch-Satterthwaite degrees of freedom of the difference of the two means.
    spread = (se2_in ** 2 / jnp.maximum(inside["count"] - 1.0, 1.0)
              + se2_out ** 2 / jnp.maximum(outside["count"] - 1.0, 1.0))
    dof = jnp.where(spread > 0, se2 ** 2 / jnp.where(spread > 0, spread, 1.0), 1e6)
    stderr = jnp.sqrt(se2) * _t_inflation(jnp.minimum(dof, 1e6) + 1.0)
    stderr = jnp.where((inside["count"] >= 2) & (outside["count"] >= 2), stderr, jnp.nan)
    values = inside["mean"] - outside["mean"]
    return jnp.where(active, values, 0.0), jnp.where(active, stderr, 0.0)
  if estimator != "kernel":
    return jnp.where(active, state["mean"], 0.0), jnp.where(active, _ratio_stderr(state), 0.0)
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


def _additivity(state, active, v_empty_full) -> jax.Array:
  """Adjusted R^2 of the least-squares additive game over the evaluated coalitions (:class:`ShapleyResult`)."""
  n_players = active.shape[0]
  activity = active.astype(jnp.float32)
  whole = v_empty_full[1] - v_empty_full[0]
  # v(empty) (target 0, no player) and v(all active) join the data once, whatever the number of blocks.
  count = state["fit_count"] + 2.0
  mean = (state["fit_sum"] + whole) / count
  second = (state["fit_sq"] + whole * whole) / count
  zy = (state["fit_zy"] + activity * whole) / count
  zz = (state["fit_zz"] + activity[:, None] * activity[None, :]) / count
  both = active[:, None] & active[None, :]
  eye = jnp.eye(n_players, dtype=jnp.float32)
  gram = jnp.where(both, zz, 0.0)
  coef = jnp.linalg.solve(jnp.where(both, zz, eye) + _RIDGE * eye, jnp.where(active, zy, 0.0))
  residual = jnp.maximum(second - 2.0 * coef @ zy + coef @ gram @ coef, 0.0)  # SSE / m
  total = second - mean * mean  # SST / m
  n_active = jnp.sum(activity)
  defined = (count > n_active + 1.0) & (total > 1e-6 * second)
  ratio = residual * (count - 1.0) / jnp.where(defined, total * (count - n_active), 1.0)
  return jnp.where(defined, 1.0 - ratio, jnp.nan)


def estimate_block(value_fn: ValueFn, n_players: int, n_perm: int, *, key: jax.Array, start: int | jax.Array,
                   state: dict[str, jax.Array], active: jax.Array, v_empty_full: jax.Array,
                   batch_size: int = DEFAULT_BATCH_SIZE, estimator: str = DEFAULT_ESTIMATOR,
                   index=DEFAULT_INDEX, axis_name=None) -> tuple[dict[str, jax.Array], ShapleyResult]:
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
    estimator: one of ``INDEX_ESTIMATORS[index_kind(index)]`` (static, resolved: not None).
    index: ``"shapley"``, ``"banzhaf"``, ``"loo"`` or ``("beta", alpha, beta)`` in normal form
      (:func:`check_index`; static).
    axis_name: inside ``shard_map``, the mesh axes whose devices each drew their own units: their statistics
      are merged (``psum``) before they join ``state``, so every device returns the estimate of all units.
      (Leave-one-out is deterministic: every device computes the same sweep and nothing is merged.)

  Returns:
    ``(state, result)``; ``result.converged`` is True (the caller decides about stopping).
  """
  if estimator == "kernel":
    block, fit = _kernel_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full)
  elif estimator == "msr":
    block, fit = _msr_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full)
  elif estimator == "exact":
    block, fit = _loo_block(value_fn, n_players, batch_size, active, v_empty_full)
  elif estimator == "paired":
    block, fit = _paired_block(value_fn, n_players, n_perm, key, start, batch_size, active, v_empty_full, index)
  else:
    ranks, table = _permutation_table(value_fn, n_players, n_perm, key, start, batch_size, estimator, active,
                                      v_empty_full)
    by_position = (table[1:] - table[:-1]).T  # [P, n]: contribution of the player at each position
    by_rank = _position_weights(index, n_players, jnp.sum(active, dtype=jnp.int32))
    weighted = jnp.take_along_axis(by_position * by_rank[None, :], ranks, axis=1)
    weights = jnp.take_along_axis(jnp.broadcast_to(by_rank[None, :], ranks.shape), ranks, axis=1)
    weighted = jnp.where(active[None, :], weighted, 0.0)
    weights = jnp.where(active[None, :], weights, 0.0)
    block = _ratio_moments(*_independent_samples(weighted, weights, estimator))
    fit = _permutation_fit(ranks, table, active, v_empty_full)
  block = {**block, **fit}
  units = jnp.asarray(1 if estimator == "exact" else n_perm, jnp.int32)
  if axis_name is not None and estimator != "exact":
    block = _combine_across(block, axis_name, estimator)
    units = jax.lax.psum(units, axis_name)
  state = _combine(state, block, estimator)
  state = {**state, "units": units if estimator == "exact" else state["units"] + units}
  values, stderr = _finish(state, active, v_empty_full, estimator)
  n_active = jnp.sum(active, dtype=jnp.int32)
  n_evals = state["units"] * evals_per_unit(n_active, estimator) + 2
  return state, ShapleyResult(values=values, stderr=stderr, n_evals=n_evals.astype(jnp.int32),
                              converged=jnp.asarray(True), additivity=_additivity(state, active, v_empty_full))


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


def run_blocks(block_fn: Callable, state, *, n_perm: int, block_cost: int, tol: float | None,
               max_evals: int | None, active) -> ShapleyResult:
  """Host loop over jitted blocks: ``block_fn(state, start) -> (state, result)``.

  Without ``tol`` runs one block. With it, runs blocks of ``n_perm`` units until :func:`tolerance_met` or the
  next block would spend more than ``max_evals`` evaluations in total (``block_cost`` per block, from
  :func:`block_evals`, 2 more for the empty and full coalitions).
  """
  if tol is not None:
    if max_evals is None:
      max_evals = 2 + DEFAULT_MAX_BLOCKS * block_cost
    if 2 + block_cost > max_evals:
      raise ValueError(f"max_evals={max_evals} is less than one block of n_perm={n_perm} units "
                       f"({2 + block_cost} evaluations); lower n_perm or raise max_evals")
  start = 0
  while True:
    state, result = block_fn(state, jnp.asarray(start, jnp.int32))
    start += n_perm
    if tol is None:
      return result
    if tolerance_met(result, active, tol):
      return result.replace(converged=jnp.asarray(True))
    if 2 + (start // n_perm + 1) * block_cost > max_evals:
      return result.replace(converged=jnp.asarray(False))


@functools.partial(jax.jit, static_argnames=("value_fn",))
def _endpoints_jit(value_fn, active):
  return endpoint_values(value_fn, active)


@functools.partial(jax.jit, static_argnames=("value_fn", "n_players", "n_perm", "batch_size", "estimator", "index"))
def _block_jit(value_fn, n_players, n_perm, key, start, state, active, v_empty_full, batch_size, estimator, index):
  return estimate_block(value_fn, n_players, n_perm, key=key, start=start, state=state, active=active,
                        v_empty_full=v_empty_full, batch_size=batch_size, estimator=estimator, index=index)


def shapley_values(
    value_fn: ValueFn,
    n_players: int,
    n_perm: int,
    *,
    key: jax.Array,
    batch_size: int | None = None,
    estimator: str | None = None,
    index=DEFAULT_INDEX,
    player_mask=None,
    tol: float | None = None,
    max_evals: int | None = None,
) -> ShapleyResult:
  """Sampling estimate of the Shapley values (or another semivalue) of ``value_fn``, with standard errors.

  A unit of ``n_perm`` costs :func:`evals_per_unit` evaluations: ``n_active - 1`` for a permutation,
  ``2 * (n_active // 2)`` for a kernel unit, ``n_active + 1`` for a paired unit, ``n_active`` for an MSR unit;
  leave-one-out costs ``n_active`` whatever ``n_perm``. v(empty) and v(all) are evaluated once. Players
  outside ``player_mask`` get exactly 0 and cost no evaluation. For the Shapley index, efficiency,
  ``sum(values) = v(all) - v(empty)``, holds for every estimator: exactly per permutation for the permutation
  estimators (telescoping), and through the constraint of the kernel fit. Other indices are not efficient.

  Error bars: permutations, antithetic pairs, stratified groups and paired units are iid, so ``stderr`` is
  their standard deviation over ``sqrt(count)`` (for importance-weighted Beta estimates, the delta-method
  standard error of the self-normalized mean, with the effective sample size); MSR's combines the variances of
  its two means (Welch); the kernel estimator's comes from a delete-a-group jackknife. All are scaled by the
  Student-t factor ``t(0.975, dof) / 1.96`` (1.02 at 50 samples, 1.62 at 4), so that ``values +- 1.96 * stderr``
  covers the true values 95% of the time even with few samples (Beta indices' intervals are narrower than that
  at a few units: docs/estimators.md, "Error bars"). Leave-one-out is exact (``stderr`` 0).

  Stopping on tolerance: with ``tol``, ``n_perm`` is the block size. Blocks of ``n_perm`` units run (one
  compiled program, reused) until ``max(stderr) < tol * (max(values) - min(values))`` over the active players,
  or until one more block would take the evaluations past ``max_evals`` (default: the cost of
  :data:`DEFAULT_MAX_BLOCKS` blocks); ``converged`` says which. Block ``b`` holds units
  ``b * n_perm .. (b + 1) * n_perm - 1``, so the result equals the fixed-size result for the same total.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``, a JAX-traceable function (hashable: pass the same function
      object to reuse the compiled program).
    n_players: number of players.
    n_perm: units to draw (permutations, kernel, paired or MSR units); the block size with ``tol``. Even for
      ``"antithetic"``, a multiple of 16 for ``"stratified"``; ignored by leave-one-out.
    key: PRNG key; unit ``i`` comes from ``fold_in(key, i)`` (pair ``i // 2`` for antithetic, group ``i // 16``
      for stratified).
    batch_size: coalitions per ``value_fn`` call: bounds peak memory, does not change the sample (default:
      :func:`default_batch_size`).
    estimator: one of the index's estimators (module docstring): Shapley ``"antithetic"`` (default),
      ``"permutation"``, ``"stratified"``, ``"kernel"``; Banzhaf ``"paired"`` (default), ``"msr"``; Beta
      ``"paired"`` (default), ``"antithetic"``, ``"permutation"``, ``"stratified"``; leave-one-out ``"exact"``.
      None picks the default; another index's estimator is a ValueError naming the ones that apply.
    index: ``"shapley"`` (default), ``"banzhaf"``, ``"loo"``, or ``("beta", alpha, beta)``; ``alpha > beta``
      weights small coalitions (Kwon & Zou's Beta(16, 1)).
    player_mask: optional ``bool[n_players]``; False marks null players (padding) that get exactly 0.
    tol: relative tolerance on the largest standard error; None runs ``n_perm`` units once.
    max_evals: evaluation budget when stopping on tolerance.

  Returns:
    :class:`ShapleyResult` with ``values`` and ``stderr`` of shape ``[n_players]`` and the game's
    ``additivity``.

  Example:
    >>> import jax, jax.numpy as jnp, shapjax
    >>> weights = jnp.arange(4.0)
    >>> additive = lambda coalitions: coalitions.astype(jnp.float32) @ weights
    >>> result = shapjax.shapley_values(additive, 4, 8, key=jax.random.key(0))
    >>> [round(float(v), 4) for v in result.values]
    [0.0, 1.0, 2.0, 3.0]
    >>> banzhaf = shapjax.shapley_values(additive, 4, 8, key=jax.random.key(0), index="banzhaf")
    >>> [round(float(v), 4) for v in banzhaf.values], round(float(banzhaf.additivity), 4)
    ([0.0, 1.0, 2.0, 3.0], 1.0)
  """
  batch_size = default_batch_size(batch_size)
  index = check_index(index)
  check_counts(n_players, n_perm, batch_size, estimator, index=index)
  estimator = resolve_estimator(index, estimator)
  check_stopping(tol, max_evals)
  n_players, n_perm, batch_size = int(n_players), int(n_perm), int(batch_size)
  active = _player_mask(player_mask, n_players)
  v_empty_full = _endpoints_jit(value_fn, active)

  def block_fn(state, start):
    return _block_jit(value_fn, n_players, n_perm, key, start, state, active, v_empty_full, batch_size, estimator,
                      index)

  block_cost = 0 if tol is None else block_evals(int(np.sum(np.asarray(active))), n_perm, estimator)
  return run_blocks(block_fn, init_state(n_players, estimator), n_perm=n_perm, block_cost=block_cost, tol=tol,
                    max_evals=max_evals, active=active)


@functools.partial(jax.jit, static_argnames=("value_fn", "n_players", "batch_size"))
def _all_coalition_values(value_fn, n_players, batch_size):
  n_items = 2 ** n_players
  bits = jnp.arange(n_players, dtype=jnp.int32)

  def coalitions_of(flat):
    return (flat[:, None] >> bits[None, :]) & 1 == 1

  return _evaluate_chunked(value_fn, coalitions_of, n_items, min(batch_size, n_items), jnp.asarray(n_items))


def exact_semivalue(value_fn: ValueFn, n_players: int, *, index=DEFAULT_INDEX,
                    batch_size: int = 1024) -> ShapleyResult:
  """Exact semivalues by evaluating all ``2 ** n_players`` coalitions (the reference for the estimators).

  The coalition values come from one jitted, chunked program; the weighted sums (and the additive fit behind
  ``additivity``, over all coalitions alike) are done on the host in float64, so the reference is accurate to
  the value function's own precision.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``.
    n_players: number of players, at most 24 (``2 ** n`` evaluations).
    index: ``"shapley"`` (default), ``"banzhaf"``, ``"loo"`` or ``("beta", alpha, beta)``.
    batch_size: coalitions per ``value_fn`` call.

  Returns:
    :class:`ShapleyResult` with ``stderr`` all zero.

  Example:
    >>> import jax.numpy as jnp, shapjax
    >>> pairwise = lambda c: c.sum(axis=1).astype(jnp.float32) + 2.0 * (c[:, 0] & c[:, 1])
    >>> [float(v) for v in shapjax.exact_semivalue(pairwise, 3, index="banzhaf").values]
    [2.0, 2.0, 1.0]
  """
  index = check_index(index)
  if not isinstance(n_players, (int, np.integer)) or not 1 <= n_players <= 24:
    raise ValueError(f"exact_semivalue needs 1 <= n_players <= 24, got {n_players!r}")
  values = np.asarray(_all_coalition_values(value_fn, int(n_players), int(batch_size)), np.float64)
  return _exact_from_table(values, int(n_players), index)


def exact_shapley(value_fn: ValueFn, n_players: int, *, batch_size: int = 1024) -> ShapleyResult:
  """Exact Shapley values by evaluating all ``2 ** n_players`` coalitions: ``exact_semivalue(..., index="shapley")``.

  Args:
    value_fn: ``bool[B, n_players] -> f32[B]``.
    n_players: number of players, at most 24 (``2 ** n`` evaluations).
    batch_size: coalitions per ``value_fn`` call.

  Returns:
    :class:`ShapleyResult` with ``stderr`` all zero.
  """
  if not isinstance(n_players, (int, np.integer)) or not 1 <= n_players <= 24:
    raise ValueError(f"exact_shapley needs 1 <= n_players <= 24, got {n_players!r}")
  return exact_semivalue(value_fn, n_players, index="shapley", batch_size=batch_size)


def size_weights(n: int, index) -> np.ndarray:
  """``f64[n]``: ``p(s)``, the weight of one coalition of size ``s = 0 .. n - 1`` without the player."""
  index = check_index(index)
  s = np.arange(n, dtype=np.float64)
  kind = index_kind(index)
  if kind == "loo":
    return (s == n - 1).astype(np.float64)
  if kind == "banzhaf":
    return np.full(n, 2.0 ** -(n - 1))
  alpha, beta = (1.0, 1.0) if kind == "shapley" else index[1:]
  lgamma = np.vectorize(math.lgamma)
  log_beta = lambda a, b: lgamma(a) + lgamma(b) - lgamma(a + b)
  return np.exp(log_beta(s + beta, n - 1 - s + alpha) - log_beta(alpha, beta))


def _exact_from_table(values: np.ndarray, n: int, index=DEFAULT_INDEX) -> ShapleyResult:
  coalitions = np.arange(2 ** n)
  bits = ((coalitions[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)  # [2^n, n]
  sizes = bits.sum(axis=1).astype(np.int64)
  weights = size_weights(n, index)
  phi = np.zeros(n)
  for player in range(n):
    without = coalitions[(coalitions >> player) & 1 == 0]
    phi[player] = np.sum(weights[sizes[without]] * (values[without | (1 << player)] - values[without]))
  targets = values - values[0]
  coef = np.linalg.lstsq(bits, targets, rcond=None)[0]
  residual = np.sum((targets - bits @ coef) ** 2)
  total = np.sum((targets - targets.mean()) ** 2)
  m = 2 ** n
  defined = m > n + 1 and total > 1e-12 * np.sum(targets ** 2)
  additivity = 1.0 - residual * (m - 1) / (total * (m - n)) if defined else np.nan
  return ShapleyResult(values=jnp.asarray(phi, jnp.float32), stderr=jnp.zeros(n, jnp.float32),
                       n_evals=jnp.asarray(2 ** n, jnp.int32), converged=jnp.asarray(True),
                       additivity=jnp.asarray(additivity, jnp.float32))
