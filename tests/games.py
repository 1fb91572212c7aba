"""Cooperative games whose Shapley values (and other semivalues) are known in closed form.

A semivalue weighs the coalitions T of the other players by their size only, so in a polynomial game only the
probability that given other players are in T matters: ``inclusion(index)`` gives it for one and for two of them.
"""

import jax.numpy as jnp
import numpy as np


def additive_game(weights):
  """v(S) = sum_{i in S} w_i; phi_i = w_i."""
  weights = jnp.asarray(weights, jnp.float32)

  def value_fn(coalitions):
    return coalitions.astype(jnp.float32) @ weights

  return value_fn, np.asarray(weights)


def inclusion(index):
  """``(P(j in T), P(j, k in T))`` for other players j, k when T follows the index's size distribution."""
  if index == "loo":
    return 1.0, 1.0
  if index == "banzhaf":
    return 0.5, 0.25
  alpha, beta = (1.0, 1.0) if index == "shapley" else index[1:]
  first = beta / (alpha + beta)  # the mean of t ~ Beta(beta, alpha), then its second moment
  return first, first * (beta + 1.0) / (alpha + beta + 1.0)


def pairwise_game(weights, interactions, index="shapley"):
  """v(S) = sum_{i in S} w_i + sum_{i<j in S} c_ij; phi_i = w_i + sum_j c_ij P(j in T) (Shapley, Banzhaf: 1/2)."""
  weights = jnp.asarray(weights, jnp.float32)
  c = np.triu(np.asarray(interactions, np.float64), 1)
  c_sym = c + c.T
  c_j = jnp.asarray(c, jnp.float32)

  def value_fn(coalitions):
    s = coalitions.astype(jnp.float32)
    return s @ weights + jnp.einsum("bi,ij,bj->b", s, c_j, s)

  return value_fn, np.asarray(weights, np.float64) + c_sym.sum(1) * inclusion(index)[0]


def triple_game(weights, triples, index="shapley"):
  """v(S) = sum_{i in S} w_i + sum over (a, b, c, coef) of coef [a, b, c in S]; phi_i gains coef P(j, k in T).

  Shapley: coef / 3; Banzhaf: coef / 4; leave-one-out: coef.
  """
  weights = jnp.asarray(weights, jnp.float32)

  def value_fn(coalitions):
    s = coalitions.astype(jnp.float32)
    total = s @ weights
    for a, b, c, coef in triples:
      total = total + coef * s[:, a] * s[:, b] * s[:, c]
    return total

  expected = np.asarray(weights, np.float64).copy()
  for a, b, c, coef in triples:
    expected[[a, b, c]] += coef * inclusion(index)[1]
  return value_fn, expected


def majority_game(n_voters, quota, n_dummies=0):
  """v(S) = 1 when at least ``quota`` of the first ``n_voters`` players are in S; the others are dummies (0).

  Returns the value function and each voter's Banzhaf value: the chance that exactly ``quota - 1`` of the other
  voters are in a uniform coalition, ``C(n_voters - 1, quota - 1) / 2 ** (n_voters - 1)``.
  """
  import math

  def value_fn(coalitions):
    return (jnp.sum(coalitions[:, :n_voters], axis=1) >= quota).astype(jnp.float32)

  banzhaf = math.comb(n_voters - 1, quota - 1) / 2 ** (n_voters - 1)
  return value_fn, np.concatenate([np.full(n_voters, banzhaf), np.zeros(n_dummies)])


def glove_like_game(n_players):
  """v(S) = max(|S|-1, 0)^2: symmetric, so every player gets (v(N) - v(empty)) / n."""

  def value_fn(coalitions):
    size = coalitions.sum(axis=1).astype(jnp.float32)
    return jnp.maximum(size - 1.0, 0.0) ** 2

  return value_fn, np.full(n_players, (n_players - 1) ** 2 / n_players)
