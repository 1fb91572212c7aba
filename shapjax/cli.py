"""The ``shapjax`` command: argument parsing only; every command is a library call.

    shapjax train DATA_DIR --out CKPT_DIR [--steps N] [--image-size H [W]] [--seed K] [--resume] [--devices N]
    shapjax explain IMAGE... --checkpoint CKPT_DIR [--n-perm N] [--regions R] --out OUT_DIR
    shapjax demo [--out DIR] [--quick]
    shapjax evaluate DATA_DIR --checkpoint CKPT_DIR [--maps M,...] [--n-perm N] [--regions R] [--limit K] --json OUT.json
        [--figures DIR]

Global option: ``shapjax --compilation-cache DIR COMMAND ...`` (or ``SHAPJAX_COMPILATION_CACHE=DIR``) keeps
compiled and traced programs for the next run (:func:`shapjax.enable_compilation_cache`).

Exit codes: 0 success, 2 usage error (from argparse), 1 any other failure, reported as one line
``shapjax: error: ...`` on stderr without a traceback (set ``SHAPJAX_TRACEBACK=1`` to see it).

Adding a command: write ``_add_<name>(subparsers)`` that builds its parser and sets ``handler`` to a
function ``(args) -> int``, and append it to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_PROG = "shapjax"


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
  return value


def _features(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated channel counts like 32,64,96, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"channel counts must be positive, got {text!r}")
  return values


# --- train ------------------------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
  parser = subparsers.add_parser(
      "train", help="train an autoencoder on DATA_DIR/train/good",
      description="Train the convolutional autoencoder on the defect-free images of an MVTec-layout dataset "
      "(DATA_DIR/train/good). Saves orbax checkpoints in CKPT_DIR every --checkpoint-every steps and at the end, "
      "and a loss curve CKPT_DIR/loss.png. Interrupted? Run the same command with --resume.")
  parser.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder in the MVTec AD layout")
  parser.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint folder (created)")
  parser.add_argument("--steps", type=_positive_int, default=1000, metavar="N", help="optimizer steps (default 1000)")
  parser.add_argument("--image-size", type=_positive_int, nargs="+", default=[128], metavar="H [W]",
                      help="resize images to H x W (one number: square; default 128). Give both for non-square "
                      "images, e.g. --image-size 320 128 for kolektor_sdd's tall 640 x 250 images")
  parser.add_argument("--seed", type=int, default=0, metavar="K", help="PRNG seed (default 0)")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in CKPT_DIR")
  parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="images per step (default 32)")
  parser.add_argument("--learning-rate", type=_positive_float, default=2e-3, metavar="LR",
                      help="peak Adam learning rate (default 2e-3; warm-up then cosine decay)")
  parser.add_argument("--features", type=_features, default=None, metavar="C1,C2,...",
                      help="encoder channels per stride-2 layer (default 32,64,96,128)")
  parser.add_argument("--latent-features", type=_positive_int, default=None, metavar="C",
                      help="bottleneck channels (default 32)")
  parser.add_argument("--no-flips", action="store_true", help="do not flip training images at random")
  parser.add_argument("--max-shift", type=int, default=4, metavar="P", help="random shifts of up to P pixels "
                      "(default 4; 0 turns them off)")
  parser.add_argument("--checkpoint-every", type=_positive_int, default=250, metavar="N",
                      help="save every N steps (default 250)")
  parser.add_argument("--keep", type=_positive_int, default=3, metavar="K",
                      help="keep the last K checkpoints (default 3)")
  parser.add_argument("--devices", type=_positive_int, default=1, metavar="N",
                      help="data parallel over N devices, each taking batch-size/N images of every step (default 1). "
                      "On a CPU these are N CPU devices, one per core (shapjax.use_cpu_devices): the fast way to "
                      "train on a multi-core CPU. Same batches, same params to float tolerance")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.set_defaults(handler=_run_train)


def _train_mesh(n_devices: int):
  """``None`` for one device; else a mesh of ``n_devices`` (on a CPU host, after splitting it into CPU devices)."""
  if n_devices == 1:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  import shapjax  # pylint: disable=g-import-not-at-top
  try:
    shapjax.use_cpu_devices(n_devices)  # only shapes the CPU backend; accelerators keep their devices
  except RuntimeError:
    pass  # JAX already runs (e.g. shapjax.cli.main called from Python): use the devices it has
  if jax.device_count() < n_devices:
    raise _UsageError(f"--devices {n_devices}: this process has only {jax.device_count()} "
                      f"{jax.default_backend()} device(s)")
  return shapjax.make_mesh(n_devices)


def _run_train(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  import shapjax  # pylint: disable=g-import-not-at-top

  if len(args.image_size) > 2:
    raise _UsageError("--image-size takes one or two numbers (H [W])")
  size = tuple(args.image_size) * (2 if len(args.image_size) == 1 else 1)
  if args.batch_size % args.devices:
    raise _UsageError(f"--batch-size ({args.batch_size}) must be a multiple of --devices ({args.devices})")
  mesh = _train_mesh(args.devices)  # before any JAX computation: it may split the CPU into devices
  print(f"reading {args.data_dir}/train/good ...", file=sys.stderr, flush=True)
  split = shapjax.load_mvtec(args.data_dir, split="train", image_size=size)
  options = {}
  if args.features is not None:
    options["features"] = args.features
  if args.latent_features is not None:
    options["latent_features"] = args.latent_features
  model_config = shapjax.AutoencoderConfig(image_shape=split.images.shape[1:], **options)
  config = shapjax.TrainConfig(
      model=model_config, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
      warmup_steps=min(100, args.steps // 10), flips=not args.no_flips, max_shift=args.max_shift,
      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, seed=args.seed)
  print(f"{len(split)} images of {split.images.shape[1:]}; model {model_config}", file=sys.stderr, flush=True)
  if mesh is not None:
    print(f"data parallel over {mesh.size} {jax.default_backend()} devices", file=sys.stderr, flush=True)
  shapjax.train(config, split.images, key=jax.random.key(args.seed), checkpoint_dir=Path(args.out).absolute(),
                resume=args.resume, progress=not args.quiet, mesh=mesh)
  print(f"checkpoint: {Path(args.out)}  (loss curve: {Path(args.out) / 'loss.png'})")
  return 0


# --- explain ----------------------------------------------------------------------------------------------------

def _add_explain(subparsers) -> None:
  parser = subparsers.add_parser(
      "explain", help="Shapley values of superpixels for image files",
      description="For each IMAGE: resize it to the model's input size, split it into SLIC superpixels, estimate "
      "each region's Shapley value for the autoencoder's reconstruction loss, and write OUT_DIR/<name>.png (image, "
      "superpixels, heat map, top regions outlined) and OUT_DIR/<name>.json (per-region values and standard "
      "errors). Images inside an MVTec layout get their ground truth outlined.")
  parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, BMP or TIFF files")
  parser.add_argument("--checkpoint", required=True, metavar="CKPT_DIR",
                      help="a checkpoint folder from 'shapjax train' (its latest step) or shapjax.save")
  parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (created)")
  parser.add_argument("--n-perm", type=_positive_int, default=64, metavar="N",
                      help="sampled permutations per image (even; default 64)")
  parser.add_argument("--regions", type=_positive_int, default=64, metavar="R",
                      help="at most R superpixels (SLIC aims at R; default 64)")
  parser.add_argument("--baseline", choices=("blur", "mean", "zeros"), default="blur",
                      help="what absent regions are replaced with (default blur)")
  parser.add_argument("--top", type=_positive_int, default=3, metavar="K", help="regions outlined (default 3)")
  parser.add_argument("--compactness", type=_positive_float, default=10.0, metavar="C",
                      help="SLIC compactness (default 10); lower values weigh intensity more than position")
  parser.add_argument("--seed", type=int, default=0, metavar="K", help="PRNG seed (default 0)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.set_defaults(handler=_run_explain)


def _run_explain(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import shapjax  # pylint: disable=g-import-not-at-top
  from shapjax import pipeline  # pylint: disable=g-import-not-at-top

  if args.n_perm % 2:
    raise _UsageError(f"--n-perm must be even (antithetic pairs), got {args.n_perm}")
  params = shapjax.load(args.checkpoint)
  records = pipeline.explain_files(args.images, params=params, out_dir=args.out, n_perm=args.n_perm,
                                   max_regions=args.regions, key=jax.random.key(args.seed), baseline=args.baseline,
                                   top_k=args.top, compactness=args.compactness, progress=not args.quiet)
  for record in records:
    top = record["regions"][record["regions_by_value"][0]]
    print(f"{record['image']}: top region {top['id']} value {top['value']:+.3e} ± {top['stderr']:.1e} "
          f"-> {record['figure']}")
  print(f"wrote {len(records)} figures and JSON files to {args.out}")
  return 0


# --- demo -------------------------------------------------------------------------------------------------------

def _add_demo(subparsers) -> None:
  parser = subparsers.add_parser(
      "demo", help="the whole job on generated data (no downloads)",
      description="Build a small defect dataset from a texture scikit-image ships (crops with painted scratches "
      "and blobs whose masks are known), train an autoencoder, explain a few defective images, and write the "
      "figures and a metrics summary. A few minutes on 2 CPU cores; --quick takes seconds.")
  parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")
  parser.add_argument("--quick", action="store_true", help="tiny images, model and sample (for tests)")
  parser.add_argument("--seed", type=int, default=0, metavar="K", help="PRNG seed (default 0)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
  from shapjax import pipeline  # pylint: disable=g-import-not-at-top

  config = pipeline.DemoConfig.quick() if args.quick else pipeline.DemoConfig()
  log = lambda message: print(message, file=sys.stderr, flush=True)
  summary = pipeline.run_demo(args.out, config=config, seed=args.seed, progress=not args.quiet, log=log)
  print((Path(args.out) / "summary.md").read_text())
  print(f"demo output in {Path(args.out).absolute()}: overview.png, explanations/, checkpoint/loss.png, "
        f"summary.json ({summary['total_seconds']} s)")
  return 0


# --- evaluate ---------------------------------------------------------------------------------------------------

# evaluate()'s defaults, spelled out so that building the parser imports no JAX (a test checks they agree).
_EVALUATE_DEFAULTS = dict(maps=("residual", "shapley", "shapley_area", "residual_x_shapley", "residual_x_shapley_norm"),
                          base_maps=("residual", "shapley", "shapley_area", "residual_x_shapley",
                                     "residual_x_shapley_norm", "pooled_residual", "residual_x_pooled_norm"),
                          n_perm=8, regions=(32,), baseline="reconstruction")


def _add_evaluate(subparsers) -> None:
  evaluation = argparse.Namespace(**{
      "DEFAULT_MAPS": _EVALUATE_DEFAULTS["maps"], "BASE_MAPS": _EVALUATE_DEFAULTS["base_maps"],
      "DEFAULT_N_PERM": _EVALUATE_DEFAULTS["n_perm"], "DEFAULT_REGIONS": _EVALUATE_DEFAULTS["regions"],
      "DEFAULT_BASELINE": _EVALUATE_DEFAULTS["baseline"]})

  parser = subparsers.add_parser(
      "evaluate", help="score anomaly maps on a test split (AUROC, AUPRO)",
      description="Compute every anomaly map (residual, Shapley, ...) of DATA_DIR/test with the autoencoder in "
      "CKPT_DIR, print image AUROC, pixel AUROC, AUPRO@0.3 and seconds per image overall and per defect type, and "
      "write them to OUT.json. Per-image results are cached, so an interrupted run resumes.")
  parser.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder in the MVTec AD layout")
  parser.add_argument("--checkpoint", required=True, metavar="CKPT_DIR", help="a checkpoint folder")
  parser.add_argument("--maps", default=",".join(evaluation.DEFAULT_MAPS), metavar="M1,M2,...",
                      help=f"maps from {','.join(evaluation.BASE_MAPS)}; Shapley maps may end in :constant or "
                      f":shuffled (ablations). Default {','.join(evaluation.DEFAULT_MAPS)}")
  parser.add_argument("--n-perm", type=_positive_int, default=evaluation.DEFAULT_N_PERM, metavar="N",
                      help=f"permutations per image (even; default {evaluation.DEFAULT_N_PERM})")
  parser.add_argument("--regions", default=",".join(str(r) for r in evaluation.DEFAULT_REGIONS), metavar="R[,R2]",
                      help="SLIC regions per image; several numbers average several scales "
                      f"(default {','.join(str(r) for r in evaluation.DEFAULT_REGIONS)})")
  parser.add_argument("--baseline", choices=("reconstruction", "blur", "mean", "zeros"),
                      default=evaluation.DEFAULT_BASELINE, help="what absent regions become "
                      f"(default {evaluation.DEFAULT_BASELINE})")
  parser.add_argument("--limit", type=_positive_int, default=None, metavar="K",
                      help="a fixed stratified subset of about K test images")
  parser.add_argument("--json", required=True, metavar="OUT.json", help="results file (created)")
  parser.add_argument("--figures", default=None, metavar="DIR", help="write DIR/overlays.png")
  parser.add_argument("--cache", default=None, metavar="DIR",
                      help="per-image cache folder (default: OUT.json's folder/.shapjax_cache)")
  parser.add_argument("--seed", type=int, default=0, metavar="K", help="PRNG seed (default 0)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> int:
  import shapjax  # pylint: disable=g-import-not-at-top
  from shapjax import evaluation  # pylint: disable=g-import-not-at-top

  if args.n_perm % 2:
    raise _UsageError(f"--n-perm must be even (antithetic pairs), got {args.n_perm}")
  try:
    regions = tuple(int(r) for r in args.regions.split(","))
  except ValueError:
    raise _UsageError(f"--regions takes comma-separated integers, got {args.regions!r}") from None
  maps = [m for m in args.maps.split(",") if m]
  try:
    for name in maps:
      evaluation._parse_map(name)  # pylint: disable=protected-access
  except ValueError as error:
    raise _UsageError(str(error)) from None
  cache = Path(args.cache) if args.cache else Path(args.json).absolute().parent / ".shapjax_cache"
  params = shapjax.load(args.checkpoint)
  result = shapjax.evaluate(params, args.data_dir, maps=maps, n_perm=args.n_perm, regions=regions,
                            baseline=args.baseline, seed=args.seed, limit=args.limit, cache_dir=cache,
                            figures_dir=args.figures, progress=not args.quiet)
  print(evaluation.format_table(result))
  evaluation.write_json(result, args.json)
  print(f"wrote {args.json}" + (f" and {Path(args.figures) / 'overlays.png'}" if args.figures else ""))
  return 0


# --- entry point ------------------------------------------------------------------------------------------------

_COMMANDS = (_add_train, _add_explain, _add_demo, _add_evaluate)


class _UsageError(Exception):
  """A usage problem found after parsing (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
  """The ``shapjax`` argument parser with every subcommand registered."""
  parser = argparse.ArgumentParser(
      prog=_PROG, description="Where is an image anomalous? Shapley values of superpixels for an autoencoder's "
      "reconstruction loss, in JAX.")
  from shapjax import __version__  # pylint: disable=g-import-not-at-top
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  parser.add_argument("--compilation-cache", metavar="DIR", default=os.environ.get("SHAPJAX_COMPILATION_CACHE"),
                      help="keep compiled and traced programs in DIR, so the next run starts faster (default: "
                      "$SHAPJAX_COMPILATION_CACHE, else off)")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for add in _COMMANDS:
    add(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the ``shapjax`` command line; returns the exit code (0 ok, 1 failure, 2 usage error)."""
  parser = build_parser()
  args = parser.parse_args(argv)  # exits with 2 on usage errors
  try:
    if args.compilation_cache:
      from shapjax import compilation  # pylint: disable=g-import-not-at-top

      compilation.enable_compilation_cache(args.compilation_cache)
    return int(args.handler(args) or 0)
  except _UsageError as error:
    parser.print_usage(sys.stderr)
    print(f"{_PROG} {args.command}: error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{_PROG}: interrupted", file=sys.stderr)
    return 130
  except Exception as error:  # one line for the user; the traceback on request
    if os.environ.get("SHAPJAX_TRACEBACK"):
      raise
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, FileNotFoundError, OSError, TypeError)):
      message = f"{type(error).__name__}: {message}"
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
