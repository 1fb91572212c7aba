"""The autoencoder: initialisation (deterministic, also under tracing, the params tree of plain nn.Conv layers),
bottlenecks, config round trip, and the CPU speed-ups of shapjax.speedups against plain convolutions."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from shapjax import model, speedups

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


class _PlainFlaxAutoencoder(nn.Module):
  """The model as plain nn.Conv layers with auto-names: its params tree is the one checkpoints hold."""
  config: shapjax.AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    channels = x.shape[-1]
    for features in cfg.features:
      x = nn.Conv(features, (3, 3), strides=2)(x)
    x = nn.Conv(cfg.latent_features, (1, 1))(x)
    for features in list(cfg.features[-2::-1]) + [max(cfg.features[0] // 2, channels)]:
      x = speedups.depth_to_space(nn.Conv(4 * features, (3, 3))(x), 2)
    return nn.Conv(channels, (3, 3))(x)


@pytest.mark.slow
def test_params_are_those_of_plain_flax_convolutions():
  config = shapjax.AutoencoderConfig((24, 24, 3), features=(8, 16, 24), latent_features=8)
  params = shapjax.init_autoencoder(config=config, key=jax.random.key(7))
  dummy = jnp.zeros((1, config.stride, config.stride, 3))
  plain = _PlainFlaxAutoencoder(config).init(jax.random.key(7), dummy)["params"]
  assert jax.tree.structure(params.weights) == jax.tree.structure(plain)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params.weights, plain)


def test_conv_bottleneck_is_local_and_dense_bottleneck_is_global():
  conv = shapjax.AutoencoderConfig.tiny(SHAPE)
  dense = shapjax.AutoencoderConfig(image_shape=SHAPE, features=(8, 16), latent_features=8, bottleneck="dense")
  assert _far_corner_change(conv) == 0.0  # beyond the receptive field
  assert _far_corner_change(dense) > 1e-6


@pytest.mark.slow
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


def test_config_reads_old_checkpoints_with_a_shuffle_decoder_and_names_other_decoders():
  config = shapjax.AutoencoderConfig.tiny(SHAPE)
  assert shapjax.AutoencoderConfig.from_dict(config.to_dict()) == config
  assert shapjax.AutoencoderConfig.from_dict({**config.to_dict(), "decoder": "shuffle"}) == config
  for decoder in ("resize", "transpose"):
    with pytest.raises(ValueError, match=f"decoder '{decoder}'"):
      shapjax.AutoencoderConfig.from_dict({**config.to_dict(), "decoder": decoder})
  with pytest.raises(TypeError):
    shapjax.AutoencoderConfig(image_shape=SHAPE, decoder="shuffle")  # pylint: disable=unexpected-keyword-arg


def _random_params(shape, features=(8, 16)):
  # Random biases too, so that a wrong phase order of the output bias shows.
  params = shapjax.init_autoencoder(shape, key=jax.random.key(1), features=features, latent_features=8)
  leaves, tree = jax.tree.flatten(params.weights)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return params.replace(weights=jax.tree.unflatten(
      tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]))


@pytest.mark.slow
@pytest.mark.parametrize("xla_defaults", ["0", "1"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (20, 28, 1), (19, 13, 3)])
def test_reconstruction_equals_plain_convolutions(shape, xla_defaults, monkeypatch):
  # The output convolution runs as a 2x2 convolution on the low-resolution tensor on CPU (xla_defaults "0"), as
  # a full-resolution one elsewhere ("1"); both must be the plain model.
  monkeypatch.setenv("SHAPJAX_XLA_DEFAULTS", xla_defaults)
  assert speedups.enabled() == (xla_defaults == "0")
  params = _random_params(shape)
  images = jnp.asarray(np.random.default_rng(0).random((3, *shape)), jnp.float32)
  expected = plain_reconstruction(params, images)
  np.testing.assert_allclose(shapjax.reconstruct(params, images), expected, atol=2e-6)
  np.testing.assert_allclose(shapjax.reconstruction_loss(params, images),
                             jnp.mean(jnp.square(expected - images), axis=(1, 2, 3)), rtol=2e-5)
  np.testing.assert_allclose(shapjax.residual_map(params, images),
                             jnp.mean(jnp.square(expected - images), axis=-1), atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("per_image_from", [32 * 32, 1])
def test_gradients_equal_xla_convolution_gradients(per_image_from, monkeypatch):
  # On CPU the convolutions compute their kernel gradients by matrix products per tap (for 8 or more input
  # channels; image by image for big feature maps); the gradient of the loss must equal the one of plain lax
  # convolutions. per_image_from=1 sends every such layer through the image-by-image sum.
  monkeypatch.setattr(speedups, "_PER_IMAGE_MIN_PIXELS", per_image_from)
  assert speedups._taps_are_faster((3, 3, 64, 96))
  assert not speedups._taps_are_faster((3, 3, 3, 8))  # both kinds of kernel gradient are exercised
  shape = (32, 32, 3)
  params = _random_params(shape, features=(8, 64, 96))
  images = jnp.asarray(np.random.default_rng(1).random((2, *shape)), jnp.float32)

  def loss(reconstruction):
    return lambda w: jnp.sum(jnp.mean(jnp.square(reconstruction(params.replace(weights=w), images) - images),
                                      axis=(1, 2, 3)))

  grads = jax.jit(jax.grad(loss(shapjax.reconstruct)))(params.weights)
  expected = jax.jit(jax.grad(loss(plain_reconstruction)))(params.weights)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()), err_msg=str(path))
