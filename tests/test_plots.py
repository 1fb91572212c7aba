"""Figures (colour bars, robust scales, numbered outlines) and the demo pipeline's scores, on tiny inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shapjax
from shapjax import evaluation, metrics, pipeline, plots

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def _valid_png(path):
  assert path.is_file(), path
  with Image.open(path) as image:
    image.verify()


def _map_images(ax):
  """The colour-mapped images of an axes (a grey photo underneath is not one)."""
  return [image for image in ax.get_images() if image.get_cmap().name != "gray"]


def _scratch():
  """A grey image with a dark one-pixel diagonal scratch, its mask, and a residual map that scores it."""
  rows = np.arange(6, 26)
  mask = np.zeros((SIZE, SIZE), bool)
  mask[rows, rows] = True
  image = np.full((SIZE, SIZE, 1), 0.6, np.float32)
  image[mask] = 0.05
  rng = np.random.default_rng(0)
  residual = rng.uniform(0.0, 0.01, (SIZE, SIZE)).astype(np.float32)
  residual[mask] = 0.1  # the scratch outranks all but two pixels (pixel AUROC > 0.99) ...
  residual[0, 0] = residual[31, 2] = 5.0  # ... which dwarf it on a min-max scale; a robust scale clips them
  return image, mask, residual


def _labels():
  """Sixteen 8 x 8 square regions."""
  return (np.arange(SIZE)[:, None] // 8 * 4 + np.arange(SIZE)[None, :] // 8).astype(np.int32)


def test_explanation_has_a_colour_bar_and_numbered_top_regions(tmp_path):
  image, mask, _ = _scratch()
  labels = _labels()
  values = np.linspace(-1.0, 1.0, 16).astype(np.float32)[::-1]  # region 0 ranks first, region 1 second, ...
  fig = shapjax.plot_explanation(image, labels, values, top_k=3, mask=mask, title="t", path=tmp_path / "e.png")
  _valid_png(tmp_path / "e.png")
  panels = fig.axes[:4]
  (value_map,) = _map_images(panels[2])
  assert value_map.colorbar is not None
  assert len(fig.axes) == 5  # four panels and the value map's colour bar
  np.testing.assert_allclose(value_map.get_array(), values[labels])
  for ax in (panels[2], panels[3]):
    assert [text.get_text() for text in ax.texts] == ["1", "2", "3"]
    # Each badge sits inside its region: rank r is region r - 1 here.
    for rank, text in enumerate(ax.texts):
      x, y = text.get_position()
      assert labels[int(round(y)), int(round(x))] == rank
  badges = [text.get_bbox_patch().get_facecolor() for text in panels[3].texts]
  assert badges[0] != badges[1] == badges[2]  # rank 1 stands out


def test_explanation_shows_the_pixel_map_as_a_fifth_panel(tmp_path):
  image, mask, residual = _scratch()
  values = np.linspace(-1.0, 1.0, 16).astype(np.float32)
  fig = shapjax.plot_explanation(image, _labels(), values, mask=mask, pixel_map=residual, pixel_map_name="residual",
                                 value_label="drop in error", path=tmp_path / "e.png")
  _valid_png(tmp_path / "e.png")
  assert len(fig.axes) == 7  # five panels, a colour bar for the value map and one for the pixel map
  panel = fig.axes[4]
  assert panel.get_title() == "residual"
  (shown,) = _map_images(panel)
  np.testing.assert_array_equal(shown.get_array(), residual)
  assert shown.colorbar is not None and shown.norm.vmax < residual.max()  # its own robust scale
  assert panel.get_xlabel() == f"pixel AUROC {metrics.pixel_auroc(residual, mask):.3f}"
  assert fig.axes[2].get_xlabel() == f"pixel AUROC {metrics.pixel_auroc(values[_labels()], mask):.3f}"
  assert _map_images(fig.axes[2])[0].colorbar.ax.get_ylabel() == "drop in error"
  assert panel.collections  # the ground truth is outlined on it
  plain = shapjax.plot_explanation(image, _labels(), values)
  assert len(plain.axes) == 5 and plain.axes[2].get_xlabel() == ""


def test_outlines_are_thin_pixel_borders():
  image, mask, _ = _scratch()
  fig = shapjax.plot_explanation(image, _labels(), np.arange(16.0), top_k=1, mask=mask)
  # Every outline segment runs along a pixel border (half-integer x or y) and spans one pixel.
  for collection in fig.axes[3].collections:
    for segment in collection.get_segments():
      (x0, y0), (x1, y1) = segment
      assert abs(x1 - x0) + abs(y1 - y0) == pytest.approx(1.0)
      assert (x0 % 1 == 0.5 and x1 == x0) or (y0 % 1 == 0.5 and y1 == y0)
    assert np.max(collection.get_linewidths()) < 5  # points: thin next to an 8-point-wide pixel


def test_overlay_grid_scales_each_map_so_a_thin_scratch_reaches_the_top(tmp_path):
  image, mask, residual = _scratch()
  shapley = np.linspace(0.0, 1.0, 16)[_labels()].astype(np.float32)
  images, masks = np.stack([image, image]), np.stack([mask, mask])
  maps = {"Shapley map": np.stack([shapley, shapley]), "residual map": np.stack([residual, residual * 1e-4])}
  fig = shapjax.plot_overlay_grid(images, maps, masks=masks, row_titles=["a", "b"],
                                  region_labels={"Shapley map": np.stack([_labels(), _labels()])},
                                  top_k=2, path=tmp_path / "grid.png")
  _valid_png(tmp_path / "grid.png")
  assert metrics.pixel_auroc(residual, mask) > 0.99
  n_rows, n_columns = 2, 4
  assert len(fig.axes) == n_rows * n_columns + n_rows * len(maps)  # one colour bar per map of each image
  panels = np.asarray(fig.axes[:n_rows * n_columns]).reshape(n_rows, n_columns)
  for row in range(n_rows):
    for column, name in zip((2, 3), maps):
      (shown,) = _map_images(panels[row, column])
      assert shown.colorbar is not None
      plotted = np.asarray(shown.get_array())
      np.testing.assert_array_equal(plotted, maps[name][row])  # the map itself, as scored
      assert "pixel AUROC" in panels[row, column].get_xlabel()
      if name == "residual map":
        # On its own robust scale the scratch is at the top, whatever the map's units; min-max would put it
        # near 2% of the range.
        assert np.all(shown.norm(plotted[mask]) >= 0.9)
        assert (plotted[mask].min() - plotted.min()) / np.ptp(plotted) < 0.05
    assert [text.get_text() for text in panels[row, 2].texts] == ["1", "2"]
    assert not panels[row, 3].texts


def test_overlay_grid_rejects_unknown_region_columns():
  image, mask, residual = _scratch()
  with pytest.raises(ValueError, match="not in maps"):
    shapjax.plot_overlay_grid(image[None], {"residual": residual[None]}, region_labels={"shapley": _labels()[None]})


def test_overlay_grid_handles_flat_maps_and_missing_truth():
  image, _, _ = _scratch()
  fig = plots.plot_overlay_grid(image[None], {"flat": np.zeros((1, SIZE, SIZE))})
  (shown,) = _map_images(fig.axes[1])
  assert shown.norm.vmax > shown.norm.vmin
  assert fig.axes[1].get_xlabel() == ""


@pytest.mark.parametrize("truth_kind", ["scratch", "empty", "full"])
def test_pipeline_pixel_auroc_is_the_metrics_module(truth_kind):
  _, mask, residual = _scratch()
  rng = np.random.default_rng(1)
  heat = rng.normal(size=mask.shape).astype(np.float32) + 0.5 * mask
  truth = {"scratch": mask, "empty": np.zeros_like(mask), "full": np.ones_like(mask)}[truth_kind]
  if truth_kind == "scratch":
    assert pipeline._pixel_auroc(heat, truth) == metrics.pixel_auroc(heat, truth)
    assert pipeline._pixel_auroc(residual, truth) == metrics.pixel_auroc(residual, truth)
  else:
    assert pipeline._pixel_auroc(heat, truth) is None  # undefined, where metrics raises


def test_plots_has_no_private_copy_of_heatmap():
  assert not hasattr(plots, "value_map")
  assert not hasattr(pipeline, "_auroc")


@pytest.mark.slow
def test_demo_end_to_end_figures_and_scores(tmp_path):
  out = tmp_path / "demo"
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-m", "shapjax.cli", "demo", "--quick", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  summary = json.loads((out / "summary.json").read_text())
  _valid_png(out / "overview.png")
  for item in summary["images"]:
    _valid_png(Path(item["figure"]))
    assert json.loads(Path(item["figure"]).with_suffix(".json").read_text())["pixel_map"] == "inpaint_grid"
  # One checkpoint of each kind: the explanations and the default map are the inpainter's.
  autoencoder = shapjax.load(out / "checkpoint" / "autoencoder")
  inpainter = shapjax.load(out / "checkpoint" / "inpainter")
  assert isinstance(autoencoder, shapjax.AutoencoderParams) and isinstance(inpainter, shapjax.InpainterParams)
  assert summary["default_map"] == "inpaint_grid" and summary["reference_map"] == "residual"
  # The four maps, the default first and the residual beside it, each with finite scores of the whole test split:
  # those evaluate() gives for the saved checkpoints.
  maps = ["inpaint_grid", "residual", "inpaint_shapley", "inpaint_loo"]
  assert list(summary["maps"]) == maps
  config = pipeline.DemoConfig.quick()
  scored = shapjax.evaluate(inpainter, out / "data", maps=maps, reference=autoencoder, n_perm=config.n_perm,
                            regions=(config.max_regions,), progress=False)
  for name in maps:
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
      assert np.isfinite(summary["maps"][name][metric]), (name, metric)
      assert summary["maps"][name][metric] == pytest.approx(scored["maps"][name]["overall"][metric], abs=1e-9)
  assert summary["maps"]["inpaint_grid"]["pixel_auroc"] != summary["maps"]["residual"]["pixel_auroc"]
  # The per-image residual AUROCs are the metrics module's, of the map evaluate scores, from the checkpoint.
  test = shapjax.load_mvtec(out / "data", split="test", image_size=summary["image_size"])
  paths = [str(p) for p in test.paths]
  rows = [paths.index(item["image"]) for item in summary["images"]]
  for item, row in zip(summary["images"], rows):
    residual = evaluation.image_map(autoencoder, test.images[row])
    assert item["pixel_auroc_residual"] == pytest.approx(metrics.pixel_auroc(residual, test.masks[row]), abs=1e-6)
    grid = evaluation.image_map(inpainter, test.images[row])
    assert item["pixel_auroc_inpaint_grid"] == pytest.approx(metrics.pixel_auroc(grid, test.masks[row]), abs=1e-6)
