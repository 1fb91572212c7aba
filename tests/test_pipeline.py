"""explain_files with either model kind: region values beside the model's default pixel map, in the figure and JSON."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import shapjax
from shapjax import evaluation, masking, metrics, pipeline, plots

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return shapjax.make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=2, n_test=4, image_size=SIZE, seed=0)


def _model(kind):
  if kind == "inpainting":
    return shapjax.init_inpainter((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8))
  return shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8), latent_features=4)


@pytest.mark.parametrize("kind, pixel_map, game", [("inpainting", "inpaint_grid", "inpainting"),
                                                   ("autoencoder", "residual", "reconstruction")])
def test_explain_draws_and_records_the_default_pixel_map(kind, pixel_map, game, dataset, tmp_path, monkeypatch):
  params = _model(kind)
  figures = []
  draw = plots.plot_explanation

  def keep(*args, **kwargs):
    figures.append(draw(*args, **kwargs))
    return figures[-1]

  monkeypatch.setattr(plots, "plot_explanation", keep)
  split = shapjax.load_mvtec(dataset, split="test", image_size=SIZE)
  defective = next(i for i, t in enumerate(split.defect_types) if t != "good")
  rows = [defective, split.defect_types.index("good")]
  records = shapjax.explain_files([split.paths[i] for i in rows], params=params, out_dir=tmp_path, n_perm=2,
                                  max_regions=6, key=jax.random.key(1), progress=False)
  assert len(records) == len(figures) == 2
  for row, record, figure in zip(rows, records, figures):
    stored = json.loads(Path(record["json"]).read_text())
    assert stored["pixel_map"] == record["pixel_map"] == pixel_map and stored["game"] == game
    assert {"regions", "regions_by_value", "n_regions", "additivity", "seconds"} <= set(stored)  # the keys before
    image = shapjax.read_image(split.paths[row], image_size=(SIZE, SIZE), channels=1)
    np.testing.assert_array_equal(record["pixel_map_values"], evaluation.image_map(params, image))
    # The fifth panel is the pixel map, titled with its name, drawn as computed.
    panel = figure.axes[4]
    assert panel.get_title() == pixel_map
    (shown,) = [im for im in panel.get_images() if im.get_cmap().name == "inferno"]
    np.testing.assert_array_equal(shown.get_array(), record["pixel_map_values"])
    truth = split.masks[row]
    if truth.any():
      heat = np.asarray(masking.heatmap(record["values"], record["labels"]))
      assert stored["pixel_auroc_region_values"] == pytest.approx(metrics.pixel_auroc(heat, truth), abs=1e-12)
      assert stored["pixel_auroc_pixel_map"] == pytest.approx(metrics.pixel_auroc(record["pixel_map_values"], truth),
                                                              abs=1e-12)
      assert stored["pixel_auroc_region_values"] != stored["pixel_auroc_pixel_map"]
      assert panel.get_xlabel() == f"pixel AUROC {stored['pixel_auroc_pixel_map']:.3f}"
      assert "ground_truth" in stored
    else:  # a good image: one class only, no AUROC
      assert stored["pixel_auroc_region_values"] is None and stored["pixel_auroc_pixel_map"] is None
      assert panel.get_xlabel() == ""
  assert len(list(tmp_path.glob("*.png"))) == 2


def test_demo_config_trains_one_model_of_each_kind():
  for config in (pipeline.DemoConfig(), pipeline.DemoConfig.quick()):
    assert isinstance(config.autoencoder.model, shapjax.AutoencoderConfig)
    assert isinstance(config.inpainter.model, shapjax.InpainterConfig)
  with pytest.raises(ValueError, match="inpainter"):
    pipeline.DemoConfig(inpainter=pipeline.DemoConfig().autoencoder)
