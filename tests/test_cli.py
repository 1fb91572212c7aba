"""The ``shapjax`` command, run as a subprocess on tiny settings: exit codes, promised files, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import shapjax
from shapjax import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "shapjax.cli", *map(str, args)], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=ROOT)


def _valid_png(path):
  assert path.is_file(), path
  assert path.read_bytes()[:8] == PNG_SIGNATURE, path
  with Image.open(path) as image:
    image.verify()


def _one_line_error(result):
  lines = result.stderr.strip().splitlines()
  assert lines and lines[-1].startswith("shapjax: error: "), result.stderr
  assert "Traceback" not in result.stderr
  return lines[-1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return shapjax.make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=12, n_test=4, image_size=(24, 40),
                                   seed=0)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "ckpt"
  result = _run("train", dataset, "--out", out, "--steps", 4, "--image-size", 24, 40, "--features", "4,8",
                "--latent-features", 4, "--batch-size", 4, "--checkpoint-every", 2, "--keep", 2, "--seed", 3)
  assert result.returncode == 0, result.stderr
  return out, result


def test_train_writes_checkpoints_and_loss_curve(trained):
  out, result = trained
  assert sorted(int(p.name) for p in out.iterdir() if p.name.isdigit()) == [2, 4]
  _valid_png(out / "loss.png")
  assert len(json.loads((out / "loss.json").read_text())["loss"]) == 4
  params = shapjax.load(out)
  assert params.config.image_shape == (24, 40, 1) and params.config.features == (4, 8)
  assert str(out) in result.stdout


def test_train_resume_and_refusal(trained, dataset):
  out, _ = trained
  again = _run("train", dataset, "--out", out, "--steps", 4, "--image-size", 24, 40, "--features", "4,8",
               "--latent-features", 4, "--batch-size", 4, "--seed", 3)
  assert again.returncode == 1
  assert "resume" in _one_line_error(again)
  resumed = _run("train", dataset, "--out", out, "--steps", 4, "--image-size", 24, 40, "--features", "4,8",
                 "--latent-features", 4, "--batch-size", 4, "--checkpoint-every", 2, "--keep", 2, "--seed", 3,
                 "--resume", "--quiet")
  assert resumed.returncode == 0, resumed.stderr


def test_train_data_parallel_over_cpu_devices(trained, dataset, tmp_path):
  # --devices 2 in a fresh process splits the CPU into 2 devices (use_cpu_devices) and trains with a mesh: the
  # batches are those of the one-device run, so the params agree to float tolerance.
  out, _ = trained
  args = ("train", dataset, "--out", tmp_path / "two", "--steps", 4, "--image-size", 24, 40, "--features", "4,8",
          "--latent-features", 4, "--batch-size", 4, "--checkpoint-every", 2, "--keep", 2, "--seed", 3, "--quiet")
  result = _run(*args, "--devices", 2)
  assert result.returncode == 0, result.stderr
  assert "data parallel over 2 cpu devices" in result.stderr
  one, two = shapjax.load(out), shapjax.load(tmp_path / "two")
  for a, b in zip(jax.tree.leaves(one.weights), jax.tree.leaves(two.weights)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  uneven = _run(*args[:3], tmp_path / "three", *args[4:], "--devices", 3)
  assert uneven.returncode == 2 and "multiple of --devices" in uneven.stderr


def test_explain_writes_figure_and_json(trained, dataset, tmp_path):
  out, _ = trained
  images = sorted((dataset / "test").glob("[!g]*/*.png"))[:2]  # defective ones: not under test/good
  assert len(images) == 2
  cache = tmp_path / "cache"
  for run in ("x", "warm"):  # the second run starts from the compilation cache of the first
    result = _run("--compilation-cache", cache, "explain", *images, "--checkpoint", out, "--n-perm", 4,
                  "--regions", 8, "--out", tmp_path / run)
    assert result.returncode == 0, result.stderr
  assert sorted(p.name.split("-")[0] for p in (cache / "exported").iterdir()) == ["attribute"]
  for image in images:
    _valid_png(tmp_path / "x" / f"{image.stem}.png")
    record = json.loads((tmp_path / "x" / f"{image.stem}.json").read_text())
    assert 1 <= record["n_regions"] <= 8 and len(record["regions"]) == record["n_regions"]
    assert all({"id", "value", "stderr", "pixels"} <= set(r) for r in record["regions"])
    assert sum(r["pixels"] for r in record["regions"]) == 24 * 40
    assert record["n_perm"] == 4 and "ground_truth" in record  # inside an MVTec layout: the mask is found
    assert json.loads((tmp_path / "warm" / f"{image.stem}.json").read_text())["regions"] == record["regions"]


def test_demo_quick(tmp_path):
  result = _run("demo", "--quick", "--out", tmp_path / "demo")
  assert result.returncode == 0, result.stderr
  demo = tmp_path / "demo"
  summary = json.loads((demo / "summary.json").read_text())
  assert len(summary["images"]) == 2
  assert {item["defect_type"] for item in summary["images"]} == {"blob", "scratch"}  # one of each kind
  for item in summary["images"]:
    _valid_png(Path(item["figure"]))
    json.loads(Path(item["figure"]).with_suffix(".json").read_text())
  _valid_png(demo / "overview.png")
  _valid_png(demo / "checkpoint" / "loss.png")
  assert (demo / "summary.md").read_text().startswith("# shapjax demo")
  assert str(demo) in result.stdout
  assert "[2/4]" in result.stderr and "training" in result.stderr  # progress is shown


def test_missing_checkpoint_as_subprocess(dataset, tmp_path):
  image = sorted((dataset / "test" / "good").glob("*.png"))[0]
  missing = _run("explain", image, "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x")
  assert missing.returncode == 1 and "nowhere" in _one_line_error(missing)


def _main_error(argv, capsys):
  """Runs the command in-process (no interpreter start-up) and returns its one-line error."""
  assert cli.main([str(a) for a in argv]) == 1
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert lines[-1].startswith("shapjax: error: ") and "Traceback" not in err, err
  return lines[-1]


def test_bad_checkpoints_and_images(trained, dataset, tmp_path, capsys):
  out, _ = trained
  image = sorted((dataset / "test" / "good").glob("*.png"))[0]
  corrupt = tmp_path / "corrupt"
  (corrupt / "weights").mkdir(parents=True)
  (corrupt / "config").mkdir()
  (corrupt / "config" / "metadata").write_text("garbage")
  assert "corrupt" in _main_error(["explain", image, "--checkpoint", corrupt, "--out", tmp_path / "x"], capsys)
  truncated = tmp_path / "truncated"
  shapjax.save(shapjax.load(out), truncated)
  for file in (truncated / "weights").rglob("*"):
    if file.is_file():
      file.write_bytes(file.read_bytes()[:3])
  assert "truncated" in _main_error(["explain", image, "--checkpoint", truncated, "--out", tmp_path / "x"], capsys)
  assert "no_such.png" in _main_error(["explain", tmp_path / "no_such.png", "--checkpoint", out, "--out",
                                       tmp_path / "x", "--quiet"], capsys)
  (tmp_path / "text.png").write_text("not a png")
  assert "text.png" in _main_error(["explain", tmp_path / "text.png", "--checkpoint", out, "--out", tmp_path / "x"],
                                   capsys)
  assert "no_data" in _main_error(["train", tmp_path / "no_data", "--out", tmp_path / "ck", "--steps", 2], capsys)
  assert "compilation cache directory" in _main_error(
      ["--compilation-cache", tmp_path / "text.png", "explain", tmp_path / "text.png", "--checkpoint", out, "--out",
       tmp_path / "x"], capsys)


@pytest.mark.parametrize("argv", [[], ["train"], ["train", "d", "--out", "o", "--steps", "0"],
                                  ["explain", "x.png", "--out", "o"], ["demo", "--bogus"], ["frobnicate"],
                                  ["train", "d", "--out", "o", "--image-size", "1", "2", "3"],
                                  ["explain", "x.png", "--checkpoint", "c", "--out", "o", "--n-perm", "3"],
                                  ["train", "d", "--out", "o", "--devices", "0"]])
def test_usage_errors_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    code = cli.main(argv)
    raise SystemExit(code)
  assert exit_info.value.code == 2
  assert "usage:" in capsys.readouterr().err


def test_train_more_devices_than_the_running_process_has(capsys):
  # Called from Python after JAX started (4 fake CPU devices here), --devices cannot re-split the CPU.
  assert len(jax.devices()) == 4
  assert cli.main(["train", "d", "--out", "o", "--devices", "8", "--batch-size", "8"]) == 2
  assert "--devices 8: this process has only 4 cpu device(s)" in capsys.readouterr().err
  assert "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", "")  # nothing changed


@pytest.mark.parametrize("command", ["train", "explain", "demo"])
def test_help_is_complete(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for action in cli.build_parser()._subparsers._group_actions[0].choices[command]._actions:
    for option in action.option_strings:
      assert option in text


def test_usage_error_as_subprocess():
  result = _run("train")
  assert result.returncode == 2 and "usage:" in result.stderr
