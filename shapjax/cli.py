"""The ``shapjax`` command: argument parsing only; every command is a library call.

    shapjax train DATA_DIR --out CKPT_DIR [--model autoencoder|inpainting] [--steps N] [--image-size H [W]]
        [--seed K] [--resume] [--devices N]
    shapjax explain IMAGE... --checkpoint CKPT_DIR [--n-perm N] [--regions R] --out OUT_DIR
    shapjax demo [--out DIR] [--quick]
    shapjax evaluate DATA_DIR --checkpoint CKPT_DIR [--maps M,...] [--n-perm N] [--regions R] [--limit K] --json OUT.json
        [--figures DIR]

``python -m shapjax ...`` runs the same command. Global option: ``shapjax --compilation-cache DIR COMMAND ...``
(or ``SHAPJAX_COMPILATION_CACHE=DIR``) keeps compiled and traced programs for the next run
(:func:`shapjax.enable_compilation_cache`).

Several processes (hosts): ``shapjax --coordinator HOST:PORT --num-processes N --process-id I COMMAND ...`` on
every host, or ``shapjax --distributed COMMAND ...`` where JAX finds them itself (Cloud TPU pod slices, Slurm,
Open MPI); both call :func:`shapjax.devices.initialize_processes` first. ``train`` is then data parallel over
every host's devices (``--devices N`` per host), ``evaluate`` and ``explain`` split the images across hosts,
and every output file is written once (``evaluate``'s JSON and figure by process 0).

Every default comes from the library function or config it configures (``shapjax.TrainConfig``,
``shapjax.evaluation.DEFAULT_MAPS``, ...), so ``shapjax CMD`` and the Python call agree; the only defaults of the
CLI's own are marked as such below.

Exit codes: 0 success, 2 usage error (from argparse, or found after parsing: then the command's usage line is
printed), 1 any other failure, reported as one line ``shapjax: error: ...`` on stderr without a traceback (set
``SHAPJAX_TRACEBACK=1`` to see it).

Adding a command: write ``_add_<name>(subparsers)`` that builds its parser with :func:`_add_parser` and sets
``handler`` to a function ``(args) -> int``, and append it to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from pathlib import Path

_PROG = "shapjax"

# The CLI's own default (no library function has it): the image size the data are read at.
_IMAGE_SIZE = 128


class _UsageError(Exception):
  """A usage problem found after parsing (exit code 2)."""


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


def _weight(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
  if not 0 <= value < float("inf"):
    raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
  return value


def _features(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated channel counts like 32,64,96, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"channel counts must be positive, got {text!r}")
  return values


def _joined(values) -> str:
  return ",".join(str(v) for v in values)


def _default(function, name: str):
  """The default of keyword ``name`` of a library function: the CLI offers the same one."""
  return inspect.signature(function).parameters[name].default


def _field_default(config_class, name: str):
  return {field.name: field.default for field in dataclasses.fields(config_class)}[name]


class _HeightWidth(argparse.Action):
  """``--image-size H [W]``: one positive number (a square) or two; stores ``(H, W)``."""

  def __init__(self, option_strings, dest, **kwargs):
    super().__init__(option_strings, dest, nargs="+", type=_positive_int, metavar=("H", "W"), **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    if len(values) > 2:
      parser.error(f"argument {option_string}: takes one or two numbers (H [W]), got {len(values)}")
    setattr(namespace, self.dest, (values[0], values[-1]))


class _StoreGiven(argparse.Action):
  """Stores the value like ``store`` and notes that the option was given (``args.<dest>_given``), for options
  whose default depends on another one (``--features`` of ``--model inpainting``)."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, values)
    setattr(namespace, f"{self.dest}_given", True)


class _HelpFormatter(argparse.HelpFormatter):
  """argparse's formatter, except that ``--image-size`` reads ``H [W]`` (argparse would write ``H [W ...]``)."""

  def _format_args(self, action, default_metavar):
    if isinstance(action, _HeightWidth):
      return "%s [%s]" % action.metavar
    return super()._format_args(action, default_metavar)


def _add_parser(subparsers, name: str, handler, **kwargs) -> argparse.ArgumentParser:
  """A subcommand's parser; it stays reachable as ``args.parser`` for usage errors found after parsing."""
  parser = subparsers.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
  parser.set_defaults(handler=handler, parser=parser)
  return parser


def _check_sampling(n_perm: int, max_regions: int) -> None:
  """The sampler's own checks of ``--n-perm`` and ``--regions``, before any loading or compiling."""
  from shapjax import sampling  # pylint: disable=g-import-not-at-top

  try:
    sampling.check_counts(max_regions, n_perm, sampling.DEFAULT_BATCH_SIZE, sampling.DEFAULT_ESTIMATOR)
  except ValueError as error:
    raise _UsageError(f"--n-perm {n_perm}: {error}") from None


# --- train ------------------------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
  from shapjax import inpainting, model, training  # pylint: disable=g-import-not-at-top

  defaults = training.TrainConfig()
  parser = _add_parser(
      subparsers, "train", _run_train, help="train an autoencoder (or an inpainter) on DATA_DIR/train/good",
      description="Train the convolutional autoencoder (or, with --model inpainting, a U-Net that fills random "
      "holes) on the defect-free images of an MVTec-layout dataset (DATA_DIR/train/good). Saves orbax checkpoints "
      "in CKPT_DIR every --checkpoint-every steps and at the end, and a loss curve CKPT_DIR/loss.png. "
      "Interrupted? Run the same command with --resume.")
  parser.set_defaults(features_given=False, latent_features_given=False, context_given=False,
                      ssim_weight_given=False, gms_weight_given=False)
  parser.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder in the MVTec AD layout")
  parser.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint folder (created)")
  parser.add_argument("--steps", type=_positive_int, default=defaults.steps, metavar="N",
                      help=f"optimizer steps (default {defaults.steps})")
  parser.add_argument("--image-size", action=_HeightWidth, default=(_IMAGE_SIZE, _IMAGE_SIZE),
                      help=f"resize images to H x W (one number: square; default {_IMAGE_SIZE}). Give both for "
                      "non-square images, e.g. --image-size 320 128 for kolektor_sdd's tall 640 x 250 images")
  parser.add_argument("--seed", type=int, default=defaults.seed, metavar="K",
                      help=f"PRNG seed (default {defaults.seed})")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in CKPT_DIR")
  parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, metavar="B",
                      help=f"images per step (default {defaults.batch_size})")
  parser.add_argument("--learning-rate", type=_positive_float, default=defaults.learning_rate, metavar="LR",
                      help=f"peak Adam learning rate (default {defaults.learning_rate:g}; warm-up then cosine decay)")
  parser.add_argument("--model", choices=model.MODEL_KINDS, default="autoencoder",
                      help="autoencoder: reconstruct each image (default); inpainting: fill random square cells and "
                      "blobs of each image from the rest (shapjax.InpainterConfig)")
  features = _field_default(model.AutoencoderConfig, "features")
  inpainter_features = _field_default(inpainting.InpainterConfig, "features")
  latent = _field_default(model.AutoencoderConfig, "latent_features")
  context = _field_default(inpainting.InpainterConfig, "context")
  parser.add_argument("--features", type=_features, default=features, metavar="C1,C2,...", action=_StoreGiven,
                      help=f"encoder channels per stride-2 layer (default {_joined(features)}; with --model "
                      f"inpainting {_joined(inpainter_features)})")
  parser.add_argument("--latent-features", type=_positive_int, default=latent, metavar="C", action=_StoreGiven,
                      help=f"bottleneck channels of the autoencoder (default {latent})")
  parser.add_argument("--context", choices=inpainting.CONTEXTS, default=context, action=_StoreGiven,
                      help=f"--model inpainting only: 'lowres' also shows the model a pooled copy of the whole "
                      f"image (default {context})")
  for name, term in (("ssim", "1 - SSIM (structural similarity)"), ("gms", "1 - GMS (gradient magnitude similarity)")):
    parser.add_argument(f"--{name}-weight", type=_weight, default=_field_default(inpainting.InpainterConfig,
                        f"{name}_weight"), metavar="W", action=_StoreGiven,
                        help=f"--model inpainting only: add W times {term} of the completed image on the hidden "
                        "pixels to the training loss (default 0)")
  parser.add_argument("--no-flips", dest="flips", action="store_false", default=defaults.flips,
                      help="do not flip training images at random")
  parser.add_argument("--max-shift", type=int, default=defaults.max_shift, metavar="P",
                      help=f"random shifts of up to P pixels (default {defaults.max_shift}; 0 turns them off)")
  parser.add_argument("--checkpoint-every", type=_positive_int, default=defaults.checkpoint_every,
                      metavar="N", help=f"save every N steps (default {defaults.checkpoint_every})")
  parser.add_argument("--keep", type=_positive_int, default=defaults.keep_checkpoints, metavar="K",
                      help=f"keep the last K checkpoints (default {defaults.keep_checkpoints})")
  parser.add_argument("--devices", type=_positive_int, default=1, metavar="N",
                      help="data parallel over N devices, each taking batch-size/N images of every step (default 1). "
                      "On a CPU these are N CPU devices, one per core (shapjax.use_cpu_devices): the fast way to "
                      "train on a multi-core CPU. Same batches, same params to float tolerance")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_mesh(n_devices: int):
  """``None`` for one device; else a mesh of ``n_devices`` (on a CPU host, after splitting it into CPU devices).

  Several processes: a mesh over every process's devices, ``n_devices`` of them on each.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import shapjax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    if n_devices > 1:
      shapjax.use_cpu_devices(n_devices)
    if jax.local_device_count() < n_devices:
      raise _UsageError(f"--devices {n_devices}: this process has only {jax.local_device_count()} "
                        f"{jax.default_backend()} device(s)")
    return shapjax.make_mesh(devices=[d for d in jax.devices() if d.id in _first_local_ids(n_devices)])
  if n_devices == 1:
    return None
  try:
    shapjax.use_cpu_devices(n_devices)  # only shapes the CPU backend; accelerators keep their devices
  except RuntimeError:
    pass  # JAX already runs (e.g. shapjax.cli.main called from Python): use the devices it has
  if jax.device_count() < n_devices:
    raise _UsageError(f"--devices {n_devices}: this process has only {jax.device_count()} "
                      f"{jax.default_backend()} device(s)")
  return shapjax.make_mesh(n_devices)


def _first_local_ids(n_devices: int) -> set[int]:
  """The ids of the first ``n_devices`` devices of every process (the same count on each)."""
  import jax  # pylint: disable=g-import-not-at-top
  ids = set()
  for process in range(jax.process_count()):
    ids.update(sorted(d.id for d in jax.devices() if d.process_index == process)[:n_devices])
  return ids


def _run_train(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import shapjax  # pylint: disable=g-import-not-at-top

  if args.batch_size % args.devices:  # before _train_mesh splits the CPU, in the flags' own terms
    raise _UsageError(f"--batch-size ({args.batch_size}) must be a multiple of --devices ({args.devices})")
  if args.batch_size % (args.devices * args.num_processes):
    raise _UsageError(f"--batch-size ({args.batch_size}) must be a multiple of --devices times --num-processes "
                      f"({args.devices * args.num_processes})")
  if args.model == "inpainting" and args.latent_features_given:
    raise _UsageError("--latent-features is an option of the autoencoder, not of --model inpainting")
  for option in ("context", "ssim_weight", "gms_weight"):
    if args.model == "autoencoder" and getattr(args, f"{option}_given"):
      raise _UsageError(f"--{option.replace('_', '-')} is an option of --model inpainting")
  mesh = _train_mesh(args.devices)  # before any JAX computation: it may split the CPU into devices
  print(f"reading {Path(args.data_dir) / 'train' / 'good'} ...", file=sys.stderr, flush=True)
  split = shapjax.load_mvtec(args.data_dir, split="train", image_size=args.image_size)
  if args.model == "inpainting":
    options = {"features": args.features} if args.features_given else {}
    model_config = shapjax.InpainterConfig(image_shape=split.images.shape[1:], context=args.context,
                                           ssim_weight=args.ssim_weight, gms_weight=args.gms_weight, **options)
  else:
    model_config = shapjax.AutoencoderConfig(image_shape=split.images.shape[1:], features=args.features,
                                             latent_features=args.latent_features)
  warmup = _field_default(shapjax.TrainConfig, "warmup_steps")
  config = shapjax.TrainConfig(
      model=model_config, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
      warmup_steps=min(warmup, args.steps // 10), flips=args.flips, max_shift=args.max_shift,
      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, seed=args.seed)
  print(f"{len(split)} images of {split.images.shape[1:]}; model {model_config}", file=sys.stderr, flush=True)
  if mesh is not None:
    print(f"data parallel over {mesh.size} {jax.default_backend()} devices", file=sys.stderr, flush=True)
  shapjax.train(config, split.images, key=jax.random.key(args.seed), checkpoint_dir=args.out,
                resume=args.resume, progress=not args.quiet, mesh=mesh)
  if jax.process_index() == 0:
    print(f"checkpoint: {Path(args.out)}  (loss curve: {Path(args.out) / 'loss.png'})")
  return 0


# --- explain ----------------------------------------------------------------------------------------------------

def _add_explain(subparsers) -> None:
  from shapjax import attribution, masking, pipeline  # pylint: disable=g-import-not-at-top

  explain_files = pipeline.explain_files
  n_perm, regions = _default(explain_files, "n_perm"), _default(explain_files, "max_regions")
  baseline, top_k = _default(explain_files, "baseline"), _default(explain_files, "top_k")
  compactness = _default(explain_files, "compactness")
  parser = _add_parser(
      subparsers, "explain", _run_explain, help="Shapley values of superpixels and the pixel map for image files",
      description="For each IMAGE: resize it to the model's input size, split it into SLIC superpixels, estimate "
      "each region's Shapley value in the model's game (an autoencoder's reconstruction loss, an inpainter's "
      "inpainting error), compute the model's default pixel map (residual for an autoencoder, inpaint_grid for an "
      "inpainter), and write OUT_DIR/<name>.png (image, superpixels, value map, top regions outlined, pixel map) and "
      "OUT_DIR/<name>.json (per-region values and standard errors, the pixel map's name). Images inside an MVTec "
      "layout get their ground truth outlined and, for a defective image, the pixel AUROC of the value map and of "
      "the pixel map.")
  parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, BMP or TIFF files")
  parser.add_argument("--checkpoint", required=True, metavar="CKPT_DIR",
                      help="a checkpoint folder from 'shapjax train' (its latest step) or shapjax.save")
  parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (created)")
  parser.add_argument("--n-perm", type=_positive_int, default=n_perm, metavar="N",
                      help=f"sampled permutations per image (even; default {n_perm})")
  parser.add_argument("--regions", type=_positive_int, default=regions, metavar="R",
                      help=f"at most R superpixels (SLIC aims at R; default {regions})")
  parser.add_argument("--baseline", choices=masking.BASELINES, default=baseline,
                      help=f"what absent regions are replaced with in an autoencoder's game (default {baseline})")
  parser.add_argument("--top", type=_positive_int, default=top_k, metavar="K",
                      help=f"regions outlined (default {top_k})")
  parser.add_argument("--compactness", type=_positive_float, default=compactness, metavar="C",
                      help=f"SLIC compactness (default {compactness:g}); lower values weigh intensity more than "
                      "position")
  parser.add_argument("--seed", type=int, default=attribution.DEFAULT_KEY_SEED, metavar="K",
                      help=f"PRNG seed (default {attribution.DEFAULT_KEY_SEED})")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_explain(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import shapjax  # pylint: disable=g-import-not-at-top

  _check_sampling(args.n_perm, args.regions)
  params = shapjax.load(args.checkpoint)
  records = shapjax.explain_files(args.images, params=params, out_dir=args.out, n_perm=args.n_perm,
                                  max_regions=args.regions, key=jax.random.key(args.seed), baseline=args.baseline,
                                  top_k=args.top, compactness=args.compactness, progress=not args.quiet)
  for record in records:
    top = record["regions"][record["regions_by_value"][0]]
    additivity = "-" if record["additivity"] is None else f"{record['additivity']:.4f}"
    aurocs = "" if record["pixel_auroc_pixel_map"] is None else (
        f", pixel AUROC region values {record['pixel_auroc_region_values']:.3f} / {record['pixel_map']} "
        f"{record['pixel_auroc_pixel_map']:.3f}")
    print(f"{record['image']}: top region {top['id']} value {top['value']:+.3e} ± {top['stderr']:.1e}, "
          f"additivity {additivity}{aurocs} -> {record['figure']}")
  print(f"wrote {len(records)} figures and JSON files to {args.out}"
        + (f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""))
  return 0


# --- demo -------------------------------------------------------------------------------------------------------

def _add_demo(subparsers) -> None:
  from shapjax import pipeline  # pylint: disable=g-import-not-at-top

  seed = _default(pipeline.run_demo, "seed")
  parser = _add_parser(
      subparsers, "demo", _run_demo, help="the whole job on generated data (no downloads)",
      description="Build a small defect dataset from a texture scikit-image ships (crops with painted scratches "
      "and blobs whose masks are known), train an autoencoder and an inpainter, explain a few defective images "
      "with the inpainter (Shapley values of superpixels in its inpainting game, beside its inpaint_grid pixel "
      "map), score the inpaint_grid, residual, inpaint_shapley and inpaint_loo maps on the whole test split "
      "(image AUROC, pixel AUROC, AUPRO), and write the figures and a metrics summary. A few minutes on 2 CPU "
      "cores; --quick takes seconds.")
  parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")
  parser.add_argument("--quick", action="store_true", help="tiny images, model and sample (for tests)")
  parser.add_argument("--seed", type=int, default=seed, metavar="K", help=f"PRNG seed (default {seed})")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_demo(args) -> int:
  import shapjax  # pylint: disable=g-import-not-at-top

  config = shapjax.DemoConfig.quick() if args.quick else shapjax.DemoConfig()
  log = lambda message: print(message, file=sys.stderr, flush=True)
  summary = shapjax.run_demo(args.out, config=config, seed=args.seed, progress=not args.quiet, log=log)
  print((Path(args.out) / "summary.md").read_text())
  print(f"demo output in {Path(args.out).absolute()}: summary.md, summary.json, overview.png, explanations/, "
        f"checkpoint/autoencoder/loss.png, checkpoint/inpainter/loss.png ({summary['total_seconds']} s)")
  return 0


# --- evaluate ---------------------------------------------------------------------------------------------------

def _add_evaluate(subparsers) -> None:
  from shapjax import evaluation, masking  # pylint: disable=g-import-not-at-top

  seed = _default(evaluation.evaluate, "seed")
  parser = _add_parser(
      subparsers, "evaluate", _run_evaluate, help="score anomaly maps on a test split (AUROC, AUPRO)",
      description="Compute every anomaly map (residual, Shapley, ...) of DATA_DIR/test with the autoencoder in "
      "CKPT_DIR, print image AUROC, pixel AUROC, AUPRO@0.3 and seconds per image overall and per defect type, and "
      "write them to OUT.json. Per-image results are cached, so an interrupted run resumes.")
  parser.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder in the MVTec AD layout")
  parser.add_argument("--checkpoint", required=True, metavar="CKPT_DIR", help="a checkpoint folder")
  parser.add_argument("--maps", default=_joined(evaluation.DEFAULT_MAPS), metavar="M1,M2,...",
                      help=f"an autoencoder's maps from {_joined(evaluation.BASE_MAPS)} (default "
                      f"{_joined(evaluation.DEFAULT_MAPS)}); an inpainter's inpaint_grid, inpaint_<index>, "
                      f"inpaint_grid_x_<index> with index shapley, banzhaf, loo or beta_A_B, and residual with "
                      f"--reference (default {_joined(evaluation.INPAINT_DEFAULT_MAPS)}); Shapley and game maps may "
                      f"end in :constant or :shuffled (ablations)")
  parser.add_argument("--n-perm", type=_positive_int, default=evaluation.DEFAULT_N_PERM, metavar="N",
                      help=f"permutations per image (even; default {evaluation.DEFAULT_N_PERM})")
  parser.add_argument("--regions", default=_joined(evaluation.DEFAULT_REGIONS), metavar="R[,R2]",
                      help="SLIC regions per image; several numbers average several scales "
                      f"(default {_joined(evaluation.DEFAULT_REGIONS)})")
  parser.add_argument("--baseline", choices=("reconstruction", *masking.BASELINES),
                      default=evaluation.DEFAULT_BASELINE, help="what absent regions become "
                      f"(default {evaluation.DEFAULT_BASELINE})")
  parser.add_argument("--limit", type=_positive_int, default=_default(evaluation.evaluate, "limit"), metavar="K",
                      help="a fixed stratified subset of about K test images (default: all)")
  parser.add_argument("--json", required=True, metavar="OUT.json", help="results file (created)")
  parser.add_argument("--figures", default=None, metavar="DIR", help="write DIR/overlays.png")
  parser.add_argument("--reference", default=None, metavar="AE_DIR",
                      help="with an inpainter checkpoint: an autoencoder checkpoint at the same image size whose "
                      "residual map is scored beside the inpainter's maps")
  parser.add_argument("--cache", default=None, metavar="DIR",
                      help="per-image cache folder (default: OUT.json's folder/.shapjax_cache)")
  parser.add_argument("--seed", type=int, default=seed, metavar="K", help=f"PRNG seed (default {seed})")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_evaluate(args) -> int:
  import shapjax  # pylint: disable=g-import-not-at-top
  from shapjax import evaluation  # pylint: disable=g-import-not-at-top

  try:
    regions = tuple(int(r) for r in args.regions.split(","))
  except ValueError:
    raise _UsageError(f"--regions takes comma-separated integers, got {args.regions!r}") from None
  _check_sampling(args.n_perm, max(regions))
  maps = [m for m in args.maps.split(",") if m]
  try:
    for name in maps:
      evaluation.parse_map_name(name)
  except ValueError as error:
    raise _UsageError(f"--maps: {error}") from None
  cache = Path(args.cache) if args.cache else Path(args.json).absolute().parent / ".shapjax_cache"
  params = shapjax.load(args.checkpoint)
  reference = shapjax.load(args.reference) if args.reference else None
  result = shapjax.evaluate(params, args.data_dir, maps=maps, n_perm=args.n_perm, regions=regions,
                            baseline=args.baseline, seed=args.seed, limit=args.limit, cache_dir=cache,
                            figures_dir=args.figures, reference=reference, progress=not args.quiet)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # every process has the whole result: one of them writes it
    print(evaluation.format_table(result))
    evaluation.write_json(result, args.json)
    print(f"wrote {args.json}" + (f" and {Path(args.figures) / 'overlays.png'}" if args.figures else ""))
  return 0


# --- entry point ------------------------------------------------------------------------------------------------

_COMMANDS = (_add_train, _add_explain, _add_demo, _add_evaluate)


def build_parser() -> argparse.ArgumentParser:
  """The ``shapjax`` argument parser with every subcommand registered."""
  parser = argparse.ArgumentParser(
      prog=_PROG, formatter_class=_HelpFormatter, description="Where is an image anomalous? Shapley values of "
      "superpixels for an autoencoder's reconstruction loss, in JAX.")
  from shapjax import __version__  # pylint: disable=g-import-not-at-top
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  parser.add_argument("--compilation-cache", metavar="DIR", default=os.environ.get("SHAPJAX_COMPILATION_CACHE"),
                      help="keep compiled and traced programs in DIR, so the next run starts faster (default: "
                      "$SHAPJAX_COMPILATION_CACHE, else off)")
  from shapjax import devices  # pylint: disable=g-import-not-at-top
  several = parser.add_argument_group(
      "several processes", "run the command across processes (hosts): start it on every host with the same "
      "options but --process-id; the images are split across hosts, each output file written once")
  several.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0, where JAX's coordination service listens")
  several.add_argument("--num-processes", type=_positive_int, default=1, metavar="N",
                       help="number of processes (default 1)")
  several.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, in [0, N)")
  several.add_argument("--distributed", action="store_true",
                       help="let JAX find the coordinator, N and I (Cloud TPU pod slices, Slurm, Open MPI)")
  several.add_argument("--heartbeat-timeout", type=_positive_int, metavar="S",
                       default=devices.DEFAULT_HEARTBEAT_TIMEOUT,
                       help="a process silent for S seconds ends the run on every host (default %(default)s)")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for add in _COMMANDS:
    add(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the ``shapjax`` command line; returns the exit code (0 ok, 1 failure, 2 usage error)."""
  parser = build_parser()
  args = parser.parse_args(argv)  # exits with 2 on usage errors, printing the command's usage
  given = (args.coordinator is not None, args.process_id is not None, args.num_processes > 1)
  if any(given) and not all(given):
    parser.error("--coordinator, --num-processes (> 1) and --process-id go together")
  if args.distributed and any(given):
    parser.error("--distributed finds the processes itself: give it without --coordinator, --num-processes and "
                 "--process-id")
  if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must lie in [0, {args.num_processes}), got {args.process_id}")
  try:
    import jax  # pylint: disable=g-import-not-at-top
    if (args.distributed or all(given)) and not jax.distributed.is_initialized():  # (main called again)
      from shapjax import devices  # pylint: disable=g-import-not-at-top
      devices.initialize_processes(args.coordinator, args.num_processes if all(given) else None, args.process_id,
                                   heartbeat_timeout=args.heartbeat_timeout)
    if jax.distributed.is_initialized():  # jax.process_count() would start the backend: --devices must come first
      args.num_processes = jax.process_count()
    if args.compilation_cache:
      import shapjax  # pylint: disable=g-import-not-at-top

      shapjax.enable_compilation_cache(args.compilation_cache)
    return int(args.handler(args) or 0)
  except _UsageError as error:
    args.parser.print_usage(sys.stderr)
    print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
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
