"""The autoencoder: initialisation (deterministic, also under tracing), bottlenecks, config round trip."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.layers import plain_reconstruction  # pylint: disable=g-import-not-at-top,wrong-import-position

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


@pytest.mark.parametrize("shape", [(32, 32, 3), (20, 28, 1), (19, 13, 3)])
def test_shuffle_output_layer_computed_by_phases_equals_a_full_resolution_convolution(shape):
  # The output convolution runs as a 2x2 convolution on the low-resolution tensor; reconstruct and the loss must
  # still be exactly the plain model (even sizes take the phase-wise loss, odd ones the image-wise one).
  params = shapjax.init_autoencoder(shape, key=jax.random.key(1), features=(8, 16), latent_features=8)
  # Random biases too, so a wrong phase order of the output bias shows.
  leaves, tree = jax.tree.flatten(params.weights)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = params.replace(weights=jax.tree.unflatten(
      tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]))
  images = jnp.asarray(np.random.default_rng(0).random((3, *shape)), jnp.float32)
  expected = plain_reconstruction(params, images)
  np.testing.assert_allclose(shapjax.reconstruct(params, images), expected, atol=2e-6)
  np.testing.assert_allclose(shapjax.reconstruction_loss(params, images),
                             jnp.mean(jnp.square(expected - images), axis=(1, 2, 3)), rtol=2e-5)


@pytest.mark.parametrize("decoder", ["shuffle", "resize"])
@pytest.mark.parametrize("per_image_from", [32 * 32, 1])
def test_gradients_equal_xla_convolution_gradients(decoder, per_image_from, monkeypatch):
  # The convolutions compute their kernel gradients by matrix products per tap on CPU (for the layers where that
  # is faster; image by image for big feature maps); the gradient of the loss must equal the one of plain lax
  # convolutions. per_image_from=1 sends every layer through the image-by-image sum.
  from shapjax import model
  monkeypatch.setattr(model, "_PER_IMAGE_MIN_PIXELS", per_image_from)
  jax.clear_caches()
  shape = (32, 32, 3)
  params = shapjax.init_autoencoder(shape, key=jax.random.key(4), features=(8, 64, 96), latent_features=8,
                                    decoder=decoder)
  images = jnp.asarray(np.random.default_rng(1).random((2, *shape)), jnp.float32)
  grads = jax.grad(lambda w: jnp.sum(shapjax.reconstruction_loss(params.replace(weights=w), images)))(params.weights)
  assert model._taps_are_faster((3, 3, 64, 96), (1, 1)) == (jax.default_backend() == "cpu")
  assert not model._taps_are_faster((3, 3, 3, 8), (2, 2))  # both kinds of kernel gradient are exercised

  def plain_loss(w):
    out = _plain_reconstruction(params.replace(weights=w), images)
    return jnp.sum(jnp.mean(jnp.square(out - images), axis=(1, 2, 3)))

  expected = jax.grad(plain_loss)(params.weights)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6 * float(jnp.abs(e).max()), err_msg=str(path))


def _plain_reconstruction(params, images):
  """The model with every convolution swapped for plain ``lax.conv_general_dilated`` (XLA's own gradients)."""
  from unittest import mock

  from shapjax import model
  plain = lambda x, k, strides, pads: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with mock.patch.object(model, "_conv", plain):
    return shapjax.reconstruct(params, images)
