"""The docs tables of the inpainting attempts come from the results files, cell by cell."""

import json
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import inpainting, inpainting_tables  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                       "inpainting")


def _scores(pixel, aupro, image=0.5):
  return {"overall": {"pixel_auroc": pixel, "aupro": aupro, "image_auroc": image}, "per_type": {},
          "seconds_per_image": 0.1}


def _record(dataset, n_images, limit, attempts):
  return {"dataset": dataset, "n_images": n_images, "limit": limit, "attempts": attempts}


def _rows(table):
  return [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]


@pytest.fixture
def results(tmp_path):
  autoencoder = {"name": "autoencoder", "additivity_median": 1.0,
                 "maps": {"residual": _scores(0.9, 0.6, 0.75), "shapley": _scores(0.7, 0.3),
                          "pooled_residual": _scores(0.8, 0.4)}}
  inpainter = {"name": "inpainter", "additivity_median": 0.5,
               "maps": {"inpaint_grid": _scores(0.91, 0.61, 0.78), "inpaint_loo": _scores(0.77, 0.41),
                        "inpaint_shapley": _scores(0.75, 0.34), "inpaint_grid_x_banzhaf": _scores(0.86, 0.52)}}
  wider = {"name": "inpainter, 1.5x the channels", "additivity_median": 0.98,
           "maps": {"inpaint_grid": _scores(0.92, 0.62), "inpaint_loo": _scores(0.78, 0.42)}}
  (tmp_path / "ko.json").write_text(json.dumps(_record("ko", 117, None, [autoencoder, inpainter, wider])))
  subset = dict(inpainter, additivity_median=-0.25, additivity_index="banzhaf")
  (tmp_path / "mt-subset80.json").write_text(json.dumps(_record("mt", 80, 80, [autoencoder, subset])))
  return tmp_path


def test_columns_are_whole_splits_then_subsets_and_cells_are_the_results(results):
  records = inpainting_tables.load(results)
  assert [r["label"] for r in records] == ["ko (117 images)", "mt (80-image subset)"]
  tables = inpainting_tables.tables(records)
  summary = _rows(tables["summary"])
  assert summary[0] == ["autoencoder `residual` (the map to beat)", "0.900 / 0.600 (0.750)"]  # whole splits only
  assert ["inpainter `inpaint_grid`", "0.910 / 0.610 (0.780)"] in summary
  assert ["inpainter, 1.5x the channels: `inpaint_loo`", "0.780 / 0.420 (0.500)"] in summary
  main = {row[0]: row[1:] for row in _rows(tables["main"])}
  assert main["`inpaint_grid_x_banzhaf`"] == ["0.860 / 0.520", "0.860 / 0.520"]
  assert "`inpaint_banzhaf`" not in main  # scored nowhere
  # The game behind each additivity: recorded, or inferred from the maps as evaluate() chooses it.
  assert main["median additivity of the inpainting game, per image"] == ["0.500 (shapley)", "-0.250 (banzhaf)"]
  attempts = _rows(tables["attempts"])
  assert ["inpainter, 1.5x the channels", "`inpaint_grid`", "0.920 / 0.620", "-"] in attempts
  assert ["inpainter, 1.5x the channels", "median additivity", "0.980 (loo)", "-"] in attempts


def test_additivity_index_follows_evaluate():
  assert inpainting_tables.additivity_index({"name": "x", "maps": {"inpaint_loo": 0, "inpaint_grid_x_banzhaf": 0,
                                                                   "inpaint_beta_1_16": 0}}) == "banzhaf"
  assert inpainting_tables.additivity_index({"name": "x", "maps": {"inpaint_grid": 0, "residual": 0}}) is None
  assert inpainting_tables.additivity_index({"name": "autoencoder", "maps": {"shapley": 0}}) == "shapley"


def test_the_committed_results_make_every_table():
  records = inpainting_tables.load(pathlib.Path(RESULTS))
  tables = inpainting_tables.tables(records)
  whole = [r for r in records if r["limit"] is None]
  residual = [f"{a['maps']['residual']['overall']['pixel_auroc']:.3f}" for r in whole for a in r["attempts"]
              if a["name"] == "autoencoder"]
  assert [c.split(" / ")[0] for c in _rows(tables["summary"])[0][1:]] == residual
  names = {row[0] for row in _rows(tables["attempts"])}
  assert names <= {a["name"] for a in inpainting.attempts()}


def test_an_empty_folder_is_named(tmp_path):
  with pytest.raises(ValueError, match="no results"):
    inpainting_tables.load(tmp_path)
