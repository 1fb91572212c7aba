"""Many devices (4 fake CPU devices, see conftest.py): sharded results equal one-device results, each device
holds only its shard, dataset batches reuse one compiled program, and segmentation overlaps device work."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from shapjax import attribution, devices, segmentation

SIZE = 32
REGIONS = 8
OPTIONS = dict(max_regions=REGIONS, batch_size=8)


@pytest.fixture(scope="module")
def params():
  return shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(1), features=(8, 16), latent_features=8)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  smooth = np.cumsum(rng.normal(size=(8, SIZE, SIZE, 1)), axis=2)  # some structure for SLIC to follow
  return ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)


@pytest.fixture(scope="module")
def labels(images):
  return shapjax.segment_batch(images, max_regions=REGIONS)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 4, "conftest.py fakes 4 CPU devices"
  return shapjax.make_mesh()


@pytest.fixture(scope="module")
def one_device(params, images, labels):
  """``attribute_batch`` on the default device: the reference."""
  return shapjax.attribute_batch(params, images, labels, 4, key=jax.random.key(3), **OPTIONS)


def test_make_mesh(params, images, labels, mesh):
  assert mesh.size == 4 and mesh.axis_names == (devices.DEFAULT_AXIS,)
  assert shapjax.make_mesh(2).devices.tolist() == jax.devices()[:2]
  with pytest.raises(ValueError, match="n_devices"):
    shapjax.make_mesh(5)
  with pytest.raises(TypeError, match="Mesh"):
    shapjax.attribute_batch(params, images, labels, 4, mesh="all devices", **OPTIONS)


def test_images_across_devices_equal_one_device_and_stay_on_their_device(params, images, labels, mesh,
                                                                          one_device):
  sharded = shapjax.attribute_batch(params, images, labels, 4, key=jax.random.key(3), mesh=mesh, **OPTIONS)
  for name in ("values", "stderr", "n_evals"):
    np.testing.assert_allclose(getattr(sharded, name), getattr(one_device, name), rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(sharded.values)[:, :1] != 0.0)
  # Each device holds two images' values, its own, and no device holds anyone else's.
  shards = sharded.values.addressable_shards
  assert len(shards) == 4 and {shard.device for shard in shards} == set(mesh.devices.flat)
  for shard in shards:
    assert shard.data.shape == (2, REGIONS)
    np.testing.assert_array_equal(shard.data, np.asarray(sharded.values)[shard.index])
  assert sorted(shard.index[0].start for shard in shards) == [0, 2, 4, 6]


def test_images_not_divisible_by_the_device_count_are_padded(params, images, labels, mesh, one_device):
  sharded = shapjax.attribute_batch(params, images[:6], labels[:6], 4, key=jax.random.key(3), mesh=mesh,
                                    **OPTIONS)
  assert sharded.values.shape == (6, REGIONS)
  np.testing.assert_allclose(sharded.values, np.asarray(one_device.values)[:6], rtol=1e-5, atol=1e-8)


def _lowered_images_program(params, images, labels, mesh):
  options = attribution.prepare(params, images, labels, 4, batched=True, **OPTIONS).options
  return attribution._images_program.lower(params, jnp.asarray(images), jnp.asarray(labels), jax.random.key(0),
                                           jnp.arange(len(images), dtype=jnp.int32), None, options=options,
                                           mesh=mesh).as_text()


def test_images_program_needs_no_communication(params, images, labels, mesh):
  text = _lowered_images_program(params, images, labels, mesh)
  assert "shard_map" in text or "sdy.manual_computation" in text or "manual" in text
  for collective in ("all_gather", "all_reduce", "all_to_all", "collective_permute", "reduce_scatter"):
    assert collective not in text, collective


@pytest.mark.parametrize("estimator, n_perm", [("antithetic", 8), ("permutation", 4), ("stratified", 64),
                                               ("kernel", 4)])
@pytest.mark.slow
def test_permutations_across_devices_equal_one_device(params, images, labels, mesh, estimator, n_perm):
  key = jax.random.key(5)
  single = shapjax.attribute(params, images[0], labels[0], n_perm, key=key, estimator=estimator, **OPTIONS)
  sharded = shapjax.attribute(params, images[0], labels[0], n_perm, key=key, mesh=mesh, estimator=estimator,
                              **OPTIONS)
  np.testing.assert_allclose(sharded.values, single.values, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(sharded.stderr, single.stderr, rtol=1e-3, atol=1e-9)
  assert int(sharded.n_evals) == int(single.n_evals)
  assert float(jnp.abs(sharded.values).sum()) > 0


def test_mesh_and_tol_are_exclusive(params, images, labels, mesh):
  with pytest.raises(ValueError, match="mesh or tol"):
    shapjax.attribute(params, images[0], labels[0], 8, mesh=mesh, tol=0.1, **OPTIONS)


def test_permutations_program_reduces_across_devices(params, images, labels, mesh):
  options = attribution.prepare(params, images[0], labels[0], 8, **OPTIONS).options
  text = attribution._permutations_program.lower(params, jnp.asarray(images[0]), jnp.asarray(labels[0]),
                                                 jax.random.key(0), None, options=options, mesh=mesh).as_text()
  assert "all_reduce" in text


def test_uneven_permutation_split_is_named(params, images, labels, mesh):
  with pytest.raises(ValueError, match="multiple of 8"):
    shapjax.attribute(params, images[0], labels[0], 6, mesh=mesh, **OPTIONS)


@pytest.mark.parametrize("use_mesh", [pytest.param(False, marks=pytest.mark.slow), True])
def test_dataset_equals_attribute_batch_with_one_program_for_all_batches(params, images, labels, mesh, one_device,
                                                                         use_mesh):
  before = attribution._images_program.cache_size()
  # A generator of [H, W] images: consumed one batch ahead; 6 images in batches of 4, the last one padded.
  stream = (image[..., 0] for image in images[:6])
  out = shapjax.attribute_dataset(params, stream, 4, key=jax.random.key(3), batch=4, progress=False,
                                  mesh=mesh if use_mesh else None, **OPTIONS)
  assert attribution._images_program.cache_size() - before <= 1
  assert out.values.shape == (6, REGIONS) and out.stderr.shape == (6, REGIONS)
  np.testing.assert_array_equal(out.labels, labels[:6])
  np.testing.assert_allclose(out.values, np.asarray(one_device.values)[:6], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(out.result.n_evals, np.asarray(one_device.n_evals)[:6])


@pytest.mark.slow
def test_dataset_segments_the_next_batch_while_the_devices_work(params, images, monkeypatch, capsys):
  events = []
  lock = threading.Lock()
  segment_batch, local_rows = segmentation.segment_batch, devices.local_rows

  def logged_segment_batch(*args, **kwargs):
    with lock:
      events.append(("segment starts", time.perf_counter()))
    return segment_batch(*args, **kwargs)

  def slow_local_rows(array):
    time.sleep(0.05)  # the devices are busy a while; in that time the next batch must already be segmenting
    rows = local_rows(array)
    with lock:
      events.append(("batch collected", time.perf_counter()))
    return rows

  monkeypatch.setattr(segmentation, "segment_batch", logged_segment_batch)
  monkeypatch.setattr(devices, "local_rows", slow_local_rows)
  out = shapjax.attribute_dataset(params, images[:6], 4, key=jax.random.key(3), batch=4, progress=True, **OPTIONS)
  assert out.values.shape == (6, REGIONS)
  starts = [t for name, t in events if name == "segment starts"]
  first_batch_collected = [t for name, t in events if name == "batch collected"][3]  # 4 leaves per result
  assert len(starts) == 2
  assert starts[1] < first_batch_collected
  assert "6/6" in capsys.readouterr().err  # the tqdm bar


def test_dataset_errors(params, images):
  with pytest.raises(ValueError, match="one shape"):
    shapjax.attribute_dataset(params, [*images[:4], images[4, :16]], 4, batch=4, progress=False, **OPTIONS)
  with pytest.raises(ValueError, match="16x32 pixels but the autoencoder was built for 32x32"):
    shapjax.attribute_dataset(params, images[:, :16], 4, batch=4, progress=False, **OPTIONS)
  with pytest.raises(ValueError, match="no images"):
    shapjax.attribute_dataset(params, [], 2, progress=False, max_regions=4)
  with pytest.raises(ValueError, match="batch"):
    shapjax.attribute_dataset(params, images, 2, batch=0, progress=False, max_regions=4)


@pytest.mark.slow
def test_use_cpu_devices_in_a_fresh_process_gives_one_device_per_core_with_single_threaded_eigen(tmp_path):
  import os
  import subprocess
  import sys
  script = tmp_path / "devices.py"
  script.write_text(
      "import os, jax, shapjax\n"
      "n = shapjax.use_cpu_devices(3)\n"
      "print(n, jax.device_count(), jax.default_backend(), '--xla_cpu_multi_thread_eigen=false' in "
      "os.environ['XLA_FLAGS'].split())\n"
      "shapjax.use_cpu_devices(3)  # the same count again is fine\n"
      "try:\n"
      "  shapjax.use_cpu_devices(2)\n"
      "except RuntimeError as e:\n"
      "  print('refused:', e)\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  first, second = out.stdout.strip().splitlines()
  assert first == "3 3 cpu True"
  assert "before JAX starts its backends" in second and "already has 3 CPU device(s)" in second


def test_use_cpu_devices_checks_its_argument():
  with pytest.raises(ValueError, match="n_devices"):
    shapjax.use_cpu_devices(0)
