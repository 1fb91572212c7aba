"""The localization analysis scripts run end to end on a small synthetic dataset and agree with evaluate()."""

import json
import os
import sys

import jax
import pytest

import shapjax

pytestmark = pytest.mark.slow  # the analysis scripts end to end

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import additivity, map_variants  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return shapjax.make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=3, n_test=6, image_size=SIZE, seed=1)


@pytest.fixture(scope="module")
def params():
  return shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(0), features=(4, 8), latent_features=4)


def test_map_variants_reads_the_cache_and_agrees_with_evaluate(dataset, params, tmp_path):
  result = shapjax.evaluate(params, dataset, maps=("residual", "shapley"), n_perm=2, regions=6, cache_dir=tmp_path / "cache",
                            progress=False)
  (folder,) = (tmp_path / "cache").iterdir()
  assert map_variants.main([str(dataset), str(folder), "--out", str(tmp_path / "out")]) == 0
  rows = json.loads((tmp_path / "out" / f"{dataset.name}.json").read_text())["rows"]
  residual = rows[0]
  assert residual["map"] == "residual"
  assert residual["pixel_auroc"] == pytest.approx(result["maps"]["residual"]["overall"]["pixel_auroc"], abs=1e-6)
  assert residual["aupro"] == pytest.approx(result["maps"]["residual"]["overall"]["aupro"], abs=1e-6)
  assert {r["source"] for r in rows} == {"-", "shapley", "shapley:constant", "shapley:shuffled", "pooled sum",
                                        "pooled max"}


def test_map_variants_names_a_cache_without_shapley_values(dataset, params, tmp_path):
  shapjax.evaluate(params, dataset, maps=("residual",), cache_dir=tmp_path / "cache", progress=False)
  (folder,) = (tmp_path / "cache").iterdir()
  with pytest.raises(ValueError, match="no Shapley values"):
    map_variants.main([str(dataset), str(folder), "--out", str(tmp_path / "out")])


def test_additivity_reports_every_baseline_and_a_perfect_oracle(dataset, params, tmp_path):
  checkpoint = shapjax.save(params, tmp_path / "ckpt")
  assert additivity.main([str(dataset), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                          "--limit", "6", "--regions", "6"]) == 0
  report = json.loads((tmp_path / "out" / f"{dataset.name}_conv.json").read_text())
  assert [r["baseline"] for r in report["baselines"]] == list(additivity.BASELINES)
  for row in report["baselines"]:
    assert -1.0 <= row["corr_min"] <= row["corr_median"] <= 1.0
    assert 0.0 <= row["auroc_residual"] <= 1.0
  assert report["oracle_region_map"]["pixel_auroc"] > 0.9  # the regions hold the painted defects


def test_inpainting_attempts_train_score_and_resume(dataset, tmp_path):
  from benchmarks import inpainting  # pylint: disable=g-import-not-at-top
  args = [str(dataset), "--image-size", "32", "32", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
          "--n-perm", "2", "--steps-autoencoder", "2", "--steps-inpainter", "2", "--limit", "2"]
  inpainting.main(args + ["--attempts", "autoencoder,inpainter"])  # the attempt with every kind of map
  stem = f"{dataset.name}-subset2"  # a subset's table is not the whole split's
  assert not (tmp_path / "out" / f"{dataset.name}.json").exists()
  record = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
  assert [a["name"] for a in record["attempts"]] == ["autoencoder", "inpainter"]
  by_name = {a["name"]: a for a in record["attempts"]}
  for attempt in inpainting.attempts()[:2]:
    assert set(attempt["maps"]) <= set(by_name[attempt["name"]]["maps"])
  # The reference autoencoder's residual beside every inpainter attempt is the autoencoder attempt's.
  assert (by_name["inpainter"]["maps"]["residual"]["overall"]
          == by_name["autoencoder"]["maps"]["residual"]["overall"])
  assert -1e9 < by_name["inpainter"]["additivity_median"] <= 1.0
  assert by_name["inpainter"]["additivity_index"] == "shapley"  # the game whose coalitions it is measured on
  assert "| inpainter | inpaint_grid_x_banzhaf:shuffled |" in (tmp_path / "out" / f"{stem}.md").read_text()
  # A second run, with --maps, trains nothing, reads every image from the caches and keeps the maps it skips.
  inpainting.main(args + ["--attempts", "inpainter", "--maps", "inpaint_grid,inpaint_loo"])
  again = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
  assert again["train_seconds"] == {}
  assert [a["name"] for a in again["attempts"]] == ["autoencoder", "inpainter"]  # the earlier attempt is kept
  assert again["attempts"][1]["cached_images"] == again["attempts"][1]["n_images"]
  assert again["attempts"][1]["maps"].keys() == by_name["inpainter"]["maps"].keys()
  assert (again["attempts"][1]["maps"]["inpaint_grid"]["overall"]
          == by_name["inpainter"]["maps"]["inpaint_grid"]["overall"])
  with pytest.raises(SystemExit):
    inpainting.main(args + ["--attempts", "autoencoder", "--maps", "inpaint_grid"])  # no chosen attempt has it
