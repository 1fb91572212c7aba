"""evaluate() end to end on a tiny generated MVTec-layout folder, the cache, and the maps' ablations."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import shapjax
import shapjax.data
import shapjax.metrics
from shapjax import evaluation

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  return shapjax.data.make_demo_dataset(root, n_train=2, n_test=6, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def params():
  return shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8), latent_features=4)


MAPS = ("residual", "shapley", "shapley_area", "residual_x_shapley", "residual_x_shapley:shuffled",
        "shapley_area:constant")


@pytest.mark.slow
def test_evaluate_end_to_end_and_cache(dataset, params, tmp_path):
  options = dict(maps=MAPS, n_perm=2, regions=6, cache_dir=tmp_path / "cache", progress=False)
  first = shapjax.evaluate(params, dataset, figures_dir=tmp_path / "figures", **options)
  assert first["n_images"] == 6 and first["cached_images"] == 0
  assert set(first["maps"]) == set(MAPS)
  for name, result in first["maps"].items():
    overall = result["overall"]
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
      assert 0.0 <= overall[metric] <= 1.0, (name, metric)
    assert set(result["per_type"]) == {"blob", "scratch"}
    assert result["seconds_per_image"] > 0
  # Shapley maps cost the attribution on top of the residual.
  assert first["maps"]["shapley"]["seconds_per_image"] > first["maps"]["residual"]["seconds_per_image"]
  assert (tmp_path / "figures" / "overlays.png").stat().st_size > 1000
  json.loads(json.dumps(first))  # JSON-ready as it is
  assert len(list((tmp_path / "cache").rglob("*.npz"))) == 6

  second = shapjax.evaluate(params, dataset, **options)
  assert second["cached_images"] == 6
  for name in MAPS:
    assert second["maps"][name]["overall"] == first["maps"][name]["overall"]
  # Other settings get their own cache entries.
  third = shapjax.evaluate(params, dataset, **dict(options, seed=1))
  assert third["cached_images"] == 0


def test_residual_only_needs_no_attribution(dataset, params, tmp_path):
  result = shapjax.evaluate(params, dataset, maps=("residual",), cache_dir=tmp_path, progress=False)
  stored = np.load(next(tmp_path.rglob("*.npz")))
  assert "residual" in stored and "shapley_seconds" not in stored
  # A later Shapley run recomputes those entries instead of trusting them.
  again = shapjax.evaluate(params, dataset, maps=("residual", "shapley"), n_perm=2, regions=6, cache_dir=tmp_path,
                           progress=False)
  assert again["cached_images"] == 0
  assert again["maps"]["residual"]["overall"] == result["maps"]["residual"]["overall"]


def test_evaluate_accepts_a_loaded_split_and_a_limit(dataset, params):
  split = shapjax.data.load_mvtec(dataset, split="test", image_size=SIZE)
  result = shapjax.evaluate(params, split, maps=("residual",), limit=4, progress=False)
  types = {image["defect_type"] for image in result["images"]}
  assert types == {"good", "blob", "scratch"}
  assert result["n_images"] <= 5


def _assert_evaluate_scores(result, name, maps, split):
  """``maps`` (one per test image, in order) are the maps ``result`` (evaluate) scored as ``name``."""
  assert [float(m.max()) for m in maps] == pytest.approx([image["scores"][name] for image in result["images"]],
                                                         rel=1e-6, abs=1e-12)
  scored = shapjax.metrics.pixel_metrics(np.stack(maps), split.masks)
  assert result["maps"][name]["overall"]["pixel_auroc"] == pytest.approx(scored.pixel_auroc, abs=1e-9)
  assert result["maps"][name]["overall"]["aupro"] == pytest.approx(scored.aupro, abs=1e-9)


def test_default_map_and_image_map_are_what_evaluate_scores(dataset, params):
  # The default map of each kind is its own pixel map, evaluate's first default; image_map computes the very map
  # evaluate scores, image by image (the masks are at the model's size here, so no upsampling comes between).
  inpainter = shapjax.init_inpainter((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8))
  assert evaluation.default_map(params) == "residual" == evaluation.DEFAULT_MAPS[0]
  assert evaluation.default_map(inpainter) == "inpaint_grid" == evaluation.INPAINT_DEFAULT_MAPS[0]
  assert evaluation.default_map(inpainter.config) == "inpaint_grid"
  split = shapjax.data.load_mvtec(dataset, split="test", image_size=SIZE)
  assert all(m.shape == (SIZE, SIZE) for m in split.original_masks)
  for model_params, name, reference in ((params, None, None), (inpainter, None, None), (inpainter, "residual", params)):
    name = name or evaluation.default_map(model_params)
    result = shapjax.evaluate(model_params, split, maps=(name,), reference=reference, progress=False)
    maps = [evaluation.image_map(model_params, image, name=name, reference=reference) for image in split.images]
    assert all(m.shape == (SIZE, SIZE) and m.dtype == np.float32 for m in maps)
    _assert_evaluate_scores(result, name, maps, split)
  # Smoothing follows the settings: sigma 0 is the raw squared error of the reconstruction.
  raw = evaluation.image_map(params, split.images[0], settings=evaluation.MapSettings(sigma=0.0))
  np.testing.assert_allclose(raw, shapjax.residual_map(params, split.images[:1])[0], rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="not available for an autoencoder"):
    evaluation.image_map(params, split.images[0], name="inpaint_grid")
  with pytest.raises(ValueError, match="reference"):
    evaluation.image_map(inpainter, split.images[0], name="residual")
  with pytest.raises(ValueError, match="shape"):
    evaluation.image_map(params, split.images[0, :16])


@pytest.mark.slow
def test_image_map_of_a_game_map_is_what_evaluate_scores(dataset, params):
  # Game maps too: image i of the split takes evaluate's permutation key and ablation seed with index=i.
  inpainter = shapjax.init_inpainter((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8))
  split = shapjax.data.load_mvtec(dataset, split="test", image_size=SIZE)
  options = dict(n_perm=2, regions=(6,), seed=3)
  settings = evaluation.MapSettings(**options)
  for model_params, name in ((params, "shapley_area:shuffled"), (inpainter, "inpaint_shapley")):
    result = shapjax.evaluate(model_params, split, maps=(name,), progress=False, **options)
    maps = [evaluation.image_map(model_params, image, name=name, settings=settings, index=i)
            for i, image in enumerate(split.images)]
    _assert_evaluate_scores(result, name, maps, split)


def test_stratified_subset_is_fixed_and_covers_every_type():
  types = ["good"] * 50 + ["a"] * 30 + ["b"] * 3
  subset = evaluation.stratified_subset(types, 10)
  np.testing.assert_array_equal(subset, evaluation.stratified_subset(types, 10))
  assert {types[i] for i in subset} == {"good", "a", "b"}
  assert 8 <= subset.size <= 12
  np.testing.assert_array_equal(evaluation.stratified_subset(types, None), np.arange(83))


def _parts():
  labels = np.zeros((4, 6), np.int32)
  labels[:, 2:] = 1
  labels[2:, 4:] = 2  # areas 8, 12, 4
  rng = np.random.default_rng(0)
  return {"residual": rng.random((4, 6)), "residual_seconds": 0.1, "labels_0": labels,
          "values_0": np.asarray([0.2, -0.1, 0.4, 0.0]), "shapley_seconds": 1.0}


def test_maps_and_ablations():
  parts = _parts()
  settings = evaluation.MapSettings(regions=(4,), sigma=0.0)
  labels = parts["labels_0"]
  np.testing.assert_allclose(evaluation.anomaly_map("residual", parts, settings=settings), parts["residual"],
                             rtol=1e-6)
  np.testing.assert_allclose(evaluation.anomaly_map("shapley", parts, settings=settings),
                             parts["values_0"][labels], rtol=1e-6)
  area = np.asarray([8, 12, 4])[labels]
  density = parts["values_0"][labels] * 24 / area
  np.testing.assert_allclose(evaluation.anomaly_map("shapley_area", parts, settings=settings), density, rtol=1e-6)
  np.testing.assert_allclose(evaluation.anomaly_map("residual_x_shapley", parts, settings=settings),
                             parts["residual"] * np.maximum(density, 0), rtol=1e-6)
  # The constant ablation keeps only the region sizes; the padding player (id 3) never enters the mean.
  mean = np.mean(parts["values_0"][:3])
  np.testing.assert_allclose(evaluation.anomaly_map("shapley_area:constant", parts, settings=settings),
                             mean * 24 / area, rtol=1e-6)
  shuffled = evaluation.anomaly_map("shapley:shuffled", parts, settings=settings, seed=3)
  assert sorted(np.unique(shuffled)) == pytest.approx(sorted(parts["values_0"][:3]))
  assert evaluation.anomaly_map("shapley:shuffled", parts, settings=settings, seed=3) == pytest.approx(shuffled)


def test_several_scales_are_averaged():
  parts = _parts()
  parts["labels_1"] = np.zeros((4, 6), np.int32)
  parts["values_1"] = np.asarray([1.0, 0.0])
  settings = evaluation.MapSettings(regions=(4, 2), sigma=0.0)
  expected = (parts["values_0"][parts["labels_0"]] + 1.0) / 2
  np.testing.assert_allclose(evaluation.anomaly_map("shapley", parts, settings=settings), expected, rtol=1e-6)


def test_bad_names_and_settings():
  with pytest.raises(ValueError, match="unknown map"):
    evaluation.anomaly_map("gradcam", _parts(), settings=evaluation.MapSettings())
  with pytest.raises(ValueError, match="ablation"):
    evaluation.anomaly_map("residual:shuffled", _parts(), settings=evaluation.MapSettings())
  with pytest.raises(ValueError, match="baseline"):
    evaluation.MapSettings(baseline="noise")
  with pytest.raises(ValueError, match="regions"):
    evaluation.MapSettings(regions=(1,))


@pytest.mark.slow
def test_cli_evaluate_as_subprocess(dataset, params, tmp_path):
  checkpoint = shapjax.save(params, tmp_path / "checkpoint")
  out = tmp_path / "results" / "out.json"
  command = [sys.executable, "-m", "shapjax.cli", "evaluate", str(dataset), "--checkpoint", str(checkpoint),
             "--maps", "residual,shapley_area,shapley_area:shuffled", "--n-perm", "2", "--regions", "6", "--json",
             str(out), "--figures", str(tmp_path / "figures"), "--quiet"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "pixel AUROC" in done.stdout and "shapley_area:shuffled" in done.stdout
  result = json.loads(out.read_text())
  assert set(result["maps"]) == {"residual", "shapley_area", "shapley_area:shuffled"}
  assert (tmp_path / "figures" / "overlays.png").is_file()
  assert list((tmp_path / "results" / ".shapjax_cache").rglob("*.npz"))  # the default cache sits beside the JSON
  bad = subprocess.run(command[:-1] + ["--maps", "gradcam"], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "unknown map" in bad.stderr


def test_pooled_controls_equal_shapley_maps_of_an_additive_game():
  # In the additive game v(S) = mean residual over the pixels of S's regions, each region's Shapley value is its
  # residual sum over the image size; shapley_area and residual_x_shapley_norm then equal their pooled controls.
  parts = _parts()
  labels, residual = parts["labels_0"], parts["residual"]
  parts["values_0"] = np.append(np.bincount(labels.ravel(), residual.ravel(), 3) / residual.size, 0.0)
  settings = evaluation.MapSettings(regions=(4,), sigma=0.0)
  for shapley, pooled in [("shapley_area", "pooled_residual"), ("residual_x_shapley_norm", "residual_x_pooled_norm")]:
    np.testing.assert_allclose(evaluation.anomaly_map(pooled, parts, settings=settings),
                               evaluation.anomaly_map(shapley, parts, settings=settings), rtol=1e-5)
  region_mean = np.asarray([residual[labels == i].mean() for i in range(3)])[labels]
  np.testing.assert_allclose(evaluation.anomaly_map("pooled_residual", parts, settings=settings),
                             region_mean, rtol=1e-6)
  with pytest.raises(ValueError, match="ablation"):
    evaluation.anomaly_map("pooled_residual:constant", parts, settings=settings)
