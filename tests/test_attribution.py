"""attribute() on small images: efficiency, padding, locating a painted defect, determinism, compiles, errors."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data

import shapjax
from conftest import stripes_labels
from shapjax import attribution

SIZE = 32


def _crops(texture, n, rng):
  ys = rng.integers(0, texture.shape[0] - SIZE, n)
  xs = rng.integers(0, texture.shape[1] - SIZE, n)
  return np.stack([texture[y:y + SIZE, x:x + SIZE] for y, x in zip(ys, xs)])[..., None].astype(np.float32) / 255


@pytest.fixture(scope="module")
def texture_crops():
  return _crops(skimage.data.brick(), 256, np.random.default_rng(0))


@pytest.fixture(scope="module")
def random_params():
  return shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(1), features=(8, 16), latent_features=8)


@pytest.fixture(scope="module")
def trained_params(texture_crops, random_params):
  """A briefly trained autoencoder (plain optax; the library trainer is tested elsewhere)."""
  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: shapjax.reconstruction_loss(p, batch).mean())(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  params, state = random_params, optimizer.init(random_params)
  for i in range(300):
    params, state, _ = step(params, state, texture_crops[(i * 16) % 256:(i * 16) % 256 + 16])
  return params


def _value(params, image, labels, coalition, baseline="blur"):
  value_fn = shapjax.masked_value_fn(lambda x: shapjax.reconstruction_loss(params, x), image, labels,
                                     baseline=baseline)
  return float(value_fn(jnp.asarray(coalition)[None])[0])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["random", "trained"])
def test_efficiency_and_padding(which, random_params, trained_params, texture_crops):
  params = random_params if which == "random" else trained_params
  image = texture_crops[0]
  labels = shapjax.segment(image, max_regions=16)
  n_regions = labels.max() + 1
  result = shapjax.attribute(params, image, labels, 6, max_regions=24)
  assert result.values.shape == (24,)
  assert np.all(np.asarray(result.values[n_regions:]) == 0.0)
  everyone = np.arange(24) < n_regions
  total = _value(params, image, labels, everyone) - _value(params, image, labels, np.zeros(24, bool))
  np.testing.assert_allclose(float(result.values.sum()), total, rtol=1e-4, atol=1e-7)
  assert int(result.n_evals) == 6 * (n_regions - 1) + 2


@pytest.mark.slow
def test_matches_exact_values_on_few_regions(trained_params, texture_crops):
  image = texture_crops[1]
  labels = stripes_labels(SIZE, SIZE, 5)
  value_fn = shapjax.masked_value_fn(lambda x: shapjax.reconstruction_loss(trained_params, x), image, labels,
                                     baseline="blur")
  exact = shapjax.exact_shapley(value_fn, 5)
  result = shapjax.attribute(trained_params, image, labels, 600, max_regions=5, batch_size=256)
  scale = float(np.abs(np.asarray(exact.values)).max())
  np.testing.assert_allclose(result.values, exact.values, atol=0.1 * scale)
  assert np.all(np.abs(np.asarray(result.values) - np.asarray(exact.values)) < 4 * np.asarray(result.stderr) + 1e-7)


@pytest.mark.slow
def test_painted_defect_gets_the_largest_value(trained_params, texture_crops):
  image = texture_crops[2].copy()
  image[10:18, 12:20] = 1.0  # a bright blob the autoencoder never saw
  defect = np.zeros((SIZE, SIZE), bool)
  defect[10:18, 12:20] = True
  labels = shapjax.segment(image, max_regions=16)
  result = shapjax.attribute(trained_params, image, labels, 16, max_regions=16)
  top = int(np.argmax(result.values))
  overlap = np.mean(defect[labels == top])
  assert overlap > 0.5, (overlap, np.asarray(result.values))


@pytest.mark.slow
def test_same_key_same_values_whatever_the_batch_size(random_params, texture_crops):
  image = texture_crops[3]
  labels = shapjax.segment(image, max_regions=12)
  key = jax.random.key(7)
  runs = [shapjax.attribute(random_params, image, labels, 4, key=key, max_regions=12, batch_size=b)
          for b in (5, 16, 64)]
  for other in runs[1:]:
    np.testing.assert_allclose(other.values, runs[0].values, rtol=1e-6, atol=1e-9)
  different = shapjax.attribute(random_params, image, labels, 4, key=jax.random.key(8), max_regions=12,
                                batch_size=16)
  assert not np.allclose(different.values, runs[0].values, rtol=1e-6, atol=1e-9)


def test_one_compile_for_images_with_different_region_counts(random_params, texture_crops):
  first = stripes_labels(SIZE, SIZE, 5)
  second = stripes_labels(SIZE, SIZE, 9)
  options = dict(max_regions=10, batch_size=8, key=jax.random.key(0))
  shapjax.attribute(random_params, texture_crops[4], first, 2, **options)
  size = attribution._attribute_jit.cache_size()
  result = shapjax.attribute(random_params, texture_crops[5], second, 2, **options)
  assert attribution._attribute_jit.cache_size() == size
  assert np.all(np.asarray(result.values[9:]) == 0.0)
  assert np.all(np.asarray(result.values[:9]) != 0.0)


def test_baselines(random_params, texture_crops):
  image = texture_crops[6]
  labels = stripes_labels(SIZE, SIZE, 4)
  mean_image = texture_crops.mean(axis=0)
  results = {}
  for name, baseline in [("blur", "blur"), ("mean", "mean"), ("zeros", "zeros"), ("const", 0.5),
                         ("array", mean_image)]:
    result = shapjax.attribute(random_params, image, labels, 4, baseline=baseline, max_regions=4)
    total = _value(random_params, image, labels, np.ones(4, bool), baseline) - _value(
        random_params, image, labels, np.zeros(4, bool), baseline)
    np.testing.assert_allclose(float(result.values.sum()), total, rtol=1e-4, atol=1e-7)
    results[name] = np.asarray(result.values)
  assert not np.allclose(results["blur"], results["array"])
  np.testing.assert_allclose(results["zeros"], results["const"] * 0 + results["zeros"])


def test_batch_equals_single_images_with_folded_keys(random_params, texture_crops):
  images = texture_crops[:3]
  labels = np.stack([stripes_labels(SIZE, SIZE, n) for n in (3, 5, 6)])
  key = jax.random.key(3)
  batch = shapjax.attribute_batch(random_params, images, labels, 4, key=key, max_regions=6, batch_size=8)
  assert batch.values.shape == (3, 6)
  for i in range(3):
    single = shapjax.attribute(random_params, images[i], labels[i], 4, key=jax.random.fold_in(key, i),
                               max_regions=6, batch_size=8)
    np.testing.assert_allclose(batch.values[i], single.values, rtol=1e-6, atol=1e-9)


def test_works_inside_a_users_jit(random_params, texture_crops):
  labels = jnp.asarray(stripes_labels(SIZE, SIZE, 4))

  @jax.jit
  def top_region(image):
    return jnp.argmax(shapjax.attribute(random_params, image, labels, 4, max_regions=4).values)

  eager = shapjax.attribute(random_params, texture_crops[7], labels, 4, max_regions=4)
  assert int(top_region(texture_crops[7])) == int(jnp.argmax(eager.values))


def test_uint8_and_grey_hw_images_are_accepted(random_params, texture_crops):
  labels = stripes_labels(SIZE, SIZE, 4)
  as_uint8 = np.round(texture_crops[8] * 255).astype(np.uint8)
  a = shapjax.attribute(random_params, as_uint8, labels, 2, max_regions=4)
  b = shapjax.attribute(random_params, as_uint8[..., 0].astype(np.float32) / 255, labels, 2, max_regions=4)
  np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-8)


def test_heatmap_paints_values():
  labels = stripes_labels(4, 6, 3)
  painted = shapjax.heatmap(jnp.asarray([1.0, 2.0, 3.0]), labels)
  np.testing.assert_array_equal(painted, np.array([[1, 1, 2, 2, 3, 3]] * 4, np.float32))
  batch = shapjax.heatmap(jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), np.stack([labels, labels]))
  assert batch.shape == (2, 4, 6) and float(batch[1, 0, 0]) == 4.0


LABELS = stripes_labels(SIZE, SIZE, 4)
IMAGE = np.full((SIZE, SIZE, 1), 0.5, np.float32)


@pytest.mark.parametrize("image, labels, kwargs, error, match", [
    (IMAGE[:16], LABELS, {}, ValueError, "16x32 pixels but the autoencoder was built for 32x32: resize"),
    (IMAGE, LABELS[:16], {}, ValueError, "height and width"),
    (IMAGE * 255, LABELS, {}, ValueError, r"\[0, 1\].*divide by 255"),
    (IMAGE - 0.6, LABELS, {}, ValueError, r"must lie in \[0, 1\]"),
    (IMAGE, LABELS + 10, {}, ValueError, r"\[0, max_regions\)"),
    (IMAGE, LABELS - 1, {}, ValueError, r"\[0, max_regions\)"),
    (IMAGE, LABELS, dict(n_perm=0), ValueError, "n_perm"),
    (np.where(LABELS[..., None] == 0, np.nan, IMAGE), LABELS, {}, ValueError, "NaN"),
    (np.full_like(IMAGE, np.inf), LABELS, {}, ValueError, "NaN or inf"),
    (IMAGE[None, None], LABELS, {}, ValueError, "shape"),
    (IMAGE, LABELS.astype(np.float32), {}, TypeError, "integer"),
    (np.repeat(IMAGE, 3, axis=-1), LABELS, {}, ValueError, "channels"),
    (IMAGE.astype(np.int64), LABELS, {}, TypeError, "dtype"),
    (IMAGE, LABELS, dict(baseline="noise"), ValueError, "baseline"),
    (IMAGE, LABELS, dict(baseline=np.zeros((3, 3))), ValueError, "baseline"),
    (IMAGE, LABELS, dict(max_regions=0), ValueError, "max_regions"),
    (IMAGE, LABELS, dict(n_perm=3), ValueError, "even"),
    (IMAGE, LABELS, dict(estimator="exact"), ValueError, "estimator"),
])
def test_bad_input_is_named_before_compiling(random_params, image, labels, kwargs, error, match):
  kwargs = dict(dict(n_perm=2, max_regions=4), **kwargs)
  with pytest.raises(error, match=match):
    shapjax.attribute(random_params, image, labels, **kwargs)


def test_params_of_the_wrong_kind_are_named():
  with pytest.raises(TypeError, match="AutoencoderParams"):
    shapjax.attribute({"weights": 1}, IMAGE, LABELS, 2, max_regions=4)


def test_a_float_image_may_stray_a_rounding_error_outside_the_unit_range(random_params):
  labels = stripes_labels(SIZE, SIZE, 4)
  result = shapjax.attribute(random_params, IMAGE + 1.0005 - 0.5, labels, 2, max_regions=4)
  assert np.all(np.isfinite(result.values))


@pytest.mark.parametrize("entry", ["batch", "mesh", "dataset"])
def test_every_entry_point_checks_range_and_size(random_params, entry):
  mesh = shapjax.make_mesh() if entry == "mesh" else None
  images = np.stack([IMAGE, IMAGE])
  labels = np.stack([LABELS, LABELS])

  def call(images, labels):
    if entry == "dataset":
      return shapjax.attribute_dataset(random_params, images, 4, max_regions=4, progress=False)
    if entry == "mesh":
      return shapjax.attribute(random_params, images[0], labels[0], 4, max_regions=4, mesh=mesh)
    return shapjax.attribute_batch(random_params, images, labels, 4, max_regions=4)

  with pytest.raises(ValueError, match="divide by 255"):
    call(images * 255, labels)
  with pytest.raises(ValueError, match="built for 32x32"):
    call(images[:, :16, :16], labels[:, :16, :16])


ESTIMATOR_UNITS = {"permutation": 4, "antithetic": 4, "stratified": 16, "kernel": 4}


@pytest.fixture(scope="module")
def image_64():
  """A 64x64 brick crop with SLIC's 64 regions: the default number of players."""
  image = skimage.data.brick()[100:164, 100:164, None].astype(np.float32) / 255
  return image, shapjax.segment(image)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(ESTIMATOR_UNITS))
def test_every_estimator_at_the_default_64_regions(estimator, image_64):
  """The user's call: default max_regions, every estimator, with and without tol, batch and mesh."""
  image, labels = image_64
  assert int(labels.max()) + 1 > 32  # most of the 64 players are real regions
  params = shapjax.init_autoencoder(image.shape, key=jax.random.key(0), features=(8, 16), latent_features=8)
  n_perm = ESTIMATOR_UNITS[estimator]
  key = jax.random.key(2)
  plain = shapjax.attribute(params, image, labels, n_perm, key=key, estimator=estimator)
  assert plain.values.shape == (64,) and np.all(np.isfinite(np.asarray(plain.values)))
  total = _value(params, image, labels, labels.max() >= np.arange(64)) - _value(
      params, image, labels, np.zeros(64, bool))
  np.testing.assert_allclose(float(plain.values.sum()), total, rtol=1e-3, atol=1e-7)
  stopped = shapjax.attribute(params, image, labels, n_perm, key=key, estimator=estimator, tol=0.5,
                              max_evals=4 * int(plain.n_evals))
  assert stopped.values.shape == (64,) and np.all(np.isfinite(np.asarray(stopped.values)))
  batch = shapjax.attribute_batch(params, image[None], labels[None], n_perm, key=key, estimator=estimator)
  single = shapjax.attribute(params, image, labels, n_perm, key=jax.random.fold_in(key, 0), estimator=estimator)
  np.testing.assert_allclose(batch.values[0], single.values, rtol=1e-4, atol=1e-8)
  mesh = shapjax.make_mesh(2)
  on_mesh = shapjax.attribute(params, image, labels, 2 * n_perm if estimator != "stratified" else 32, key=key,
                              estimator=estimator, mesh=mesh)
  assert np.all(np.isfinite(np.asarray(on_mesh.values)))


@pytest.mark.slow
def test_attribute_stops_on_tolerance(key):
  params = shapjax.init_autoencoder((16, 16, 1), key=key, config=shapjax.AutoencoderConfig.tiny((16, 16, 1)))
  image = np.asarray(jax.random.uniform(jax.random.key(3), (16, 16, 1)))
  labels = stripes_labels(16, 16, 5)
  options = dict(key=key, max_regions=6, baseline="zeros", estimator="kernel", batch_size=32)
  stopped = shapjax.attribute(params, image, labels, 8, tol=1e-9, max_evals=2 + 2 * 8 * 4, **options)
  assert not bool(stopped.converged)
  assert int(stopped.n_evals) == 2 + 2 * 8 * 4
  fixed = shapjax.attribute(params, image, labels, 16, **options)
  np.testing.assert_allclose(stopped.values, fixed.values, rtol=1e-4, atol=1e-7)
  assert float(stopped.values[5]) == 0.0
  reached = shapjax.attribute(params, image, labels, 8, tol=0.2, max_evals=10_000, **options)
  assert bool(reached.converged)
  assert float(np.max(reached.stderr)) < 0.2 * float(np.ptp(np.asarray(reached.values)[:5]))
