"""Several processes (hosts): 2 local processes on 127.0.0.1 give the values and params of one process.

Each test starts its processes with ``subprocess`` (this file is also the worker: ``python
tests/test_multiprocess.py worker ...``), every one with a timeout, so a broken run fails instead of hanging.
The references come from this pytest process, on one device. Nothing here talks to another address than
127.0.0.1: the coordinator binds there, and gloo (the CPU collectives) is told to use it too.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SIZE = 16
REGIONS = 4
N_PERM = 4
ONE_N_PERM = 8  # one image's permutations across 2 or 4 devices: whole antithetic pairs on each
HEARTBEAT = 5  # seconds: how soon a lost process ends the run (the tests' setting; JAX's default is 100)
OPTIONS = dict(max_regions=REGIONS, batch_size=8)
TRAIN = dict(steps=3, batch_size=4)
EVALUATE = dict(maps=("residual", "shapley_area"), n_perm=2, regions=4, progress=False)
RUN_TIMEOUT = 90  # seconds for a pair of processes; a hang fails the test instead of the suite


def _images(n: int = 8) -> np.ndarray:
  rng = np.random.default_rng(0)
  smooth = np.cumsum(rng.normal(size=(n, SIZE, SIZE, 1)), axis=2)  # some structure for SLIC to follow
  return ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)


def _params():
  import jax
  import shapjax
  return shapjax.init_autoencoder((SIZE, SIZE, 1), key=jax.random.key(1), features=(4,), latent_features=4)


def _cli_images(root) -> list[str]:
  return sorted(str(p) for p in Path(root, "test").rglob("*.png") if "ground_truth" not in p.parts)[:3]


def _without_timings(result: dict) -> dict:
  return {**result, "maps": {name: {k: v for k, v in m.items() if k != "seconds_per_image"}
                             for name, m in result["maps"].items()}}


def _train_config():
  import shapjax
  return shapjax.TrainConfig.tiny((SIZE, SIZE, 1), **TRAIN, model=_params().config)


# --- the worker: one process of the run ---------------------------------------------------------------------

def _worker(port: int, n_processes: int, process_id: int, n_devices: int, out: Path, scenario: str) -> None:
  os.environ["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  _gloo_on_loopback()
  from shapjax import devices
  devices.initialize_processes(f"127.0.0.1:{port}", n_processes, process_id, heartbeat_timeout=HEARTBEAT,
                               initialization_timeout=60, cpu_devices=n_devices)
  import jax
  import shapjax

  assert jax.process_count() == n_processes and jax.local_device_count() == n_devices
  mesh = shapjax.make_mesh()
  if scenario in ("killed", "fails"):  # process 1 is lost while process 0 waits for it in a collective
    if process_id == 1:
      print(f"lost at {time.monotonic()}", flush=True)  # CLOCK_MONOTONIC: one clock for every local process
    if process_id == 1 and scenario == "killed":
      os._exit(3)  # no clean-up at all, as after SIGKILL
    if process_id == 1:
      raise RuntimeError("process 1 fails")  # a Python error: exits through jax.distributed.shutdown
    shapjax.attribute_dataset(_params(), _images(4), N_PERM, key=jax.random.key(3), batch=4, mesh=mesh,
                              progress=False, **OPTIONS)
    return
  if scenario == "cli":
    _cli(port, process_id, out)
    return

  params, images, key = _params(), _images(), jax.random.key(3)
  labels = shapjax.segment_batch(images, max_regions=REGIONS)
  results = {}
  # Each host its own 4 images, in host order.
  mine = slice(4 * process_id, 4 * process_id + 4)
  dataset = shapjax.attribute_dataset(params, images[mine], N_PERM, key=key, batch=4, mesh=mesh, progress=False,
                                      **OPTIONS)
  results["dataset_values"], results["dataset_labels"] = dataset.values, dataset.labels
  # Unequal shares (host 0 the first 4 images, host 1 the next 3), padded to 4 rows on each: the same program.
  share = slice(0, 4) if process_id == 0 else slice(4, 7)
  batch = shapjax.attribute_batch(params, images[share], labels[share], N_PERM, key=key, mesh=mesh, **OPTIONS)
  results["batch_values"] = np.asarray(batch.values)
  # One image, the same on every host: its permutations across every device.
  one = shapjax.attribute(params, images[0], labels[0], ONE_N_PERM, key=key, mesh=mesh, **OPTIONS)
  results["one_values"] = np.asarray(one.values)
  trained = shapjax.train(_train_config(), images, key=jax.random.key(5), mesh=mesh, progress=False)
  for i, leaf in enumerate(jax.tree.leaves(trained.weights)):
    results[f"weight_{i}"] = np.asarray(leaf)
  np.savez(out / f"process_{process_id}.npz", **results)


def _gloo_on_loopback() -> None:
  """gloo listens on the address of this host's name unless told otherwise: keep it on 127.0.0.1.

  JAX has no option for it, so this wraps the private factory JAX calls when it makes the CPU client.
  """
  from jax._src import xla_bridge
  make = xla_bridge._jax.make_gloo_tcp_collectives
  xla_bridge._jax.make_gloo_tcp_collectives = lambda **kwargs: make(**{"hostname": "127.0.0.1", **kwargs})


def _cli(port: int, process_id: int, out: Path) -> None:
  """``shapjax train``, ``evaluate`` and ``explain`` with the global options of several processes."""
  from shapjax import cli
  dataset = os.environ["SHAPJAX_TEST_DATASET"]
  several = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id),
             "--heartbeat-timeout", str(HEARTBEAT)]
  commands = [
      ["train", dataset, "--out", str(out / "checkpoint"), "--steps", "2", "--image-size", str(SIZE),
       "--batch-size", "4", "--features", "4", "--latent-features", "4", "--checkpoint-every", "1", "--quiet"],
      ["evaluate", dataset, "--checkpoint", str(out / "checkpoint"), "--maps", ",".join(EVALUATE["maps"]),
       "--n-perm", str(EVALUATE["n_perm"]), "--regions", str(EVALUATE["regions"]), "--json",
       str(out / "evaluate.json"), "--figures", str(out / "figures"), "--quiet"],
      ["explain", *_cli_images(dataset), "--checkpoint", str(out / "checkpoint"), "--out", str(out / "explain"),
       "--n-perm", "2", "--regions", str(REGIONS), "--quiet"],
  ]
  for command in commands:
    code = cli.main(several + command)
    assert code == 0, (command[0], code)


# --- the launcher ------------------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _start(tmp_path: Path, *, n_devices: int, scenario: str, dataset: Path | None = None) -> list:
  """Starts 2 worker processes of ``n_devices`` CPU devices each."""
  port = _free_port()
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", SHAPJAX_TEST_DATASET=str(dataset))
  env.pop("XLA_FLAGS", None)  # conftest.py's 4 fake devices are for this process only
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(port), "2", str(i), str(n_devices),
                             str(tmp_path), scenario], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True) for i in range(2)]
  return procs


def _wait(procs, timeout: float = RUN_TIMEOUT) -> list:
  """Waits for the processes (killing them all after ``timeout`` s): ``[(returncode, output, end time)]``."""
  start = time.monotonic()
  results = []
  try:
    for proc in procs:
      output, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
      results.append((proc.returncode, output, time.monotonic()))
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    outputs = [proc.communicate()[0] for proc in procs]
    pytest.fail(f"the processes ran past {timeout} s (a hang):\n" + "\n---\n".join(o[-3000:] for o in outputs))
  return results


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  import shapjax.data
  root = tmp_path_factory.mktemp("demo")
  shapjax.data.make_demo_dataset(root, n_train=2, n_test=5, image_size=SIZE, seed=0)
  return root


@pytest.fixture(scope="module")
def reference():
  """One process, one device: attribute_batch over every image, attribute of image 0, and train."""
  import jax
  import shapjax
  params, images, key = _params(), _images(), jax.random.key(3)
  labels = shapjax.segment_batch(images, max_regions=REGIONS)
  trained = shapjax.train(_train_config(), images, key=jax.random.key(5), progress=False)
  one = np.asarray(shapjax.attribute(params, images[0], labels[0], ONE_N_PERM, key=key, **OPTIONS).values)
  return {"labels": labels,
          "values": np.asarray(shapjax.attribute_batch(params, images, labels, N_PERM, key=key, **OPTIONS).values),
          "one": one, "weights": [np.asarray(leaf) for leaf in jax.tree.leaves(trained.weights)]}


@pytest.mark.slow
@pytest.mark.parametrize("n_devices", [1, 2])
def test_two_processes_equal_one_process(tmp_path, request, n_devices):
  procs = _start(tmp_path, n_devices=n_devices, scenario="equal")
  reference = request.getfixturevalue("reference")  # computed here while the processes run
  results = _wait(procs)
  for returncode, output, _ in results:
    assert returncode == 0, output[-4000:]
  values = reference["values"]
  for process_id in range(2):
    got = np.load(tmp_path / f"process_{process_id}.npz")
    mine = slice(4 * process_id, 4 * process_id + 4)
    np.testing.assert_array_equal(got["dataset_labels"], reference["labels"][mine])
    np.testing.assert_allclose(got["dataset_values"], values[mine], rtol=1e-5, atol=1e-7)
    share = slice(0, 4) if process_id == 0 else slice(4, 7)
    np.testing.assert_allclose(got["batch_values"], values[share], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["one_values"], reference["one"], rtol=1e-5, atol=1e-7)
    for i, weight in enumerate(reference["weights"]):
      np.testing.assert_allclose(got[f"weight_{i}"], weight, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["killed", "fails"])
def test_a_lost_process_ends_the_run_on_every_host(tmp_path, scenario):
  # Process 1 is lost after joining; process 0 waits for it in attribute_dataset's first collective. JAX's
  # coordination service ends process 0 once process 1 has missed its heartbeats for HEARTBEAT seconds (or, for
  # a Python error, once process 1's shutdown barrier has waited as long): bounded, with an error naming it.
  (code_0, output_0, end_0), (code_1, output_1, _) = _wait(_start(tmp_path, n_devices=1, scenario=scenario))
  lost_at = float(output_1.split("lost at ", 1)[1].split()[0])
  print(f"{scenario}: process 0 ended {end_0 - lost_at:.1f} s after process 1 was lost (codes {code_0}, {code_1})")
  assert code_0 != 0 and code_1 != 0, output_0[-3000:]
  if scenario == "killed":
    assert code_1 == 3
    assert "stopped sending heartbeats" in output_0, output_0[-3000:]
  else:
    assert "RuntimeError: process 1 fails" in output_1, output_1[-3000:]
    assert "barrier" in output_0.lower(), output_0[-3000:]
  # Measured on 2 shared cores: 5-6 s with HEARTBEAT = 5 (10-11 s with 10), for both scenarios.
  assert end_0 - lost_at < 2 * HEARTBEAT + 10, output_0[-3000:]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  _port, _n, _id, _devices = (int(x) for x in sys.argv[2:6])
  _worker(_port, _n, _id, _devices, Path(sys.argv[6]), sys.argv[7])


@pytest.mark.slow
def test_cli_across_two_processes(tmp_path, dataset):
  # train (data parallel over both processes, checkpoints saved once through orbax), evaluate (the test split
  # across the processes, one JSON equal to one process's) and explain (the images across the processes).
  procs = _start(tmp_path, n_devices=1, scenario="cli", dataset=dataset)
  import jax
  import shapjax
  results = _wait(procs)
  for returncode, output, _ in results:
    assert returncode == 0, output[-4000:]
  assert "wrote" in results[0][1] and "evaluate.json" not in results[1][1]
  params = shapjax.load(tmp_path / "checkpoint")
  evaluated = json.loads((tmp_path / "evaluate.json").read_text())
  one = json.loads(json.dumps(shapjax.evaluate(params, dataset, **EVALUATE)))
  assert _without_timings(evaluated) == {**_without_timings(one), "cached_images": evaluated["cached_images"]}
  assert (tmp_path / "figures" / "overlays.png").is_file()
  images = _cli_images(dataset)
  assert len(images) == 3
  assert len(list((tmp_path / "explain").glob("*.json"))) == len(list((tmp_path / "explain").glob("*.png"))) == 3
  for record in shapjax.explain_files(images, params=params, out_dir=tmp_path / "one", n_perm=2, max_regions=REGIONS,
                                      key=jax.random.key(0), progress=False):
    got = json.loads((tmp_path / "explain" / Path(record["json"]).name).read_text())
    np.testing.assert_allclose([r["value"] for r in got["regions"]], [r["value"] for r in record["regions"]],
                               rtol=1e-5, atol=1e-9)


def test_cli_process_options_go_together():
  from shapjax import cli
  for argv in (["--coordinator", "127.0.0.1:1", "demo"],
               ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2", "demo"],
               ["--distributed", "--process-id", "0", "demo"]):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(argv)
    assert exit_info.value.code == 2, argv
