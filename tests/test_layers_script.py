"""benchmarks/layers.py, contention.py and throughput.py's training section run end to end on a tiny image
(layers.py: the speed-ups of shapjax.speedups agree with the plain computations)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # benchmark scripts in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layers_benchmark_checks_and_reports(tmp_path):
  out = tmp_path / "layers.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SHAPJAX_XLA_DEFAULTS")}
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "layers.py"), "--size", "32", "--batch", "2",
                        "--forward-batch", "2", "--rounds", "1", "--inpaint-shape", "32,32,1", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  # The script asserts that the speed-ups of shapjax.speedups equal the plain computations.
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert set(report["output_layer"]) == {"shuffle", "plain"}
  assert len(report["kernel_gradients"]) == 10  # every convolution of the default model
  assert all(row["xla_s"] > 0 and row["taps_s"] > 0 for row in report["kernel_gradients"])
  assert set(report["train_step"]) == {"xla", "taps_whole_batch", "taps_per_image"}
  assert set(report["forward_options"]) == {"jit", "jit_forward"}
  assert set(report["forward_options_inpainter"]) == {"jit", "jit_forward"}
  assert set(report["init"]) == {"jit", "jit_init"}
  assert "| kernel gradients | ms | steps/s |" in run.stdout


def test_contention_benchmark_reports_every_job(tmp_path):
  out = tmp_path / "contention.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "contention.py"), "--processes", "2",
                        "--size", "32", "--repeats", "2", "--single-thread", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["single_thread"] is True
  assert [row["job"] for row in report["jobs"]] == ["matmul", "forward", "train"]
  for row in report["jobs"]:
    assert row["alone_s"] > 1e-4 and len(row["together_s"]) == 2 and row["aggregate_speedup"] > 0  # not folded
    # PJRT_NPROC=1 reached the children: XLA's pool has one thread, so no job keeps two cores busy (a 1024^2
    # matrix product on XLA's default pool of 2 threads used 1.9 cores per wall second here).
    assert 0 < row["alone_cores"] < 1.5 and len(row["together_cores"]) == 2
  assert "| job | alone (ms) | cores used alone |" in run.stdout


def test_throughput_training_section_times_every_step(tmp_path):
  pytest.importorskip("torch", reason="throughput.py compares with PyTorch: pip install -e '.[bench]'")
  out = tmp_path / "train.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick", "--sections",
                        "train", "--cpu-devices", "2", "--size", "32", "--rounds", "1", "--matmul-size", "64",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = {row["method"]: row for row in json.loads(out.read_text())["train"]}
  assert set(rows) == {"optax, batch split over a mesh of 2 devices", "optax (jax jit)", "torch eager",
                       "torch.compile"}
  assert all(row["steps_per_s"] > 0 for row in rows.values())
  assert "| optax, batch split over a mesh of 2 devices |" in run.stdout
