"""Cooperative games whose Shapley values are known in closed form."""

import jax.numpy as jnp
import numpy as np


def additive_game(weights):
  """v(S) = sum_{i in S} w_i; phi_i = w_i."""
  weights = jnp.asarray(weights, jnp.float32)

  def value_fn(coalitions):
    return coalitions.astype(jnp.float32) @ weights

  return value_fn, np.asarray(weights)


def pairwise_game(weights, interactions):
  """v(S) = sum_{i in S} w_i + sum_{i<j in S} c_ij; phi_i = w_i + sum_j c_ij / 2."""
  weights = jnp.asarray(weights, jnp.float32)
  c = np.triu(np.asarray(interactions, np.float64), 1)
  c_sym = c + c.T
  c_j = jnp.asarray(c, jnp.float32)

  def value_fn(coalitions):
    s = coalitions.astype(jnp.float32)
    return s @ weights + jnp.einsum("bi,ij,bj->b", s, c_j, s)

  return value_fn, np.asarray(weights, np.float64) + c_sym.sum(1) / 2


def glove_like_game(n_players):
  """v(S) = max(|S|-1, 0)^2: symmetric, so every player gets (v(N) - v(empty)) / n."""

  def value_fn(coalitions):
    size = coalitions.sum(axis=1).astype(jnp.float32)
    return jnp.maximum(size - 1.0, 0.0) ** 2

  return value_fn, np.full(n_players, (n_players - 1) ** 2 / n_players)
