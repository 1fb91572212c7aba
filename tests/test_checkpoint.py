"""Checkpoints: round trip into attribute(), clear errors for missing/corrupt/foreign folders, safe saves."""

import json

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import shapjax
from conftest import stripes_labels

SHAPE = (32, 32, 1)


@pytest.fixture(scope="module")
def params():
  config = shapjax.AutoencoderConfig.tiny(SHAPE)  # the model the training tests use: compiled once
  return shapjax.init_autoencoder(config=config, key=jax.random.key(0))


def test_round_trip_gives_identical_attributions(params, tmp_path, key):
  path = shapjax.save(params, tmp_path / "ae")
  loaded = shapjax.load(path)
  assert loaded.config == params.config
  chex.assert_trees_all_equal(loaded.weights, params.weights)
  image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
  labels = stripes_labels(32, 32, 6)
  before = shapjax.attribute(params, image, labels, 4, key=key, max_regions=8)
  after = shapjax.attribute(loaded, image, labels, 4, key=key, max_regions=8)
  np.testing.assert_array_equal(before.values, after.values)
  np.testing.assert_array_equal(before.stderr, after.stderr)


def test_overwrite_replaces_and_leaves_no_temporaries(params, tmp_path):
  path = shapjax.save(params, tmp_path / "ae")
  other = shapjax.init_autoencoder(config=params.config, key=jax.random.key(1))
  shapjax.save(other, path)
  chex.assert_trees_all_equal(shapjax.load(path).weights, other.weights)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_failed_save_keeps_the_old_checkpoint(params, tmp_path):
  path = shapjax.save(params, tmp_path / "ae")
  broken = shapjax.AutoencoderParams(weights={"layer": {"kernel": object()}}, config=params.config)
  with pytest.raises(Exception):
    shapjax.save(broken, path)
  chex.assert_trees_all_equal(shapjax.load(path).weights, params.weights)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_refuses_to_overwrite_other_folders(params, tmp_path):
  (tmp_path / "photos").mkdir()
  (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
  with pytest.raises(ValueError, match="refusing to overwrite"):
    shapjax.save(params, tmp_path / "photos")
  assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_missing_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    shapjax.load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no shapjax checkpoint in .*empty"):
    shapjax.load(tmp_path / "empty")
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="file"):
    shapjax.load(tmp_path / "file")


def test_corrupt_weights_name_the_path(params, tmp_path):
  path = shapjax.save(params, tmp_path / "ae")
  files = [p for p in (path / "weights").rglob("*") if p.is_file()]
  assert files
  for file in files:  # truncate every file of the weights item
    file.write_bytes(file.read_bytes()[:5])
  with pytest.raises(ValueError, match=str(path)):
    shapjax.load(path)


def test_corrupt_config_names_the_path(params, tmp_path):
  path = shapjax.save(params, tmp_path / "ae")
  (path / "config" / "metadata").write_text("{not json")
  with pytest.raises(ValueError, match=str(path)):
    shapjax.load(path)


def test_foreign_checkpoint(tmp_path):
  path = tmp_path / "foreign"
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, args=ocp.args.Composite(
        weights=ocp.args.StandardSave({"w": np.zeros(3)}), config=ocp.args.JsonSave({"lr": 0.1})))
  with pytest.raises(ValueError, match="not a shapjax checkpoint"):
    shapjax.load(path)


def test_weights_that_do_not_match_the_config(params, tmp_path):
  path = shapjax.save(params, tmp_path / "ae")
  # Say the model is wider than the stored weights.
  record = json.loads((path / "config" / "metadata").read_text())
  record["model"]["features"] = [16, 16]
  (path / "config" / "metadata").write_text(json.dumps(record))
  with pytest.raises(ValueError, match=str(path)):
    shapjax.load(path)


def test_load_training_folder_takes_latest_step(tmp_path):
  images = np.random.default_rng(0).random((8, *SHAPE), dtype=np.float32)
  config = shapjax.TrainConfig.tiny(SHAPE, steps=4, checkpoint_every=2, keep_checkpoints=2)
  params = shapjax.train(config, images, key=jax.random.key(0), checkpoint_dir=tmp_path / "run", progress=False)
  chex.assert_trees_all_equal(shapjax.load(tmp_path / "run").weights, params.weights)
  earlier = shapjax.load(tmp_path / "run" / "2")
  assert earlier.config == params.config
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(earlier.weights),
                                                       jax.tree.leaves(params.weights)))
