"""The inpainting game: hidden regions filled by an inpainter, checked against exact values and closed forms.

``v(S) = -sum over the pixels hidden by S of mean over channels of (inpaint(x, m_S) - x) ** 2 / (H * W)``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from shapjax import attribution, evaluation, masking
from conftest import stripes_labels

SIZE = 16
N_REGIONS = 4  # vertical stripes 4 px wide
MAX_REGIONS = 6  # two padding players
LABELS = stripes_labels(SIZE, SIZE, N_REGIONS)


@pytest.fixture(scope="module")
def params():
  return shapjax.init_inpainter((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8))


@pytest.fixture(scope="module")
def image():
  image = np.random.default_rng(0).random((SIZE, SIZE, 1), dtype=np.float32) * 0.3
  image[5:9, 9:13] = 0.95  # a bright blotch inside region 2
  return image


def _coalitions(*visible):
  return jnp.asarray(np.array(visible, bool))


def _hidden_error(filled, image, hidden):
  """By hand: the error on the hidden pixels, summed and divided by the pixel count."""
  error = np.mean(np.square(np.asarray(filled, np.float64) - np.asarray(image, np.float64)), axis=-1)
  return float(np.sum(error * hidden) / error.size)


def _model_game(params, image):
  return shapjax.inpainted_value_fn(functools.partial(shapjax.inpaint, params), image, LABELS)


def test_constant_fill_is_additive_with_each_region_worth_its_own_error():
  fill = 0.7
  image = np.random.default_rng(1).random((SIZE, SIZE, 3), dtype=np.float32)
  value_fn = shapjax.inpainted_value_fn(
      lambda images, visible: jnp.where(visible[..., None] > 0, images, fill), image, LABELS)
  own_error = np.array([np.sum(np.mean(np.square(image[LABELS == r].astype(np.float64) - fill), axis=-1))
                        for r in range(N_REGIONS)] + [0.0] * (MAX_REGIONS - N_REGIONS)) / SIZE ** 2
  exact = shapjax.exact_shapley(value_fn, MAX_REGIONS)
  loo = shapjax.exact_semivalue(value_fn, MAX_REGIONS, index="loo")
  np.testing.assert_allclose(exact.values, own_error, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loo.values, own_error, rtol=1e-5, atol=1e-7)
  assert float(value_fn(_coalitions([True] * MAX_REGIONS))[0]) == 0.0
  np.testing.assert_allclose(-value_fn(_coalitions([False] * MAX_REGIONS))[0], own_error.sum(), rtol=1e-5)


def test_only_hidden_pixels_count():
  """An inpaint_fn that spoils visible pixels changes nothing: v(all) stays exactly 0."""
  image = np.random.default_rng(2).random((SIZE, SIZE, 1), dtype=np.float32)
  spoil = lambda images, visible: images + 1.0
  value_fn = shapjax.inpainted_value_fn(spoil, image, LABELS)
  values = value_fn(_coalitions([True] * MAX_REGIONS, [True, False, True, True, True, True]))
  assert float(values[0]) == 0.0
  np.testing.assert_allclose(values[1], -np.sum(LABELS == 1) / SIZE ** 2, rtol=1e-6)


def test_model_game_exact_values(params, image):
  value_fn = _model_game(params, image)
  everything = np.ones((1, SIZE, SIZE), np.float32)
  assert float(value_fn(_coalitions([True] * MAX_REGIONS))[0]) == 0.0
  exact = shapjax.exact_shapley(value_fn, MAX_REGIONS)
  # Efficiency: the values add up to the error of inpainting the whole image from nothing.
  filled_from_nothing = shapjax.inpaint(params, image[None], np.zeros((1, SIZE, SIZE), np.float32))[0]
  all_hidden_error = _hidden_error(filled_from_nothing, image, everything[0])
  np.testing.assert_allclose(float(np.sum(exact.values)), all_hidden_error, rtol=1e-5)
  np.testing.assert_allclose(-value_fn(_coalitions([False] * MAX_REGIONS))[0], all_hidden_error, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(exact.values[N_REGIONS:]), 0.0)
  # Leave-one-out is the hide-one-region map: the error of inpainting region i from all the others.
  loo = shapjax.exact_semivalue(value_fn, MAX_REGIONS, index="loo")
  for region in range(N_REGIONS):
    hidden = (LABELS == region).astype(np.float32)
    filled = shapjax.inpaint(params, image[None], (1.0 - hidden)[None])[0]
    np.testing.assert_allclose(float(loo.values[region]), _hidden_error(filled, image, hidden), rtol=1e-4)


def test_copying_a_neighbour_makes_the_game_interact():
  """A hidden pixel takes the value one stripe to its left when that pixel is visible, else 0.

  Revealing region i helps region i + 1 only while i + 1 is hidden: Shapley splits that credit, leave-one-out
  does not, so the two differ; both stay exact.
  """
  image = np.random.default_rng(3).random((SIZE, SIZE, 1), dtype=np.float32)
  stripe = SIZE // N_REGIONS

  def copy_left(images, visible):
    source, source_visible = jnp.roll(images, stripe, axis=2), jnp.roll(visible, stripe, axis=2)
    guess = jnp.where(source_visible[..., None] > 0, source, 0.0)
    return jnp.where(visible[..., None] > 0, images, guess)

  value_fn = shapjax.inpainted_value_fn(copy_left, image, LABELS)
  shapley = shapjax.exact_shapley(value_fn, MAX_REGIONS)
  loo = shapjax.exact_semivalue(value_fn, MAX_REGIONS, index="loo")
  assert not np.allclose(shapley.values, loo.values, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(float(np.sum(shapley.values)), -float(value_fn(_coalitions([False] * MAX_REGIONS))[0]),
                             rtol=1e-5)
  for region in range(N_REGIONS):  # hide region alone: filled from the stripe to its left (rolled)
    hidden = LABELS == region
    filled = np.where(hidden[..., None], np.roll(image, stripe, axis=1), image)
    np.testing.assert_allclose(float(loo.values[region]), _hidden_error(filled, image, hidden), rtol=1e-5)


def test_attribute_plays_the_inpainting_game_for_an_inpainter(params, image):
  exact = shapjax.exact_shapley(_model_game(params, image), MAX_REGIONS)
  result = shapjax.attribute(params, image, LABELS, 32, max_regions=MAX_REGIONS, batch_size=8)
  explicit = shapjax.attribute(params, image, LABELS, 32, max_regions=MAX_REGIONS, batch_size=8, game="inpainting")
  np.testing.assert_array_equal(result.values, explicit.values)
  np.testing.assert_array_equal(np.asarray(result.values[N_REGIONS:]), 0.0)
  np.testing.assert_allclose(float(np.sum(result.values)), float(np.sum(exact.values)), rtol=1e-4)
  np.testing.assert_allclose(result.values, exact.values, atol=0.15 * float(np.max(np.abs(exact.values))))
  assert int(np.argmax(exact.values)) == int(np.argmax(result.values))
  # A baseline does not enter the inpainting game: the same program and the same values.
  size = attribution._attribute_jit.cache_size()
  other = shapjax.attribute(params, image, LABELS, 32, max_regions=MAX_REGIONS, batch_size=8, baseline=0.5)
  assert attribution._attribute_jit.cache_size() == size
  np.testing.assert_array_equal(other.values, result.values)


def test_leave_one_out_index_is_the_hide_one_region_map(params, image):
  loo = shapjax.exact_semivalue(_model_game(params, image), MAX_REGIONS, index="loo")
  result = shapjax.attribute(params, image, LABELS, 1, max_regions=MAX_REGIONS, batch_size=8, index="loo")
  np.testing.assert_allclose(result.values, loo.values, rtol=1e-4, atol=1e-7)


def test_game_must_fit_the_model(params, image):
  autoencoder = shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8),
                                         latent_features=4)
  with pytest.raises(ValueError, match="'reconstruction' game needs an autoencoder"):
    shapjax.attribute(params, image, LABELS, 2, max_regions=MAX_REGIONS, game="reconstruction")
  with pytest.raises(ValueError, match="'inpainting' game needs an inpainter"):
    shapjax.attribute(autoencoder, image, LABELS, 2, max_regions=MAX_REGIONS, game="inpainting")
  with pytest.raises(ValueError, match="game must be one of"):
    shapjax.attribute(params, image, LABELS, 2, max_regions=MAX_REGIONS, game="hide")
  with pytest.raises(TypeError, match="AutoencoderParams or InpainterParams"):
    shapjax.attribute(params.weights, image, LABELS, 2, max_regions=MAX_REGIONS)
  with pytest.raises(ValueError, match="16x8 pixels but the inpainter was built for 16x16"):
    shapjax.attribute(params, image[:, :8], LABELS[:, :8], 2, max_regions=MAX_REGIONS)
  assert attribution.check_game(autoencoder) == "reconstruction"
  assert attribution.check_game(params) == "inpainting"


@pytest.mark.slow
def test_batch_and_mesh_equal_one_image_at_a_time(params, image):
  images = np.stack([image, image[::-1], image[:, ::-1]])
  labels = np.stack([LABELS, stripes_labels(SIZE, SIZE, 3), LABELS])
  key = jax.random.key(5)
  options = dict(max_regions=MAX_REGIONS, batch_size=8)
  batch = shapjax.attribute_batch(params, images, labels, 4, key=key, **options)
  on_mesh = shapjax.attribute_batch(params, images, labels, 4, key=key, mesh=shapjax.make_mesh(), **options)
  for i in range(len(images)):
    one = shapjax.attribute(params, images[i], labels[i], 4, key=jax.random.fold_in(key, i), **options)
    np.testing.assert_allclose(batch.values[i], one.values, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(on_mesh.values[i], one.values, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(np.asarray(batch.values[1, 3:]), 0.0)


@pytest.mark.slow
def test_permutations_across_devices_equal_one_device(params, image):
  options = dict(max_regions=MAX_REGIONS, batch_size=8, key=jax.random.key(2))
  one = shapjax.attribute(params, image, LABELS, 8, **options)
  across = shapjax.attribute(params, image, LABELS, 8, mesh=shapjax.make_mesh(), **options)
  np.testing.assert_allclose(across.values, one.values, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["permutation", "stratified", "kernel"])
def test_every_shapley_estimator_plays_the_inpainting_game(params, image, estimator):
  exact = shapjax.exact_shapley(_model_game(params, image), MAX_REGIONS)
  result = shapjax.attribute(params, image, LABELS, 64, max_regions=MAX_REGIONS, batch_size=8,
                             estimator=estimator)
  np.testing.assert_array_equal(np.asarray(result.values[N_REGIONS:]), 0.0)
  np.testing.assert_allclose(float(np.sum(result.values)), float(np.sum(exact.values)), rtol=1e-3)
  np.testing.assert_allclose(result.values, exact.values, atol=0.2 * float(np.max(np.abs(exact.values))))


@pytest.mark.slow
@pytest.mark.parametrize("index", ["banzhaf", ("beta", 4, 1)])
def test_other_indices_play_the_inpainting_game(params, image, index):
  exact = shapjax.exact_semivalue(_model_game(params, image), MAX_REGIONS, index=index)
  result = shapjax.attribute(params, image, LABELS, 64, max_regions=MAX_REGIONS, batch_size=8, index=index)
  np.testing.assert_array_equal(np.asarray(result.values[N_REGIONS:]), 0.0)
  np.testing.assert_allclose(result.values, exact.values, atol=0.25 * float(np.max(np.abs(exact.values))))


def test_grid_passes_hide_every_pixel_once_per_size():
  masks = masking.grid_visible_masks(24, 20, (4, 8))
  assert masks.shape == (8, 24, 20)
  np.testing.assert_array_equal((~masks).reshape(2, 4, 24, 20).sum(axis=1), 1)


def test_grid_error_of_a_constant_fill_is_the_pixel_error(params):
  image = np.random.default_rng(4).random((SIZE, SIZE, 3), dtype=np.float32)
  grid = masking.grid_inpainting_error(lambda images, visible: jnp.where(visible[..., None] > 0, images, 0.25),
                                       image, cell_sizes=(4, 8))
  np.testing.assert_allclose(grid, np.mean(np.square(image - 0.25), axis=-1), rtol=1e-6)
  model_grid = masking.grid_inpainting_error(functools.partial(shapjax.inpaint, params), image[..., :1])
  assert model_grid.shape == (SIZE, SIZE) and bool(jnp.all(jnp.isfinite(model_grid)))


def test_inpainter_maps_from_parts(params, image):
  settings = evaluation.MapSettings(n_perm=4, regions=(6,), sigma=0.0)
  games = ("shapley", "loo", "banzhaf", ("beta", 16.0, 1.0))
  parts = evaluation.image_parts(params, image, settings=settings, key=jax.random.key(0), games=games)
  grid = masking.grid_inpainting_error(functools.partial(shapjax.inpaint, params), image,
                                       cell_sizes=evaluation.INPAINT_GRID_CELLS)
  np.testing.assert_allclose(evaluation.anomaly_map("inpaint_grid", parts, settings=settings), grid, rtol=1e-5,
                             atol=1e-8)
  labels = parts["labels_0"]
  area_share = np.bincount(labels.ravel(), minlength=6) / labels.size
  for label in ("shapley", "loo", "banzhaf", "beta_16_1"):
    expected = (np.asarray(parts[f"values_{label}_0"], np.float64) / np.maximum(area_share, 1e-12))[labels]
    np.testing.assert_allclose(evaluation.anomaly_map(f"inpaint_{label}", parts, settings=settings), expected,
                               rtol=1e-5)
    gate = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(evaluation.anomaly_map(f"inpaint_grid_x_{label}", parts, settings=settings),
                               grid * gate, rtol=1e-4, atol=1e-9)
  # Ablations: a constant game gives every region the same value (so the gate follows 1 / area); shuffling moves
  # the values among the regions.
  n_regions = int(labels.max()) + 1
  constant = np.zeros(6)
  constant[:n_regions] = np.mean(parts["values_shapley_0"][:n_regions])
  density = (constant / np.maximum(area_share, 1e-12))[labels]
  np.testing.assert_allclose(evaluation.anomaly_map("inpaint_grid_x_shapley:constant", parts, settings=settings),
                             grid * (density - density.min()) / (density.max() - density.min()), rtol=1e-4,
                             atol=1e-9)
  shuffled = evaluation.anomaly_map("inpaint_shapley:shuffled", parts, settings=settings, seed=1)
  moved = [shuffled[labels == r][0] * area_share[r] for r in range(n_regions)]
  np.testing.assert_allclose(sorted(moved), sorted(parts["values_shapley_0"][:n_regions]), rtol=1e-4)
  value_fn = shapjax.inpainted_value_fn(functools.partial(shapjax.inpaint, params), image, labels)
  for label, index in (("loo", "loo"), ("beta_16_1", ("beta", 16.0, 1.0))):
    exact = shapjax.exact_semivalue(value_fn, 6, index=index)
    tolerance = 1e-7 if index == "loo" else 0.3 * float(np.max(np.abs(exact.values)))
    np.testing.assert_allclose(parts[f"values_{label}_0"], exact.values, rtol=1e-4, atol=tolerance)
  # Parts computed before are completed, not recomputed.
  again = evaluation.image_parts(params, image, settings=settings, key=jax.random.key(1), parts=parts,
                                 games=("shapley", ("beta", 1.0, 4.0)))
  np.testing.assert_array_equal(again["values_shapley_0"], parts["values_shapley_0"])
  assert "values_beta_1_4_0" in again and "seconds_beta_1_4" in again


@pytest.mark.parametrize("name, index", [("inpaint_shapley", "shapley"), ("inpaint_grid_x_banzhaf:shuffled", "banzhaf"),
                                         ("inpaint_beta_16_1", ("beta", 16.0, 1.0)),
                                         ("inpaint_grid_x_beta_0.5_4", ("beta", 0.5, 4.0)), ("inpaint_grid", None),
                                         ("residual_x_shapley", None)])
def test_map_names_of_an_inpainter(name, index):
  assert evaluation.map_index(name) == index
  evaluation.parse_map_name(name)
  if index is not None:
    assert evaluation.index_label(index) in name


@pytest.mark.parametrize("name, message", [("inpaint_beta_0_1", "positive"), ("inpaint_grid:shuffled", "ablation"),
                                           ("inpaint_owen", "unknown map"), ("inpaint_loo:sorted", "ablation")])
def test_bad_inpainter_map_names(name, message):
  with pytest.raises(ValueError, match=message):
    evaluation.parse_map_name(name)


@pytest.mark.slow
def test_evaluate_an_inpainter(tmp_path):
  import shapjax.data
  dataset = shapjax.data.make_demo_dataset(tmp_path / "demo", n_train=2, n_test=4, image_size=32, seed=0)
  inpainter = shapjax.init_inpainter((32, 32, 1), key=jax.random.key(0), features=(4, 8))
  result = shapjax.evaluate(inpainter, dataset, n_perm=2, regions=6, progress=False, cache_dir=tmp_path / "cache")
  assert list(result["maps"]) == list(evaluation.INPAINT_DEFAULT_MAPS)
  for name, maps in result["maps"].items():
    assert 0.0 <= maps["overall"]["pixel_auroc"] <= 1.0, name
  assert result["maps"]["inpaint_shapley"]["seconds_per_image"] > result["maps"]["inpaint_grid"]["seconds_per_image"]
  assert all(len(image["additivity"]) == 1 for image in result["images"])
  assert result["additivity_index"] == "shapley"  # the first sampled game's coalitions
  # More maps on the same cache: the entries are completed with the new game only.
  maps = ("inpaint_shapley", "inpaint_banzhaf", "inpaint_grid_x_banzhaf", "inpaint_grid_x_banzhaf:constant")
  more = shapjax.evaluate(inpainter, dataset, maps=maps, n_perm=2, regions=6, progress=False,
                          cache_dir=tmp_path / "cache")
  assert more["cached_images"] == 0 and list(more["maps"]) == list(maps)
  assert more["maps"]["inpaint_shapley"] == result["maps"]["inpaint_shapley"] | {
      "seconds_per_image": more["maps"]["inpaint_shapley"]["seconds_per_image"]}
  assert more["maps"]["inpaint_grid_x_banzhaf:constant"]["overall"] != more["maps"]["inpaint_grid_x_banzhaf"]["overall"]
  again = shapjax.evaluate(inpainter, dataset, maps=maps, n_perm=2, regions=6, progress=False,
                           cache_dir=tmp_path / "cache")
  assert again["cached_images"] == again["n_images"]
  gates = shapjax.evaluate(inpainter, dataset, maps=("inpaint_loo", "inpaint_grid_x_banzhaf"), n_perm=2, regions=6,
                           progress=False, cache_dir=tmp_path / "cache")
  assert gates["additivity_index"] == "banzhaf"  # leave-one-out's only when it is the one game
  assert [i["additivity"] for i in gates["images"]] != [i["additivity"] for i in again["images"]]
  # The reference autoencoder's residual map beside the inpainter's.
  autoencoder = shapjax.init_autoencoder((32, 32, 1), key=jax.random.key(0), features=(4, 8), latent_features=4)
  with pytest.raises(ValueError, match="reference"):
    shapjax.evaluate(inpainter, dataset, maps=("residual",), progress=False)
  with_reference = shapjax.evaluate(inpainter, dataset, maps=("inpaint_grid", "residual"), reference=autoencoder,
                                    progress=False)
  alone = shapjax.evaluate(autoencoder, dataset, maps=("residual",), progress=False)
  assert with_reference["maps"]["residual"]["overall"] == alone["maps"]["residual"]["overall"]
  assert list(shapjax.evaluate(inpainter, dataset, n_perm=2, regions=6, reference=autoencoder, progress=False,
                               cache_dir=tmp_path / "cache")["maps"]) == [*evaluation.INPAINT_DEFAULT_MAPS, "residual"]
  with pytest.raises(ValueError, match="same image size"):
    shapjax.evaluate(inpainter, dataset, reference=shapjax.init_autoencoder((16, 16, 1), key=jax.random.key(0),
                                                                            features=(4, 8), latent_features=4))
  with pytest.raises(ValueError, match="pass it with an inpainter"):
    shapjax.evaluate(autoencoder, dataset, reference=autoencoder)
  with pytest.raises(ValueError, match="not available for an autoencoder"):
    shapjax.evaluate(autoencoder, dataset, maps=("inpaint_grid",), progress=False)
