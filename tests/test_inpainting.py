"""The inpainter: training holes, hidden pixels that never reach the output, a trained model that beats the mean,
checkpoints that know their kind, exact resume, a mesh, and ``shapjax train --model inpainting``."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from shapjax import inpainting

SHAPE = (32, 32, 1)
ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides) -> shapjax.InpainterConfig:
  return dataclasses.replace(shapjax.InpainterConfig.tiny(SHAPE), **overrides)


def _train_config(**overrides) -> shapjax.TrainConfig:
  return shapjax.TrainConfig.tiny(SHAPE, model=_config(), **overrides)


def _smooth_images(n: int, seed: int) -> np.ndarray:
  """Low-frequency sinusoid mixtures in [0, 1]: a hidden cell is predictable from its surroundings."""
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, SHAPE[0]), np.linspace(0, 1, SHAPE[1]), indexing="ij")
  images = np.zeros((n, *SHAPE), np.float32)
  for i in range(n):
    fy, fx = rng.uniform(0.5, 2.0, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    images[i, ..., 0] = 0.5 + 0.2 * np.sin(2 * np.pi * fy * y + phase[0]) * np.cos(2 * np.pi * fx * x + phase[1])
    images[i, ..., 0] += rng.uniform(-0.2, 0.2)
  return np.clip(images, 0, 1)


@pytest.fixture(scope="module")
def images():
  return _smooth_images(32, seed=0)


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)))


# --- holes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("holes", [{}, {"blob_counts": ()}, {"cell_sizes": ()}])
def test_training_holes_are_deterministic_and_hide_a_third_to_a_half(holes, key):
  config = shapjax.InpainterConfig((48, 40, 1), **holes)
  draw = lambda k: shapjax.random_visible_masks(config, 128, key=k)
  step_3 = draw(jax.random.fold_in(key, 3))
  np.testing.assert_array_equal(step_3, draw(jax.random.fold_in(key, 3)))  # the same step: the same holes
  step_4 = draw(jax.random.fold_in(key, 4))
  assert step_3.shape == (128, 48, 40) and step_3.dtype == bool
  assert np.mean(np.asarray(step_3) != np.asarray(step_4)) > 0.2
  hidden = 1.0 - np.asarray(step_3).mean(axis=(1, 2))
  assert 1 / 3 <= hidden.mean() <= 1 / 2
  assert hidden.std() > 0.05  # each image draws its own rate and hole shape
  assert len({m.tobytes() for m in np.asarray(step_3)}) > 120  # a coarse grid of big cells may repeat


def test_square_cells_are_aligned_blocks_of_one_size(key):
  config = shapjax.InpainterConfig((64, 64, 1), cell_sizes=(16,), blob_counts=(), hide_rate=(0.5, 0.5))
  masks = np.asarray(shapjax.random_visible_masks(config, 8, key=key))
  for mask in masks:
    rows = np.flatnonzero(np.any(mask[1:] != mask[:-1], axis=1)) + 1  # rows where the pattern changes
    assert len(rows) == 0 or np.all(np.diff(rows) % 16 == 0)


# --- the model -------------------------------------------------------------------------------------------------

def test_hidden_pixels_do_not_reach_the_output(key):
  params = shapjax.init_inpainter(config=_config(), key=key)
  rng = np.random.default_rng(1)
  images = rng.random((4, *SHAPE), dtype=np.float32)
  visible = np.asarray(shapjax.random_visible_masks(params.config, 4, key=jax.random.key(2)))
  changed = np.where(visible[..., None], images, rng.random(images.shape, dtype=np.float32))
  assert np.any(changed != images)
  for fn in (jax.jit(shapjax.inpaint), jax.jit(inpainting.predict)):
    np.testing.assert_array_equal(fn(params, images, visible), fn(params, changed, visible))
  out = np.asarray(jax.jit(shapjax.inpaint)(params, images, visible))
  np.testing.assert_array_equal(out[visible], images[visible])  # visible pixels are kept as given
  assert np.all((out >= 0) & (out <= 1))
  # The low-resolution context is the one path by which hidden pixels do reach the output.
  lowres = shapjax.init_inpainter(config=_config(context="lowres"), key=key)
  inpaint = jax.jit(shapjax.inpaint)
  assert np.any(inpaint(lowres, images, visible) != inpaint(lowres, changed, visible))


def test_loss_covers_only_hidden_pixels(key):
  params = shapjax.init_inpainter(config=_config(), key=key)
  images = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
  visible = np.ones((3, 32, 32), bool)
  visible[1, :16] = False
  loss = np.asarray(jax.jit(shapjax.inpainting_loss)(params, images, visible))
  assert loss[0] == 0.0 and loss[2] == 0.0 and loss[1] > 0
  prediction = np.asarray(jax.jit(inpainting.predict)(params, images, visible))
  np.testing.assert_allclose(loss[1], np.mean((prediction[1, :16] - images[1, :16]) ** 2), rtol=1e-5)


@pytest.mark.parametrize("context", ["none", "lowres"])
@pytest.mark.parametrize("shape", [(19, 13, 1), (16, 24, 3)])
def test_phase_wise_output_layer_equals_the_plain_convolution(shape, context, monkeypatch):
  # On CPU the output convolution runs on the half-resolution phases of the last upsampling and of the input;
  # with SHAPJAX_XLA_DEFAULTS=1 it is nn.Conv on their full-resolution concatenation. Random biases too.
  params = shapjax.init_inpainter(shape, key=jax.random.key(0), features=(4, 8), context=context)
  leaves, tree = jax.tree.flatten(params.weights)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = params.replace(weights=jax.tree.unflatten(
      tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]))
  assert sorted(params.weights) == [f"Conv_{i}" for i in sorted(range(3 * 2 + 2), key=str)]
  rng = np.random.default_rng(0)
  images = rng.random((3, *shape), dtype=np.float32)
  visible = rng.random((3, *shape[:2])) < 0.6
  fast = np.asarray(inpainting.predict(params, images, visible))
  monkeypatch.setenv("SHAPJAX_XLA_DEFAULTS", "1")
  np.testing.assert_allclose(fast, inpainting.predict(params, images, visible), atol=2e-6)


def test_ssim_and_gradient_magnitude_maps(key):
  from skimage.metrics import structural_similarity  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.random((2, 24, 20, 1), dtype=np.float32)
  b = np.clip(a + 0.2 * rng.standard_normal(a.shape, dtype=np.float32), 0, 1)
  np.testing.assert_allclose(inpainting.ssim_map(a, a), 1.0, atol=1e-5)
  np.testing.assert_allclose(inpainting.gms_map(a, a), 1.0, atol=1e-6)
  ssim = np.asarray(inpainting.ssim_map(a, b))
  assert ssim.shape == (2, 24, 20)
  for i in range(2):  # scikit-image's Gaussian SSIM, away from the edges (where the two pad differently)
    _, expected = structural_similarity(a[i, ..., 0], b[i, ..., 0], gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0, full=True)
    np.testing.assert_allclose(ssim[i, 5:-5, 5:-5], expected[5:-5, 5:-5], atol=1e-4)
  gms = np.asarray(inpainting.gms_map(a, b))
  assert gms.shape == (2, 24, 20) and np.all((gms > 0) & (gms <= 1 + 1e-6)) and gms.mean() < 0.95
  # The training loss adds the weighted terms of the completed image on the hidden pixels.
  images = rng.random((3, *SHAPE), dtype=np.float32)
  visible = np.ones((3, 32, 32), bool)
  visible[1, :16] = False
  visible[2, 8:20, 4:30] = False
  plain = shapjax.init_inpainter(config=_config(), key=key)
  weighted = plain.replace(config=_config(ssim_weight=0.5, gms_weight=2.0))
  prediction = np.asarray(inpainting.predict(plain, images, visible))
  completed = np.where(visible[..., None], images, prediction)
  per_pixel = (np.mean((prediction - images) ** 2, axis=-1) + 0.5 * (1 - inpainting.ssim_map(completed, images))
               + 2.0 * (1 - inpainting.gms_map(completed, images)))
  hidden = ~visible
  expected = [0.0] + [per_pixel[i][hidden[i]].mean() for i in (1, 2)]
  np.testing.assert_allclose(shapjax.inpainting_loss(weighted, images, visible), expected, rtol=1e-5)
  assert np.all(np.asarray(shapjax.inpainting_loss(plain, images, visible))[1:] < expected[1:])


def test_config_round_trip_and_checks():
  config = shapjax.InpainterConfig((40, 24, 3), features=(4, 8, 16), context="lowres", ssim_weight=1.0,
                                   gms_weight=0.5)
  assert shapjax.InpainterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  hash(config)
  train_config = shapjax.TrainConfig.tiny((40, 24, 3), model=config)
  assert shapjax.TrainConfig.from_dict(json.loads(json.dumps(train_config.to_dict()))) == train_config
  with pytest.raises(ValueError, match="context"):
    shapjax.InpainterConfig(SHAPE, context="blur")
  with pytest.raises(ValueError, match="hide_rate"):
    shapjax.InpainterConfig(SHAPE, hide_rate=(0.6, 0.2))
  for name in ("ssim_weight", "gms_weight"):
    for bad in (-1.0, float("nan"), float("inf")):
      with pytest.raises(ValueError, match=name):
        shapjax.InpainterConfig(SHAPE, **{name: bad})
  with pytest.raises(ValueError, match="both empty"):
    shapjax.InpainterConfig(SHAPE, cell_sizes=(), blob_counts=())
  with pytest.raises(TypeError, match="InpainterParams"):
    shapjax.inpaint(shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4,)), np.zeros((1, *SHAPE)),
                    np.ones((1, 32, 32)))


# --- training and checkpoints ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_save_and_load_an_inpainter(images, tmp_path, key):
  # The quick tier's one trained inpainter: train() dispatches on the config, the checkpoint records the kind.
  params = shapjax.train(_train_config(steps=3, checkpoint_every=3), images, key=key, progress=False,
                         checkpoint_dir=tmp_path / "run")
  assert isinstance(params, shapjax.InpainterParams) and params.config == _config()
  loaded = shapjax.load(tmp_path / "run")
  assert isinstance(loaded, shapjax.InpainterParams) and loaded.config == params.config
  chex.assert_trees_all_equal(loaded.weights, params.weights)
  record = json.loads((tmp_path / "run" / "3" / "config" / "metadata").read_text())
  assert (record["kind"], record["version"]) == ("inpainting", 2)
  saved = shapjax.save(params, tmp_path / "saved")
  chex.assert_trees_all_equal(shapjax.load(saved).weights, params.weights)
  assert isinstance(shapjax.load(saved), shapjax.InpainterParams)
  # An autoencoder run cannot resume an inpainter's checkpoints.
  with pytest.raises(ValueError, match="cannot resume"):
    shapjax.train(shapjax.TrainConfig.tiny(SHAPE, steps=6, checkpoint_every=3), images, key=key, progress=False,
                  checkpoint_dir=tmp_path / "run", resume=True)


@pytest.mark.slow
def test_a_briefly_trained_inpainter_beats_the_mean_of_the_visible_pixels(images, key):
  config = _train_config(steps=300, batch_size=16, learning_rate=1e-2, warmup_steps=20, flips=True, max_shift=2)
  params = shapjax.train(config, images, key=key, progress=False)
  held_out = _smooth_images(16, seed=1)
  visible = np.asarray(shapjax.random_visible_masks(params.config, 16, key=jax.random.key(9)))
  hidden = ~visible
  out = np.asarray(jax.jit(shapjax.inpaint)(params, held_out, visible))[..., 0]
  mean_fill = (held_out[..., 0] * visible).sum((1, 2)) / visible.sum((1, 2))
  model_error = np.sum((out - held_out[..., 0]) ** 2 * hidden) / hidden.sum()
  mean_error = np.sum((mean_fill[:, None, None] - held_out[..., 0]) ** 2 * hidden) / hidden.sum()
  assert model_error < 0.8 * mean_error, (model_error, mean_error)  # 0.62 measured


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(images, tmp_path):
  n = 4
  config = _train_config(steps=2 * n, checkpoint_every=n, keep_checkpoints=3)
  key = jax.random.key(7)
  whole = shapjax.train(config, images, key=key, checkpoint_dir=tmp_path / "run", progress=False)
  again = shapjax.train(config, images, key=key, progress=False)
  assert _max_difference(whole, again) == 0.0  # repeatable: same key, same holes, same params
  shutil.rmtree(tmp_path / "run" / str(2 * n))  # interrupted after n steps
  resumed = shapjax.train(config, images, key=key, checkpoint_dir=tmp_path / "run", resume=True, progress=False)
  assert isinstance(resumed, shapjax.InpainterParams)
  assert _max_difference(whole, resumed) == 0.0
  chex.assert_trees_all_equal(shapjax.load(tmp_path / "run").weights, resumed.weights)
  other = shapjax.train(config, images, key=jax.random.key(8), progress=False)
  assert _max_difference(whole, other) > 1e-4


@pytest.mark.slow
def test_data_parallel_on_a_mesh_equals_one_device(images, tmp_path):
  mesh = shapjax.make_mesh()  # conftest.py: 4 fake CPU devices, 2 of the 8 images of each batch on each
  assert mesh.size == 4
  config = _train_config(steps=4, checkpoint_every=2)
  key = jax.random.key(5)
  one = shapjax.train(config, images, key=key, progress=False)
  sharded = shapjax.train(config, images, key=key, progress=False, mesh=mesh, checkpoint_dir=tmp_path / "mesh")
  assert isinstance(sharded, shapjax.InpainterParams)
  assert _max_difference(one, sharded) <= 1e-5
  assert all(leaf.devices() == {jax.devices()[0]} for leaf in jax.tree.leaves(sharded.weights))
  chex.assert_trees_all_equal(shapjax.load(tmp_path / "mesh").weights, sharded.weights)


@pytest.mark.slow
def test_cli_trains_an_inpainter(tmp_path):
  data = shapjax.make_demo_dataset(tmp_path / "data", n_train=8, n_test=2, image_size=(24, 40), seed=0)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "shapjax", "train", str(data), "--out", str(tmp_path / "ckpt"), "--model",
             "inpainting", "--steps", "2", "--image-size", "24", "40", "--features", "4,8", "--batch-size", "4",
             "--ssim-weight", "0.5", "--gms-weight", "1", "--quiet"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  params = shapjax.load(tmp_path / "ckpt")
  assert isinstance(params, shapjax.InpainterParams)
  assert params.config.features == (4, 8) and params.config.image_shape[:2] == (24, 40)
  assert (params.config.ssim_weight, params.config.gms_weight) == (0.5, 1.0)
  wrong = subprocess.run(command[:-1] + ["--latent-features", "4"], env=env, capture_output=True, text=True,
                         timeout=300)
  assert wrong.returncode == 2 and "--latent-features" in wrong.stderr
  base = command[:command.index("--model")] + ["--steps", "1", "--quiet"]
  for extra, option in ((["--ssim-weight", "1"], "--ssim-weight"),  # an autoencoder has no such term
                        (["--model", "inpainting", "--gms-weight", "-1"], "--gms-weight")):
    wrong = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and option in wrong.stderr, wrong.stderr[-2000:]
