"""The PyTorch reference in benchmarks/ computes what shapjax computes: same reconstructions and inpaintings, same
values.

The benchmarks compare speeds only if both sides do the same work; these tests pin that down on tiny sizes
(eager PyTorch, no torch.compile).
"""

import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch cross-check needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("captum", reason="the captum cross-check needs the bench extra: pip install -e '.[bench]'")

import shapjax
from conftest import stripes_labels
from shapjax import inpainting, masking

# benchmarks/ is a package at the repository root, not part of the installed library.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import torch_reference  # noqa: E402


def _params(key, image_shape):
  config = shapjax.AutoencoderConfig(image_shape, features=(8, 16), latent_features=8)
  params = shapjax.init_autoencoder(key=key, config=config)
  # Larger weights than the initialiser's so the output is far from a flat 0.5 and a wrong channel order shows.
  weights = jax.tree.map(lambda w: 3.0 * w, params.weights)
  return shapjax.AutoencoderParams(weights=weights, config=config)


@pytest.mark.parametrize("image_shape", [(30, 36, 3), (20, 24, 1)])
def test_reconstructions_match(key, image_shape):
  params = _params(key, image_shape)
  images = np.random.default_rng(0).random((3, *image_shape), dtype=np.float32)
  expected = np.asarray(shapjax.reconstruct(params, images))
  module = torch_reference.torch_autoencoder(params)
  with torch.no_grad():
    got = module(torch_reference.to_nchw(images)).numpy().transpose(0, 2, 3, 1)
  assert expected.std() > 0.02
  np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)
  loss = torch_reference.reconstruction_loss(module, torch_reference.to_nchw(images)).detach().numpy()
  np.testing.assert_allclose(loss, np.asarray(shapjax.reconstruction_loss(params, images)), rtol=2e-5)


def test_dense_bottleneck_is_refused():
  config = shapjax.AutoencoderConfig((16, 16, 1), features=(4,), latent_features=4, bottleneck="dense")
  with pytest.raises(ValueError, match="dense"):
    torch_reference.TorchAutoencoder(config)


@pytest.mark.slow
def test_shapley_values_match_for_same_permutations(key):
  estimator = "antithetic"
  image_shape, max_regions, n_regions, n_perm = (24, 24, 3), 8, 6, 6
  params = _params(key, image_shape)
  image = np.random.default_rng(1).random(image_shape, dtype=np.float32)
  labels = stripes_labels(24, 24, n_regions)
  sample_key = jax.random.key(3)
  result = shapjax.attribute(params, image, labels, n_perm, key=sample_key, max_regions=max_regions,
                             batch_size=5, estimator=estimator)

  module = torch_reference.torch_autoencoder(params)
  baseline = torch_reference.to_nchw(masking.make_baseline(image, "blur"))
  ranks = torch_reference.shapjax_ranks(sample_key, n_perm, max_regions, n_regions, estimator=estimator)
  _assert_samplers_agree(lambda x: torch_reference.reconstruction_loss(module, x), torch_reference.to_nchw(image),
                         baseline, labels, ranks, result, n_perm, n_regions)


def _assert_samplers_agree(value_fn, t_image, t_baseline, labels, ranks, result, n_perm, n_regions):
  """The hand-batched PyTorch sampler and captum, on shapjax's permutations, give ``result``'s values."""
  t_labels = torch.as_tensor(labels, dtype=torch.long)
  contributions, n_evals = torch_reference.torch_permutation_shapley(
      value_fn, t_image, t_labels, t_baseline, torch.as_tensor(ranks), n_regions, batch_size=7)
  values = contributions.mean(0).numpy()
  assert n_evals == int(result.n_evals)
  scale = np.abs(np.asarray(result.values)).max()
  assert scale > 0
  np.testing.assert_allclose(values, np.asarray(result.values), atol=1e-4 * scale, rtol=0)
  assert np.all(values[n_regions:] == 0)

  captum_values, captum_evals = torch_reference.captum_shapley(
      value_fn, t_image, t_labels, t_baseline, n_perm, perturbations_per_eval=4,
      orders=torch_reference.permutation_orders(ranks, n_regions))
  assert captum_evals == 1 + n_perm * n_regions
  np.testing.assert_allclose(captum_values.numpy(), np.asarray(result.values)[:n_regions], atol=1e-4 * scale,
                             rtol=0)


def _inpainter_params(key, image_shape, context="none"):
  params = shapjax.init_inpainter(image_shape, key=key, features=(8, 16), context=context)
  # Larger weights, as for the autoencoder: a wrong channel order or padding shows in the output.
  return inpainting.InpainterParams(weights=jax.tree.map(lambda w: 3.0 * w, params.weights), config=params.config)


@pytest.mark.parametrize("image_shape, context", [((32, 32, 1), "none"), ((30, 36, 3), "lowres")])
def test_inpaintings_match(key, image_shape, context):
  params = _inpainter_params(key, image_shape, context)
  rng = np.random.default_rng(0)
  images = rng.random((3, *image_shape), dtype=np.float32)
  visible = rng.random((3, *image_shape[:2])) < 0.5
  expected = np.asarray(shapjax.inpaint(params, images, visible))
  module = torch_reference.torch_inpainter(params)
  t_visible = torch.as_tensor(visible, dtype=torch.float32)
  with torch.no_grad():
    got = torch_reference.inpaint(module, torch_reference.to_nchw(images), t_visible).numpy().transpose(0, 2, 3, 1)
  hidden = ~visible
  assert expected[hidden].std() > 0.02
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_inpainting_game_values_match_for_same_permutations(key):
  image_shape, max_regions, n_regions, n_perm = (32, 32, 1), 10, 8, 4
  params = _inpainter_params(key, image_shape)
  image = np.random.default_rng(1).random(image_shape, dtype=np.float32)
  labels = stripes_labels(32, 32, n_regions)
  sample_key = jax.random.key(3)
  result = shapjax.attribute(params, image, labels, n_perm, key=sample_key, max_regions=max_regions, batch_size=5,
                             game="inpainting")

  module = torch_reference.torch_inpainter(params)
  t_image = torch_reference.to_nchw(image)
  value_fn = torch_reference.inpainting_game(module, t_image)
  ones, zeros = torch_reference.inpainting_inputs(t_image)
  # v(every region visible) = 0 exactly; v(none visible) = minus the whole image's error, which the values sum to.
  all_visible, none_visible = value_fn(torch.stack([ones, zeros])).detach().numpy()
  assert all_visible == 0 and none_visible < 0
  np.testing.assert_allclose(float(np.sum(np.asarray(result.values))), -none_visible, rtol=1e-4)

  ranks = torch_reference.shapjax_ranks(sample_key, n_perm, max_regions, n_regions)
  _assert_samplers_agree(value_fn, ones, zeros, labels, ranks, result, n_perm, n_regions)
