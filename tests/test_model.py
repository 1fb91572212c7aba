"""The autoencoder: initialisation (deterministic, also under tracing), bottlenecks, config round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax

SHAPE = (32, 32, 1)


def _far_corner_change(config) -> float:
  params = shapjax.init_autoencoder(config=config, key=jax.random.key(0))
  image = jnp.full((1, *SHAPE), 0.5)
  poked = image.at[0, :4, :4].set(1.0)  # a bright spot in one corner
  out, out_poked = shapjax.reconstruct(params, image), shapjax.reconstruct(params, poked)
  return float(jnp.max(jnp.abs(out[0, -6:, -6:] - out_poked[0, -6:, -6:])))


def test_init_is_deterministic_and_the_same_under_tracing():
  config = shapjax.AutoencoderConfig.tiny(SHAPE)
  a = shapjax.init_autoencoder(config=config, key=jax.random.key(3))
  b = shapjax.init_autoencoder(config=config, key=jax.random.key(3))
  c = shapjax.init_autoencoder(config=config, key=jax.random.key(4))
  traced = jax.jit(lambda k: shapjax.init_autoencoder(config=config, key=k).weights)(jax.random.key(3))
  shapes = jax.eval_shape(lambda: shapjax.init_autoencoder(config=config, key=jax.random.key(3)).weights)
  for x, y, z, t, s in zip(*(jax.tree.leaves(w) for w in (a.weights, b.weights, c.weights, traced, shapes))):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(x, t, atol=1e-6)  # same draws; the CPU init program skips LLVM optimisation
    assert x.shape == s.shape
  kernels = [(x, z) for x, z in zip(jax.tree.leaves(a.weights), jax.tree.leaves(c.weights)) if x.ndim == 4]
  assert all(not np.array_equal(x, z) for x, z in kernels)


def test_conv_bottleneck_is_local_and_dense_bottleneck_is_global():
  conv = shapjax.AutoencoderConfig.tiny(SHAPE)
  dense = shapjax.AutoencoderConfig(image_shape=SHAPE, features=(8, 16), latent_features=8, bottleneck="dense")
  assert _far_corner_change(conv) == 0.0  # beyond the receptive field
  assert _far_corner_change(dense) > 1e-6


def test_dense_bottleneck_weights_follow_the_image_shape_and_survive_a_checkpoint(tmp_path):
  config = shapjax.AutoencoderConfig(image_shape=(32, 48, 1), features=(8, 16), latent_features=8,
                                     bottleneck="dense")
  params = shapjax.init_autoencoder(config=config, key=jax.random.key(0))
  assert params.weights["Dense_0"]["kernel"].shape == (8 * 12 * 16, 8)
  loaded = shapjax.load(shapjax.save(params, tmp_path / "dense"))
  assert loaded.config == config
  image = jnp.asarray(np.random.default_rng(0).random((2, 32, 48, 1)), jnp.float32)
  np.testing.assert_array_equal(shapjax.reconstruct(loaded, image), shapjax.reconstruct(params, image))


def test_bad_bottleneck_is_named():
  with pytest.raises(ValueError, match="bottleneck"):
    shapjax.AutoencoderConfig(image_shape=SHAPE, bottleneck="global")
