"""Training: the loss falls, runs repeat exactly, and an interrupted run resumes to the same params."""

import functools
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shapjax
from shapjax.training import augment
from shapjax.training import learning_rates

SHAPE = (32, 32, 1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = shapjax.make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=24, n_test=2, image_size=32, seed=0)
  return shapjax.load_mvtec(root, split="train", image_size=32).images


@jax.jit
def _mean_loss(params, images):
  return jnp.mean(shapjax.reconstruction_loss(params, images))


def test_loss_decreases_and_loss_curve_is_written(images, tmp_path):
  config = shapjax.TrainConfig.tiny(SHAPE, steps=40, checkpoint_every=40)
  params = shapjax.train(config, images, key=jax.random.key(0), checkpoint_dir=tmp_path / "ckpt", progress=False)
  assert params.config == config.model
  chex.assert_tree_all_finite(params.weights)
  losses = json.loads((tmp_path / "ckpt" / "loss.json").read_text())["loss"]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  untrained = shapjax.init_autoencoder(config=config.model, key=jax.random.key(123))
  assert _mean_loss(params, images) < 0.7 * _mean_loss(untrained, images)
  assert (tmp_path / "ckpt" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)))


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(images, tmp_path):
  n = 6
  config = shapjax.TrainConfig.tiny(SHAPE, steps=2 * n, checkpoint_every=n, keep_checkpoints=3)
  key = jax.random.key(7)
  whole = shapjax.train(config, images, key=key, checkpoint_dir=tmp_path / "run", progress=False)
  assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [n, 2 * n]
  again = shapjax.train(config, images, key=key, progress=False)
  assert _max_difference(whole, again) == 0.0  # repeatable: same key, same params
  # Interrupt after n steps: the last checkpoint is all that survives of the second half.
  shutil.rmtree(tmp_path / "run" / str(2 * n))
  resumed = shapjax.train(config, images, key=key, checkpoint_dir=tmp_path / "run", resume=True, progress=False)
  assert _max_difference(whole, resumed) <= 1e-6
  chex.assert_trees_all_close(shapjax.load(tmp_path / "run").weights, resumed.weights, atol=0, rtol=0)
  other = shapjax.train(config, images, key=jax.random.key(8), progress=False)
  assert _max_difference(whole, other) > 1e-4


def test_checkpoint_folder_rules(images, tmp_path):
  config = shapjax.TrainConfig.tiny(SHAPE, steps=6, checkpoint_every=2, keep_checkpoints=2)
  key = jax.random.key(1)
  shapjax.train(config, images, key=key, checkpoint_dir=tmp_path / "run", progress=False)
  assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [4, 6]
  with pytest.raises(ValueError, match="already holds checkpoints"):
    shapjax.train(config, images, key=key, checkpoint_dir=tmp_path / "run", progress=False)
  with pytest.raises(ValueError, match="another PRNG key"):
    shapjax.train(config, images, key=jax.random.key(2), checkpoint_dir=tmp_path / "run", resume=True,
                  progress=False)
  bigger = shapjax.TrainConfig.tiny(SHAPE, steps=6, checkpoint_every=2, keep_checkpoints=2,
                                    model=shapjax.AutoencoderConfig(SHAPE, features=(4, 8), latent_features=4))
  with pytest.raises(ValueError, match="cannot resume"):
    shapjax.train(bigger, images, key=key, checkpoint_dir=tmp_path / "run", resume=True, progress=False)


def test_bad_inputs():
  config = shapjax.TrainConfig.tiny(SHAPE)
  with pytest.raises(ValueError, match="shape"):
    shapjax.train(config, np.zeros((4, 32, 32), np.float32), key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="built for"):
    shapjax.train(config, np.zeros((4, 16, 16, 1), np.float32), key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="NaN"):
    shapjax.train(config, np.full((4, 32, 32, 1), np.nan, np.float32), key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="schedule"):
    shapjax.TrainConfig(schedule="linear")
  with pytest.raises(ValueError, match="steps"):
    shapjax.TrainConfig(steps=0)


def test_config_round_trip_and_default_model():
  config = shapjax.TrainConfig.tiny((24, 40, 3), steps=5)
  assert shapjax.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  default = shapjax.TrainConfig().with_model((64, 48, 1))
  assert default.model == shapjax.AutoencoderConfig((64, 48, 1))
  hash(default)


def test_schedule_is_optax_warmup_cosine():
  config = shapjax.TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-2)
  rates = learning_rates(config)
  reference = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100, 1e-2 * config.end_learning_rate_fraction)
  np.testing.assert_allclose(rates, [float(reference(t)) for t in range(100)], rtol=1e-5, atol=1e-9)
  assert rates[0] == 0 and np.all(np.diff(rates[:11]) > 0) and np.all(np.diff(rates[10:]) <= 1e-9)
  constant = learning_rates(shapjax.TrainConfig(steps=20, warmup_steps=4, schedule="constant"))
  np.testing.assert_allclose(constant[4:], 2e-3)
  np.testing.assert_allclose(constant[:4], 2e-3 * np.arange(4) / 4)


def test_augment_flips_and_shifts_each_image(key):
  images = jax.random.uniform(key, (16, 8, 8, 1))
  same = augment(images, key, flips=False, max_shift=0)
  np.testing.assert_array_equal(same, images)
  flipped = jax.jit(lambda x, k: augment(x, k, flips=True, max_shift=0))(images, jax.random.key(3))
  variants = []
  for original, out in zip(np.asarray(images), np.asarray(flipped)):
    options = [original, original[:, ::-1], original[::-1], original[::-1, ::-1]]
    matches = [i for i, o in enumerate(options) if np.array_equal(o, out)]
    assert matches
    variants.append(matches[0])
  assert len(set(variants)) > 1  # each image draws its own flip
  shifted = np.asarray(augment(images, jax.random.key(4), flips=False, max_shift=2))
  assert shifted.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  for i in range(16):
    assert any(np.array_equal(padded[i, dy:dy + 8, dx:dx + 8], shifted[i]) for dy in range(5) for dx in range(5))


@pytest.mark.slow
def test_data_parallel_on_a_mesh_equals_one_device(images, tmp_path):
  # conftest.py fakes 4 CPU devices: each takes 2 of the 8 images of every batch, gradients summed across them.
  mesh = shapjax.make_mesh()
  assert mesh.size == 4
  config = shapjax.TrainConfig.tiny(SHAPE, steps=6, checkpoint_every=3)
  key = jax.random.key(5)
  one = shapjax.train(config, images, key=key, progress=False)
  sharded = shapjax.train(config, images, key=key, progress=False, mesh=mesh, checkpoint_dir=tmp_path / "mesh")
  assert _max_difference(one, sharded) <= 1e-5
  assert all(leaf.devices() == {jax.devices()[0]} for leaf in jax.tree.leaves(sharded.weights))
  chex.assert_trees_all_close(shapjax.load(tmp_path / "mesh").weights, sharded.weights, atol=0, rtol=0)
  with pytest.raises(ValueError, match="multiple of 4"):
    shapjax.train(shapjax.TrainConfig.tiny(SHAPE, steps=1, batch_size=6), images, key=key, progress=False,
                  mesh=mesh)
  # The compiled step works on a quarter of the batch per device and sums the gradients across devices.
  from shapjax import devices, training
  config = config.with_model(SHAPE)
  step = training._step_function(config.model, config.batch_size, config.flips, config.max_shift, mesh)
  weights = one.weights
  args = devices.replicate((weights, training._optimizer().init(weights), jnp.asarray(images), key), mesh)
  hlo = step.lower(*args, 0, 1e-3).compile().as_text()
  assert "all-reduce" in hlo
  assert f"f32[{config.batch_size // 4},32,32,1]" in hlo  # the per-device share of the batch


@pytest.mark.slow
def test_data_parallel_step_keeps_image_by_image_gradients_local(images, monkeypatch):
  # With every layer's kernel gradient summed image by image (a lax.scan over the batch), the scan must run on
  # each device's own images: left to XLA's partitioner, the activations were all-gathered and the scan ran
  # whole on every device.
  from shapjax import devices, speedups, training
  monkeypatch.setattr(speedups, "_PER_IMAGE_MIN_PIXELS", 1)
  mesh = shapjax.make_mesh()
  config = shapjax.TrainConfig.tiny(SHAPE, steps=1).with_model(SHAPE)
  step = jax.jit(functools.partial(training._train_step, model_config=config.model, batch_size=config.batch_size,
                                   flips=config.flips, max_shift=config.max_shift, mesh=mesh))
  weights = shapjax.init_autoencoder(config=config.model, key=jax.random.key(0)).weights
  args = devices.replicate((weights, training._optimizer().init(weights), jnp.asarray(images),
                                 jax.random.key(1)), mesh)
  hlo = step.lower(*args, 0, 1e-3).compile().as_text()
  assert " while(" in hlo  # the image-by-image sums
  assert "all-gather" not in hlo


def test_config_of_either_model_kind_round_trips():
  inpainter = shapjax.TrainConfig.tiny(SHAPE, model=shapjax.InpainterConfig.tiny(SHAPE))
  data = json.loads(json.dumps(inpainter.to_dict()))
  assert data["model_kind"] == "inpainting"
  assert shapjax.TrainConfig.from_dict(data) == inpainter
  older = shapjax.TrainConfig.tiny(SHAPE).to_dict()
  del older["model_kind"]  # a dict written before inpainters existed
  assert shapjax.TrainConfig.from_dict(older) == shapjax.TrainConfig.tiny(SHAPE)
