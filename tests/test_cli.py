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


def _run(*args, cwd=ROOT, timeout=300):
  """``python -m shapjax ARGS...`` in ``cwd``, as a user runs it."""
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # a user's process: one CPU device unless --devices splits it (not conftest's 4)
  return subprocess.run([sys.executable, "-m", "shapjax", *map(str, args)], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=cwd)


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


@pytest.mark.slow
def test_train_writes_checkpoints_and_loss_curve(trained):
  out, result = trained
  assert sorted(int(p.name) for p in out.iterdir() if p.name.isdigit()) == [2, 4]
  _valid_png(out / "loss.png")
  assert len(json.loads((out / "loss.json").read_text())["loss"]) == 4
  params = shapjax.load(out)
  assert params.config.image_shape == (24, 40, 1) and params.config.features == (4, 8)
  assert str(out) in result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_explain_writes_figure_and_json(trained, dataset, tmp_path):
  out, _ = trained
  images = sorted((dataset / "test").glob("[!g]*/*.png"))[:2]  # defective ones: not under test/good
  assert len(images) == 2
  cache = tmp_path / "cache"
  for run in ("x", "warm"):  # the second run starts from the compilation cache of the first
    result = _run("--compilation-cache", cache, "explain", *images, "--checkpoint", out, "--n-perm", 4,
                  "--regions", 8, "--out", tmp_path / run)
    assert result.returncode == 0, result.stderr
  assert any(cache.iterdir())  # JAX's persistent cache holds the compiled programs
  for image in images:
    _valid_png(tmp_path / "x" / f"{image.stem}.png")
    record = json.loads((tmp_path / "x" / f"{image.stem}.json").read_text())
    assert 1 <= record["n_regions"] <= 8 and len(record["regions"]) == record["n_regions"]
    assert all({"id", "value", "stderr", "pixels"} <= set(r) for r in record["regions"])
    assert sum(r["pixels"] for r in record["regions"]) == 24 * 40
    assert record["n_perm"] == 4 and "ground_truth" in record  # inside an MVTec layout: the mask is found
    assert record["pixel_map"] == "residual" and record["game"] == "reconstruction"  # an autoencoder's
    for key in ("pixel_auroc_region_values", "pixel_auroc_pixel_map"):  # a defective image: both are defined
      assert 0.0 <= record[key] <= 1.0, key
    assert json.loads((tmp_path / "warm" / f"{image.stem}.json").read_text())["regions"] == record["regions"]


@pytest.mark.slow
def test_demo_quick_with_a_relative_out(tmp_path):
  # README command 1, from a fresh folder: the relative --out reaches orbax (which wants absolute paths).
  result = _run("demo", "--quick", "--out", "demo_out", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  demo = tmp_path / "demo_out"
  summary = json.loads((demo / "summary.json").read_text())
  assert len(summary["images"]) == 2
  assert {item["defect_type"] for item in summary["images"]} == {"blob", "scratch"}  # one of each kind
  for item in summary["images"]:
    figure = tmp_path / item["figure"]  # relative to the working directory when --out is
    _valid_png(figure)
    json.loads(figure.with_suffix(".json").read_text())
  _valid_png(demo / "overview.png")
  for name in ("autoencoder", "inpainter"):
    _valid_png(demo / "checkpoint" / name / "loss.png")
  markdown = (demo / "summary.md").read_text()
  assert markdown.startswith("# shapjax demo")
  # The table leads with the inpainter's default map, the autoencoder's residual beside it.
  table = [line.split(" | ")[0].strip("| ") for line in markdown.splitlines() if line.startswith("| inpaint_")
           or line.startswith("| residual")]
  assert table == ["inpaint_grid", "residual", "inpaint_shapley", "inpaint_loo"]
  assert markdown in result.stdout and str(demo) in result.stdout
  for step in ("[1/5]", "[2/5] training the autoencoder", "[3/5] training the inpainter", "[4/5]", "[5/5]"):
    assert step in result.stderr  # progress is shown


@pytest.mark.slow
def test_train_explain_evaluate_with_relative_paths(tmp_path):
  shapjax.make_demo_dataset(tmp_path / "data", n_train=8, n_test=4, image_size=24, seed=1)
  run = lambda *args: _run(*args, cwd=tmp_path)
  trained = run("train", "data", "--out", "ckpt", "--steps", 2, "--image-size", 24, "--features", "4,8",
                "--latent-features", 4, "--batch-size", 4, "--checkpoint-every", 1, "--keep", 1, "--quiet")
  assert trained.returncode == 0, trained.stderr
  assert "checkpoint: ckpt " in trained.stdout and (tmp_path / "ckpt" / "2").is_dir()
  resumed = run("train", "data", "--out", "ckpt", "--steps", 3, "--image-size", 24, "--features", "4,8",
                "--latent-features", 4, "--batch-size", 4, "--checkpoint-every", 1, "--keep", 1, "--quiet",
                "--resume")
  assert resumed.returncode == 0, resumed.stderr
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["3"]
  image = next((tmp_path / "data" / "test").glob("[!g]*/*.png")).relative_to(tmp_path)
  explained = run("explain", image, "--checkpoint", "ckpt", "--out", "explained", "--n-perm", 4, "--regions", 8,
                  "--quiet")
  assert explained.returncode == 0, explained.stderr
  _valid_png(tmp_path / "explained" / f"{image.stem}.png")
  evaluated = run("evaluate", "data", "--checkpoint", "ckpt", "--maps", "residual,shapley", "--n-perm", 4,
                  "--regions", 8, "--json", "results.json", "--quiet")
  assert evaluated.returncode == 0, evaluated.stderr
  assert set(json.loads((tmp_path / "results.json").read_text())["maps"]) == {"residual", "shapley"}
  missing = run("evaluate", "data", "--checkpoint", "no_ckpt", "--json", "x.json")
  assert missing.returncode == 1
  assert _one_line_error(missing) == "shapjax: error: no checkpoint at no_ckpt: the path does not exist"


@pytest.mark.slow
def test_missing_checkpoint_as_subprocess(dataset, tmp_path):
  image = sorted((dataset / "test" / "good").glob("*.png"))[0]
  missing = _run("explain", image, "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x")
  assert missing.returncode == 1
  assert _one_line_error(missing) == f"shapjax: error: no checkpoint at {tmp_path / 'nowhere'}: the path does not exist"


def _main_error(argv, capsys):
  """Runs the command in-process (no interpreter start-up) and returns its one-line error."""
  assert cli.main([str(a) for a in argv]) == 1
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert lines[-1].startswith("shapjax: error: ") and "Traceback" not in err, err
  return lines[-1]


@pytest.mark.slow
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


@pytest.mark.parametrize("argv, message", [
    (["explain", "x.png", "--checkpoint", "c", "--out", "o", "--n-perm", "3"], "n_perm must be even, got 3"),
    (["evaluate", "d", "--checkpoint", "c", "--json", "o.json", "--n-perm", "5"], "n_perm must be even, got 5"),
    (["evaluate", "d", "--checkpoint", "c", "--json", "o.json", "--maps", "residual,foo"], "unknown map 'foo'"),
    (["evaluate", "d", "--checkpoint", "c", "--json", "o.json", "--regions", "8,x"], "comma-separated integers"),
    (["train", "d", "--out", "o", "--image-size", "1", "2", "3"], "one or two numbers"),
    (["train", "d", "--out", "o", "--devices", "2", "--batch-size", "5"], "multiple of --devices"),
])
def test_usage_errors_show_the_commands_usage(argv, message, capsys):
  # Found before anything is loaded ("c" and "d" do not exist), reported with the subcommand's usage line.
  with pytest.raises(SystemExit) as exit_info:
    raise SystemExit(cli.main(argv))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  command = argv[0]
  assert err.startswith(f"usage: shapjax {command} "), err
  assert f"shapjax {command}: error: " in err and message in err, err


def test_image_size_takes_one_or_two_numbers(capsys):
  parser = cli.build_parser()
  assert parser.parse_args(["train", "d", "--out", "o"]).image_size == (128, 128)
  assert parser.parse_args(["train", "d", "--out", "o", "--image-size", "64"]).image_size == (64, 64)
  assert parser.parse_args(["train", "d", "--out", "o", "--image-size", "320", "128"]).image_size == (320, 128)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  assert "[--image-size H [W]]" in text and "--image-size H [W]  " in text
  assert "H [W ...]" not in text and "[H [W] ...]" not in text


def test_defaults_are_the_librarys():
  from shapjax import evaluation, pipeline, segmentation, training
  parser = cli.build_parser()
  evaluate = parser.parse_args(["evaluate", "d", "--checkpoint", "c", "--json", "o.json"])
  assert evaluate.maps.split(",") == list(evaluation.DEFAULT_MAPS)
  assert evaluate.n_perm == evaluation.DEFAULT_N_PERM and evaluate.baseline == evaluation.DEFAULT_BASELINE
  assert tuple(int(r) for r in evaluate.regions.split(",")) == evaluation.DEFAULT_REGIONS
  explain = parser.parse_args(["explain", "x.png", "--checkpoint", "c", "--out", "o"])
  assert explain.n_perm == pipeline.DEFAULT_EXPLAIN_N_PERM and explain.regions == segmentation.DEFAULT_MAX_REGIONS
  train = parser.parse_args(["train", "d", "--out", "o"])
  config, model_config = training.TrainConfig(), shapjax.AutoencoderConfig(image_shape=(8, 8, 1))
  assert (train.batch_size, train.learning_rate, train.max_shift, train.keep, train.seed, train.flips) == (
      config.batch_size, config.learning_rate, config.max_shift, config.keep_checkpoints, config.seed, config.flips)
  assert (train.features, train.latent_features) == (model_config.features, model_config.latent_features)


@pytest.mark.slow
def test_python_dash_m_shapjax(tmp_path):
  result = _run("--version", cwd=tmp_path)
  assert result.returncode == 0 and result.stdout.strip() == f"shapjax {shapjax.__version__}", result


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


@pytest.mark.slow
def test_usage_error_as_subprocess():
  result = _run("train")
  assert result.returncode == 2 and "usage:" in result.stderr
