"""Checkpoints: round trip into attribute(), clear errors for missing/corrupt/foreign folders, safe saves."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_load_training_folder_takes_latest_step(tmp_path):
  images = np.random.default_rng(0).random((8, *SHAPE), dtype=np.float32)
  config = shapjax.TrainConfig.tiny(SHAPE, steps=4, checkpoint_every=2, keep_checkpoints=2)
  params = shapjax.train(config, images, key=jax.random.key(0), checkpoint_dir=tmp_path / "run", progress=False)
  chex.assert_trees_all_equal(shapjax.load(tmp_path / "run").weights, params.weights)
  earlier = shapjax.load(tmp_path / "run" / "2")
  assert earlier.config == params.config
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(earlier.weights),
                                                       jax.tree.leaves(params.weights)))


# --- relative paths: what a user types -------------------------------------------------------------------------

def test_relative_paths_save_load_train_and_resume(params, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert shapjax.save(params, "ae") == tmp_path / "ae"
  chex.assert_trees_all_equal(shapjax.load("ae").weights, params.weights)
  chex.assert_trees_all_equal(shapjax.load("./ae").weights, params.weights)
  images = np.random.default_rng(0).random((8, *SHAPE), dtype=np.float32)
  config = shapjax.TrainConfig.tiny(SHAPE, steps=4, checkpoint_every=2, keep_checkpoints=2)
  whole = shapjax.train(config, images, key=jax.random.key(0), checkpoint_dir="run", progress=False)
  chex.assert_trees_all_equal(shapjax.load("run").weights, whole.weights)
  assert (tmp_path / "run" / "loss.png").is_file()
  shutil.rmtree(tmp_path / "run" / "4")  # interrupted after step 2
  resumed = shapjax.train(config, images, key=jax.random.key(0), checkpoint_dir="run", resume=True, progress=False)
  chex.assert_trees_all_close(resumed.weights, whole.weights, atol=1e-6, rtol=0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ae", "run"]


@pytest.mark.slow
def test_errors_name_the_path_as_given(params, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="no checkpoint at nowhere"):
    shapjax.load("nowhere")
  shapjax.save(params, "ae")
  (tmp_path / "ae" / "config" / "metadata").write_text("{not json")
  with pytest.raises(ValueError, match=r"cannot read checkpoint ae \(truncated, corrupt"):
    shapjax.load("ae")
  (tmp_path / "photos").mkdir()
  (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
  with pytest.raises(ValueError, match="refusing to overwrite photos:"):
    shapjax.save(params, "photos")


# --- device counts: a checkpoint loads on any number of devices --------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SMALL = (16, 16, 1)


def _small_images():
  return np.random.default_rng(5).random((8, *SMALL), dtype=np.float32)


def _python(code: str, *, cwd: Path, devices: int | None = None) -> None:
  """Runs ``code`` in a fresh interpreter with ONE CPU device, or ``devices`` of them (``use_cpu_devices``)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}  # conftest's 4
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
  prelude = ("import jax, numpy as np, shapjax\n"
             + (f"shapjax.use_cpu_devices({devices})\n" if devices else "")
             + f"assert jax.device_count() == {devices or 1}, jax.devices()\n"
             + "images = np.random.default_rng(5).random((8, *" + repr(SMALL) + "), dtype=np.float32)\n"
             + "host = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in "
             + "jax.tree_util.tree_flatten_with_path(tree)[0]}\n")
  result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def _npz_tree(path: Path, like):
  with np.load(path) as stored:
    flat = [stored[jax.tree_util.keystr(k)] for k, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  return jax.tree.unflatten(jax.tree.structure(like), flat)


@pytest.mark.slow
def test_checkpoints_written_on_a_mesh_load_on_one_device(tmp_path):
  _python("""
      from jax.sharding import NamedSharding, PartitionSpec
      mesh = shapjax.make_mesh(2)
      params = shapjax.init_autoencoder(config=shapjax.AutoencoderConfig.tiny(%r), key=jax.random.key(0))
      replicated = jax.device_put(params.weights, NamedSharding(mesh, PartitionSpec()))
      assert len(jax.tree.leaves(replicated)[0].sharding.device_set) == 2
      shapjax.save(shapjax.AutoencoderParams(weights=replicated, config=params.config), "replicated")
      np.savez("replicated.npz", **host(params.weights))
      config = shapjax.TrainConfig.tiny(%r, steps=2, checkpoint_every=2)
      trained = shapjax.train(config, images, key=jax.random.key(1), checkpoint_dir="run", progress=False,
                              mesh=mesh)
      np.savez("run.npz", **host(trained.weights))
      """ % (SMALL, SMALL), cwd=tmp_path, devices=2)
  # A fresh one-device process: orbax must not ask for the 2 devices that wrote them.
  _python("""
      for name in ("replicated", "run"):
        weights = shapjax.load(name).weights
        with np.load(name + ".npz") as stored:
          for path, value in host(weights).items():
            np.testing.assert_array_equal(value, stored[path])
      # ... and the mesh run resumes here, on one device.
      config = shapjax.TrainConfig.tiny(%r, steps=3, checkpoint_every=1)
      shapjax.train(config, images, key=jax.random.key(1), checkpoint_dir="run", resume=True, progress=False)
      assert shapjax.load("run/3").config == shapjax.load("run/2").config
      """ % (SMALL,), cwd=tmp_path)
  for name, folder in (("replicated", "replicated"), ("run", "run/2")):  # this process: 4 devices
    loaded = shapjax.load(tmp_path / folder)
    chex.assert_trees_all_equal(loaded.weights, _npz_tree(tmp_path / f"{name}.npz", loaded.weights))


@pytest.mark.slow
def test_one_device_checkpoint_resumes_on_a_mesh(tmp_path):
  config = shapjax.TrainConfig.tiny(SMALL, steps=4, checkpoint_every=2)
  whole = shapjax.train(config, _small_images(), key=jax.random.key(2), checkpoint_dir=tmp_path / "run",
                        progress=False)
  shutil.rmtree(tmp_path / "run" / "4")  # interrupted after step 2
  _python("""
      mesh = shapjax.make_mesh(2)
      loaded = shapjax.load("run")
      config = shapjax.TrainConfig.tiny(%r, steps=4, checkpoint_every=2)
      resumed = shapjax.train(config, images, key=jax.random.key(2), checkpoint_dir="run", resume=True,
                              progress=False, mesh=mesh)
      np.savez("resumed.npz", **host(resumed.weights))
      """ % (SMALL,), cwd=tmp_path, devices=2)
  resumed = _npz_tree(tmp_path / "resumed.npz", whole.weights)
  chex.assert_trees_all_close(resumed, whole.weights, atol=1e-5, rtol=0)
  chex.assert_trees_all_equal(shapjax.load(tmp_path / "run").weights, resumed)


# --- model kinds -----------------------------------------------------------------------------------------------

def test_the_record_names_the_kind_and_old_records_are_autoencoders(params, tmp_path):
  path = shapjax.save(params, tmp_path / "ae")
  record = json.loads((path / "config" / "metadata").read_text())
  assert (record["kind"], record["version"]) == ("autoencoder", 1)  # version 1: earlier shapjax still reads it
  del record["kind"]  # what a checkpoint of an earlier shapjax holds
  (path / "config" / "metadata").write_text(json.dumps(record))
  loaded = shapjax.load(path)
  assert isinstance(loaded, shapjax.AutoencoderParams) and loaded.config == params.config
  record["kind"] = "diffusion"
  (path / "config" / "metadata").write_text(json.dumps(record))
  with pytest.raises(ValueError, match="unknown kind 'diffusion'"):
    shapjax.load(path)
